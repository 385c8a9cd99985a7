"""Single-process or ``torchrun`` DDP training: device, rank, model wrapping and rank-0-only side effects.

    torchrun --nproc_per_node=8 -m usb_training.latent.train_diffusion --tier base --work RUN
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 \\
        -m usb_training.latent.train_diffusion ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Context:
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device: str = "auto") -> Context:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    dev = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    return Context(rank, world, dev)


def wrap(module: nn.Module, ctx: Context) -> nn.Module:
    """The module on this rank's device, inside DistributedDataParallel when there are several ranks."""
    module = module.to(ctx.device)
    if ctx.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return module


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module inside a DDP wrapper."""
    return module.module if hasattr(module, "module") and isinstance(module, nn.parallel.DistributedDataParallel) else module


def any_rank(ctx: Context, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (so that all ranks stop at the same step)."""
    if ctx.world == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=ctx.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item() > 0)


def barrier(ctx: Context) -> None:
    if ctx.world > 1:
        torch.distributed.barrier()


def teardown(ctx: Context) -> None:
    if ctx.world > 1 and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
