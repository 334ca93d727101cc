"""Stage 2: train a student from a teacher's fields (a cache, or the teacher run online) with sparse KD + CE, or
plain SFT from a dataset. Single process, DDP or FSDP2; padded or packed batches."""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import storage
from pipeline import batches, checkpoint, config, losses, models, parallel, run_folder, scoring, sources, teachers
from pipeline.config import DataConfig, TrainConfig
from pipeline.data import tokenized
from pipeline.errors import Diverged, OptionError


def lr_lambda(warmup: int, total: int, min_ratio: float):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def make_teacher(
    cfg: TrainConfig,
    data: DataConfig | None,
    cache: str | None,
    tok,
    model,
    device,
    online_model=None,
    kind: str | None = None,
):
    """The teacher for a split (its cache, the online teacher over its data, or none: SFT), checked to serve the loss
    `kind` (default: the run's)."""
    if cache and (kind or cfg.loss.kind) in config.CROSS_KINDS:
        return cross_tokenizer_teacher(cfg, data, (cache,) if isinstance(cache, str) else tuple(cache), tok, kind)
    if cache:
        t = teachers.cached((cache,) if isinstance(cache, str) else tuple(cache), cfg.teacher.mix, cfg.loss.temperature)
        teachers.check_caches_readable(t.source, tok, model, cfg.teacher.allow_tokenizer_mismatch)
        teachers.check_serves(
            t.source,
            kind or cfg.loss.kind,
            beta=cfg.loss.beta,
            tail=cfg.loss.tail,
            allow_offpolicy_pg=cfg.loss.allow_offpolicy_pg,
        )
        return t
    source = sources.TokenizedSource(tokenized(data, tok, cfg.scale.num_proc, cfg.progress), cfg.batches.part_size)
    if online_model is None:
        return teachers.Teacher(source)
    return teachers.OnlineTeacher(source, online_model, len(tok), cfg.teacher.online_topk, cfg.loss.temperature)


def cross_tokenizer_teacher(cfg: TrainConfig, data: DataConfig | None, caches: tuple, tok, kind: str | None):
    """The caches' rows aligned to the student's tokenization of their texts (the student's --max-length, or the
    first cache's); gold and pkl also map the teacher's vocabulary onto the student's (--teacher-tokenizer, or the
    cache's teacher)."""
    first = storage.open_cache(caches[0]).manifest
    max_length = data.max_length if data else first["identity"]["dataset"]["max_length"]
    teacher_tok = None
    kind = kind or cfg.loss.kind
    if kind in ("gold", "pkl"):
        name = cfg.teacher.teacher_tokenizer or first["identity"]["teacher"]["name_or_path"]
        teacher_tok = models.load_tokenizer(name, cfg.trust_remote_code)
    return teachers.cross_tokenizer(caches, cfg.teacher.mix, cfg.loss.temperature, tok, max_length, teacher_tok, kind)


def load_online_teacher(cfg: TrainConfig, tok, model, device):
    t_tok = models.load_tokenizer(cfg.teacher.model, cfg.trust_remote_code)
    teacher = models.load_teacher(
        cfg.teacher.model,
        models.resolve_dtype(cfg.scale.dtype, device),
        device,
        device_map=cfg.teacher.device_map,
        trust_remote_code=cfg.trust_remote_code,
    )
    models.check_vocab(teacher, t_tok, "teacher")
    teachers.check_compatible(
        teachers.model_vocabulary(t_tok), tok, model, cfg.teacher.allow_tokenizer_mismatch, "teacher"
    )
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@dataclass
class Run:
    """What the training loop works with, built once by setup()."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    tok: object
    student: parallel.Student
    teacher: teachers.Teacher
    eval_teacher: teachers.Teacher | None
    autocast: bool
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    total: int
    folder: run_folder.RunFolder

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    def plan(self, epoch: int) -> list[list[int]]:
        c = self.cfg
        return self.teacher.source.plan(
            c.seed,
            epoch,
            c.batches.batch_size,
            c.batches.batch_tokens,
            c.batches.shuffle_window,
            self.world,
            packed=c.batches.packing,
        )


def run(cfg: TrainConfig) -> dict:
    r = setup(cfg)
    with r.folder.owned(r.rank == 0):
        if r.rank == 0:
            r.folder.start(cfg.resume, cfg.overwrite, checkpoint.latest_step(r.out / "checkpoints"))
            checkpoint.remove_stale(r.out / "checkpoints")
        parallel.barrier()
        state = restore(r)
        summary = loop(r, state)
        full = r.student.full_state_dict()
        if r.rank == 0:
            checkpoint.save_final(r.out / "final", r.model, r.tok, full)
            (r.out / "summary.json").write_text(json.dumps(summary, indent=1))
    parallel.barrier()
    return summary


def setup(cfg: TrainConfig) -> Run:
    """Process group, student, teachers (checked to serve the loss), optimizer and schedule, run folder."""
    rank, world = parallel.init()
    run_folder.check_apart(cfg.out, input_paths(cfg))
    device = models.resolve_device(cfg.scale.device)
    bf16 = device.type == "cuda" and models.resolve_dtype(cfg.scale.dtype, device) == torch.bfloat16
    torch.manual_seed(cfg.seed)
    model, tok = models.load_student(
        cfg.student,
        device,
        tokenizer=cfg.tokenizer,
        init_from_config=cfg.init_from_config,
        seed=cfg.seed,
        attn_implementation=cfg.scale.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
    )
    online = load_online_teacher(cfg, tok, model, device) if cfg.teacher.model else None
    teacher = make_teacher(cfg, cfg.data, cfg.teacher.cache, tok, model, device, online)
    eval_teacher = None
    if cfg.evaluation.eval_cache or cfg.evaluation.eval_data:
        eval_teacher = make_teacher(
            cfg, cfg.evaluation.eval_data, cfg.evaluation.eval_cache, tok, model, device, online, eval_kind(cfg)
        )
    folder = run_folder.RunFolder(cfg.out, _config_json(cfg), input_fingerprints(cfg, teacher, eval_teacher))
    vocab = models.check_vocab(model, tok, "student")
    student = parallel.Student(
        models.PositionLogits(model, vocab),
        model,
        world=world,
        fsdp=cfg.scale.fsdp,
        bf16=bf16 and cfg.scale.fsdp,
        gradient_checkpointing=cfg.scale.gradient_checkpointing,
    )
    n_batches = len(
        teacher.source.plan(
            cfg.seed,
            0,
            cfg.batches.batch_size,
            cfg.batches.batch_tokens,
            cfg.batches.shuffle_window,
            world,
            packed=cfg.batches.packing,
        )
    )
    steps_per_epoch = math.ceil(n_batches / cfg.batches.grad_accum)
    if steps_per_epoch == 0:
        raise OptionError(
            f"no batch fits: {len(teacher.source)} samples for batch size {cfg.batches.batch_size} on {world} ranks"
        )
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    opt, sched = optimizer(cfg, model, total)
    autocast = bf16 and not cfg.scale.fsdp
    return Run(cfg, rank, world, device, model, tok, student, teacher, eval_teacher, autocast, opt, sched,
               steps_per_epoch, total, folder)  # fmt: skip


def optimizer(cfg: TrainConfig, model, total: int):
    """AdamW (no weight decay on biases and norms) and the warmup-cosine schedule over `total` steps."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optimizer.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.optimizer.lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda(cfg.optimizer.warmup_steps, total, cfg.optimizer.min_lr_ratio)
    )


def restore(r: Run) -> dict:
    """The loop's state: fresh, or the latest checkpoint's (model, optimizer, schedule and RNGs restored in place)."""
    state = {"step": 0, "epoch": 0, "step_in_epoch": 0, "nonfinite": 0, "tokens": 0}
    if r.cfg.resume:
        state.update(checkpoint.load(checkpoint.latest(r.out / "checkpoints"), r.student, r.opt, r.sched))
        if r.rank == 0:
            _truncate_metrics(r.out / "metrics.jsonl", state["step"])
    return state


def loop(r: Run, state: dict) -> dict:
    """Optimizer steps until the total, epoch by epoch, from where `state` stands; returns the summary."""
    cfg = r.cfg
    r.model.train()
    log = Log()
    t_start = time.perf_counter()
    with tqdm(
        total=r.total,
        initial=state["step"],
        desc=f"train {cfg.loss.kind}",
        unit="step",
        disable=not cfg.progress or r.rank > 0,
    ) as bar:
        while state["step"] < r.total:
            it = iter(loader(r, state))
            while state["step"] < r.total and state["step_in_epoch"] < r.steps_per_epoch:
                group = [b for _, b in zip(range(cfg.batches.grad_accum), it)]
                sums = _train_step(cfg, r.student, r.teacher, group, r.device, r.autocast, r.world)
                optimizer_step(r, state, sums)
                bar.update(1)
                after_step(r, state, sums, log, bar)
            if state["step_in_epoch"] >= r.steps_per_epoch:
                state["epoch"] += 1
                state["step_in_epoch"] = 0
    return {
        "steps": state["step"],
        "nonfinite": state["nonfinite"],
        "tokens": state["tokens"],
        "seconds": time.perf_counter() - t_start,
        "world_size": r.world,
    }


def loader(r: Run, state: dict) -> torch.utils.data.DataLoader:
    """This rank's share of the rest of the epoch's micro-batches, collated (padded or packed)."""
    cfg, pack = r.cfg, r.cfg.batches.pack_length if r.cfg.batches.packing else None
    first = state["step_in_epoch"] * cfg.batches.grad_accum
    mine = [b[r.rank :: r.world] for b in r.plan(state["epoch"])[first:]]
    return torch.utils.data.DataLoader(
        r.teacher.source,
        batch_sampler=mine,
        num_workers=cfg.batches.num_workers,
        collate_fn=lambda s: batches.collate(s, r.tok.pad_token_id, pack),
        pin_memory=r.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed + state["epoch"]),  # not the global RNG: resume
        persistent_workers=False,
        prefetch_factor=4 if cfg.batches.num_workers else None,
    )


def optimizer_step(r: Run, state: dict, sums: dict) -> None:
    """Clip and step on a finite loss; skip a non-finite one (up to --max-nonfinite). The schedule always advances,
    so a resumed run stays on the same schedule."""
    cfg = r.cfg
    state["step_in_epoch"] += 1
    if math.isfinite(sums["loss"]):
        if cfg.optimizer.grad_clip:
            sums["grad_norm"] = r.student.clip_grad_norm(cfg.optimizer.grad_clip)
        r.opt.step()
    else:
        state["nonfinite"] += 1
        warnings.warn(f"non-finite loss at step {state['step'] + 1}; step skipped ({state['nonfinite']} so far)")
        if state["nonfinite"] > cfg.optimizer.max_nonfinite:
            raise Diverged(
                f"{state['nonfinite']} non-finite losses (more than --max-nonfinite {cfg.optimizer.max_nonfinite}); "
                "lower --lr or check the data"
            )
    r.opt.zero_grad(set_to_none=True)
    r.sched.step()
    state["step"] += 1
    state["tokens"] += sums["tokens"]


class Log:
    """Sums of a step's figures since the last metrics row, and the time they took."""

    def __init__(self):
        self.sums, self.n, self.tokens, self.t = {}, 0, 0, time.perf_counter()

    def add(self, sums: dict) -> None:
        for k, v in sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        self.tokens += sums["tokens"]

    def row(self) -> dict:
        dt = time.perf_counter() - self.t
        out = {
            "tokens_per_s": self.tokens / dt if dt > 0 else None,
            **{k: v / self.n for k, v in self.sums.items() if k != "tokens"},
        }
        self.__init__()
        return out


def after_step(r: Run, state: dict, sums: dict, log: Log, bar) -> None:
    """Metrics every --log-every steps, held-out scores every --eval-every, a checkpoint every --save-every."""
    cfg, step = r.cfg, state["step"]
    log.add(sums)
    if r.rank == 0 and (step % cfg.log_every == 0 or step == r.total):
        row = {
            "step": step,
            "epoch": state["epoch"],
            "lr": r.sched.get_last_lr()[0],
            "nonfinite": state["nonfinite"],
            **log.row(),
        }
        _append(r.out / "metrics.jsonl", row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
    if (
        r.eval_teacher is not None
        and cfg.evaluation.eval_every
        and (step % cfg.evaluation.eval_every == 0 or step == r.total)
    ):
        row = evaluate_teacher(cfg, r.student, r.model, r.eval_teacher, r.tok, r.device, r.autocast)
        if r.rank == 0:
            _append(r.out / "metrics.jsonl", {"step": step, **row})
    if cfg.save_every and step % cfg.save_every == 0 and step < r.total:
        checkpoint.save(
            r.out / "checkpoints", step, r.student, r.opt, r.sched, {k: v for k, v in state.items() if k != "step"}
        )


def _train_step(cfg, student, teacher, group, device, autocast, world) -> dict:
    """Forward/backward every micro-batch of one optimizer step, normalized by the step's global item count."""
    n_items, n_tokens = parallel.all_sum(
        [sum(int(len(b["row_index"])) for b in group), sum(int(b["tokens"]) for b in group)]
    )
    n_items, n_tokens = max(1.0, n_items), int(n_tokens)
    sums: dict[str, float] = {}
    for i, batch in enumerate(group):
        with student.sync(i == len(group) - 1):
            b = scoring.to_device(batch, device)
            terms = losses.batch_losses(
                scoring.forward(student, b, autocast), b, teacher.fields(b), cfg.loss.kind, **cfg.loss.params
            )
            kd = terms.get("kd", torch.zeros((), device=device))
            loss = losses.mix(terms["ce"], kd, cfg.loss.kd_ratio) / n_items
            (loss * world).backward()
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
    names = sorted(sums)
    sums = dict(zip(names, parallel.all_sum([sums[k] for k in names])))
    out = {k: v / n_items for k, v in sums.items()}
    out["loss"] = (1 - cfg.loss.kd_ratio) * out["ce"] + cfg.loss.kd_ratio * out.get("kd", 0.0)
    out["tokens"] = n_tokens
    return out


def eval_kind(cfg) -> str:
    """The divergence held-out rows are scored with: the run's, or fkl for CE and the policy gradient."""
    return "fkl" if cfg.loss.kind in ("ce", "pg") else cfg.loss.kind


def eval_kinds(cfg) -> tuple:
    """eval_kind, and fkl beside it where the teacher's ids are the student's."""
    kind = eval_kind(cfg)
    return (kind,) if kind in config.CROSS_KINDS else tuple(dict.fromkeys([kind, "fkl"]))


def evaluate_teacher(cfg, student, model, teacher, tok, device, autocast) -> dict:
    """eval_ce; with teacher rows also eval_kd (the run's loss kind) and eval_fkl, comparable across runs."""
    kind = eval_kind(cfg)
    row = scoring.score(
        student,
        model,
        teacher,
        tok.pad_token_id,
        device,
        eval_kinds(cfg),
        cfg.evaluation.eval_samples,
        cfg.batches.batch_size,
        autocast,
        **cfg.loss.params,
    )
    out = {"eval_ce": row["ce"]}
    if kind in row:
        out.update(eval_kd=row[kind], **({"eval_fkl": row["fkl"]} if "fkl" in row else {}))
        out[f"eval_{kind}"] = row[kind]
    return out


SINCE = {"text_end": "eos"}  # data settings added after runs were first saved, at what earlier versions did
# and run settings (--gguf-file joins the student)
SINCE_RUN = {"teacher_tokenizer": None, "gguf_file": None, "alm_tau": 1.0}


def _config_json(cfg: TrainConfig) -> dict:
    """The run's settings as flat option values (what --resume compares), without how the run was invoked; a setting
    added since is left out where it is what earlier versions did, so that their runs still resume."""
    d = config.flat(cfg)
    for key in run_folder.IGNORED:
        d.pop(key)
    d["cache"] = d["cache"] or None
    for key, value in SINCE_RUN.items():
        if d.get(key) == value:
            d.pop(key)
    for data in (d["data"], d["eval_data"]):
        for key, value in SINCE.items():
            if data is not None and data.get(key) == value:
                data.pop(key)
    return json.loads(json.dumps(d, default=str))


def input_paths(cfg: TrainConfig) -> dict:
    """The run's inputs on disk, by the option that names them (an --out may be none of them)."""
    out = {
        "--student": cfg.student,
        "--tokenizer": cfg.tokenizer,
        "--teacher": cfg.teacher.model,
        "--eval-cache": cfg.evaluation.eval_cache,
        "--data": cfg.data and cfg.data.source,
        "--eval-data": cfg.evaluation.eval_data and cfg.evaluation.eval_data.source,
    }
    return out | {f"--cache {c}": c for c in cfg.teacher.cache or ()}


def input_fingerprints(cfg: TrainConfig, teacher, eval_teacher) -> dict:
    """What the run depends on, pinned for --resume: its sources' content keys and the models' weights."""
    pins = {"train": teacher.source.fingerprint(), "student": models.weights_fingerprint(cfg.student)}
    if cfg.teacher.model:
        pins["teacher"] = models.weights_fingerprint(cfg.teacher.model)
    if eval_teacher is not None:
        pins["eval"] = eval_teacher.source.fingerprint()
    return pins


def _append(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int) -> None:
    if path.exists():
        rows = [l for l in path.read_text().splitlines() if l and json.loads(l)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
