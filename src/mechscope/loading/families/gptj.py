"""GPT-J: one LayerNorm feeding parallel attention and MLP, interleaved partial RoPE, biased unembedding.

GPT-J's MLP reads the same ``ln_1`` output as attention; mechscope's parallel block gives the MLP
its own ``ln2``, so ``ln_1`` is copied into both (exactly the same function, separately hookable).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechscope.loading.families._common import StateDictReader, activation, get
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("gptj",)
DEFAULT_PREPEND_BOS = True
"""GPT-J uses GPT-2's tokenizer; like GPT-2, mechscope prepends ``<|endoftext|>``."""


def config_from_hf(hf: Any) -> ModelConfig:
    d_model = hf.n_embd
    return ModelConfig(
        d_model=d_model,
        n_layers=hf.n_layer,
        n_heads=hf.n_head,
        d_mlp=get(hf, "n_inner", default=4 * d_model),
        d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions,
        act_fn=activation("gptj", hf.activation_function),
        normalization_type="LN",
        norm_eps=hf.layer_norm_epsilon,
        positional_embedding_type="rotary",
        rotary_dim=get(hf, "rotary_dim", default=d_model // hf.n_head),
        rotary_interleaved=True,
        mlp_bias=True,
        unembed_bias=True,
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
        parallel_attn_mlp=True,
        family="gptj",
        extra={"model_type": "gptj"},
    )


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``GPTJForCausalLM`` state dict to mechscope names (all weights already ``[out, in]``)."""
    sd = {key.removeprefix("transformer."): value for key, value in state_dict.items()}
    ignored = ("attn.bias", "attn.masked_bias", "embed_positions")
    r = StateDictReader(sd, "gptj", ignore=lambda key: key.endswith(ignored))
    d, m = cfg.d_model, cfg.d_mlp
    out = {
        "embed.W_E": r.take("wte.weight", (cfg.d_vocab, d)),
        "ln_final.w": r.take("ln_f.weight", (d,)),
        "ln_final.b": r.take("ln_f.bias", (d,)),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"h.{layer}.", f"blocks.{layer}."
        ln_w, ln_b = r.take(src + "ln_1.weight", (d,)), r.take(src + "ln_1.bias", (d,))
        out.update({dst + "ln1.w": ln_w, dst + "ln1.b": ln_b, dst + "ln2.w": ln_w.clone(), dst + "ln2.b": ln_b.clone()})
        for name in "qkv":
            out[dst + f"attn.w_{name}"] = r.take(src + f"attn.{name}_proj.weight", (d, d))
        out[dst + "attn.w_o"] = r.take(src + "attn.out_proj.weight", (d, d))
        out[dst + "mlp.w_in"] = r.take(src + "mlp.fc_in.weight", (m, d))
        out[dst + "mlp.b_in"] = r.take(src + "mlp.fc_in.bias", (m,))
        out[dst + "mlp.w_out"] = r.take(src + "mlp.fc_out.weight", (d, m))
        out[dst + "mlp.b_out"] = r.take(src + "mlp.fc_out.bias", (d,))
    out.update(r.take_unembed("lm_head.weight", cfg))
    if cfg.unembed_bias:
        out["unembed.b_U"] = r.take("lm_head.bias", (cfg.d_vocab,))
    r.finish()
    return out
