"""OLMo-2: the Llama layout with post-norms only and RMSNorm over all query (and all key) heads.

Each sublayer's output is normalised (``post_attention_layernorm``, ``post_feedforward_layernorm``)
before joining the residual stream; sublayer inputs are not normalised. ``q_norm``/``k_norm``
act on the whole ``[n_heads * d_head]`` projection before RoPE.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechscope.loading.families import llama
from mechscope.loading.families._common import StateDictReader, take_attention, take_gated_mlp
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("olmo2",)
DEFAULT_PREPEND_BOS = None
"""Follow the tokenizer."""


def config_from_hf(hf: Any) -> ModelConfig:
    bias = bool(getattr(hf, "attention_bias", False))
    return llama.config_from_hf(
        hf, qk_norm="full", pre_norm=False, post_norm=True, attn_qkv_bias=bias, attn_out_bias=bias, family="olmo2"
    )


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map an ``Olmo2ForCausalLM`` state dict (``model.layers.{l}...``) to mechscope names."""
    sd = {key.removeprefix("model."): value for key, value in state_dict.items()}
    r = StateDictReader(sd, "olmo2", ignore=lambda key: key.endswith("rotary_emb.inv_freq"))
    d = cfg.d_model
    out = {"embed.W_E": r.take("embed_tokens.weight", (cfg.d_vocab, d)), "ln_final.w": r.take("norm.weight", (d,))}
    for layer in range(cfg.n_layers):
        src, dst = f"layers.{layer}.", f"blocks.{layer}."
        out[dst + "ln1_post.w"] = r.take(src + "post_attention_layernorm.weight", (d,))
        out[dst + "ln2_post.w"] = r.take(src + "post_feedforward_layernorm.weight", (d,))
        out.update(take_attention(r, src + "self_attn.", dst, cfg))
        out[dst + "attn.q_norm.w"] = r.take(src + "self_attn.q_norm.weight", (cfg.n_heads * cfg.d_head,))
        out[dst + "attn.k_norm.w"] = r.take(src + "self_attn.k_norm.weight", (cfg.n_key_value_heads * cfg.d_head,))
        out.update(take_gated_mlp(r, src + "mlp.", dst, cfg))
    out.update(r.take_unembed("lm_head.weight", cfg))
    r.finish()
    return out
