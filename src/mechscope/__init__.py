"""mechscope: mechanistic interpretability of transformer language models.

Example:
    >>> import mechscope as ms
    >>> model = ms.load("smollm2-135m")                                   # doctest: +SKIP
    >>> logits, cache = model.run_with_cache("The cat sat on the")        # doctest: +SKIP
"""

from importlib import import_module

from mechscope.errors import (
    ConfigError,
    HookError,
    HookNameError,
    InputError,
    LoadError,
    MechscopeError,
    WeightConversionError,
)

# The names that need torch are imported on first use, so that `import mechscope` (and the
# command line's --help) stays fast and has no side effects.
_LAZY = {
    "ActivationCache": "mechscope.cache",
    "HookPoint": "mechscope.hooks",
    "HookedTransformer": "mechscope.model.transformer",
    "ModelConfig": "mechscope.model.config",
    "act_name": "mechscope.names",
    "load": "mechscope.loading.pretrained",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mechscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | set(globals()))


__all__ = [
    "ActivationCache",
    "ConfigError",
    "HookError",
    "HookNameError",
    "HookPoint",
    "HookedTransformer",
    "InputError",
    "LoadError",
    "MechscopeError",
    "ModelConfig",
    "WeightConversionError",
    "act_name",
    "load",
]
__version__ = "0.1.0"
