"""Scoring a student against teacher fields: its logits at a batch's distilled positions, and mean CE and divergences
over a source in eval mode. Used by training (held-out loss), evaluation and the benchmarks."""

from __future__ import annotations

import torch

from pipeline import batches, losses


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(student, batch: dict, autocast: bool = False):
    """The student's logits at the batch's distilled positions (student: models.PositionLogits, maybe wrapped)."""
    device_type = batch["input_ids"].device.type
    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast):
        return student(
            batch["input_ids"],
            batch.get("attention_mask"),
            batch["row_index"],
            batch["col_index"],
            batch.get("position_ids"),
        )


@torch.no_grad()
def score(
    student, model, teacher, pad_id, device, kinds=("fkl",), max_samples=None, batch_size=8, autocast=False, **params
) -> dict:
    """Mean CE and (with teacher rows) the mean divergence of each kind, per distilled token, in eval mode; one
    forward per batch serves every kind. `teacher` is a teacher signal (pipeline.teachers) over the source to score."""
    was_training = model.training
    model.eval()
    source = teacher.source
    n = len(source) if max_samples is None else min(len(source), max_samples)
    totals, items = {}, 0
    for a in range(0, n, batch_size):
        b = to_device(batches.collate([source[i] for i in range(a, min(n, a + batch_size))], pad_id), device)
        logits, fields = forward(student, b, autocast), teacher.fields(b)
        items += len(b["row_index"])
        for j, kind in enumerate(kinds or ("ce",)):
            terms = losses.batch_losses(logits, b, fields, kind, **params)
            if j == 0:
                totals["ce"] = totals.get("ce", 0.0) + float(terms["ce"])
            if "kd" in terms:
                totals[kind] = totals.get(kind, 0.0) + float(terms["kd"])
    model.train(was_training)
    return {k: v / max(1, items) for k, v in totals.items()} | {"positions": items}
