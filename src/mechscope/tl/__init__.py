"""TransformerLens' API on mechscope: port a notebook by changing its import.

    import mechscope.tl as transformer_lens
    from mechscope.tl import HookedTransformer, HookedTransformerConfig, ActivationCache, FactoredMatrix, utils

Every name here has TransformerLens 3.9's signature, defaults and meaning, and runs on mechscope's
own model, cache, hooks and batched patching engine. ``docs/tl_compat.md`` lists each
TransformerLens name with its status (same, extended, not supported yet and why).

Example:
    >>> import mechscope.tl as transformer_lens
    >>> transformer_lens.utils.get_act_name("k6"), transformer_lens.FactoredMatrix is ms.analysis.FactoredMatrix
    ('blocks.6.attn.hook_k', True)
"""

from mechscope.analysis.factored import FactoredMatrix
from mechscope.cache import ActivationCache
from mechscope.hooks import HookPoint
from mechscope.model.context import KVCache
from mechscope.tl import head_detector, hook_points, patching, utils
from mechscope.tl.config import HookedTransformerConfig
from mechscope.tl.hook_points import HookedRootModule
from mechscope.tl.model import HookedTransformer

utilities = utils
"""TransformerLens 3 renamed ``utils`` to ``utilities``; both names work."""
TransformerLensKeyValueCache = KVCache
"""TransformerLens' key/value cache: mechscope's `KVCache` (``init_cache``, ``freeze``, ``append_attention_mask``)."""
HookedTransformerKeyValueCache = KVCache
"""The cache's name before TransformerLens 3."""

__all__ = [
    "ActivationCache",
    "FactoredMatrix",
    "HookPoint",
    "HookedRootModule",
    "HookedTransformer",
    "HookedTransformerConfig",
    "HookedTransformerKeyValueCache",
    "TransformerLensKeyValueCache",
    "head_detector",
    "hook_points",
    "patching",
    "utilities",
    "utils",
]
