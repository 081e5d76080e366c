"""Moving cached activations off an accelerator: pinned, asynchronous copies to the CPU.

`offload` starts the copy of one activation and returns its CPU tensor at once; `finish_offload`
waits, once per run, for every copy started on the accelerators. Between the two the CPU tensors
must not be read. On a machine without CUDA both are plain `Tensor.to` and a no-op.
"""

from __future__ import annotations

import torch
from torch import Tensor


def offload(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` on ``device``: a CUDA tensor bound for the CPU is copied into pinned (page-locked)
    memory without blocking, so the forward goes on while it transfers; anything else is ``.to``.

    Example:
        >>> offload(torch.ones(2), "cpu")
        tensor([1., 1.])
    """
    device = torch.device(device)
    if device.type == "cpu" and tensor.is_cuda:
        out = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        return out.copy_(tensor, non_blocking=True)
    return tensor.to(device)


def finish_offload(device: torch.device | str | None) -> None:
    """Wait for the copies `offload` started (every CUDA device) when caching to the CPU.

    Example:
        >>> finish_offload("cpu")  # a no-op without CUDA
    """
    if device is not None and torch.device(device).type == "cpu" and torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            torch.cuda.synchronize(index)
