"""The pieces only vision models have: the patch embedding and an attention-pooling head.

A vision model's input is pixels ``[batch, n_channels, image_size, image_size]``. `PatchEmbed`
cuts them into square patches, maps each patch's pixels linearly into the residual stream,
prepends the class embedding (when ``cfg.class_token``) and adds the learned position table; the
model normalises the sum with ``ln_pre`` when ``cfg.embed_norm`` is set, and ``hook_embed`` sees
the result: the whole of what enters the residual stream. `AttentionPool` is SigLIP's pooling head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from mechscope.errors import InputError
from mechscope.hooks import HookPoint
from mechscope.model.components import activation_fn
from mechscope.model.config import ModelConfig


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


class PatchEmbed(nn.Module):
    """Patches, class token and positions of a vision model.

    ``w_patch [d_model, n_channels, patch_size, patch_size]`` is stored as the convolution that
    applies it; ``W_E`` is the ``[n_channels * patch_size * patch_size, d_model]`` view (one row
    per pixel value of a patch, as a token embedding has one row per token). ``W_pos [n_ctx,
    d_model]`` is the position table (class token first).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.w_patch = _param(cfg.d_model, cfg.n_channels, cfg.patch_size, cfg.patch_size)
        self.register_parameter("b_patch", _param(cfg.d_model) if cfg.patch_bias else None)
        self.register_parameter("class_embedding", _param(cfg.d_model) if cfg.class_token else None)
        self.W_pos = _param(cfg.n_ctx, cfg.d_model)

    @property
    def W_E(self) -> Float[Tensor, "patch_pixels d_model"]:
        return self.w_patch.flatten(1).T

    def forward(self, pixels: Float[Tensor, "batch channel height width"]) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        expected = (cfg.n_channels, cfg.image_size, cfg.image_size)
        if not isinstance(pixels, Tensor) or pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise InputError(
                f"a vision model takes pixels [batch, {', '.join(map(str, expected))}], got "
                f"{tuple(getattr(pixels, 'shape', ())) or type(pixels).__name__}; turn images into pixels "
                "with mechscope.vision.pixels(model, images)"
            )
        x = F.conv2d(pixels.to(self.w_patch.dtype), self.w_patch, self.b_patch, stride=cfg.patch_size)
        x = x.flatten(2).transpose(1, 2)  # [batch, n_patches, d_model], row-major over the patch grid
        if self.class_embedding is not None:
            x = torch.cat((self.class_embedding.expand(x.shape[0], 1, -1), x), dim=1)  # [batch, pos, d_model]
        return x + self.W_pos


class AttentionPool(nn.Module):
    """A learned probe attends over every position, then an MLP with a residual (SigLIP's head).

    ``out = a + MLP(LayerNorm(a))`` where ``a`` is the multi-head attention output of the probe
    query over the residual stream (keys and values from every position). ``hook_pattern`` is the
    probe's attention ``[batch, head, 1, key_pos]``, ``hook_out`` the pooled ``[batch, d_model]``
    (its norm and MLP carry no hooks of their own).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.probe = _param(d)
        self.w_q, self.w_k, self.w_v, self.w_o = _param(d, d), _param(d, d), _param(d, d), _param(d, d)
        self.b_q, self.b_k, self.b_v, self.b_o = _param(d), _param(d), _param(d), _param(d)
        self.ln_w, self.ln_b = _param(d), _param(d)
        self.w_in, self.b_in = _param(cfg.d_mlp, d), _param(cfg.d_mlp)
        self.w_out, self.b_out = _param(d, cfg.d_mlp), _param(d)
        self.act = activation_fn(cfg.act_fn)
        self.hook_pattern, self.hook_out = HookPoint(), HookPoint()

    def forward(self, resid: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch d_model"]:
        batch, n_heads = resid.shape[0], self.cfg.n_heads
        q = F.linear(self.probe, self.w_q, self.b_q).view(n_heads, 1, -1)  # [head, 1, d_head]
        k = (
            F.linear(resid, self.w_k, self.b_k).unflatten(-1, (n_heads, -1)).transpose(1, 2)
        )  # [batch, head, pos, d_head]
        v = F.linear(resid, self.w_v, self.b_v).unflatten(-1, (n_heads, -1)).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # [batch, head, 1, key_pos]
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1))
        z = torch.matmul(pattern, v).transpose(1, 2).reshape(batch, -1)  # [batch, head * d_head]
        pooled = F.linear(z, self.w_o, self.b_o)  # [batch, d_model]
        normed = F.layer_norm(pooled, (pooled.shape[-1],), self.ln_w, self.ln_b, self.cfg.norm_eps)
        hidden = self.act(F.linear(normed, self.w_in, self.b_in))  # [batch, d_mlp]
        return self.hook_out(pooled + F.linear(hidden, self.w_out, self.b_out))
