"""Qwen3: the Llama layout with per-head RMSNorm on queries and keys (QK-norm) before RoPE.

No q/k/v biases (unless ``attention_bias``), an explicit ``head_dim``, and optional
sliding-window layers (``layer_types``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechscope.loading.families import llama
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("qwen3",)
DEFAULT_PREPEND_BOS = None
"""Follow the tokenizer (Qwen3's adds no BOS)."""


def config_from_hf(hf: Any) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    return llama.config_from_hf(hf, qk_norm="head", attn_qkv_bias=bias, attn_out_bias=bias, family="qwen3")


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """The Llama conversion; ``cfg.qk_norm`` makes it read ``self_attn.q_norm``/``k_norm``."""
    return llama.convert_weights(state_dict, cfg)
