"""The CLIP vision tower: class embedding, learned positions, a pre-LayerNorm on the embeddings,
pre-norm blocks with quick-GELU, a post-LayerNorm and the visual projection.

``post_layernorm`` is ``ln_final`` and ``visual_projection`` the unembedding, so the logits at
position 0 are CLIP's image embedding (before its L2 normalisation); at other positions they are
the same map applied to each patch. Without a projection (``CLIPVisionModel``) the unembedding is
the identity. A full ``CLIPModel`` directory (``model_type`` ``"clip"``) loads as its vision
tower; `mechscope.vision.load_clip` loads both towers. The encoder-layer layout is shared with
SigLIP (`take_encoder_layers`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechscope.loading.families._common import StateDictReader, activation
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("clip_vision_model", "clip")
DEFAULT_PREPEND_BOS = False
"""Vision models take pixels, not tokens; no BOS."""

OTHER_TOWER = ("text_model.", "text_projection.", "logit_scale", "logit_bias")
"""Keys of a full CLIP/SigLIP checkpoint that belong to the text tower or the contrastive head."""


def has_projection(hf: Any, tower: str) -> bool:
    """Whether a checkpoint of this config has the tower's projection (full models always do)."""
    archs = getattr(hf, "architectures", None) or []
    return hf.model_type in ("clip", "siglip") or any(arch.endswith(f"{tower}ModelWithProjection") for arch in archs)


def vision_config(hf: Any, family: str, **fields: Any) -> ModelConfig:
    """The fields every CLIP-layout vision tower shares, from its ``vision_config``."""
    n_patches = (hf.image_size // hf.patch_size) ** 2
    base = dict(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        d_vocab=hf.hidden_size,
        n_ctx=n_patches,
        act_fn=activation(family, hf.hidden_act),
        normalization_type="LN",
        norm_eps=hf.layer_norm_eps,
        positional_embedding_type="none",
        attn_qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
        causal=False,
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        n_channels=hf.num_channels,
        default_prepend_bos=False,
        family=family,
    )
    return ModelConfig(**{**base, **fields})


def config_from_hf(hf: Any) -> ModelConfig:
    projection = has_projection(hf, "Vision")
    vision = hf.vision_config if hf.model_type == "clip" else hf
    dim = hf.projection_dim if projection else vision.hidden_size
    n_patches = (vision.image_size // vision.patch_size) ** 2
    return vision_config(vision, "clip_vision", n_ctx=n_patches + 1, d_vocab=dim, class_token=True, embed_norm=True)


def take_encoder_layers(r: StateDictReader, prefix: str, cfg: ModelConfig) -> dict[str, Tensor]:
    """``{prefix}encoder.layers.{l}``: ``layer_norm1``, ``self_attn`` (q/k/v/out projections with
    biases), ``layer_norm2`` and ``mlp.fc1``/``fc2`` (CLIP, SigLIP)."""
    d, m = cfg.d_model, cfg.d_mlp
    out = {}
    for layer in range(cfg.n_layers):
        src, dst = f"{prefix}encoder.layers.{layer}.", f"blocks.{layer}."
        for ours, theirs, shape in (
            ("ln1.w", "layer_norm1.weight", (d,)),
            ("ln1.b", "layer_norm1.bias", (d,)),
            ("attn.w_q", "self_attn.q_proj.weight", (d, d)),
            ("attn.b_q", "self_attn.q_proj.bias", (d,)),
            ("attn.w_k", "self_attn.k_proj.weight", (d, d)),
            ("attn.b_k", "self_attn.k_proj.bias", (d,)),
            ("attn.w_v", "self_attn.v_proj.weight", (d, d)),
            ("attn.b_v", "self_attn.v_proj.bias", (d,)),
            ("attn.w_o", "self_attn.out_proj.weight", (d, d)),
            ("attn.b_o", "self_attn.out_proj.bias", (d,)),
            ("ln2.w", "layer_norm2.weight", (d,)),
            ("ln2.b", "layer_norm2.bias", (d,)),
            ("mlp.w_in", "mlp.fc1.weight", (m, d)),
            ("mlp.b_in", "mlp.fc1.bias", (m,)),
            ("mlp.w_out", "mlp.fc2.weight", (d, m)),
            ("mlp.b_out", "mlp.fc2.bias", (d,)),
        ):
            out[dst + ours] = r.take(src + theirs, shape)
    return out


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``CLIPVisionModel(WithProjection)`` or ``CLIPModel`` state dict to mechscope names.

    The text tower's keys of a full ``CLIPModel`` are left for `mechscope.vision.load_clip`; old
    checkpoints' ``position_ids`` buffers are skipped.
    """
    sd = {key.removeprefix("vision_model."): value for key, value in state_dict.items()}  # prefixed or not
    r = StateDictReader(sd, "clip_vision", ignore=lambda k: k.startswith(OTHER_TOWER) or k.endswith("position_ids"))
    d, p, c, v = cfg.d_model, cfg.patch_size, cfg.n_channels, ""
    out = {
        "embed.class_embedding": r.take(v + "embeddings.class_embedding", (d,)),
        "embed.w_patch": r.take(v + "embeddings.patch_embedding.weight", (d, c, p, p)),
        "embed.W_pos": r.take(v + "embeddings.position_embedding.weight", (cfg.n_ctx, d)),
        "ln_pre.w": r.take(v + "pre_layrnorm.weight", (d,)),
        "ln_pre.b": r.take(v + "pre_layrnorm.bias", (d,)),
        "ln_final.w": r.take(v + "post_layernorm.weight", (d,)),
        "ln_final.b": r.take(v + "post_layernorm.bias", (d,)),
        **take_encoder_layers(r, v, cfg),
    }
    if r.has("visual_projection.weight") or cfg.d_vocab_out != d:
        out["unembed.w_u"] = r.take("visual_projection.weight", (cfg.d_vocab_out, d))
    else:
        out["unembed.w_u"] = torch.eye(d)
    r.finish()
    return out
