"""The SigLIP vision tower: no class token, learned positions, pre-norm blocks with tanh-GELU, a
post-LayerNorm over every position and a multi-head attention-pooling head.

``post_layernorm`` is ``ln_final`` and the unembedding is the identity, so the logits are
``transformers``' ``last_hidden_state``; the pooling head (``model.pool_head``, hooks
``pool_head.hook_pattern`` and ``pool_head.hook_out``) maps them to the image embedding
(`mechscope.vision.image_embeddings`). A full ``SiglipModel`` directory loads as its vision tower.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.loading.families._common import StateDictReader
from mechscope.loading.families.clip_vision import OTHER_TOWER, take_encoder_layers, vision_config
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("siglip_vision_model", "siglip")
DEFAULT_PREPEND_BOS = False
"""Vision models take pixels, not tokens; no BOS."""


def config_from_hf(hf: Any) -> ModelConfig:
    vision = hf.vision_config if hf.model_type == "siglip" else hf
    if not getattr(vision, "vision_use_head", True):
        raise ConfigError(
            "siglip_vision: checkpoints without the pooling head (vision_use_head=False) are not supported"
        )
    return vision_config(vision, "siglip_vision", patch_bias=True, attention_pool=True)


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``SiglipVisionModel`` or ``SiglipModel`` state dict to mechscope names (a full model's
    text tower is left for the text adapter; ``position_ids`` buffers are skipped)."""
    sd = {key if key.startswith(OTHER_TOWER) else key.removeprefix("vision_model."): v for key, v in state_dict.items()}
    r = StateDictReader(sd, "siglip_vision", ignore=lambda k: k.startswith(OTHER_TOWER) or k.endswith("position_ids"))
    d, m, p, c = cfg.d_model, cfg.d_mlp, cfg.patch_size, cfg.n_channels
    in_proj_w = r.take("head.attention.in_proj_weight", (3 * d, d)).split(d)
    in_proj_b = r.take("head.attention.in_proj_bias", (3 * d,)).split(d)
    out = {
        "embed.w_patch": r.take("embeddings.patch_embedding.weight", (d, c, p, p)),
        "embed.b_patch": r.take("embeddings.patch_embedding.bias", (d,)),
        "embed.W_pos": r.take("embeddings.position_embedding.weight", (cfg.n_ctx, d)),
        "ln_final.w": r.take("post_layernorm.weight", (d,)),
        "ln_final.b": r.take("post_layernorm.bias", (d,)),
        "unembed.w_u": torch.eye(d),
        "pool_head.probe": r.take("head.probe", (1, 1, d)).reshape(d),
        **{f"pool_head.w_{x}": w for x, w in zip("qkv", in_proj_w, strict=True)},
        **{f"pool_head.b_{x}": b for x, b in zip("qkv", in_proj_b, strict=True)},
        "pool_head.w_o": r.take("head.attention.out_proj.weight", (d, d)),
        "pool_head.b_o": r.take("head.attention.out_proj.bias", (d,)),
        "pool_head.ln_w": r.take("head.layernorm.weight", (d,)),
        "pool_head.ln_b": r.take("head.layernorm.bias", (d,)),
        "pool_head.w_in": r.take("head.mlp.fc1.weight", (m, d)),
        "pool_head.b_in": r.take("head.mlp.fc1.bias", (m,)),
        "pool_head.w_out": r.take("head.mlp.fc2.weight", (d, m)),
        "pool_head.b_out": r.take("head.mlp.fc2.bias", (d,)),
        **take_encoder_layers(r, "", cfg),
    }
    r.finish()
    return {key: value.contiguous() for key, value in out.items()}
