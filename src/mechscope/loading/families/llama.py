"""Llama and its close relatives (SmolLM2, Qwen2, Mistral without a sliding window).

RMSNorm, RoPE (``rope_theta``; ``linear`` and ``llama3`` scaling), SwiGLU MLP, grouped- and
multi-query attention, tied or untied embeddings, optional q/k/v (and output) biases.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.loading.families._common import StateDictReader, activation, get
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("llama", "qwen2", "mistral")
DEFAULT_PREPEND_BOS = None
"""Follow the tokenizer: Llama 2/3 tokenizers add BOS, SmolLM2's and Qwen2's do not."""


def rope_parameters(hf: Any) -> tuple[float, dict | None]:
    """``(rope_theta, scaling)`` from a transformers 5 ``rope_parameters`` or a 4.x ``rope_scaling``."""
    params = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(hf, "rope_theta", None) or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError("llama: partial_rotary_factor is not supported for this family")
        return float(theta), None
    if rope_type not in ("linear", "llama3"):
        raise ConfigError(f"llama: rope type {rope_type!r} is not supported; supported: default, linear, llama3")
    keys = ("factor",) if rope_type == "linear" else (
        "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"
    )
    missing = [k for k in keys if k not in params]
    if missing:
        raise ConfigError(f"llama: rope scaling {rope_type!r} is missing {missing}")
    return float(theta), {"rope_type": rope_type, **{k: params[k] for k in keys}}


def config_from_hf(hf: Any) -> ModelConfig:
    model_type = hf.model_type
    if model_type == "qwen2" and getattr(hf, "use_sliding_window", False):
        raise ConfigError("qwen2: use_sliding_window=True is not supported yet")
    window = getattr(hf, "sliding_window", None) if model_type == "mistral" else None
    if model_type == "qwen2":
        qkv_bias, out_bias = True, False
    else:
        qkv_bias = out_bias = bool(getattr(hf, "attention_bias", False))
    theta, scaling = rope_parameters(hf)
    n_heads = hf.num_attention_heads
    return ModelConfig(
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
        normalization_type="rmsnorm",
        norm_eps=hf.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_base=theta,
        rope_scaling=scaling,
        attn_qkv_bias=qkv_bias,
        attn_out_bias=out_bias,
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_window=window,
        family="llama",
        extra={"model_type": model_type},
    )


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``LlamaForCausalLM``-style state dict (``model.layers.{l}...``) to mechscope names.

    The projections are already ``[out, in]``, so every weight is taken as is.
    """
    sd = {key.removeprefix("model."): value for key, value in state_dict.items()}
    r = StateDictReader(sd, cfg.extra.get("model_type", "llama"), ignore=lambda key: key.endswith("rotary_emb.inv_freq"))
    d, m, v = cfg.d_model, cfg.d_mlp, cfg.d_vocab
    q_size, kv_size = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    out = {
        "embed.W_E": r.take("embed_tokens.weight", (v, d)),
        "ln_final.w": r.take("norm.weight", (d,)),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"layers.{layer}.", f"blocks.{layer}."
        attn, mlp = src + "self_attn.", src + "mlp."
        out[dst + "ln1.w"] = r.take(src + "input_layernorm.weight", (d,))
        out[dst + "ln2.w"] = r.take(src + "post_attention_layernorm.weight", (d,))
        for name, size in (("q", q_size), ("k", kv_size), ("v", kv_size)):
            out[dst + f"attn.w_{name}"] = r.take(attn + f"{name}_proj.weight", (size, d))
            if cfg.attn_qkv_bias:
                out[dst + f"attn.b_{name}"] = r.take(attn + f"{name}_proj.bias", (size,))
        out[dst + "attn.w_o"] = r.take(attn + "o_proj.weight", (d, q_size))
        if cfg.attn_out_bias:
            out[dst + "attn.b_o"] = r.take(attn + "o_proj.bias", (d,))
        for ours, theirs, shape in (("w_gate", "gate_proj", (m, d)), ("w_in", "up_proj", (m, d)), ("w_out", "down_proj", (d, m))):
            out[dst + f"mlp.{ours}"] = r.take(mlp + f"{theirs}.weight", shape)
        if cfg.mlp_bias:
            out[dst + "mlp.b_gate"] = r.take(mlp + "gate_proj.bias", (m,))
            out[dst + "mlp.b_in"] = r.take(mlp + "up_proj.bias", (m,))
            out[dst + "mlp.b_out"] = r.take(mlp + "down_proj.bias", (d,))
    out.update(r.take_unembed("lm_head.weight", cfg))
    r.finish()
    return out
