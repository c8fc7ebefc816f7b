"""Several processes under ``torchrun``: the process group, each rank's device, and sharding the
frozen base with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Nothing here launches processes or moves data itself: torchrun starts the ranks and sets
WORLD_SIZE, RANK and LOCAL_RANK; torch.distributed (gloo on CPU, NCCL on CUDA) carries the traffic.
Outside torchrun every function is a no-op for a single process of rank 0.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist
from torch import nn

from .errors import ConfigError
from .io import base_fingerprint

TIMEOUT = datetime.timedelta(minutes=10)  # a collective a dead rank never joins fails after this


def launched() -> bool:
    """Whether torchrun started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def start(device: torch.device) -> torch.device:
    """Join torchrun's process group (gloo for CPU, NCCL for CUDA) and return this rank's device:
    ``cuda`` becomes ``cuda:LOCAL_RANK``. A single process gets ``device`` back unchanged."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "cuda":
        if device.index is not None:
            raise ConfigError(f"under torchrun give --device cuda, not {device}: each rank takes cuda:LOCAL_RANK")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"multi-process training runs on cpu (gloo) or cuda (NCCL), not {device.type}")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return device


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if world_size() > 1:
        dist.barrier()


def average(value: torch.Tensor) -> torch.Tensor:
    """The mean of a tensor over the ranks (the tensor itself in a single process)."""
    if world_size() == 1:
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / world_size()


def data_parallel(module: nn.Module, parameters: list[nn.Parameter]) -> nn.Module:
    """``module`` under DistributedDataParallel, which all-reduces the gradients of ``parameters``
    (the ones that require grad: an adapter's few MB). They start as rank 0's; the frozen base is
    neither broadcast nor synchronised, each rank having loaded the same one."""
    from torch.nn.parallel import DistributedDataParallel

    for parameter in parameters:
        dist.broadcast(parameter.data, src=0)
    return DistributedDataParallel(module, init_sync=False, forward_sync_buffers=False)


def shard_base(model: nn.Module, device: torch.device | str) -> int:
    """Shard the frozen base's blocks (the classes its ``_no_split_modules`` names, as transformers
    lists them) across the ranks with FSDP2, then put the rest (embeddings, head, adapters) on
    ``device``; returns the number of blocks sharded.

    The adapters stay whole on every rank (they are megabytes) and train under data parallelism
    like the unsharded model, so every method's training-time work sees whole tensors and saving
    needs no gather. The base fingerprint is taken first, from the whole weights: a rank holds
    only its shards afterwards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = model.base
    base_fingerprint(base)
    block_names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [module for module in base.modules() if type(module).__name__ in block_names]
    if not blocks:
        raise ConfigError(f"{type(base).__name__} names no transformer blocks (_no_split_modules), "
                          "so --fsdp cannot shard it")
    mesh = init_device_mesh(torch.device(device).type, (world_size(),))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    model.to(device)
    return len(blocks)
