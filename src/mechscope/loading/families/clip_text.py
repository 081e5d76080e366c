"""The CLIP and SigLIP text towers: token and learned position embeddings, pre-norm blocks, a
final LayerNorm and a projection into the shared image-text space as the unembedding.

CLIP's text tower is causal and reads its embedding at the first end-of-text token; SigLIP's is
bidirectional and reads the last position. The logits at that position are the tower's text
embedding (before L2 normalisation); `mechscope.vision.text_embeddings` picks it. Without a
projection (``CLIPTextModel``) the unembedding is the identity. The position read is recorded in
``cfg.extra["pool"]`` (``"eos"`` or ``"last"``) and ``cfg.extra["eos_token_id"]``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechscope.loading.families._common import StateDictReader, activation
from mechscope.loading.families.clip_vision import has_projection, take_encoder_layers
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("clip_text_model", "siglip_text_model")
DEFAULT_PREPEND_BOS = None
"""Follow the tokenizer: CLIP's adds ``<|startoftext|>``, SigLIP's adds none."""


def config_from_hf(hf: Any) -> ModelConfig:
    """``hf`` is a ``CLIPTextConfig``/``SiglipTextConfig`` (a full model's ``text_config``)."""
    siglip = hf.model_type == "siglip_text_model"
    family = "siglip_text" if siglip else "clip_text"
    if siglip:
        d_unembed = hf.projection_size  # SigLIP's text head is always there
    else:
        d_unembed = hf.projection_dim if has_projection(hf, "Text") else hf.hidden_size
    return ModelConfig(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.vocab_size,
        d_unembed=d_unembed,
        n_ctx=hf.max_position_embeddings,
        act_fn=activation(family, hf.hidden_act),
        normalization_type="LN",
        norm_eps=hf.layer_norm_eps,
        positional_embedding_type="standard",
        attn_qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        unembed_bias=siglip,
        causal=not siglip,
        family=family,
        extra={"pool": "last" if siglip else "eos", "eos_token_id": hf.eos_token_id},
    )


def text_config(hf: Any, projection: bool) -> ModelConfig:
    """The text tower of a full CLIP/SigLIP config (``projection``: whether it has one)."""
    cfg = config_from_hf(hf.text_config)
    if hf.model_type == "clip":
        cfg.d_unembed = hf.projection_dim if projection else cfg.d_model
    return cfg


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a text tower (alone, or inside a full ``CLIPModel``/``SiglipModel``) to mechscope names.

    The vision tower's keys of a full model are skipped here (`mechscope.vision.load_clip` loads
    them separately), as are old checkpoints' ``position_ids`` buffers.
    """
    siglip = cfg.family == "siglip_text"
    skip = ("vision_model.", "visual_projection.", "logit_scale", "logit_bias")
    sd = {key.removeprefix("text_model."): value for key, value in state_dict.items()}  # prefixed or not
    r = StateDictReader(sd, cfg.family, ignore=lambda k: k.startswith(skip) or k.endswith("position_ids"))
    d, t = cfg.d_model, ""
    out = {
        "embed.W_E": r.take(t + "embeddings.token_embedding.weight", (cfg.d_vocab, d)),
        "pos_embed.W_pos": r.take(t + "embeddings.position_embedding.weight", (cfg.n_ctx, d)),
        "ln_final.w": r.take(t + "final_layer_norm.weight", (d,)),
        "ln_final.b": r.take(t + "final_layer_norm.bias", (d,)),
        **take_encoder_layers(r, t, cfg),
    }
    if siglip:
        out["unembed.w_u"] = r.take(t + "head.weight", (cfg.d_vocab_out, d))
        out["unembed.b_U"] = r.take(t + "head.bias", (cfg.d_vocab_out,))
    elif r.has("text_projection.weight") or cfg.d_vocab_out != d:
        out["unembed.w_u"] = r.take("text_projection.weight", (cfg.d_vocab_out, d))
    else:
        out["unembed.w_u"] = torch.eye(d)
    r.finish()
    return out
