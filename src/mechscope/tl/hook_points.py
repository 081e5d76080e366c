"""TransformerLens' ``hook_points`` module: `HookPoint`, `HookedRootModule` and the names filter
type, on mechscope's hooks.

`HookedRootModule` here is mechscope's (`mechscope.hooks.HookedRootModule`) plus the
TransformerLens methods that attach hooks outside a ``with`` block or list them:
``add_caching_hooks``, ``cache_all``, ``cache_some`` and ``list_hooks`` (`CachingHooks`).

Example:
    >>> from mechscope.tl.hook_points import HookPoint, HookedRootModule
    >>> HookPoint().fwd_hooks
    []
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Literal

import torch

from mechscope import hooks
from mechscope.hooks import HookHandle, HookPoint, NamesFilter

__all__ = ["CachingHooks", "HookPoint", "HookedRootModule", "NamesFilter"]


class CachingHooks:
    """TransformerLens' hook methods that mechscope's `HookedRootModule` leaves out: caching hooks
    that stay attached until ``reset_hooks()``, and a listing of attached hooks.

    Mixed into `mechscope.tl.HookedTransformer` and `HookedRootModule` (this module's).
    """

    def add_caching_hooks(
        self,
        names_filter: NamesFilter = None,
        incl_bwd: bool = False,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
        cache: dict | None = None,
    ) -> dict:
        """Attach hooks that store the activations ``names_filter`` selects into ``cache`` (a new
        dict by default, returned) on every later forward, gradients as ``"{name}_grad"`` with
        ``incl_bwd``; they stay until ``reset_hooks()``. Nothing runs here.

        Example:
            >>> from mechscope.tl import HookedTransformer
            >>> tl_model = HookedTransformer(model.cfg)
            >>> store = tl_model.add_caching_hooks("blocks.0.attn.hook_z")
            >>> _ = tl_model(torch.tensor([[1, 2, 3]])); tl_model.reset_hooks()
            >>> list(store), store["blocks.0.attn.hook_z"].shape
            (['blocks.0.attn.hook_z'], torch.Size([1, 3, 4, 8]))
        """
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for name, fn in fwd:
            self.add_hook(name, fn, dir="fwd")
        for name, fn in bwd:
            self.add_hook(name, fn, dir="bwd")
        return cache

    def cache_all(
        self,
        cache: dict | None,
        incl_bwd: bool = False,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
    ) -> None:
        """Deprecated in TransformerLens: `add_caching_hooks` for every hook point, into ``cache``."""
        warnings.warn("cache_all is deprecated; use add_caching_hooks or run_with_cache", DeprecationWarning, 2)
        self.add_caching_hooks(None, incl_bwd, device, remove_batch_dim, cache)

    def cache_some(
        self,
        cache: dict | None,
        names: Callable[[str], bool],
        incl_bwd: bool = False,
        device: torch.device | str | None = None,
        remove_batch_dim: bool = False,
    ) -> None:
        """Deprecated in TransformerLens: `add_caching_hooks` for the points ``names`` selects."""
        warnings.warn("cache_some is deprecated; use add_caching_hooks or run_with_cache", DeprecationWarning, 2)
        self.add_caching_hooks(names, incl_bwd, device, remove_batch_dim, cache)

    def list_hooks(
        self,
        name_filter: NamesFilter = None,
        dir: Literal["fwd", "bwd", "both"] = "both",
        including_permanent: bool = True,
    ) -> dict[str, list[HookHandle]]:
        """The attached hooks by hook-point name (points without hooks left out): forward,
        backward or both, permanent ones unless ``including_permanent=False``. ``name_filter`` is a
        name, a list of names or a predicate, as in TransformerLens (unknown names match nothing).

        Example:
            >>> from mechscope.tl import HookedTransformer
            >>> tl_model = HookedTransformer(model.cfg)
            >>> _ = tl_model.add_hook("blocks.1.hook_resid_post", lambda x, hook: None)
            >>> {k: len(v) for k, v in tl_model.list_hooks().items()}
            {'blocks.1.hook_resid_post': 1}
            >>> tl_model.reset_hooks()
        """
        if name_filter is None or callable(name_filter):
            matches: Callable[[str], bool] = name_filter or (lambda name: True)  # noqa: E731
        else:
            matches = ({name_filter} if isinstance(name_filter, str) else set(name_filter)).__contains__
        listed = {}
        for name, point in self.hook_dict.items():
            if not matches(name):
                continue
            handles = [
                *(point.fwd_hooks if dir in ("fwd", "both") else []),
                *(point.bwd_hooks if dir in ("bwd", "both") else []),
            ]
            handles = [h for h in handles if including_permanent or not h.is_permanent]
            if handles:
                listed[name] = handles
        return listed


class HookedRootModule(CachingHooks, hooks.HookedRootModule):
    """mechscope's `mechscope.hooks.HookedRootModule` with TransformerLens' `CachingHooks`
    methods: subclass it, build the modules, call ``setup()``.

    Example:
        >>> class Doubler(HookedRootModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.hook_in = HookPoint()
        ...         self.setup()
        ...     def forward(self, x):
        ...         return 2 * self.hook_in(x)
        >>> doubler = Doubler()
        >>> store = doubler.add_caching_hooks()  # stays attached until reset_hooks()
        >>> doubler(torch.ones(2)).tolist(), store["hook_in"].tolist()
        ([2.0, 2.0], [1.0, 1.0])
        >>> doubler.reset_hooks(); doubler.list_hooks()
        {}
    """
