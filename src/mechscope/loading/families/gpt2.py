"""GPT-2: learned positions, LayerNorm, GELU, ``Conv1D`` weights stored ``[in, out]``, tied unembedding."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.loading.families._common import StateDictReader, activation, get
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("gpt2",)
DEFAULT_PREPEND_BOS = True
"""GPT-2's tokenizer adds no BOS, but mechscope (like TransformerLens) prepends ``<|endoftext|>``
by default: GPT-2 saw it between documents and uses it as a resting position for attention."""


def config_from_hf(hf: Any) -> ModelConfig:
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("gpt2: scale_attn_by_inverse_layer_idx=True is not supported")
    d_model = hf.n_embd
    return ModelConfig(
        d_model=d_model,
        n_layers=hf.n_layer,
        n_heads=hf.n_head,
        d_mlp=get(hf, "n_inner", default=4 * d_model),
        d_vocab=hf.vocab_size,
        n_ctx=hf.n_positions,
        act_fn=activation("gpt2", hf.activation_function),
        normalization_type="LN",
        norm_eps=hf.layer_norm_epsilon,
        positional_embedding_type="standard",
        attn_scale=None if getattr(hf, "scale_attn_weights", True) else 1.0,
        attn_qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        tie_word_embeddings=getattr(hf, "tie_word_embeddings", True),
        family="gpt2",
    )


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``GPT2LMHeadModel`` (or bare ``GPT2Model``) state dict to mechscope names.

    ``Conv1D`` weights are ``[in, out]``; mechscope stores ``[out, in]``, hence the transposes.
    The causal-mask buffers (``h.{l}.attn.bias``/``masked_bias``) of old checkpoints are ignored.
    """
    sd = {key.removeprefix("transformer."): value for key, value in state_dict.items()}
    buffers = tuple(f"h.{layer}.attn.{name}" for layer in range(cfg.n_layers) for name in ("bias", "masked_bias"))
    r = StateDictReader(sd, "gpt2", ignore=lambda key: key in buffers)
    d, m, v = cfg.d_model, cfg.d_mlp, cfg.d_vocab
    out = {
        "embed.W_E": r.take("wte.weight", (v, d)),
        "pos_embed.W_pos": r.take("wpe.weight", (cfg.n_ctx, d)),
        "ln_final.w": r.take("ln_f.weight", (d,)),
        "ln_final.b": r.take("ln_f.bias", (d,)),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"h.{layer}.", f"blocks.{layer}."
        w_q, w_k, w_v = r.take(src + "attn.c_attn.weight", (d, 3 * d)).T.split(d, dim=0)
        b_q, b_k, b_v = r.take(src + "attn.c_attn.bias", (3 * d,)).split(d)
        out.update(
            {
                dst + "ln1.w": r.take(src + "ln_1.weight", (d,)),
                dst + "ln1.b": r.take(src + "ln_1.bias", (d,)),
                dst + "attn.w_q": w_q,
                dst + "attn.w_k": w_k,
                dst + "attn.w_v": w_v,
                dst + "attn.b_q": b_q,
                dst + "attn.b_k": b_k,
                dst + "attn.b_v": b_v,
                dst + "attn.w_o": r.take(src + "attn.c_proj.weight", (d, d)).T,
                dst + "attn.b_o": r.take(src + "attn.c_proj.bias", (d,)),
                dst + "ln2.w": r.take(src + "ln_2.weight", (d,)),
                dst + "ln2.b": r.take(src + "ln_2.bias", (d,)),
                dst + "mlp.w_in": r.take(src + "mlp.c_fc.weight", (d, m)).T,
                dst + "mlp.b_in": r.take(src + "mlp.c_fc.bias", (m,)),
                dst + "mlp.w_out": r.take(src + "mlp.c_proj.weight", (m, d)).T,
                dst + "mlp.b_out": r.take(src + "mlp.c_proj.bias", (d,)),
            }
        )
    out.update(r.take_unembed("lm_head.weight", cfg))
    r.finish()
    return {key: value.contiguous() for key, value in out.items()}  # transposed views -> [out, in] storage
