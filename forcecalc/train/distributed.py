"""Data-parallel training with ``torch.distributed``: one process per GPU (or CPU, gloo).

``torchrun --nproc-per-node=N -m forcecalc train ...`` sets ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE``; :func:`init_from_env` joins the process group (NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from forcecalc.checkpoint import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place: ``rank`` of ``world_size``, on device ``local_rank``."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def init_from_env(device: str | None) -> tuple[DistInfo, torch.device]:
    """Join the process group described by torchrun's variables (if any) and pick the device.

    Args:
        device: ``"cpu"``, ``"cuda"`` or ``None`` (CUDA when available).

    Returns:
        ``(info, device)``; under torchrun with CUDA the device is ``cuda:LOCAL_RANK``.

    Raises:
        ValueError: an unknown device, or one that is not available (e.g. ``"cuda"`` without
            a GPU), before anything else is done.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = resolve_device(f"cuda:{local_rank if world_size > 1 else 0}")
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank), resolved


def all_reduce_sum(tensor: Tensor, info: DistInfo) -> Tensor:
    """Sum of ``tensor`` over processes (a copy; unchanged for one process)."""
    if not info.active:
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out)
    return out


def all_gather_objects(value: Any, info: DistInfo) -> list[Any]:
    """``[value of rank 0, value of rank 1, ...]`` on every process."""
    if not info.active:
        return [value]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, value)
    return out


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def leave_process_group() -> None:
    """Leave the process group at the end of a successful run: a barrier first, so that no
    process closes its connections while another still reads from them, then
    ``destroy_process_group`` (a process that exits without it can abort in gloo's or NCCL's
    threads during interpreter shutdown).  Does nothing outside a process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _SumOverProcesses(torch.autograd.Function):
    """The sum of a tensor over every process, differentiable: each process's output depends
    on every process's input with derivative 1, so the gradient reaching an input is the sum
    of the output gradients of all processes (itself differentiable, for double backward)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _SumOverProcesses.apply(grad)


def sum_over_processes(tensor: Tensor) -> Tensor:
    """Differentiable sum of ``tensor`` over the processes of the default group."""
    return _SumOverProcesses.apply(tensor)


class GlobalBatchNorm(nn.BatchNorm1d):
    """``BatchNorm1d`` whose training statistics cover the batch of every process.

    Same parameters, buffers and eval-mode behaviour as ``nn.BatchNorm1d``; in training mode
    with several processes the mean and (biased) variance are sums over all processes
    (differentiable all-reduces, gloo or NCCL), so ``W`` processes with batches ``b_1..b_W``
    compute what one process computes on their union.  Inputs ``[n, C]``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        if dist.get_world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        count = torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)
        sums = sum_over_processes(torch.cat([x.sum(dim=0), count]))
        n = sums[-1]
        mean = sums[:-1] / n
        centered = x - mean
        var = sum_over_processes((centered * centered).sum(dim=0)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = (
                    1.0 / float(self.num_batches_tracked)
                    if self.momentum is None
                    else self.momentum
                )
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.detach().to(self.running_var.dtype), momentum)
        out = centered * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d`` below ``module`` by a :class:`GlobalBatchNorm` with the
    same state (state-dict keys unchanged)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = GlobalBatchNorm(
                child.num_features,
                eps=child.eps,
                momentum=child.momentum,
                affine=child.affine,
                track_running_stats=child.track_running_stats,
            )
            reference = child.weight if child.affine else child.running_mean
            if reference is not None:
                replacement = replacement.to(device=reference.device, dtype=reference.dtype)
            replacement.load_state_dict(child.state_dict())
            replacement.train(child.training)
            if child.affine:
                replacement.weight.requires_grad_(child.weight.requires_grad)
                replacement.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child)
    return module
