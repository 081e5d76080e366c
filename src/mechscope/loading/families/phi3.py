"""Phi-3: the Llama computation with fused ``qkv_proj`` and ``gate_up_proj`` weights.

Partial rotary (``partial_rotary_factor``) and a sliding window on every layer are supported;
``longrope`` scaling (the 128k-context variants) is not.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechscope.loading.families._common import (
    StateDictReader,
    activation,
    attention_windows,
    get,
    rope_parameters,
    rotary_dim,
)
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("phi3",)
DEFAULT_PREPEND_BOS = None
"""Follow the tokenizer."""


def config_from_hf(hf: Any) -> ModelConfig:
    theta, scaling, partial = rope_parameters(hf, "phi3")
    window, layer_types = attention_windows(hf)
    n_heads = hf.num_attention_heads
    d_head = get(hf, "head_dim", default=hf.hidden_size // n_heads)
    return ModelConfig(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=n_heads,
        n_key_value_heads=get(hf, "num_key_value_heads", default=n_heads),
        d_head=d_head,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=activation("phi3", hf.hidden_act),
        gated_mlp=True,
        normalization_type="RMS",
        norm_eps=hf.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim(d_head, partial, "phi3"),
        rotary_base=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        sliding_window=window,
        layer_types=layer_types,
        family="phi3",
        extra={"model_type": "phi3"},
    )


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Split ``qkv_proj`` ``[q | k | v]`` and ``gate_up_proj`` ``[gate | up]`` (both ``[out, in]``)."""
    sd = {key.removeprefix("model."): value for key, value in state_dict.items()}
    r = StateDictReader(sd, "phi3", ignore=lambda key: key.endswith("rotary_emb.inv_freq"))
    d, m = cfg.d_model, cfg.d_mlp
    q_size, kv_size = cfg.n_heads * cfg.d_head, cfg.n_key_value_heads * cfg.d_head
    out = {"embed.W_E": r.take("embed_tokens.weight", (cfg.d_vocab, d)), "ln_final.w": r.take("norm.weight", (d,))}
    for layer in range(cfg.n_layers):
        src, dst = f"layers.{layer}.", f"blocks.{layer}."
        w_q, w_k, w_v = r.take(src + "self_attn.qkv_proj.weight", (q_size + 2 * kv_size, d)).split(
            (q_size, kv_size, kv_size), dim=0
        )
        w_gate, w_in = r.take(src + "mlp.gate_up_proj.weight", (2 * m, d)).split(m, dim=0)
        out.update(
            {
                dst + "ln1.w": r.take(src + "input_layernorm.weight", (d,)),
                dst + "ln2.w": r.take(src + "post_attention_layernorm.weight", (d,)),
                dst + "attn.w_q": w_q,
                dst + "attn.w_k": w_k,
                dst + "attn.w_v": w_v,
                dst + "attn.w_o": r.take(src + "self_attn.o_proj.weight", (d, q_size)),
                dst + "mlp.w_gate": w_gate,
                dst + "mlp.w_in": w_in,
                dst + "mlp.w_out": r.take(src + "mlp.down_proj.weight", (d, m)),
            }
        )
    out.update(r.take_unembed("lm_head.weight", cfg))
    r.finish()
    return {key: value.contiguous() for key, value in out.items()}
