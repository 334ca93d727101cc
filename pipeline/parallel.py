"""Process groups and the student's wrapping, on PyTorch's engines: ranks and collectives under torchrun, the
teacher's tensor-parallel groups (which ranks shard one teacher and which writes), and the student in DDP or FSDP2
(fully_shard per decoder layer, then the root). The stages ask this module; none wraps a model itself. (Loading a
teacher sharded by transformers' TP plans is models.load_teacher.)"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pipeline import compat
from pipeline.errors import OptionError


def init() -> tuple[int, int]:
    """(rank, world size); starts the process group under torchrun (NCCL on GPUs, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t)
    return t.tolist()


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ---------------------------------------------------------------- tensor-parallel teacher groups


@dataclass
class TeacherGroup:
    """Where this process sits: the ranks of a tensor-parallel group run the same batches and its first rank
    writes; groups are data-parallel shards."""

    tp: int
    group: int
    groups: int
    tp_rank: int
    ranks: list[int]

    @property
    def writer(self) -> bool:
        return self.tp_rank == 0


def teacher_group(tp: int) -> TeacherGroup:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if tp > 1 and "RANK" not in os.environ:
        raise OptionError(
            f"--tp {tp} runs under torchrun: torchrun --nproc-per-node {tp} -m pipeline.cli cache-teacher …"
        )
    if world % tp:
        raise OptionError(
            f"--tp {tp} does not divide the {world} torchrun processes; use a world size that is a multiple of {tp}"
        )
    g = rank // tp
    return TeacherGroup(tp, g, world // tp, rank % tp, list(range(g * tp, (g + 1) * tp)))


def broadcast_in_group(values: list[int], group: TeacherGroup) -> list[int]:
    """The group writer's list of ints, on every rank of its TP group (one tensor, no pickling)."""
    if group.tp == 1:
        return values
    pg = _tp_process_group(group)
    dev = _collective_device()
    n = torch.tensor([len(values)], dtype=torch.long, device=dev)
    dist.broadcast(n, group.ranks[0], group=pg)
    t = torch.tensor(values if group.writer else [0] * int(n), dtype=torch.long, device=dev)
    dist.broadcast(t, group.ranks[0], group=pg)
    return t.tolist()


_TP_GROUPS: dict = {}


def _tp_process_group(group: TeacherGroup):
    if not _TP_GROUPS:  # every rank creates every group, in the same order
        for g in range(group.groups):
            _TP_GROUPS[g] = dist.new_group(list(range(g * group.tp, (g + 1) * group.tp)))
    return _TP_GROUPS[group.group]


# ---------------------------------------------------------------- students


def decoder_layers(model) -> list[torch.nn.Module]:
    """The repeated blocks transformers names in _no_split_modules (LlamaDecoderLayer, GPT2Block, …)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise OptionError(f"{type(model).__name__} names no decoder layers (_no_split_modules); --fsdp cannot shard it")
    return layers


class Student:
    """The student's forward module (the lm_head-at-positions head, wrapped for DDP or FSDP2) and the
    operations whose form depends on the wrapping: gradient sync, clipping, state dicts."""

    def __init__(
        self, head, model, *, world: int, fsdp: bool = False, bf16: bool = False, gradient_checkpointing: bool = False
    ):
        self.model, self.head, self.world, self.fsdp = model, head, world, fsdp
        if gradient_checkpointing:
            compat.enable_gradient_checkpointing(model)
        if fsdp:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            if not dist.is_initialized():
                raise OptionError(
                    "--fsdp runs under torchrun: torchrun --nproc-per-node N -m pipeline.cli train --fsdp …"
                )
            mp = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if bf16
                else MixedPrecisionPolicy()
            )
            for layer in decoder_layers(model):
                fully_shard(layer, mp_policy=mp)
            fully_shard(head, mp_policy=mp)
            self.module = head
        elif world > 1:
            self.module = torch.nn.parallel.DistributedDataParallel(head)
        else:
            self.module = head

    def __call__(self, *args, **kw):
        return self.module(*args, **kw)

    def sync(self, enabled: bool):
        """Context for one micro-batch's backward: gradients are reduced across ranks only when enabled."""
        if self.world == 1 or enabled:
            return contextlib.nullcontext()
        if self.fsdp:
            return _fsdp_no_sync(self.module)
        return self.module.no_sync()

    def clip_grad_norm(self, max_norm: float) -> float:
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    # state dicts: sharded (DTensor) under FSDP, plain otherwise; the same calls for both
    def model_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.model)

    def load_model_state(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state)

    def optimizer_state(self, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, optimizer)

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, optimizer, state)

    def full_state_dict(self) -> dict:
        """The whole model on CPU on rank 0 (a collective under FSDP); {} on other ranks."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if not self.fsdp:
            return self.model.state_dict() if not dist.is_initialized() or dist.get_rank() == 0 else {}
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if dist.get_rank() == 0 else {}


@contextlib.contextmanager
def _fsdp_no_sync(module):
    module.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)
