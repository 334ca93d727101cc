"""A teacher cache inside a Hugging Face Trainer / TRL / Accelerate stack: a dataset, a collator and a loss.

    from pipeline.hf import CacheDataset, DistillCollator, distill_loss
    args = TrainingArguments(..., remove_unused_columns=False)     # the collator needs the cache's fields
    trainer = Trainer(model=student, args=args, train_dataset=CacheDataset("cache/dolly"),
                      data_collator=DistillCollator(tokenizer), compute_loss_func=distill_loss("akl"))

How the pieces meet Trainer:
- DistillCollator puts the model's inputs in the batch (input_ids and attention_mask, or position_ids when packing)
  plus `logits_to_keep`: the columns where some row has a distilled position, so the model's own forward computes
  the lm_head only there (through every wrapper: DDP, FSDP, DeepSpeed, PEFT). Packed into one row, that is exactly
  the distilled positions; padded, it is their union over the rows.
- `labels` is a DistillLabels: a dict of the positions, targets and teacher rows that answers Trainer's item count
  like causal-LM labels (-100 where nothing is distilled), so Trainer's gradient accumulation divides by the
  distilled tokens of the whole accumulated batch, across devices too — as `pipeline train` does.
- distill_loss(...) is a `compute_loss_func`: the mixed loss (1 − kd_ratio)·CE + kd_ratio·KD, summed over the
  positions and divided by that count. DistillTrainer does the same for versions without `compute_loss_func`, and
  follows the cache's epoch plan (CacheDataset.plan_sampler) for batches identical to `pipeline train`'s.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from pipeline import batches, cross_tokenizer, losses, sources
from pipeline.config import CROSS_KINDS
from pipeline.errors import OptionError
from storage import tables


class CacheDataset(torch.utils.data.Dataset):
    """A teacher cache as a map-style dataset: item i is stored sample i (numpy arrays: input_ids, loss_mask and the
    teacher rows) at the chosen cached temperature. Parts are read on demand. With a `tokenizer` that is not the
    teacher's, item i is the sample's text in that tokenizer's tokens with the teacher's fields per aligned chunk
    (pipeline.cross_tokenizer; for distill_loss("uld" | "gold" | "alm")), or with the `teacher_tokenizer` too, the
    teacher's rows projected onto the student's vocabulary at every position (for distill_loss("pkl"))."""

    def __init__(self, path, temperature=None, tokenizer=None, max_length: int | None = None, teacher_tokenizer=None):
        if teacher_tokenizer is not None and tokenizer is None:
            raise OptionError("CacheDataset(teacher_tokenizer=…) projects onto the student's tokens: pass tokenizer=…")
        self.source = sources.CacheSource(path, temperature)
        self.cache = self.source.cache
        if tokenizer is not None:
            length = max_length or self.cache.manifest["identity"]["dataset"]["max_length"]
            project = cross_tokenizer.projection(teacher_tokenizer, tokenizer) if teacher_tokenizer else None
            self.source = cross_tokenizer.CrossTokenizerSource(self.source, tokenizer, length, projection=project)

    def __len__(self):
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i]

    @property
    def sketch_basis(self) -> torch.Tensor | None:
        """The teacher sketch's basis [r + 1, V] for distill_loss(sketch_basis=…), or None without a sketch."""
        sketch = self.cache.sketch()
        return None if sketch is None else torch.from_numpy(sketch["basis"])

    def plan_sampler(self, seed: int = 0, batch_size: int = 8, shuffle_window: int = 4, epochs: int = 1000):
        """A sampler yielding the samples in `pipeline train`'s order (per-epoch block shuffle, micro-batches of
        batch_size), epoch after epoch; batched by batch_size, it gives pipeline train's batches."""
        source = self.source

        class PlanSampler(torch.utils.data.Sampler):
            def __len__(self):
                return epochs * sum(map(len, source.plan(seed, 0, batch_size, None, shuffle_window, 1)))

            def __iter__(self):
                for epoch in range(epochs):
                    for batch in source.plan(seed, epoch, batch_size, None, shuffle_window, 1):
                        yield from batch

        return PlanSampler()

    def plan_order(self, seed: int = 0, batch_size: int = 8, shuffle_window: int = 4, epochs: int = 1000):
        """The same order as an IterableDataset, for a plain Trainer (which batches an IterableDataset in order).
        Give Trainer `accelerator_config={"dispatch_batches": False}`: dispatching slices every tensor of a batch
        to the batch size, the per-position ones too."""
        sampler, source = self.plan_sampler(seed, batch_size, shuffle_window, epochs), self.source

        class PlanOrder(torch.utils.data.IterableDataset):
            def __iter__(self):
                for i in sampler:
                    yield source[i]

        return PlanOrder()

    def to_hf_dataset(self, folder: str | None = None):
        """The cache as a datasets.Dataset of one row per sample, memory-mapped: its Parquet export (pipeline
        export: every decoded field, teacher rows unpadded), written once into `folder` (default: under the
        datasets cache, named by the cache's key and temperature) and loaded by datasets. DistillCollator takes its
        rows as it takes this dataset's items."""
        import datasets

        t = self.cache.temperatures[self.cache.temperature_index]
        key = f"{self.cache.manifest['cache_key'][:16]}-t{t:g}"
        out = Path(folder or Path(datasets.config.HF_DATASETS_CACHE) / "distill-cache-exports" / key)
        tables.export(self.cache.path, out, "parquet", t, progress=False)
        return datasets.load_dataset("parquet", data_files=sorted(map(str, out.glob("part-*.parquet"))), split="train")


class DistillLabels(dict):
    """Positions, targets and teacher rows for the loss, travelling as `labels`. Indexed like a tensor (labels[..., 1:],
    .ne(-100)), it is the causal-LM label tensor [B, L]: the target where a token is distilled, -100 elsewhere."""

    def __getitem__(self, key):
        if isinstance(key, str):
            return super().__getitem__(key)
        return super().__getitem__("labels")[key]

    def ne(self, other):
        return super().__getitem__("labels").ne(other)


class DistillCollator:
    """Samples of a CacheDataset → a Trainer batch (see the module docstring); pack_length packs samples into rows of
    that many tokens with per-sample position ids instead of padding."""

    def __init__(self, tokenizer, pack_length: int | None = None):
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.vocab_size = len(tokenizer)
        self.pack_length = pack_length

    def __call__(self, features: list[dict]) -> dict:
        features = [f if isinstance(f["input_ids"], np.ndarray) else tables.padded_sample(f) for f in features]
        b = batches.collate(features, self.pad_id, self.pack_length)
        keep, column = torch.unique(b["col_index"], return_inverse=True)
        causal = torch.full_like(b["input_ids"], -100)
        causal[b["row_index"], b["col_index"] + 1] = b["targets"]
        out = {"input_ids": b["input_ids"], "logits_to_keep": keep}
        for key in ("attention_mask", "position_ids"):
            if key in b:
                out[key] = b[key]
        out["labels"] = DistillLabels(
            labels=causal,
            row_index=b["row_index"],
            col_index=column,
            targets=b["targets"],
            vocab_size=self.vocab_size,
            **{k: b[k] for k in batches.TEACHER_KEYS if k in b},
        )
        return out


def distill_loss(
    kind: str = "akl",
    kd_ratio: float = 1.0,
    *,
    mu: float = 0.5,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    alm_tau: float = 1.0,
    tail: str = "bucket",
    sketch_basis: torch.Tensor | None = None,
    vocab_map: torch.Tensor | None = None,
):
    """A Trainer `compute_loss_func(outputs, labels, num_items_in_batch)` for DistillCollator batches:
    (1 − kd_ratio)·CE + kd_ratio·KD of `kind` (fkl, rkl, akl, jsd, tvd, sfkl, srkl; pg on generated data; ce alone),
    summed over the distilled positions and divided by Trainer's item count (the whole accumulated batch). A cache
    with a teacher sketch needs its basis: sketch_basis=CacheDataset(…).sketch_basis. A student of another tokenizer
    (CacheDataset(…, tokenizer=…)) takes uld, alm or gold, the last with the vocabulary map
    (cross_tokenizer.vocabulary_map), and pkl from CacheDataset(…, tokenizer=…, teacher_tokenizer=…)."""
    losses.check_params("fkl" if kind in ("ce", "pg", *CROSS_KINDS) else kind, mu, beta, alpha, kd_ratio, tail, alm_tau)
    if kind == "gold" and vocab_map is None:
        raise OptionError("distill_loss('gold') maps the teacher's vocabulary: pass vocab_map=vocabulary_map(...)")
    basis = {"tensor": sketch_basis, "map": vocab_map}

    def compute_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[labels["row_index"], labels["col_index"], : labels["vocab_size"]]
        fields = {k: labels[k] for k in batches.TEACHER_KEYS if k in labels}
        if kind == "pkl" and len(fields.get("topk_ids", ())) != len(labels["targets"]):
            raise OptionError("distill_loss('pkl') takes rows per position: CacheDataset(…, teacher_tokenizer=…)")
        if "sketch_coeffs" in fields:
            if basis["tensor"] is None:
                raise OptionError(
                    "this cache holds a teacher sketch: pass distill_loss(..., sketch_basis=dataset.sketch_basis)"
                )
            basis["tensor"] = basis["tensor"].to(logits.device)
            fields["sketch_basis"] = basis["tensor"]
        if basis["map"] is not None:
            basis["map"] = fields["vocab_map"] = basis["map"].to(logits.device)
        terms = losses.batch_losses(
            logits,
            {"targets": labels["targets"]},
            fields,
            kind,
            tail=tail,
            mu=mu,
            beta=beta,
            alpha=alpha,
            temperature=temperature,
            alm_tau=alm_tau,
        )
        kd = terms.get("kd", torch.zeros((), device=logits.device))
        n = num_items_in_batch if num_items_in_batch is not None else max(1, len(labels["targets"]))
        return losses.mix(terms["ce"], kd, kd_ratio if kind != "ce" else 0.0) / n

    return compute_loss


@functools.cache
def _trainer_class():
    from transformers import Trainer

    class DistillTrainer(Trainer):
        """Trainer with the distillation loss built in (for transformers versions without compute_loss_func), and
        pipeline train's batch order when the training set is a CacheDataset and `plan_seed` is given."""

        def __init__(self, *args, loss_func=None, plan_seed: int | None = None, **kwargs):
            self.distill_loss_func = loss_func or distill_loss()
            self.plan_seed = plan_seed
            super().__init__(*args, **kwargs)
            self.args.remove_unused_columns = False  # the collator needs every field of the cache's samples

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.plan_seed is not None and isinstance(dataset, CacheDataset):
                return dataset.plan_sampler(self.plan_seed, self.args.per_device_train_batch_size)
            return super()._get_train_sampler(train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            labels = inputs.pop("labels")
            outputs = model(**inputs)
            loss = self.distill_loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes
            return (loss, outputs) if return_outputs else loss

    return DistillTrainer


def __getattr__(name):
    if name == "DistillTrainer":  # built on first use: importing transformers' Trainer costs seconds
        return _trainer_class()
    raise AttributeError(name)
