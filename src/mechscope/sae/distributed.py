"""Data-parallel helpers over `torch.distributed`; every function is a no-op in a single process.

Launch with ``torchrun --nproc_per_node N your_script.py``: each rank harvests its own shard of
the token stream (see `ActivationStore`), gradients are averaged after every backward, and the
statistics that steer training (dead latents, thresholds, normalisation) are reduced so all
ranks keep identical weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    """Whether a process group is initialised with more than one rank.

    Example:
        >>> is_distributed()
        False
    """
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without a process group.

    Example:
        >>> rank_and_world()
        (0, 1)
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the process group from torchrun's environment (``RANK``, ``WORLD_SIZE``, ...).

    Uses ``nccl`` when CUDA is available and ``gloo`` otherwise; returns ``(rank, world_size)``.
    """
    import os

    if "RANK" in os.environ and not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend)
    return rank_and_world()


def all_reduce_mean_(tensor: Tensor) -> Tensor:
    """Average ``tensor`` over ranks in place (and return it).

    Example:
        >>> all_reduce_mean_(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
    """
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(dist.get_world_size())
    return tensor


def all_reduce_max_(tensor: Tensor) -> Tensor:
    """Elementwise maximum over ranks, in place."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def all_gather_cat(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0 (in rank order; same shape on every rank).

    Example:
        >>> all_gather_cat(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """
    if not is_distributed():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def global_topk_threshold(values: Tensor, k: int) -> Tensor:
    """The ``k``-th largest entry of every rank's ``values`` taken together, as a 0-d tensor.

    Each rank contributes its own ``k`` largest entries (padded with ``-inf``), among which the
    global top ``k`` lie, so keeping ``values >= threshold`` on every rank keeps the global top
    ``k`` (barring ties): the selection one process holding the whole batch makes, as BatchTopK
    needs under data parallelism. ``-inf`` when there are fewer than ``k`` entries in all.

    Example:
        >>> global_topk_threshold(torch.tensor([[0.5, 3.0], [2.0, 1.0]]), k=2)
        tensor(2.)
    """
    flat = values.detach().reshape(-1)
    top = flat.topk(min(k, flat.numel())).values
    if is_distributed():
        padded = torch.full((k,), -torch.inf, dtype=flat.dtype, device=flat.device)
        padded[: top.numel()] = top
        top = all_gather_cat(padded)
    if top.numel() < k:
        return torch.tensor(-torch.inf, dtype=flat.dtype, device=flat.device)
    return top.topk(k).values[-1]


def average_gradients(module: torch.nn.Module) -> None:
    """Average the gradient of every parameter of ``module`` over ranks (one flat all-reduce)."""
    if not is_distributed():
        return
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce_mean_(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
