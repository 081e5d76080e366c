"""GPT-NeoX / Pythia: LayerNorm, partial half-split RoPE, parallel attention and MLP, untied unembedding.

``query_key_value`` is ``[n_heads * 3 * d_head, d_model]`` with rows ordered head by head, each
head's query, key and value together. With ``use_parallel_residual=False`` the block is sequential.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechscope.loading.families._common import StateDictReader, activation, rope_parameters, rotary_dim
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("gpt_neox",)
DEFAULT_PREPEND_BOS = True
"""Pythia's tokenizer adds no BOS, but like TransformerLens mechscope prepends ``<|endoftext|>``,
the document separator it was trained with."""


def config_from_hf(hf: Any) -> ModelConfig:
    theta, scaling, partial = rope_parameters(hf, "gpt_neox")
    d_head = hf.hidden_size // hf.num_attention_heads
    bias = bool(getattr(hf, "attention_bias", True))
    return ModelConfig(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        n_ctx=hf.max_position_embeddings,
        act_fn=activation("gpt_neox", hf.hidden_act),
        normalization_type="LN",
        norm_eps=hf.layer_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=rotary_dim(d_head, partial, "gpt_neox"),
        rotary_base=theta,
        rope_scaling=scaling,
        attn_qkv_bias=bias,
        attn_out_bias=bias,
        mlp_bias=True,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        parallel_attn_mlp=bool(getattr(hf, "use_parallel_residual", True)),
        family="gpt_neox",
        extra={"model_type": "gpt_neox"},
    )


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``GPTNeoXForCausalLM`` state dict to mechscope names, de-interleaving ``query_key_value``.

    The causal-mask buffers of old checkpoints (``attention.bias``/``masked_bias``) are ignored.
    """
    sd = {key.removeprefix("gpt_neox."): value for key, value in state_dict.items()}
    ignored = ("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")
    r = StateDictReader(sd, "gpt_neox", ignore=lambda key: key.endswith(ignored))
    d, m, h, dh = cfg.d_model, cfg.d_mlp, cfg.n_heads, cfg.d_head
    out = {
        "embed.W_E": r.take("embed_in.weight", (cfg.d_vocab, d)),
        "ln_final.w": r.take("final_layer_norm.weight", (d,)),
        "ln_final.b": r.take("final_layer_norm.bias", (d,)),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"layers.{layer}.", f"blocks.{layer}."
        qkv = r.take(src + "attention.query_key_value.weight", (3 * h * dh, d)).view(h, 3, dh, d)
        for i, name in enumerate("qkv"):
            out[dst + f"attn.w_{name}"] = qkv[:, i].reshape(h * dh, d)
        if cfg.attn_qkv_bias:
            qkv_b = r.take(src + "attention.query_key_value.bias", (3 * h * dh,)).view(h, 3, dh)
            for i, name in enumerate("qkv"):
                out[dst + f"attn.b_{name}"] = qkv_b[:, i].reshape(h * dh)
        out[dst + "attn.w_o"] = r.take(src + "attention.dense.weight", (d, h * dh))
        if cfg.attn_out_bias:
            out[dst + "attn.b_o"] = r.take(src + "attention.dense.bias", (d,))
        for ours, theirs in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
            out[dst + f"{ours}.w"] = r.take(src + f"{theirs}.weight", (d,))
            out[dst + f"{ours}.b"] = r.take(src + f"{theirs}.bias", (d,))
        out[dst + "mlp.w_in"] = r.take(src + "mlp.dense_h_to_4h.weight", (m, d))
        out[dst + "mlp.b_in"] = r.take(src + "mlp.dense_h_to_4h.bias", (m,))
        out[dst + "mlp.w_out"] = r.take(src + "mlp.dense_4h_to_h.weight", (d, m))
        out[dst + "mlp.b_out"] = r.take(src + "mlp.dense_4h_to_h.bias", (d,))
    out.update(r.take_unembed("embed_out.weight", cfg))
    r.finish()
    return {key: value.contiguous() for key, value in out.items()}
