"""Where transformers' API differs between the versions we support: each difference is written here, once."""

from __future__ import annotations

import os

import torch


def text_config(config):
    """The language model's config of a (possibly multimodal) config."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def enable_gradient_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing; transformers 5 renamed the method, older versions know the second."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def tensor_parallel_kwargs(tp: int) -> dict:
    """from_pretrained arguments that shard a model over this rank's TP group of `tp` ranks, with the world split
    into WORLD_SIZE / tp such groups. transformers' loading API changed in 2026; this shim is the only place
    that knows either form."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # before DistributedConfig: tp_plan="auto" on a mesh's "tp" dimension
        from torch.distributed.device_mesh import init_device_mesh

        device = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device, (world // tp, tp), mesh_dim_names=("dp", "tp"))
        return {"tp_plan": "auto", "device_mesh": mesh["tp"]}

    class ReplicatedGroups(DistributedConfig):
        """TP within groups of tp_size ranks; the dp_replicate groups hold full replicas (no FSDP) and run
        different batches."""

        @property
        def dp_size(self):
            return 1

    return {"distributed_config": ReplicatedGroups(tp_size=tp, dp_replicate_size=world // tp)}
