"""Stage 2: train a student from a teacher's rows (a cache, or the teacher run online) with sparse KD + CE, or
plain SFT from a dataset. Single process, DDP or FSDP2; padded or packed batches."""
from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline import batching, checkpoint, distributed, losses, models, teachers
from pipeline.data import DataConfig, tokenized

LOSSES = ("ce",) + losses.KINDS + ("pg",)


@dataclass
class TrainConfig:
    student: str
    out: str
    loss: str = "fkl"
    cache: str | tuple[str, ...] | None = None
    mix: tuple[float, ...] = ()
    data: DataConfig | None = None
    teacher: str | None = None
    online_topk: int | None = None
    teacher_device_map: str | None = None
    init_from_config: bool = False
    tokenizer: str | None = None
    kd_ratio: float | None = None
    mu: float = 0.5
    beta: float = 0.5
    alpha: float = 0.1
    temperature: float = 1.0
    tail: str = "bucket"
    lr: float = 5e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    batch_size: int = 8
    batch_tokens: int | None = None
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int | None = None
    seed: int = 0
    packing: bool = False
    pack_length: int = 2048
    part_size: int = batching.DEFAULT_PART_SIZE
    fsdp: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    eval_cache: str | None = None
    eval_data: DataConfig | None = None
    eval_every: int = 0
    eval_samples: int = 256
    save_every: int = 0
    log_every: int = 10
    max_nonfinite: int = 10
    num_workers: int = 0
    num_proc: int = 1
    shuffle_window: int = 4
    device: str = "auto"
    dtype: str = "auto"
    resume: bool = False
    allow_tokenizer_mismatch: bool = False
    trust_remote_code: bool = False
    progress: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"unknown --loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        self.cache = (self.cache,) if isinstance(self.cache, str) else (tuple(self.cache) or None if self.cache else None)
        self.mix = tuple(self.mix or ())
        n = len(self.cache or ())
        if self.mix and not (len(self.mix) == n or (n == 2 and len(self.mix) == 1)):
            raise ValueError(f"--mix takes one share per --cache (or, with two caches, the second's share λ); "
                             f"got {len(self.mix)} for {n}")
        if n > 1 and not self.mix:
            raise ValueError(f"{n} caches need --mix: the share of each (GKD's λ for the second of two)")
        if self.cache and self.teacher:
            raise ValueError("give --cache (a cached teacher) or --teacher (run online), not both")
        if self.teacher and self.data is None:
            raise ValueError("--teacher runs the teacher online over --data; pass --data and its fields")
        if self.loss == "ce" and self.data is None and self.cache is None:
            raise ValueError("--loss ce needs --data (or --cache)")
        if self.loss != "ce" and self.cache is None and self.teacher is None:
            raise ValueError(f"--loss {self.loss} distills from a teacher: pass --cache, or --teacher with --data")
        if self.kd_ratio is None:
            self.kd_ratio = 0.0 if self.loss == "ce" else 1.0
        losses.check_params(self.loss if self.loss in losses.KINDS else "fkl", self.mu, self.beta, self.alpha)
        if self.tail not in losses.TAIL_MODES:
            raise ValueError(f"unknown --tail {self.tail!r}; choose {' or '.join(losses.TAIL_MODES)}")
        if not 0 <= self.kd_ratio <= 1:
            raise ValueError(f"--kd-ratio {self.kd_ratio} must lie in [0, 1]")
        if self.init_from_config and not self.tokenizer:
            raise ValueError("--init-from-config needs --tokenizer")
        if self.batch_size < 1 or self.grad_accum < 1 or (self.batch_tokens is not None and self.batch_tokens < 1):
            raise ValueError("--batch-size, --grad-accum and --batch-tokens must be at least 1")
        if self.packing and self.pack_length < 2:
            raise ValueError(f"--pack-length {self.pack_length} must be at least 2")


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def load_student(cfg: TrainConfig, device):
    from transformers import AutoConfig, AutoModelForCausalLM
    tok = models.load_tokenizer(cfg.tokenizer or cfg.student, cfg.trust_remote_code)
    extra = {"attn_implementation": cfg.attn_implementation} if cfg.attn_implementation else {}
    if cfg.init_from_config:
        torch.manual_seed(cfg.seed)
        config = AutoConfig.from_pretrained(cfg.student, trust_remote_code=cfg.trust_remote_code)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=cfg.trust_remote_code,
                                                 **extra)
        model = model.to(device)
    else:
        model = models.load_model(cfg.student, torch.float32, device, cfg.trust_remote_code, **extra)
    return model, tok


def check_teacher_compatible(fingerprint: str, vocab_size: int, max_id: int, tok, model, cfg, what="cache") -> int:
    """The softmax size; refuses a teacher whose vocabulary the student cannot use, with the reason."""
    vocab = models.check_vocab(model, tok, "student")
    if max_id >= vocab or vocab_size > models.output_size(model):
        raise ValueError(f"the {what} holds token ids up to {max(max_id, vocab_size - 1)} but the student's "
                         f"vocabulary has {vocab}; distill into a student that shares the teacher's tokenizer")
    if models.tokenizer_fingerprint(tok) != fingerprint:
        if not cfg.allow_tokenizer_mismatch:
            raise ValueError(f"the student's tokenizer differs from the {what}'s; pass --allow-tokenizer-mismatch "
                             "if the ids really mean the same tokens")
        warnings.warn(f"student tokenizer differs from the {what}'s; continuing (--allow-tokenizer-mismatch)")
    if vocab_size != vocab and not cfg.allow_tokenizer_mismatch:
        raise ValueError(f"the {what}'s softmax runs over {vocab_size} tokens, the student's tokenizer has {vocab}")
    return vocab


HEAD_NEEDED = ("rkl", "srkl", "tvd", "akl")     # losses whose terms keep the tail as one exact bucket


def make_teacher(cfg: TrainConfig, data: DataConfig | None, cache: str | None, tok, model, device, online_model=None):
    """The teacher for a split: its cache, the online teacher over its data, or none (SFT)."""
    if cache:
        caches = (cache,) if isinstance(cache, str) else tuple(cache)
        if len(caches) == 1:
            t = teachers.CachedTeacher(caches[0], cfg.temperature)
        else:
            shares = cfg.mix if len(cfg.mix) == len(caches) else (1 - cfg.mix[0], cfg.mix[0])
            t = teachers.MixedCaches(caches, shares, cfg.temperature)
        for m in getattr(t, "manifests", [t.manifest]):
            check_teacher_compatible(m["identity"]["tokenizer"]["fingerprint"], m["vocab_size"],
                                     m["counts"].get("max_token_id", -1), tok, model, cfg)
        sources = getattr(t.source, "sources", [t.source])
        if cfg.loss in HEAD_NEEDED and any(s.cache.encoding.get("top_p") == 0 and s.cache.encoding.get("min_k") == 0
                                           for s in sources):
            raise ValueError(f"--loss {cfg.loss} weighs the bins by the student's probabilities, and a cache without a "
                             "head (--top-p 0 --min-k 0: tail draws only) gives it no signal; use fkl, sfkl or jsd, "
                             "or a cache with a head (--top-p 0.5 --tail-draws 24)")
        if cfg.loss == "pg" and not all(s.cache.has_target_logprob for s in sources):
            raise ValueError("--loss pg needs the teacher's log-prob of each sampled token: a version-2 cache of "
                             "generated data (cache-teacher stores target_logprob)")
        return t
    source = batching.TokenizedSource(tokenized(data, tok, cfg.num_proc, cfg.progress), cfg.part_size)
    if online_model is None:
        return teachers.Teacher(source)
    return teachers.OnlineTeacher(source, online_model, len(tok), cfg.online_topk, cfg.temperature)


def load_online_teacher(cfg: TrainConfig, tok, model, device):
    t_tok = models.load_tokenizer(cfg.teacher, cfg.trust_remote_code)
    teacher = distributed.load_teacher(cfg.teacher, models.resolve_dtype(cfg.dtype, device), device,
                                       device_map=cfg.teacher_device_map, trust_remote_code=cfg.trust_remote_code)
    models.check_vocab(teacher, t_tok, "teacher")
    check_teacher_compatible(models.tokenizer_fingerprint(t_tok), len(t_tok), len(t_tok) - 1, tok, model, cfg,
                             "teacher")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(student, b, autocast: bool):
    """The student's logits at the batch's distilled positions."""
    device_type = b["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        return student(b["input_ids"], b.get("attention_mask"), b["rows"], b["cols"], b.get("position_ids"))


def loss_params(cfg: TrainConfig) -> dict:
    return {"mu": cfg.mu, "beta": cfg.beta, "alpha": cfg.alpha, "temperature": cfg.temperature, "tail": cfg.tail}


def run(cfg: TrainConfig) -> dict:
    rank, world = distributed.init()
    device = models.resolve_device(cfg.device)
    bf16 = device.type == "cuda" and models.resolve_dtype(cfg.dtype, device) == torch.bfloat16
    out = Path(cfg.out)
    torch.manual_seed(cfg.seed)
    model, tok = load_student(cfg, device)
    online = load_online_teacher(cfg, tok, model, device) if cfg.teacher else None
    teacher = make_teacher(cfg, cfg.data, cfg.cache, tok, model, device, online)
    vocab = models.check_vocab(model, tok, "student")
    student = distributed.Student(models.PositionLogits(model, vocab), model, world=world, fsdp=cfg.fsdp,
                                  bf16=bf16 and cfg.fsdp, gradient_checkpointing=cfg.gradient_checkpointing)
    autocast = bf16 and not cfg.fsdp
    pack = cfg.pack_length if cfg.packing else None
    plan = lambda epoch: batching.epoch_plan(teacher.source, cfg.seed, epoch, cfg.batch_size, cfg.batch_tokens,
                                             cfg.shuffle_window, world, packed=cfg.packing)
    steps_per_epoch = math.ceil(len(plan(0)) / cfg.grad_accum)
    if steps_per_epoch == 0:
        raise ValueError(f"no batch fits: {len(teacher.source)} samples for batch size {cfg.batch_size} on {world} ranks")
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, total, cfg.min_lr_ratio))

    state = {"epoch": 0, "step_in_epoch": 0, "nonfinite": 0, "tokens": 0}
    step = 0
    ckpt_dir = out / "checkpoints"
    if cfg.resume and (last := checkpoint.latest(ckpt_dir)) is not None:
        saved = json.loads((out / "config.json").read_text())
        if saved != _config_json(cfg):
            diff = [k for k in saved if saved[k] != _config_json(cfg).get(k) and k not in ("resume", "progress")]
            if diff:
                raise ValueError(f"--resume with different settings than the run in {out}: {', '.join(diff)}")
        loaded = checkpoint.load(last, student, opt, sched)
        step = loaded.pop("step")
        state.update(loaded)
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", step)
    elif rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(_config_json(cfg), indent=1))
        (out / "metrics.jsonl").write_text("")
    eval_teacher = None
    if cfg.eval_cache or cfg.eval_data:
        eval_teacher = make_teacher(cfg, cfg.eval_data, cfg.eval_cache, tok, model, device, online)

    model.train()
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.loss}", unit="step", disable=not cfg.progress or rank > 0)
    log, t_log, tok_log = {}, time.perf_counter(), 0
    t_start = time.perf_counter()
    while step < total:
        batches = plan(state["epoch"])
        first = state["step_in_epoch"] * cfg.grad_accum
        mine = [b[rank::world] for b in batches[first:]]
        loader = torch.utils.data.DataLoader(
            batching.IndexDataset(teacher.source), batch_sampler=mine, num_workers=cfg.num_workers,
            collate_fn=lambda s: batching.collate(s, tok.pad_token_id, pack), pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed + state["epoch"]),   # not the global RNG: resume
            persistent_workers=False, prefetch_factor=4 if cfg.num_workers else None)
        it = iter(loader)
        while step < total and state["step_in_epoch"] < steps_per_epoch:
            group = [b for _, b in zip(range(cfg.grad_accum), it)]
            sums = _train_step(cfg, student, teacher, group, device, autocast, world)
            state["step_in_epoch"] += 1
            finite = math.isfinite(sums["loss"])
            if finite:
                if cfg.grad_clip:
                    sums["grad_norm"] = student.clip_grad_norm(cfg.grad_clip)
                opt.step()
            else:
                state["nonfinite"] += 1
                warnings.warn(f"non-finite loss at step {step + 1}; step skipped ({state['nonfinite']} so far)")
                if state["nonfinite"] > cfg.max_nonfinite:
                    raise RuntimeError(f"{state['nonfinite']} non-finite losses (more than --max-nonfinite "
                                       f"{cfg.max_nonfinite}); lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            state["tokens"] += sums["tokens"]
            tok_log += sums["tokens"]
            for k, v in sums.items():
                log[k] = log.get(k, 0.0) + v
            log["n"] = log.get("n", 0) + 1
            bar.update(1)
            if rank == 0 and (step % cfg.log_every == 0 or step == total):
                dt = time.perf_counter() - t_log
                row = {"step": step, "epoch": state["epoch"], "lr": sched.get_last_lr()[0],
                       "tokens_per_s": tok_log / dt if dt > 0 else None, "nonfinite": state["nonfinite"],
                       **{k: v / log["n"] for k, v in log.items() if k not in ("n", "tokens")}}
                _append(out / "metrics.jsonl", row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                log, t_log, tok_log = {}, time.perf_counter(), 0
            if eval_teacher is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                row = evaluate_teacher(cfg, student, model, eval_teacher, tok, device, autocast)
                if rank == 0:
                    _append(out / "metrics.jsonl", {"step": step, **row})
            if cfg.save_every and step % cfg.save_every == 0 and step < total:
                checkpoint.save(ckpt_dir, step, student, opt, sched, state)
        if state["step_in_epoch"] >= steps_per_epoch:
            state["epoch"] += 1
            state["step_in_epoch"] = 0
    bar.close()
    summary = {"steps": step, "nonfinite": state["nonfinite"], "tokens": state["tokens"],
               "seconds": time.perf_counter() - t_start, "world_size": world}
    full = student.full_state_dict()
    if rank == 0:
        model.save_pretrained(out / "final", state_dict=full)
        tok.save_pretrained(out / "final")
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    distributed.barrier()
    return summary


def _train_step(cfg, student, teacher, group, device, autocast, world) -> dict:
    """Forward/backward every micro-batch of one optimizer step, normalized by the step's global item count."""
    n_items, n_tokens = distributed.all_sum([sum(int(len(b["rows"])) for b in group),
                                             sum(int(b["tokens"]) for b in group)])
    n_items, n_tokens = max(1.0, n_items), int(n_tokens)
    sums: dict[str, float] = {}
    for i, batch in enumerate(group):
        with student.sync(i == len(group) - 1):
            b = to_device(batch, device)
            parts = losses.batch_losses(forward(student, b, autocast), b, teacher.rows(b), cfg.loss, **loss_params(cfg))
            kd = parts.get("kd", torch.zeros((), device=device))
            loss = losses.mix(parts["ce"], kd, cfg.kd_ratio) / n_items
            (loss * world).backward()
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    names = sorted(sums)
    sums = dict(zip(names, distributed.all_sum([sums[k] for k in names])))
    out = {k: v / n_items for k, v in sums.items()}
    out["loss"] = (1 - cfg.kd_ratio) * out["ce"] + cfg.kd_ratio * out.get("kd", 0.0)
    out["tokens"] = n_tokens
    return out


@torch.no_grad()
def score(student, model, teacher, pad_id, device, kinds=("fkl",), max_samples=None, batch_size=8, autocast=False,
          **params) -> dict:
    """Mean CE and (with teacher rows) the mean divergence of each kind, per distilled token, in eval mode; one
    forward per batch serves every kind."""
    was_training = model.training
    model.eval()
    source = teacher.source
    n = len(source) if max_samples is None else min(len(source), max_samples)
    totals, items = {}, 0
    for a in range(0, n, batch_size):
        b = to_device(batching.collate([source[i] for i in range(a, min(n, a + batch_size))], pad_id), device)
        logits, rows = forward(student, b, autocast), teacher.rows(b)
        items += len(b["rows"])
        for j, kind in enumerate(kinds or ("ce",)):
            parts = losses.batch_losses(logits, b, rows, kind, **params)
            if j == 0:
                totals["ce"] = totals.get("ce", 0.0) + float(parts["ce"])
            if "kd" in parts:
                totals[kind] = totals.get(kind, 0.0) + float(parts["kd"])
    model.train(was_training)
    return {k: v / max(1, items) for k, v in totals.items()} | {"positions": items}


def evaluate_teacher(cfg, student, model, teacher, tok, device, autocast) -> dict:
    """eval_ce; with teacher rows also eval_kd (the run's loss kind) and eval_fkl, comparable across runs."""
    kind = "fkl" if cfg.loss in ("ce", "pg") else cfg.loss
    row = score(student, model, teacher, tok.pad_token_id, device, tuple(dict.fromkeys([kind, "fkl"])),
                cfg.eval_samples, cfg.batch_size, autocast, **loss_params(cfg))
    out = {"eval_ce": row["ce"]}
    if kind in row:
        out.update(eval_kd=row[kind], eval_fkl=row["fkl"])
        out[f"eval_{kind}"] = row[kind]
    return out


def _config_json(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d.pop("resume")
    d.pop("progress")
    return json.loads(json.dumps(d, default=str))


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        rows = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
