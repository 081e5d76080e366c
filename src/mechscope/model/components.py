"""The pieces of a hooked transformer: embeddings, RoPE, norms, attention, MLP and the block.

Weights are stored in the ``[out, in]`` layout of ``torch.nn.functional.linear`` (lower-case
names such as ``w_q``), so the forward pass runs the same kernels as ``transformers``. The
TransformerLens-style per-head views (``W_Q [head, d_model, d_head]``, ``W_O [head, d_head,
d_model]``, ``W_in [d_model, d_mlp]``, ...) are properties returning views of those tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.hooks import HookPoint
from mechscope.model.config import ModelConfig


@dataclass
class AttentionContext:
    """Per-forward state shared by every attention layer: positions, padding and masks.

    ``key_padding`` is ``None`` when no token is padding; masks and rotary tables are built
    lazily, once per forward, and reused by every layer.
    """

    positions: Int[Tensor, "batch pos"]
    key_padding: Bool[Tensor, "batch pos"] | None = None
    _masks: dict = field(default_factory=dict)
    _rotary: dict = field(default_factory=dict)

    @classmethod
    def build(cls, attention_mask: Tensor | None, batch: int, seq: int, device: torch.device) -> AttentionContext:
        """Positions count only real tokens, so a left-padded prompt sees positions 0, 1, ..."""
        if attention_mask is None or bool(attention_mask.all()):
            positions = torch.arange(seq, device=device).expand(batch, seq)
            return cls(positions)
        mask = attention_mask.to(device=device, dtype=torch.bool)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return cls(positions, mask)

    def mask(self, sliding_window: int | None) -> Bool[Tensor, "batch 1 query_pos key_pos"] | None:
        """The boolean attention mask (``True`` = may attend), or ``None`` for plain causal."""
        seq = self.positions.shape[-1]
        window = sliding_window if sliding_window is not None and sliding_window < seq else None
        if self.key_padding is None and window is None:
            return None
        if window not in self._masks:
            device = self.positions.device
            q = torch.arange(seq, device=device)[:, None]
            k = torch.arange(seq, device=device)[None, :]
            allowed = k <= q
            if window is not None:
                allowed = allowed & (k > q - window)
            allowed = allowed[None, None]  # [1, 1, query_pos, key_pos]
            if self.key_padding is not None:
                allowed = allowed & self.key_padding[:, None, None, :]
                # A padding query may see no key at all; let it see itself so softmax stays finite.
                allowed = allowed | torch.eye(seq, dtype=torch.bool, device=device)[None, None] & ~allowed.any(
                    -1, keepdim=True
                )
            self._masks[window] = allowed
        return self._masks[window]

    def rotary(self, cfg: ModelConfig, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """RoPE ``cos, sin`` of shape ``[batch, pos, 1, rotary_dim]`` for these positions."""
        key = (cfg.rotary_dim, cfg.rotary_base, str(cfg.rope_scaling), dtype)
        if key not in self._rotary:
            inv_freq = rotary_inv_freq(cfg).to(self.positions.device)
            freqs = self.positions[..., None].float() * inv_freq  # [batch, pos, rotary_dim / 2]
            emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
            self._rotary[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._rotary[key]


def rotary_inv_freq(cfg: ModelConfig) -> Float[Tensor, " half_rotary_dim"]:
    """RoPE inverse frequencies, with ``linear`` or ``llama3`` scaling when configured."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq  # "default"


def apply_rotary(x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``rotary_dim`` dimensions of each head (half-split pairing, as in Llama)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)


def _activation(name: str):
    return {
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
        "silu": F.silu,
    }[name]


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


def _optional_param(module: nn.Module, name: str, enabled: bool, *shape: int) -> None:
    module.register_parameter(name, _param(*shape) if enabled else None)


class Embed(nn.Module):
    """Token embedding ``W_E [d_vocab, d_model]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = _param(cfg.d_vocab, cfg.d_model)

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        return F.embedding(tokens, self.W_E)


class PosEmbed(nn.Module):
    """Learned position embedding ``W_pos [n_ctx, d_model]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_pos = _param(cfg.n_ctx, cfg.d_model)

    def forward(self, positions: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        if positions.numel() and int(positions.max()) >= self.W_pos.shape[0]:
            raise IndexError(
                f"position {int(positions.max())} is beyond the model's n_ctx={self.W_pos.shape[0]}; "
                "shorten the input"
            )
        return F.embedding(positions, self.W_pos)


class LayerNorm(nn.Module):
    """LayerNorm with ``hook_scale`` (the divisor, ``[..., 1]``) and ``hook_normalized`` (the output).

    Runs the fused kernel unless a hook on ``hook_scale`` needs the scale itself.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.b = nn.Parameter(torch.zeros(cfg.d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        if self.hook_scale.has_hooks:
            x = x - x.mean(-1, keepdim=True)
            scale = self.hook_scale((x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
            x = x / scale * self.w + self.b
        else:
            x = F.layer_norm(x, self.w.shape, self.w, self.b, self.eps)
        return self.hook_normalized(x)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 (as in ``transformers``), with ``hook_scale`` and ``hook_normalized``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.eps = cfg.norm_eps
        self.w = nn.Parameter(torch.ones(cfg.d_model))
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        dtype = x.dtype
        x = x.float()
        variance = x.pow(2).mean(-1, keepdim=True)
        if self.hook_scale.has_hooks:
            x = x / self.hook_scale((variance + self.eps).sqrt())
        else:
            x = x * torch.rsqrt(variance + self.eps)
        return self.hook_normalized(self.w * x.to(dtype))


def make_norm(cfg: ModelConfig) -> nn.Module | None:
    return {"layernorm": LayerNorm, "rmsnorm": RMSNorm, None: lambda cfg: None}[cfg.normalization_type](cfg)


class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query attention.

    Runs ``scaled_dot_product_attention`` unless a hook (or ``cfg.attn_implementation="eager"``)
    needs ``hook_attn_scores``/``hook_pattern``; both paths compute the same function.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, kv, dh, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
        self.w_q, self.w_k, self.w_v = _param(h * dh, d), _param(kv * dh, d), _param(kv * dh, d)
        self.w_o = _param(d, h * dh)
        for name, size in (("b_q", h * dh), ("b_k", kv * dh), ("b_v", kv * dh)):
            _optional_param(self, name, cfg.attn_qkv_bias, size)
        _optional_param(self, "b_o", cfg.attn_out_bias, d)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        if cfg.positional_embedding_type == "rotary":
            self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()
        self.hook_attn_scores, self.hook_pattern = HookPoint(), HookPoint()
        self.hook_z = HookPoint()
        self.hook_result = HookPoint(opt_in=True)

    # TransformerLens-style per-head views of the weights.
    @property
    def W_Q(self) -> Float[Tensor, "head d_model d_head"]:
        return self.w_q.view(self.cfg.n_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_K(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self.w_k.view(self.cfg.n_key_value_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_V(self) -> Float[Tensor, "kv_head d_model d_head"]:
        return self.w_v.view(self.cfg.n_key_value_heads, self.cfg.d_head, -1).transpose(1, 2)

    @property
    def W_O(self) -> Float[Tensor, "head d_head d_model"]:
        return self.w_o.view(-1, self.cfg.n_heads, self.cfg.d_head).permute(1, 2, 0)

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None, heads: int) -> Tensor:
        """``x`` is ``[batch, pos, d_model]`` or per-head ``[batch, pos, heads, d_model]``."""
        if x.dim() == 3:
            return F.linear(x, weight, bias).unflatten(-1, (heads, self.cfg.d_head))
        out = torch.einsum("bphd,hkd->bphk", x, weight.view(heads, self.cfg.d_head, -1))
        return out if bias is None else out + bias.view(heads, self.cfg.d_head)

    def forward(
        self,
        q_in: Tensor,
        k_in: Tensor,
        v_in: Tensor,
        ctx: AttentionContext,
    ) -> Float[Tensor, "batch pos d_model"]:
        cfg = self.cfg
        q = self.hook_q(self._project(q_in, self.w_q, self.b_q, cfg.n_heads))  # [batch, pos, head, d_head]
        k = self.hook_k(self._project(k_in, self.w_k, self.b_k, cfg.n_key_value_heads))  # [batch, pos, kv_head, d_head]
        v = self.hook_v(self._project(v_in, self.w_v, self.b_v, cfg.n_key_value_heads))
        if cfg.positional_embedding_type == "rotary":
            cos, sin = ctx.rotary(cfg, q.dtype)
            q = self.hook_rot_q(apply_rotary(q, cos, sin))
            k = self.hook_rot_k(apply_rotary(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head or kv_head, pos, d_head]
        mask = ctx.mask(cfg.sliding_window)
        scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.d_head**-0.5
        if cfg.attn_implementation == "eager" or self.hook_attn_scores.has_hooks or self.hook_pattern.has_hooks:
            z = self._explicit_attention(q, k, v, mask, scale)
        else:
            z = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=cfg.n_kv_groups > 1
            )
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        if cfg.use_attn_result or self.hook_result.has_hooks:
            result = self.hook_result(torch.einsum("bphk,hkd->bphd", z, self.W_O))  # [batch, pos, head, d_model]
            out = result.sum(-2)
            return out if self.b_o is None else out + self.b_o
        return F.linear(z.flatten(-2), self.w_o, self.b_o)

    def _explicit_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> Tensor:
        groups = self.cfg.n_kv_groups
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [batch, head, query_pos, key_pos]
        if mask is None:
            n = scores.shape[-1]
            mask = torch.ones(n, n, dtype=torch.bool, device=scores.device).tril()
        scores = self.hook_attn_scores(scores.masked_fill(~mask, float("-inf")))
        pattern = self.hook_pattern(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype))
        return torch.matmul(pattern, v)


class MLP(nn.Module):
    """Feed-forward layer: ``W_out(act(W_in x))``, or gated ``W_out(act(W_gate x) * W_in x)``.

    ``hook_pre`` is the pre-activation (the gate's, for gated MLPs), ``hook_pre_linear`` the
    linear branch of a gated MLP, ``hook_post`` the neuron activations ``[batch, pos, d_mlp]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.act = _activation(cfg.act_fn)
        self.w_in = _param(cfg.d_mlp, cfg.d_model)
        _optional_param(self, "b_in", cfg.mlp_bias, cfg.d_mlp)
        if cfg.gated_mlp:
            self.w_gate = _param(cfg.d_mlp, cfg.d_model)
            _optional_param(self, "b_gate", cfg.mlp_bias, cfg.d_mlp)
            self.hook_pre_linear = HookPoint()
        self.w_out = _param(cfg.d_model, cfg.d_mlp)
        _optional_param(self, "b_out", cfg.mlp_bias, cfg.d_model)
        self.hook_pre, self.hook_post = HookPoint(), HookPoint()

    @property
    def W_in(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.w_in.T

    @property
    def W_gate(self) -> Float[Tensor, "d_model d_mlp"]:
        return self.w_gate.T

    @property
    def W_out(self) -> Float[Tensor, "d_mlp d_model"]:
        return self.w_out.T

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        if self.cfg.gated_mlp:
            pre = self.hook_pre(F.linear(x, self.w_gate, self.b_gate))
            pre_linear = self.hook_pre_linear(F.linear(x, self.w_in, self.b_in))
            post = self.hook_post(self.act(pre) * pre_linear)
        else:
            post = self.hook_post(self.act(self.hook_pre(F.linear(x, self.w_in, self.b_in))))
        return F.linear(post, self.w_out, self.b_out)


class Unembed(nn.Module):
    """Unembedding, stored as ``w_u [d_vocab, d_model]``; ``W_U`` is the ``[d_model, d_vocab]`` view."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_u = _param(cfg.d_vocab, cfg.d_model)
        _optional_param(self, "b_U", cfg.unembed_bias, cfg.d_vocab)

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.w_u.T

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return F.linear(x, self.w_u, self.b_U)


class TransformerBlock(nn.Module):
    """One residual block: attention then MLP (or both reading ``resid_pre`` when parallel)."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, layer)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_in = HookPoint(opt_in=True)
        self.hook_q_input = HookPoint(opt_in=True)
        self.hook_k_input = HookPoint(opt_in=True)
        self.hook_v_input = HookPoint(opt_in=True)
        self.hook_attn_out = HookPoint()
        if not cfg.attn_only:
            self.ln2 = make_norm(cfg)
            self.mlp = MLP(cfg)
            if not cfg.parallel_attn_mlp:
                self.hook_resid_mid = HookPoint()
            self.hook_mlp_in = HookPoint(opt_in=True)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def _norm(self, norm: nn.Module | None, x: Tensor) -> Tensor:
        return x if norm is None else norm(x)

    def _attention_inputs(self, resid: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        if cfg.use_attn_in or self.hook_attn_in.has_hooks:
            resid = self.hook_attn_in(resid.clone())
        split = (
            cfg.use_split_qkv_input
            or self.hook_q_input.has_hooks
            or self.hook_k_input.has_hooks
            or self.hook_v_input.has_hooks
        )
        if not split:
            x = self._norm(self.ln1, resid)
            return x, x, x
        # Per-head copies of the residual stream; ln1 runs once over all of them together,
        # so its hooks see [batch, pos, head + 2 * kv_head, d_model].
        h, kv = cfg.n_heads, cfg.n_key_value_heads
        q_in = self.hook_q_input(resid[:, :, None].expand(-1, -1, h, -1).clone())
        k_in = self.hook_k_input(resid[:, :, None].expand(-1, -1, kv, -1).clone())
        v_in = self.hook_v_input(resid[:, :, None].expand(-1, -1, kv, -1).clone())
        normed = self._norm(self.ln1, torch.cat((q_in, k_in, v_in), dim=2))
        return normed.split((h, kv, kv), dim=2)

    def forward(self, resid_pre: Float[Tensor, "batch pos d_model"], ctx: AttentionContext) -> Tensor:
        resid_pre = self.hook_resid_pre(resid_pre)
        attn_out = self.hook_attn_out(self.attn(*self._attention_inputs(resid_pre), ctx))
        if self.cfg.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        resid = resid_pre if self.cfg.parallel_attn_mlp else self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = resid
        if self.cfg.use_hook_mlp_in or self.hook_mlp_in.has_hooks:
            mlp_in = self.hook_mlp_in(resid.clone())
        mlp_out = self.hook_mlp_out(self.mlp(self._norm(self.ln2, mlp_in)))
        if self.cfg.parallel_attn_mlp:
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        return self.hook_resid_post(resid + mlp_out)
