"""Where a training batch's teacher rows come from: one interface, several implementations.

A teacher gives the training loop its samples (`source`: map-style, with `lengths` and `part_sizes` for the epoch
plan) and, for each collated batch on the device, its rows (`rows(batch)`): the sparse fields of
pipeline.losses (topk_ids, topk_logprobs, tail_logmass, and drawn_ids/drawn_logprobs, target_logprob when
known) or dense `teacher_logits`. Cached rows travel with the samples through the DataLoader; an online teacher
computes them from the batch; SFT has none.
"""
from __future__ import annotations

import torch

from pipeline import batching, models, teacher_rows


class Teacher:
    """No teacher: plain fine-tuning on the source's tokens."""
    kind = "none"

    def __init__(self, source):
        self.source = source

    def rows(self, batch: dict) -> dict:
        return {}


class CachedTeacher(Teacher):
    """Rows read from a teacher cache along with the samples."""
    kind = "cache"

    def __init__(self, path, temperature=None):
        super().__init__(batching.CacheSource(path, temperature))
        self.manifest = self.source.cache.manifest

    def rows(self, batch: dict) -> dict:
        return {k: batch[k] for k in batching.TEACHER_KEYS if k in batch}


class MixedCaches(CachedTeacher):
    """Rows from several caches, each micro-batch from one of them (batching.MixtureSource)."""
    kind = "mixture"

    def __init__(self, paths, shares, temperature=None):
        caches = [batching.CacheSource(p, temperature) for p in paths]
        Teacher.__init__(self, batching.MixtureSource(caches, shares))
        self.manifests = [c.cache.manifest for c in caches]
        self.manifest = self.manifests[0]


class OnlineTeacher(Teacher):
    """The teacher model run on every batch: dense full-vocabulary logits (the reference for a cache's fidelity), or
    top-k + exact tail computed on the fly (topk=k), the rows a cache would have stored."""
    kind = "online"

    def __init__(self, source, model, vocab_size: int, topk: int | None = None, temperature: float = 1.0):
        super().__init__(source)
        self.head = models.PositionLogits(model, vocab_size)
        self.topk, self.temperature = topk, temperature

    @torch.no_grad()
    def rows(self, batch: dict) -> dict:
        was_training = self.head.model.training
        self.head.model.eval()
        logits = self.head(batch["input_ids"], batch.get("attention_mask"), batch["rows"], batch["cols"],
                           batch.get("position_ids")).float()
        self.head.model.train(was_training)
        if not self.topk:
            return {"teacher_logits": logits}
        r = teacher_rows.topk_rows(logits, self.topk, [self.temperature], batch["targets"].to(logits.device))
        return {"topk_ids": r["ids"], "topk_logprobs": r["logprobs"][0], "tail_logmass": r["tail"][0],
                "target_logprob": r["target"][0]}
