"""ViT: class token, learned positions in the patch embedding, pre-norm LayerNorm blocks, exact GELU.

A ``ViTForImageClassification`` checkpoint's classifier is the unembedding: the logits at
position 0 (the class token) are ``transformers``' logits, and every other position has its own
(the classifier applied to each patch's final residual stream), which is what a lens reads. A bare
``ViTModel`` has no classifier; its unembedding is the identity, so the logits are the normalised
final residual stream (``last_hidden_state``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mechscope.loading.families._common import StateDictReader, activation
from mechscope.model.config import ModelConfig

MODEL_TYPES = ("vit",)
DEFAULT_PREPEND_BOS = False
"""Vision models take pixels, not tokens; no BOS."""


def config_from_hf(hf: Any) -> ModelConfig:
    classifier = any("ForImageClassification" in arch for arch in getattr(hf, "architectures", None) or [])
    labels = {int(k): str(v) for k, v in (hf.id2label or {}).items()} if classifier else {}
    n_patches = (hf.image_size // hf.patch_size) ** 2
    return ModelConfig(
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        d_mlp=hf.intermediate_size,
        d_vocab=len(labels) if classifier else hf.hidden_size,
        n_ctx=n_patches + 1,
        act_fn=activation("vit", hf.hidden_act),
        normalization_type="LN",
        norm_eps=hf.layer_norm_eps,
        positional_embedding_type="none",
        attn_qkv_bias=hf.qkv_bias,
        attn_out_bias=True,
        mlp_bias=True,
        unembed_bias=classifier,
        causal=False,
        image_size=hf.image_size,
        patch_size=hf.patch_size,
        n_channels=hf.num_channels,
        class_token=True,
        patch_bias=True,
        default_prepend_bos=DEFAULT_PREPEND_BOS,
        family="vit",
        extra={"labels": [labels[i] for i in range(len(labels))]},
    )


def convert_weights(state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Map a ``ViTForImageClassification`` (or bare ``ViTModel``) state dict to mechscope names.

    The bare model's pooler (a dense layer and tanh on the class token, unused by classification)
    is not part of the hooked model and is skipped, as is a masked-image-modelling ``mask_token``.
    """
    sd = {key.removeprefix("vit."): value for key, value in state_dict.items()}
    r = StateDictReader(sd, "vit", ignore=lambda key: key.startswith("pooler.") or key == "embeddings.mask_token")
    d, m, p, c = cfg.d_model, cfg.d_mlp, cfg.patch_size, cfg.n_channels
    out = {
        "embed.class_embedding": r.take("embeddings.cls_token", (1, 1, d)).reshape(d),
        "embed.W_pos": r.take("embeddings.position_embeddings", (1, cfg.n_ctx, d)).reshape(cfg.n_ctx, d),
        "embed.w_patch": r.take("embeddings.patch_embeddings.projection.weight", (d, c, p, p)),
        "embed.b_patch": r.take("embeddings.patch_embeddings.projection.bias", (d,)),
        "ln_final.w": r.take("layernorm.weight", (d,)),
        "ln_final.b": r.take("layernorm.bias", (d,)),
    }
    for layer in range(cfg.n_layers):
        src, dst = f"encoder.layer.{layer}.", f"blocks.{layer}."
        for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
            out[f"{dst}attn.w_{ours}"] = r.take(f"{src}attention.attention.{theirs}.weight", (d, d))
            if cfg.attn_qkv_bias:
                out[f"{dst}attn.b_{ours}"] = r.take(f"{src}attention.attention.{theirs}.bias", (d,))
        for ours, theirs, shape in (
            ("attn.w_o", "attention.output.dense.weight", (d, d)),
            ("attn.b_o", "attention.output.dense.bias", (d,)),
            ("ln1.w", "layernorm_before.weight", (d,)),
            ("ln1.b", "layernorm_before.bias", (d,)),
            ("ln2.w", "layernorm_after.weight", (d,)),
            ("ln2.b", "layernorm_after.bias", (d,)),
            ("mlp.w_in", "intermediate.dense.weight", (m, d)),
            ("mlp.b_in", "intermediate.dense.bias", (m,)),
            ("mlp.w_out", "output.dense.weight", (d, m)),
            ("mlp.b_out", "output.dense.bias", (d,)),
        ):
            out[dst + ours] = r.take(src + theirs, shape)
    if cfg.unembed_bias:
        out["unembed.w_u"] = r.take("classifier.weight", (cfg.d_vocab_out, d))
        out["unembed.b_U"] = r.take("classifier.bias", (cfg.d_vocab_out,))
    else:
        out["unembed.w_u"] = torch.eye(d)
    r.finish()
    return out
