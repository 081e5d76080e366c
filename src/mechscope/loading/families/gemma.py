"""Gemma 1, 2 and 3 (text).

All three: token embeddings scaled by ``sqrt(d_model)``, RMSNorm computing ``x * (1 + w)``
(converted here to an ordinary weight ``1 + w``), GeGLU MLP, tied embeddings, explicit
``head_dim``. Gemma 2 adds post-norms on both sublayers, attention and final-logit soft-capping,
``query_pre_attn_scalar`` and alternating sliding-window layers. Gemma 3 drops the soft-caps and
adds per-head QK-norm and a separate RoPE base for its sliding-window layers.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.loading.families._common import (
    StateDictReader,
    activation,
    attention_windows,
    get,
    rope_parameters,
    take_attention,
    take_gated_mlp,
)
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("gemma", "gemma2", "gemma3_text")
DEFAULT_PREPEND_BOS = True
"""Gemma was trained with ``<bos>`` first and degrades badly without it."""


def _rope(hf: Any, family: str) -> dict[str, Any]:
    """RoPE of the full-attention layers and (Gemma 3) the base of the sliding-window layers.

    Gemma 3's ``rope_parameters`` has one entry per layer type; a model may have only one of
    the two types (fewer layers than the sliding-window pattern: all sliding), so each type
    reads its own entry whenever it is there.
    """
    params = getattr(hf, "rope_parameters", None) or {}
    by_type = family == "gemma3_text" and ("full_attention" in params or "sliding_attention" in params)
    if not by_type:
        theta, scaling, partial = rope_parameters(hf, family)
        local = None
    else:
        full, sliding = params.get("full_attention"), params.get("sliding_attention")
        theta, scaling, partial = rope_parameters(hf, family, full if full is not None else sliding)
        local = None
        if sliding is not None:
            local, local_scaling, _ = rope_parameters(hf, family, sliding)
            if local_scaling is not None:
                raise ConfigError(f"{family}: RoPE scaling on sliding-window layers is not supported")
    if partial != 1.0:
        raise ConfigError(f"{family}: partial_rotary_factor is not supported")
    return dict(rotary_base=theta, rope_scaling=scaling, rotary_base_local=local)


def _layer_types(hf: Any, family: str, window: int | None, layer_types: list[str] | None) -> list[str] | None:
    """Per-layer attention types. Gemma 3 keeps them whenever it has sliding-window layers,
    even when every layer is one (each type has its own RoPE base, see `ModelConfig.layer_rope`)."""
    hf_types = getattr(hf, "layer_types", None)
    if family == "gemma3_text" and window is not None and hf_types and "sliding_attention" in hf_types:
        return list(hf_types)
    return layer_types


def config_from_hf(hf: Any) -> ModelConfig:
    family = hf.model_type
    if getattr(hf, "use_bidirectional_attention", False):
        raise ConfigError(f"{family}: use_bidirectional_attention=True (encoder use) is not supported")
    n_heads = hf.num_attention_heads
    d_head = get(hf, "head_dim", default=hf.hidden_size // n_heads)
    later = family != "gemma"
    window, layer_types = attention_windows(hf) if later else (None, None)
    layer_types = _layer_types(hf, family, window, layer_types)
    scalar = getattr(hf, "query_pre_attn_scalar", None) if later else None
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=n_heads,
        n_key_value_heads=get(hf, "num_key_value_heads", default=n_heads),
        d_head=d_head,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=activation(family, get(hf, "hidden_activation", "hidden_act") if later else hf.hidden_act),
        gated_mlp=True,
        normalization_type="RMS",
        norm_eps=hf.rms_norm_eps,
        positional_embedding_type="rotary",
        **_rope(hf, family),
        attn_scale=None if scalar is None else math.sqrt(scalar),
        attn_qkv_bias=bias,
        attn_out_bias=bias,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
        sliding_window=window,
        layer_types=layer_types,
        qk_norm="head" if family == "gemma3_text" else None,
        post_norm=later,
        embed_scale=hf.hidden_size**0.5,
        attn_scores_soft_cap=getattr(hf, "attn_logit_softcapping", None) if later else None,
        output_logits_soft_cap=getattr(hf, "final_logit_softcapping", None) if later else None,
        family="gemma",
        extra={"model_type": family},
    )


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``Gemma*ForCausalLM`` state dict to mechscope names; norm weights become ``1 + w``.

    Gemma 1 has ``input_layernorm`` and ``post_attention_layernorm`` (before the MLP); Gemma 2/3
    have ``input_layernorm``, ``post_attention_layernorm`` (after attention),
    ``pre_feedforward_layernorm`` and ``post_feedforward_layernorm``.
    """
    sd = {key.removeprefix("model."): value for key, value in state_dict.items()}
    family = cfg.extra.get("model_type", "gemma")
    r = StateDictReader(sd, family, ignore=lambda key: key.endswith("rotary_emb.inv_freq"))
    d = cfg.d_model

    def norm(key: str, size: int = d) -> Tensor:
        return r.take(key, (size,)) + 1.0

    out = {"embed.W_E": r.take("embed_tokens.weight", (cfg.d_vocab, d)), "ln_final.w": norm("norm.weight")}
    for layer in range(cfg.n_layers):
        src, dst = f"layers.{layer}.", f"blocks.{layer}."
        out[dst + "ln1.w"] = norm(src + "input_layernorm.weight")
        if cfg.post_norm:
            out[dst + "ln1_post.w"] = norm(src + "post_attention_layernorm.weight")
            out[dst + "ln2.w"] = norm(src + "pre_feedforward_layernorm.weight")
            out[dst + "ln2_post.w"] = norm(src + "post_feedforward_layernorm.weight")
        else:
            out[dst + "ln2.w"] = norm(src + "post_attention_layernorm.weight")
        out.update(take_attention(r, src + "self_attn.", dst, cfg))
        if cfg.qk_norm == "head":
            out[dst + "attn.q_norm.w"] = norm(src + "self_attn.q_norm.weight", cfg.d_head)
            out[dst + "attn.k_norm.w"] = norm(src + "self_attn.k_norm.weight", cfg.d_head)
        out.update(take_gated_mlp(r, src + "mlp.", dst, cfg))
    out.update(r.take_unembed("lm_head.weight", cfg))
    r.finish()
    return out
