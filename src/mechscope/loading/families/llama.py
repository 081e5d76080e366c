"""Llama and its close relatives (SmolLM2, Qwen2, Mistral).

RMSNorm, RoPE (``rope_theta``; ``linear`` and ``llama3`` scaling), SwiGLU MLP, grouped- and
multi-query attention, tied or untied embeddings, optional q/k/v (and output) biases, and
sliding-window attention on all layers (Mistral) or some (Qwen2's ``layer_types``).
"""

from __future__ import annotations

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

MODEL_TYPES = ("llama", "qwen2", "mistral")
DEFAULT_PREPEND_BOS = None
"""Follow the tokenizer: Llama 2/3 tokenizers add BOS, SmolLM2's and Qwen2's do not."""


def config_from_hf(hf: Any, **overrides: Any) -> ModelConfig:
    """The Llama-layout config; other adapters pass their differences as ``overrides``."""
    model_type = hf.model_type
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    else:
        qkv_bias = out_bias = bool(getattr(hf, "attention_bias", False))
    theta, scaling, partial = rope_parameters(hf, model_type)
    if partial != 1.0:
        raise ConfigError(f"{model_type}: partial_rotary_factor is not supported for this family")
    window, layer_types = attention_windows(hf)
    n_heads = hf.num_attention_heads
    fields = dict(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=n_heads,
        n_key_value_heads=get(hf, "num_key_value_heads", default=n_heads),
        d_head=get(hf, "head_dim", default=hf.hidden_size // n_heads),
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=activation(model_type, hf.hidden_act),
        gated_mlp=True,
        normalization_type="RMS",
        norm_eps=hf.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_base=theta,
        rope_scaling=scaling,
        attn_qkv_bias=qkv_bias,
        attn_out_bias=out_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_window=window,
        layer_types=layer_types,
        family="llama",
        extra={"model_type": model_type},
    )
    fields.update(overrides)
    return ModelConfig(**fields)


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``LlamaForCausalLM``-style state dict (``model.layers.{l}...``) to mechscope names.

    The projections are already ``[out, in]``, so every weight is taken as is. With
    ``cfg.qk_norm`` (Qwen3) the ``q_norm``/``k_norm`` weights are read too.
    """
    sd = {key.removeprefix("model."): value for key, value in state_dict.items()}
    r = StateDictReader(
        sd, cfg.extra.get("model_type", "llama"), ignore=lambda key: key.endswith("rotary_emb.inv_freq")
    )
    d = cfg.d_model
    out = {
        "embed.W_E": r.take("embed_tokens.weight", (cfg.d_vocab, d)),
        "ln_final.w": r.take("norm.weight", (d,)),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"layers.{layer}.", f"blocks.{layer}."
        out[dst + "ln1.w"] = r.take(src + "input_layernorm.weight", (d,))
        out[dst + "ln2.w"] = r.take(src + "post_attention_layernorm.weight", (d,))
        out.update(take_attention(r, src + "self_attn.", dst, cfg))
        if cfg.qk_norm == "head":
            out[dst + "attn.q_norm.w"] = r.take(src + "self_attn.q_norm.weight", (cfg.d_head,))
            out[dst + "attn.k_norm.w"] = r.take(src + "self_attn.k_norm.weight", (cfg.d_head,))
        out.update(take_gated_mlp(r, src + "mlp.", dst, cfg))
    out.update(r.take_unembed("lm_head.weight", cfg))
    r.finish()
    return out
