"""TransformerLens' ``hook_points`` module: `HookPoint`, `HookedRootModule` and the names filter
type, from mechscope's hooks.

Example:
    >>> from mechscope.tl.hook_points import HookPoint, HookedRootModule
    >>> HookPoint().fwd_hooks
    []
"""

from mechscope.hooks import HookedRootModule, HookPoint, NamesFilter

__all__ = ["HookPoint", "HookedRootModule", "NamesFilter"]
