"""Planning a cache before running: the bytes ``run_with_cache`` will store, and whether they fit.

`cache_size` measures every selected hook point's shape on two one-row forwards of different
lengths (the axes that change are position axes), scales them to the real input and applies the
storage options of ``run_with_cache``: ``cache_dtype`` and ``pos_slice`` (an int, a list or a
slice of positions). `check_cache_fits` raises before running when the cache would not fit the
target device's free memory, naming the options that would.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mechscope.errors import InputError
from mechscope.hooks import NamesFilter, Slice, SliceInput, position_axis
from mechscope.model.tokenize import input_tokens


def _shapes(model: Any, names_filter: NamesFilter, seq: int) -> dict[str, tuple[torch.Size, torch.dtype]]:
    shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}

    def record(x: torch.Tensor, *, hook) -> None:
        shapes[hook.name] = (x.shape, x.dtype)

    names = model.hook_names(names_filter)
    with torch.no_grad():
        model.run_with_hooks(
            torch.zeros(1, seq, dtype=torch.long, device=model.device),
            fwd_hooks=[(name, record) for name in names],
            return_type=None,
        )
    return shapes


def cache_size(
    model: Any,
    tokens: Any,
    names_filter: NamesFilter = None,
    *,
    cache_dtype: torch.dtype | None = None,
    pos_slice: Slice | SliceInput = None,
) -> int:
    """Bytes ``model.run_with_cache(tokens, names_filter=..., cache_dtype=..., pos_slice=...)`` will store.

    Example:
        >>> full = cache_size(model, tokens)
        >>> _, cache = model.run_with_cache(tokens)
        >>> full == sum(t.numel() * t.element_size() for t in cache.values())
        True
        >>> cache_size(model, tokens, cache_dtype=torch.bfloat16) * 2 == full
        True
    """
    tokens = input_tokens(model, tokens)[0]
    batch, seq = tokens.shape
    short, long = _shapes(model, names_filter, 2), _shapes(model, names_filter, 3)
    kept = len(Slice.unwrap(pos_slice).indices(seq)) if pos_slice is not None else seq
    total = 0
    for name, (shape, dtype) in long.items():
        sizes = [batch] + [seq if a != b else a for a, b in zip(shape[1:], short[name][0][1:], strict=True)]
        axis = len(sizes) + position_axis(name)
        if pos_slice is not None and len(sizes) >= -position_axis(name) and sizes[axis] == seq:
            sizes[axis] = kept
        itemsize = torch.empty((), dtype=cache_dtype or dtype).element_size()
        total += math.prod(sizes) * itemsize
    return total


def free_memory(device: torch.device | str) -> int:
    """Free bytes on ``device`` (CUDA: the driver's count; CPU: the kernel's MemAvailable)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def check_cache_fits(
    model: Any,
    tokens: Any,
    names_filter: NamesFilter = None,
    *,
    cache_dtype: torch.dtype | None = None,
    pos_slice: Slice | SliceInput = None,
    device: torch.device | str | None = None,
    free_bytes: int | None = None,
) -> int:
    """The `cache_size` of a planned ``run_with_cache`` call; raises `InputError` first if it exceeds
    ``free_bytes`` (default: the free memory of ``device``, the model's when ``None``), naming the
    storage options (lower precision, the last position only, the CPU) and the bytes each needs.

    Example:
        >>> check_cache_fits(model, tokens, free_bytes=10**9) == cache_size(model, tokens)
        True
    """
    need = cache_size(model, tokens, names_filter, cache_dtype=cache_dtype, pos_slice=pos_slice)
    target = model.device if device is None else torch.device(device)
    free = free_memory(target) if free_bytes is None else free_bytes
    if need <= free:
        return need
    options = {
        "cache_dtype=torch.bfloat16": cache_size(model, tokens, names_filter, cache_dtype=torch.bfloat16),
        "pos_slice=[-1]": cache_size(model, tokens, names_filter, pos_slice=[-1]),
        "cache_dtype=torch.bfloat16, pos_slice=[-1]": cache_size(
            model, tokens, names_filter, cache_dtype=torch.bfloat16, pos_slice=[-1]
        ),
    }
    fitting = [f"{k} ({v / 2**20:.1f} MiB)" for k, v in options.items() if v <= free]
    if torch.device(target).type != "cpu":
        fitting.append('device="cpu"')
    raise InputError(
        f"the cache would need {need / 2**20:.1f} MiB but {target} has {free / 2**20:.1f} MiB free; "
        f"options that fit: {', '.join(fitting) or 'none: narrow names_filter'}"
    )


def check_before_caching(model: Any, model_args: tuple, kwargs: dict, check_fits: bool | None) -> None:
    """`check_cache_fits` for a ``run_with_cache(*model_args, **kwargs)`` call, before it runs.

    ``check_fits=None`` checks when the cache goes to a CUDA device (its free memory is known and
    an out-of-memory error there would come mid-forward); ``True`` always; ``False`` never.

    Example:
        >>> check_before_caching(model, (tokens,), {"cache_dtype": torch.bfloat16}, check_fits=True)
    """
    device = kwargs.get("device")
    target = model.device if device is None else torch.device(device)
    if check_fits is None:
        check_fits = target.type == "cuda"
    if not check_fits or not model_args or kwargs.get("start_at_layer") is not None:
        return
    if isinstance(model_args[0], torch.Tensor) and model_args[0].is_floating_point():
        return  # pixels or a residual stream: the estimate measures token inputs only
    free = free_memory(target)
    check_cache_fits(
        model,
        model_args[0],
        kwargs.get("names_filter"),
        cache_dtype=kwargs.get("cache_dtype"),
        pos_slice=kwargs.get("pos_slice"),
        device=target,
        free_bytes=free // 2 if kwargs.get("incl_bwd") else free,  # gradients are cached too
    )
