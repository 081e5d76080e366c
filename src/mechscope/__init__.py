"""mechscope: mechanistic interpretability of transformer language models.

Example:
    >>> import mechscope as ms
    >>> model = ms.load("smollm2-135m")                                   # doctest: +SKIP
    >>> logits, cache = model.run_with_cache("The cat sat on the")        # doctest: +SKIP
"""

from mechscope.cache import ActivationCache
from mechscope.errors import (
    ConfigError,
    HookError,
    HookNameError,
    InputError,
    LoadError,
    MechscopeError,
    WeightConversionError,
)
from mechscope.hooks import HookPoint
from mechscope.loading.pretrained import load
from mechscope.model.config import ModelConfig
from mechscope.model.transformer import HookedTransformer
from mechscope.names import act_name

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
