"""Hook points: identity modules with dotted names where activations can be read or replaced.

A hook function has the signature ``fn(activation, *, hook) -> activation | None``. Returning
a tensor replaces the activation (it must keep the shape, dtype and device); returning
``None`` leaves it unchanged. Backward hooks have the same signature and receive the
gradient of the activation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from mechscope.errors import HookError, HookNameError
from mechscope.names import unknown_name_error

HookFn = Callable[..., torch.Tensor | None]
NamesFilter = None | str | Sequence[str] | Callable[[str], bool]
HookTarget = str | Callable[[str], bool]
Direction = Literal["fwd", "bwd"]


@dataclass(eq=False)
class HookHandle:
    """A registered hook; `remove()` detaches it (removing twice is harmless)."""

    point: HookPoint
    fn: HookFn
    direction: Direction
    persistent: bool = False

    def remove(self) -> None:
        hooks = self.point._fwd if self.direction == "fwd" else self.point._bwd
        if self in hooks:
            hooks.remove(self)


class HookPoint(nn.Module):
    """An identity module that runs the hooks attached to it.

    ``opt_in`` hook points are skipped by their component unless a hook is attached or
    the matching config flag is set, so they cost nothing when unused.

    Example:
        >>> point = HookPoint(); point.name = "demo"
        >>> handle = point.add_hook(lambda x, *, hook: x * 2)
        >>> point(torch.ones(2)).tolist()
        [2.0, 2.0]
        >>> handle.remove(); point(torch.ones(2)).tolist()
        [1.0, 1.0]
    """

    def __init__(self, opt_in: bool = False) -> None:
        super().__init__()
        self.name: str = ""
        self.opt_in = opt_in
        self._fwd: list[HookHandle] = []
        self._bwd: list[HookHandle] = []

    @property
    def has_hooks(self) -> bool:
        return bool(self._fwd or self._bwd)

    def add_hook(self, fn: HookFn, dir: Direction = "fwd", persistent: bool = False) -> HookHandle:
        """Attach ``fn``; it runs on every forward (or backward, for ``dir="bwd"``) until removed."""
        if dir not in ("fwd", "bwd"):
            raise HookError(f"hook direction must be 'fwd' or 'bwd', got {dir!r}")
        if not callable(fn):
            raise HookError(f"hook for {self.name!r} must be callable, got {type(fn).__name__}")
        handle = HookHandle(self, fn, dir, persistent)
        (self._fwd if dir == "fwd" else self._bwd).append(handle)
        return handle

    def remove_hooks(self, dir: Literal["fwd", "bwd", "both"] = "both", including_permanent: bool = False) -> None:
        """Remove temporary hooks (and persistent ones if ``including_permanent``)."""
        for hooks, d in ((self._fwd, "fwd"), (self._bwd, "bwd")):
            if dir in (d, "both"):
                hooks[:] = [h for h in hooks if h.persistent and not including_permanent]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for handle in tuple(self._fwd):
            out = handle.fn(x, hook=self)
            if out is not None:
                _check_replacement(self.name, "activation", x, out)
                x = out
        if self._bwd and x.requires_grad:
            # A fresh autograd node, so that a tensor shared by two hook points (e.g. resid_post
            # of one block and resid_pre of the next) reports its gradient to each separately.
            # The hooks attached now are bound now: a backward pass after `run_with_hooks` or a
            # `hooks()` block has returned still runs them.
            x = x.view_as(x)
            x.register_hook(functools.partial(self._run_bwd_hooks, tuple(self._bwd)))
        return x

    def _run_bwd_hooks(self, handles: tuple[HookHandle, ...], grad: torch.Tensor) -> torch.Tensor:
        for handle in handles:
            out = handle.fn(grad, hook=self)
            if out is not None:
                _check_replacement(self.name, "gradient", grad, out)
                grad = out
        return grad

    def extra_repr(self) -> str:
        return f"name={self.name!r}" + (", opt_in=True" if self.opt_in else "")


def _check_replacement(name: str, what: str, old: torch.Tensor, new: object) -> None:
    if not isinstance(new, torch.Tensor):
        raise HookError(f"hook on {name!r} returned {type(new).__name__}; return a tensor or None")
    if new.shape != old.shape:
        raise HookError(f"hook on {name!r} returned a {what} of shape {tuple(new.shape)}, expected {tuple(old.shape)}")
    if new.dtype != old.dtype:
        raise HookError(f"hook on {name!r} returned dtype {new.dtype}, expected {old.dtype}")
    if new.device != old.device:
        raise HookError(f"hook on {name!r} returned a tensor on {new.device}, expected {old.device}")


class HookedRootModule(nn.Module):
    """Base class that names every `HookPoint` below it and manages their hooks."""

    def setup_hooks(self) -> None:
        """Name every `HookPoint` after its module path; call at the end of ``__init__``."""
        self.hook_dict: dict[str, HookPoint] = {}
        for name, module in self.named_modules():
            if isinstance(module, HookPoint):
                module.name = name
                self.hook_dict[name] = module

    def hook_names(self, names_filter: NamesFilter = None) -> list[str]:
        """Names of the hook points selected by ``names_filter``, in forward order.

        ``None`` selects every hook point that runs by default (opt-in points only when their
        config flag is on); a string or list of strings selects those names, validating each;
        a callable ``fn(name) -> bool`` selects every matching point, opt-in points included.
        """
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

    def add_hook(
        self, name: HookTarget, fn: HookFn, dir: Direction = "fwd", persistent: bool = False
    ) -> list[HookHandle]:
        """Attach ``fn`` to the hook point ``name`` (or every point a callable filter selects).

        Example:
            >>> handles = model.add_hook("blocks.0.hook_resid_pre", lambda x, *, hook: x * 2)
            >>> model.reset_hooks()
        """
        return [p.add_hook(fn, dir, persistent) for p in self._points(name)]

    def reset_hooks(self, including_permanent: bool = False) -> None:
        """Remove all temporary hooks (and persistent ones if ``including_permanent``)."""
        for point in self.hook_dict.values():
            point.remove_hooks("both", including_permanent)

    @contextmanager
    def hooks(
        self,
        fwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
        bwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
    ) -> Iterator[HookedRootModule]:
        """Attach hooks for the duration of a ``with`` block; they are removed even if it raises.

        Example:
            >>> with model.hooks(fwd_hooks=[("blocks.0.attn.hook_z", fn)]):
            ...     logits = model(tokens)
        """
        handles: list[HookHandle] = []
        try:
            for direction, pairs in (("fwd", fwd_hooks), ("bwd", bwd_hooks)):
                for target, fn in pairs or ():
                    handles.extend(self.add_hook(target, fn, direction))
            yield self
        finally:
            for handle in handles:
                handle.remove()
