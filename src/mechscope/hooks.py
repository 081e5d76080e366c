"""Hook points: identity modules with dotted names where activations can be read or replaced.

A hook function has the signature ``fn(activation, *, hook) -> activation | None``. Returning
a tensor replaces the activation (it must keep the shape, dtype and device); returning
``None`` leaves it unchanged. Backward hooks have the same signature and receive the
gradient of the activation (they may also return it as a 1-tuple, as TransformerLens allows).

`HookPoint` and `HookedRootModule` have TransformerLens' methods, arguments and defaults
(``add_hook(hook, dir, is_permanent, level, prepend)``, ``fwd_hooks``/``bwd_hooks``, context
levels, ``setup()``, ``reset_hooks(clear_contexts, direction, including_permanent, level)``,
``run_with_hooks``, ``run_with_cache``); a custom ``HookedRootModule`` subclass gets all of
them. mechscope adds handles (``add_hook`` returns them), opt-in points and name checks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from mechscope.errors import HookError, HookNameError, InputError
from mechscope.names import unknown_name_error
from mechscope.offload import finish_offload, offload

HookFn = Callable[..., torch.Tensor | None]
NamesFilter = None | str | Sequence[str] | Callable[[str], bool]
HookTarget = str | Callable[[str], bool]
Direction = Literal["fwd", "bwd"]
SliceInput = int | tuple | list | Tensor | np.ndarray | slice | None

_PER_HEAD = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result", "hook_rot_q", "hook_rot_k")
_PER_HEAD += ("hook_q_input", "hook_k_input", "hook_v_input")


class Slice:
    """TransformerLens' ``Slice``: index one axis with an int (the axis goes), a tuple
    (``slice(*t)``), a slice, a list / tensor / array of indices, or ``None`` (everything).

    Example:
        >>> x = torch.arange(10)
        >>> Slice(3).apply(x), Slice((1, 5, 2)).apply(x), Slice([0, 9]).apply(x), Slice().apply(x).shape
        (tensor(3), tensor([1, 3]), tensor([0, 9]), torch.Size([10]))
        >>> Slice(-1).indices(), Slice((2, None)).indices(5)
        (array([-1]), array([2, 3, 4]))
    """

    def __init__(self, input_slice: SliceInput = None) -> None:
        if isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, int):
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, Tensor, np.ndarray)):
            array = input_slice.detach().cpu().numpy() if isinstance(input_slice, Tensor) else np.asarray(input_slice)
            self.slice, self.mode = array, "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise InputError(
                f"invalid input_slice {input_slice!r}: use an int, tuple, slice, list, tensor, array or None"
            )

    def apply(self, tensor: Tensor, dim: int = 0) -> Tensor:
        """``tensor`` indexed along ``dim``."""
        index = [slice(None)] * tensor.ndim
        index[dim] = self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The indices selected along an axis of size ``max_ctx`` (an int slice needs none)."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise InputError("max_ctx must be given when the slice is not an int")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "

    @classmethod
    def unwrap(cls, slice_input: Slice | SliceInput) -> Slice:
        """A `Slice` from a slice input; an int becomes ``[int]`` so that the axis stays."""
        if isinstance(slice_input, Slice):
            return slice_input
        if isinstance(slice_input, int):
            slice_input = [slice_input]
        return Slice(slice_input)


def position_axis(name: str) -> int:
    """The position axis of hook point ``name`` (-3 for per-head activations, else -2), which ``pos_slice`` slices."""
    return -3 if name.rsplit(".", 1)[-1] in _PER_HEAD else -2


def as_slice(value: Slice | SliceInput) -> Slice:
    """``value`` as a `Slice` (an int drops its axis).

    Example:
        >>> as_slice(-1).apply(torch.zeros(2, 5, 3), dim=-2).shape
        torch.Size([2, 3])
    """
    return value if isinstance(value, Slice) else Slice(value)


@dataclass(eq=False)
class HookHandle:
    """A registered hook (TL's ``LensHandle`` fields); `remove()` (or ``handle.hook.remove()``) detaches it."""

    point: HookPoint
    user_hook: HookFn
    dir: Direction
    is_permanent: bool = False
    context_level: int | None = None

    @property
    def hook(self) -> HookHandle:
        return self

    def remove(self) -> None:
        hooks = self.point.fwd_hooks if self.dir == "fwd" else self.point.bwd_hooks
        if self in hooks:
            hooks.remove(self)


class HookPoint(nn.Module):
    """An identity module that runs the hooks attached to it.

    ``opt_in`` hook points are skipped by their component unless a hook is attached or
    the matching config flag is set, so they cost nothing when unused.

    Example:
        >>> point = HookPoint(); point.name = "demo"
        >>> handle = point.add_hook(lambda x, *, hook: x * 2)
        >>> point(torch.ones(2)).tolist(), point.has_hooks()
        ([2.0, 2.0], True)
        >>> handle.remove(); point(torch.ones(2)).tolist()
        [1.0, 1.0]
    """

    def __init__(self, opt_in: bool = False) -> None:
        super().__init__()
        self.name: str | None = None
        self.opt_in = opt_in
        self.fwd_hooks: list[HookHandle] = []
        self.bwd_hooks: list[HookHandle] = []
        self.ctx: dict = {}

    def add_hook(
        self,
        hook: HookFn,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> HookHandle:
        """Attach ``hook``; it runs on every forward (or backward, for ``dir="bwd"``) until
        removed. Permanent hooks survive `remove_hooks` unless asked; ``prepend`` runs it first."""
        if dir not in ("fwd", "bwd"):
            raise HookError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(hook):
            raise HookError(f"hook for {self.name!r} must be callable, got {type(hook).__name__}")
        handle = HookHandle(self, hook, dir, is_permanent, level)
        hooks = self.fwd_hooks if dir == "fwd" else self.bwd_hooks
        hooks.insert(0 if prepend else len(hooks), handle)
        return handle

    def add_perma_hook(self, hook: HookFn, dir: Direction = "fwd") -> HookHandle:
        """`add_hook` with ``is_permanent=True``."""
        return self.add_hook(hook, dir=dir, is_permanent=True)

    def has_hooks(
        self, dir: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = True, level: int | None = None
    ) -> bool:
        """Whether a hook (of ``dir``, at ``level``, permanent ones unless excluded) is attached."""
        if dir not in ("fwd", "bwd", "both"):
            raise HookError(f"hook direction must be 'fwd', 'bwd' or 'both', got {dir!r}")
        handles = (self.fwd_hooks if dir != "bwd" else []) + (self.bwd_hooks if dir != "fwd" else [])
        return any(
            (including_permanent or not h.is_permanent) and (level is None or h.context_level == level) for h in handles
        )

    def remove_hooks(
        self, dir: Literal["fwd", "bwd", "both"] = "fwd", including_permanent: bool = False, level: int | None = None
    ) -> None:
        """Remove the temporary hooks of ``dir`` (at ``level`` when given); ``including_permanent``: all."""
        if dir not in ("fwd", "bwd", "both"):
            raise HookError(f"hook direction must be 'fwd', 'bwd' or 'both', got {dir!r}")

        def kept(h: HookHandle) -> bool:
            return not including_permanent and (h.is_permanent or (level is not None and h.context_level != level))

        if dir in ("fwd", "both"):
            self.fwd_hooks = [h for h in self.fwd_hooks if kept(h)]
        if dir in ("bwd", "both"):
            self.bwd_hooks = [h for h in self.bwd_hooks if kept(h)]

    def clear_context(self) -> None:
        """Empty ``ctx``, the dict hooks may use to keep state between calls."""
        self.ctx = {}

    def layer(self) -> int:
        """The block index of a ``blocks.{layer}.…`` hook point."""
        if self.name is None:
            raise HookNameError("this hook point has no name yet: call setup() on its root module")
        return int(self.name.split(".")[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the forward hooks in order (each sees the previous one's replacement) and bind the
        backward hooks to the result's gradient; a hook returning a tensor of another shape,
        dtype or device raises `HookError`."""
        for handle in tuple(self.fwd_hooks):
            out = handle.user_hook(x, hook=self)
            if out is not None:
                _check_replacement(self.name, "activation", x, out)
                x = out
        if self.bwd_hooks and x.requires_grad:
            # A fresh autograd node, so that a tensor shared by two hook points (e.g. resid_post
            # of one block and resid_pre of the next) reports its gradient to each separately.
            # The hooks attached now are bound now: a backward pass after `run_with_hooks` or a
            # `hooks()` block has returned still runs them.
            x = x.view_as(x)
            x.register_hook(functools.partial(self._run_bwd_hooks, tuple(self.bwd_hooks)))
        return x

    def _run_bwd_hooks(self, handles: tuple[HookHandle, ...], grad: torch.Tensor) -> torch.Tensor:
        for handle in handles:
            out = handle.user_hook(grad, hook=self)
            if isinstance(out, tuple) and len(out) == 1:
                out = out[0]
            if out is not None:
                _check_replacement(self.name, "gradient", grad, out)
                grad = out
        return grad

    def extra_repr(self) -> str:
        """The hook point's name (and ``opt_in=True`` for an opt-in point), shown in the module's repr."""
        return f"name={self.name!r}" + (", opt_in=True" if self.opt_in else "")


def _check_replacement(name: str | None, what: str, old: torch.Tensor, new: object) -> None:
    if not isinstance(new, torch.Tensor):
        raise HookError(f"hook on {name!r} returned {type(new).__name__}; return a tensor or None")
    if new.shape != old.shape:
        raise HookError(f"hook on {name!r} returned a {what} of shape {tuple(new.shape)}, expected {tuple(old.shape)}")
    if new.dtype != old.dtype:
        raise HookError(f"hook on {name!r} returned dtype {new.dtype}, expected {old.dtype}")
    if new.device != old.device:
        raise HookError(f"hook on {name!r} returned a tensor on {new.device}, expected {old.device}")


class HookedRootModule(nn.Module):
    """Base class that names every `HookPoint` below it and manages their hooks.

    Subclasses build their modules, then call `setup` at the end of ``__init__``.

    Example:
        >>> class Doubler(HookedRootModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.hook_in = HookPoint()
        ...         self.setup()
        ...     def forward(self, x):
        ...         return 2 * self.hook_in(x)
        >>> out, cache = Doubler().run_with_cache(torch.ones(2))
        >>> out.tolist(), list(cache)
        ([2.0, 2.0], ['hook_in'])
    """

    def __init__(self, *args: Any) -> None:
        super().__init__()
        self.is_caching = False
        self.context_level = 0

    def setup(self) -> None:
        """Name every module after its path (``mod_dict``) and collect the `HookPoint` ones
        (``hook_dict``); call at the end of ``__init__``."""
        self.mod_dict: dict[str, nn.Module] = {}
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if name == "":
                continue
            module.name = name
            self.mod_dict[name] = module
            if isinstance(module, HookPoint):
                self.hook_dict[name] = module

    def hook_points(self):
        """Every `HookPoint` of the module (``hook_dict``'s values)."""
        return self.hook_dict.values()

    def hook_names(self, names_filter: NamesFilter = None) -> list[str]:
        """Names of the hook points selected by ``names_filter``, in forward order: ``None``, every
        point that runs by default (opt-in ones only when switched on); a name or list, those
        (validated); a callable ``fn(name) -> bool``, every match, opt-in points included."""
        if names_filter is None:
            return [n for n, p in self.hook_dict.items() if not p.opt_in or self._opt_in_enabled(n)]
        if isinstance(names_filter, str):
            names_filter = [names_filter]
        if callable(names_filter):
            return [n for n in self.hook_dict if names_filter(n)]
        names = list(names_filter)
        for n in names:
            if not isinstance(n, str):
                raise HookNameError(f"names_filter entries must be strings, got {type(n).__name__}")
            if n not in self.hook_dict:
                raise unknown_name_error(n, self.hook_dict)
        return names

    def _opt_in_enabled(self, name: str) -> bool:
        """Whether the opt-in hook point ``name`` runs without a hook attached (see `ModelConfig`)."""
        return False

    def _points(self, target: HookTarget) -> list[HookPoint]:
        if isinstance(target, str):
            if target not in self.hook_dict:
                raise unknown_name_error(target, self.hook_dict)
            return [self.hook_dict[target]]
        if callable(target):
            points = [p for n, p in self.hook_dict.items() if target(n)]
            if not points:
                raise HookNameError("the hook-name filter matched no hook point")
            return points
        raise HookNameError(f"a hook target must be a name or a callable filter, got {type(target).__name__}")

    def check_hooks_to_add(
        self,
        hook_point: HookPoint,
        hook_point_name: str,
        hook: HookFn,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        prepend: bool = False,
    ) -> None:
        """Override to validate hooks before they are added (does nothing here)."""

    def add_hook(
        self,
        name: HookTarget,
        hook: HookFn,
        dir: Direction = "fwd",
        is_permanent: bool = False,
        level: int | None = None,
        prepend: bool = False,
    ) -> list[HookHandle]:
        """Attach ``hook`` to the hook point ``name`` (or every point a callable filter selects).

        Example:
            >>> handles = model.add_hook("blocks.0.hook_resid_pre", lambda x, *, hook: x * 2)
            >>> model.reset_hooks()
        """
        handles = []
        for point in self._points(name):
            self.check_hooks_to_add(point, point.name, hook, dir, is_permanent, prepend)
            handles.append(point.add_hook(hook, dir, is_permanent, level, prepend))
        return handles

    def add_perma_hook(self, name: HookTarget, hook: HookFn, dir: Direction = "fwd") -> list[HookHandle]:
        """`add_hook` with ``is_permanent=True``: it survives `reset_hooks` unless asked."""
        return self.add_hook(name, hook, dir=dir, is_permanent=True)

    def remove_all_hook_fns(
        self,
        direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """`HookPoint.remove_hooks` on every hook point."""
        for point in self.hook_points():
            point.remove_hooks(direction, including_permanent=including_permanent, level=level)

    def clear_contexts(self) -> None:
        """`HookPoint.clear_context` on every hook point."""
        for point in self.hook_points():
            point.clear_context()

    def reset_hooks(
        self,
        clear_contexts: bool = True,
        direction: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = False,
        level: int | None = None,
    ) -> None:
        """Remove the temporary hooks (at ``level`` when given; permanent ones too with
        ``including_permanent``) and, with ``clear_contexts``, every hook point's ``ctx``."""
        if clear_contexts:
            self.clear_contexts()
        self.remove_all_hook_fns(direction, including_permanent, level=level)
        self.is_caching = False

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
    ) -> Iterator[HookedRootModule]:
        """Attach hooks for the duration of a ``with`` block; they are removed even if it raises
        (unless ``reset_hooks_end=False``).

        Example:
            >>> with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", fn)]):
            ...     logits = model(tokens)
        """
        self.context_level += 1
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for target, fn in pairs or ():
                    self.add_hook(target, fn, direction, level=self.context_level)
            yield self
        finally:
            if reset_hooks_end:
                self.reset_hooks(clear_contexts, including_permanent=False, level=self.context_level)
            self.context_level -= 1

    def run_with_hooks(
        self,
        *model_args: Any,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        **model_kwargs: Any,
    ):
        """Run the forward with temporary hooks, removed afterwards even if the forward raises.

        Example:
            >>> def zero_head_3(z, *, hook):
            ...     z[:, :, 3] = 0
            >>> logits = model.run_with_hooks(tokens, fwd_hooks=[("blocks.2.attn.hook_z", zero_head_3)])
        """
        with self.hooks(fwd_hooks, bwd_hooks, reset_hooks_end, clear_contexts):
            return self(*model_args, **model_kwargs)

    def get_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
        pos_slice: Slice | SliceInput = None,
        cache_dtype: torch.dtype | None = None,
    ) -> tuple[dict, list, list]:
        """``(cache, fwd_hooks, bwd_hooks)``: hooks that store the points ``names_filter``
        selects (see `hook_names`) into ``cache`` (gradients as ``"{name}_grad"``), detached,
        without the batch axis, with ``pos_slice`` (an int, a slice or a list of positions; an int
        keeps the axis) applied to positions, cast to ``cache_dtype`` and then moved to ``device`` (`offload`)."""
        cache = {} if cache is None else cache
        pos_slice = Slice.unwrap(pos_slice)
        self.is_caching = True

        def save(tensor: Tensor, *, hook: HookPoint, suffix: str = "") -> None:
            tensor = tensor.detach()[0] if remove_batch_dim else tensor.detach()
            pos_dim = position_axis(hook.name)
            if tensor.dim() >= -pos_dim and pos_slice.mode != "identity":
                kept = pos_slice.apply(tensor, dim=pos_dim)
                tensor = kept.clone() if pos_slice.mode == "slice" else kept  # a view would keep every position
            tensor = tensor if cache_dtype is None else tensor.to(cache_dtype)
            cache[hook.name + suffix] = tensor if device is None else offload(tensor, device)

        names = self.hook_names(names_filter)
        fwd = [(name, save) for name in names]
        bwd = [(name, functools.partial(save, suffix="_grad")) for name in names] if incl_bwd else []
        return cache, fwd, bwd

    def run_with_cache(
        self,
        *model_args: Any,
        names_filter: NamesFilter = None,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        incl_bwd: bool = False,
        reset_hooks_end: bool = True,
        clear_contexts: bool = False,
        pos_slice: Slice | SliceInput = None,
        cache_dtype: torch.dtype | None = None,
        **model_kwargs: Any,
    ) -> tuple[Any, dict[str, Tensor]]:
        """Run the forward and return ``(output, cache_dict)`` of the activations `get_caching_hooks`
        stores. With ``incl_bwd`` the output must be a scalar: its gradients are cached too. ``cache_dtype``
        (e.g. ``torch.bfloat16``) stores a lower precision; ``device="cpu"`` offloads as it runs (`offload`)."""
        cache, fwd, bwd = self.get_caching_hooks(
            names_filter, incl_bwd, device, remove_batch_dim, pos_slice=pos_slice, cache_dtype=cache_dtype
        )
        with self.hooks(fwd, bwd, reset_hooks_end, clear_contexts):
            out = self(*model_args, **model_kwargs)
            if incl_bwd:
                if not isinstance(out, Tensor) or out.numel() != 1:
                    raise InputError("incl_bwd=True needs a scalar output: use return_type='loss' or a metric")
                out.backward()
        finish_offload(device)
        return out, cache
