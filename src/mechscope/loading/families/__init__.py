"""Family adapters: one module per Hugging Face architecture.

Each module defines ``MODEL_TYPES`` (the HF ``model_type`` values it handles),
``DEFAULT_PREPEND_BOS`` (``True``/``False``, or ``None`` to follow the tokenizer),
``config_from_hf(hf_config) -> ModelConfig`` and ``convert_weights(state_dict, cfg)``.
Adding a family is adding a module and listing it here.
"""

from __future__ import annotations

from types import ModuleType

from mechscope.errors import ConfigError
from mechscope.loading.families import (
    clip_text,
    clip_vision,
    gemma,
    gpt2,
    gpt_neox,
    gptj,
    llama,
    olmo2,
    phi3,
    qwen3,
    siglip_vision,
    vit,
)

_ADAPTERS: tuple[ModuleType, ...] = (
    gpt2,
    gpt_neox,
    gptj,
    llama,
    qwen3,
    gemma,
    phi3,
    olmo2,
    vit,
    clip_vision,
    clip_text,
    siglip_vision,
)
REGISTRY: dict[str, ModuleType] = {model_type: module for module in _ADAPTERS for model_type in module.MODEL_TYPES}


def adapter_for(model_type: str) -> ModuleType:
    """The adapter module for a Hugging Face ``model_type``."""
    if model_type not in REGISTRY:
        raise ConfigError(
            f"model_type {model_type!r} has no family adapter; supported: {sorted(REGISTRY)}. "
            "mechscope.load(..., adapter='generic') wraps it at the block level (no per-head hooks)"
        )
    return REGISTRY[model_type]
