"""The pieces of a hooked transformer: embeddings, RoPE, norms, attention, MLP and the block.

Weights are stored in the ``[out, in]`` layout of ``torch.nn.functional.linear`` (lower-case
names such as ``w_q``), so the forward pass runs the same kernels as ``transformers``. The
TransformerLens-style per-head views (``W_Q [head, d_model, d_head]``, ``W_O [head, d_head,
d_model]``, ``W_in [d_model, d_mlp]``, ...) are properties returning views of those tensors.

Hook points that need an explicit computation (a norm's ``hook_scale`` and ``hook_normalized``,
``hook_attn_scores``, ``hook_pattern``, ``hook_result``) are materialised only when hooked.
When their hooks only read them, the sublayer's output keeps the values of the fused kernel (so
a cached run gives exactly the logits of a plain one) and the explicit computation's gradient
graph.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from mechscope.errors import InputError
from mechscope.hooks import HookPoint
from mechscope.model.config import ModelConfig
from mechscope.model.context import AttentionContext, apply_rotary


def activation_fn(name: str):
    """The element-wise non-linearity ``cfg.act_fn`` names."""
    return {
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
        "relu": F.relu,
        "silu": F.silu,
    }[name]


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape))


def _optional_param(module: nn.Module, name: str, enabled: bool, *shape: int) -> None:
    module.register_parameter(name, _param(*shape) if enabled else None)


class Embed(nn.Module):
    """Token embedding ``W_E [d_vocab, d_model]``, times ``cfg.embed_scale`` when set."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_E = _param(cfg.d_vocab, cfg.d_model)
        self.scale = cfg.embed_scale

    def forward(self, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        x = F.embedding(tokens, self.W_E)
        if self.scale is None:
            return x
        return x * torch.tensor(self.scale, device=x.device).to(x.dtype)  # rounded as in transformers


class PosEmbed(nn.Module):
    """Learned position embedding ``W_pos [n_ctx, d_model]``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.W_pos = _param(cfg.n_ctx, cfg.d_model)

    def forward(self, positions: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch pos d_model"]:
        if positions.numel() and int(positions.max()) >= self.W_pos.shape[0]:
            raise InputError(
                f"position {int(positions.max())} is beyond the model's n_ctx={self.W_pos.shape[0]} learned "
                "position embeddings; shorten the input"
            )
        return F.embedding(positions, self.W_pos)


class LayerNorm(nn.Module):
    """LayerNorm with TransformerLens' ``hook_scale`` (the divisor, ``[..., 1]``) and ``hook_normalized``
    (the centred input over it, before the weights); the output ``hook_normalized * w + b`` goes
    through the opt-in ``hook_out``. The fused kernel runs unless ``hook_scale``/``hook_normalized``
    are hooked (then the explicit path, whose hooks may edit). ``weighted=False`` is TL's ``LNPre``:
    no ``w``/``b`` parameters."""

    def __init__(self, cfg: ModelConfig, size: int | None = None, weighted: bool = True) -> None:
        super().__init__()
        self.eps, self.size = cfg.norm_eps, size or cfg.d_model
        self.w = nn.Parameter(torch.ones(self.size)) if weighted else None
        self.b = nn.Parameter(torch.zeros(self.size)) if weighted else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()
        self.hook_out = HookPoint(opt_in=True)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        def fused() -> Tensor:
            return F.layer_norm(x, (self.size,), self.w, self.b, self.eps)

        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return self.hook_out(fused())
        centred = x - x.mean(-1, keepdim=True)
        scale, scale_read_only = _run_hook(self.hook_scale, (centred.pow(2).mean(-1, keepdim=True) + self.eps).sqrt())
        normalized, read_only = _run_hook(self.hook_normalized, centred / scale)
        explicit = (lambda: normalized) if self.w is None else (lambda: normalized * self.w + self.b)
        return self.hook_out(_fast_unless_edited(scale_read_only and read_only, fused, explicit, normalized))


class RMSNorm(nn.Module):
    """RMSNorm in float32 (as ``transformers``), with TransformerLens' ``hook_scale`` (the root mean
    square) and ``hook_normalized`` (the input over it, before the weight); the output
    ``w * hook_normalized`` goes through the opt-in ``hook_out``. ``weighted=False`` is ``RMSPre``."""

    def __init__(self, cfg: ModelConfig, size: int | None = None, weighted: bool = True) -> None:
        super().__init__()
        self.eps, self.size = cfg.norm_eps, size or cfg.d_model
        self.w = nn.Parameter(torch.ones(self.size)) if weighted else None
        self.hook_scale = HookPoint()
        self.hook_normalized = HookPoint()
        self.hook_out = HookPoint(opt_in=True)

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        x32 = x.float()
        variance = x32.pow(2).mean(-1, keepdim=True)

        def weighted(normed: Tensor) -> Tensor:
            return normed if self.w is None else self.w * normed

        def fused() -> Tensor:
            return weighted((x32 * torch.rsqrt(variance + self.eps)).to(x.dtype))

        if not (self.hook_scale.has_hooks() or self.hook_normalized.has_hooks()):
            return self.hook_out(fused())
        scale, scale_read_only = _run_hook(self.hook_scale, (variance + self.eps).sqrt())
        normalized, read_only = _run_hook(self.hook_normalized, (x32 / scale).to(x.dtype))
        out = _fast_unless_edited(scale_read_only and read_only, fused, lambda: weighted(normalized), normalized)
        return self.hook_out(out)


def make_norm(cfg: ModelConfig, size: int | None = None, enabled: bool = True, pre: bool = False) -> nn.Module | None:
    """The configured norm over ``size`` features (default ``d_model``), or ``None``; ``pre`` marks
    the pre-norms (``ln1``, ``ln2``, ``ln_final``), weightless under ``"LNPre"``/``"RMSPre"``."""
    kind = cfg.normalization_type
    if not enabled or kind is None:
        return None
    norm = LayerNorm if kind in ("LN", "LNPre") else RMSNorm
    return norm(cfg, size, weighted=not (pre and kind.endswith("Pre")))


class Attention(nn.Module):
    """Multi-head, grouped-query or multi-query attention.

    Runs ``scaled_dot_product_attention`` unless a hook (or ``cfg.attn_implementation="eager"``)
    needs ``hook_attn_scores``/``hook_pattern``; both paths compute the same function, and hooks
    that only read the scores or pattern leave the output exactly that of the fused kernel.
    Soft-capped scores (``cfg.attn_scores_soft_cap``) always take the explicit path, which is
    exact for them. `scores` is the one computation of the attention logits.
    With a key/value cache in the context, keys and values of earlier positions are reused.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        h, kv, dh, d = cfg.n_heads, cfg.n_key_value_heads, cfg.d_head, cfg.d_model
        self.sliding_window = cfg.layer_window(layer)
        self.rotary_base, self.rope_scaling = cfg.layer_rope(layer)
        self.w_q, self.w_k, self.w_v = _param(h * dh, d), _param(kv * dh, d), _param(kv * dh, d)
        self.w_o = _param(d, h * dh)
        for name, size in (("b_q", h * dh), ("b_k", kv * dh), ("b_v", kv * dh)):
            _optional_param(self, name, cfg.attn_qkv_bias, size)
        _optional_param(self, "b_o", cfg.attn_out_bias, d)
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()
        if cfg.qk_norm is not None:
            full = cfg.qk_norm == "full"
            self.q_norm = make_norm(cfg, h * dh if full else dh)
            self.k_norm = make_norm(cfg, kv * dh if full else dh)
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

    @property
    def scale(self) -> float:
        """The factor on ``q . k``: ``cfg.attn_score_factor``, the reciprocal of ``cfg.attn_scale``."""
        return self.cfg.attn_score_factor

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None, heads: int) -> Tensor:
        """``x`` is ``[batch, pos, d_model]`` or per-head ``[batch, pos, heads, d_model]``."""
        if x.dim() == 3:
            return F.linear(x, weight, bias).unflatten(-1, (heads, self.cfg.d_head))
        out = torch.einsum("bphd,hkd->bphk", x, weight.view(heads, self.cfg.d_head, -1))
        return out if bias is None else out + bias.view(heads, self.cfg.d_head)

    def _qk_norm(self, norm: nn.Module, x: Float[Tensor, "batch pos head d_head"]) -> Tensor:
        if self.cfg.qk_norm == "head":
            return norm(x)
        return norm(x.flatten(-2)).unflatten(-1, x.shape[-2:])

    def scores(
        self, q: Float[Tensor, "... query_pos head d_head"], k: Float[Tensor, "... key_pos kv_head d_head"]
    ) -> Float[Tensor, "... head query_pos key_pos"]:
        """Attention logits before the mask and the softmax: ``q . k`` times the scale, each key
        head repeated for its group of query heads, soft-capped when ``cfg.attn_scores_soft_cap``
        is set.

        ``q`` and ``k`` are the final queries and keys in the layout of the hooks, after QK-norm
        and RoPE: ``hook_rot_q``/``hook_rot_k`` on rotary models, ``hook_q``/``hook_k`` on models
        without rotary positions or QK-norm (``hook_q``/``hook_k`` come before both). Keys keep the
        layer's ``kv_head`` heads. Leading axes other than ``batch`` are allowed. Masked entries
        are the values ``hook_attn_scores`` holds as ``-inf``; every other entry equals it.

        Example:
            >>> _, cache = model.run_with_cache(tokens)
            >>> attn = model.blocks[0].attn
            >>> scores = attn.scores(cache["q", 0], cache["k", 0])  # [batch, head, query_pos, key_pos]
            >>> torch.equal(scores.tril(), cache["attn_scores", 0].tril())
            True
        """
        cfg = self.cfg
        if q.shape[-2] != cfg.n_heads or k.shape[-2] != cfg.n_key_value_heads:
            raise InputError(
                f"scores takes queries [..., query_pos, {cfg.n_heads}, d_head] and keys [..., key_pos, "
                f"{cfg.n_key_value_heads}, d_head] (kv_head, not expanded); got {tuple(q.shape)} and {tuple(k.shape)}"
            )
        q = q.transpose(-3, -2)  # [..., head, query_pos, d_head]
        k = k.transpose(-3, -2)  # [..., kv_head, key_pos, d_head]
        if cfg.n_kv_groups > 1:
            k = k.repeat_interleave(cfg.n_kv_groups, dim=-3)  # [..., head, key_pos, d_head]
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [..., head, query_pos, key_pos]
        cap = cfg.attn_scores_soft_cap
        return scores if cap is None else torch.tanh(scores / cap) * cap

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
        if cfg.qk_norm is not None:
            q, k = self._qk_norm(self.q_norm, q), self._qk_norm(self.k_norm, k)
        if cfg.positional_embedding_type == "rotary":
            cos, sin = ctx.rotary(cfg.rotary_dim, self.rotary_base, self.rope_scaling, cfg.rotary_interleaved, q.dtype)
            q = self.hook_rot_q(apply_rotary(q, cos, sin, cfg.rotary_interleaved))
            k = self.hook_rot_k(apply_rotary(k, cos, sin, cfg.rotary_interleaved))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, head or kv_head, pos, d_head]
        if ctx.kv_cache is not None:
            k, v = ctx.kv_cache.append(self.layer, k, v)  # [batch, kv_head, past + pos, d_head]
        mask = ctx.mask(self.sliding_window) if cfg.causal else _key_padding(ctx)
        explicit = cfg.attn_implementation == "eager" or cfg.attn_scores_soft_cap is not None
        if explicit or self.hook_attn_scores.has_hooks() or self.hook_pattern.has_hooks():
            z = self._explicit_attention(q, k, v, mask, fused_if_unedited=not explicit)
        else:
            z = self._fused_attention(q, k, v, mask)
        z = self.hook_z(z.transpose(1, 2))  # [batch, pos, head, d_head]
        if not (cfg.use_attn_result or self.hook_result.has_hooks()):
            return F.linear(z.flatten(-2), self.w_o, self.b_o)
        result = torch.einsum("bphk,hkd->bphd", z, self.W_O)  # [batch, pos, head, d_model]
        result, read_only = _run_hook(self.hook_result, result)
        return _fast_unless_edited(
            read_only,
            lambda: F.linear(z.flatten(-2), self.w_o, self.b_o),
            lambda: result.sum(-2) if self.b_o is None else result.sum(-2) + self.b_o,
            result,
        )

    def _fused_attention(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        causal = self.cfg.causal and mask is None and q.shape[-2] > 1
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, enable_gqa=self.cfg.n_kv_groups > 1
        )

    def _explicit_attention(
        self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, fused_if_unedited: bool
    ) -> Float[Tensor, "batch head query_pos d_head"]:
        """Attention through materialised scores and pattern, which the hooks see; with
        ``fused_if_unedited`` the output of hooks that only read them is the fused kernel's."""
        scores = self.scores(q.transpose(1, 2), k.transpose(1, 2))  # [batch, head, query_pos, key_pos]
        allowed = mask
        if allowed is None:
            n_q, n_k = scores.shape[-2:]
            allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device)
            allowed = allowed.tril(n_k - n_q) if self.cfg.causal else allowed
        scores, scores_read_only = _run_hook(self.hook_attn_scores, scores.masked_fill(~allowed, float("-inf")))
        pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        pattern, pattern_read_only = _run_hook(self.hook_pattern, pattern)
        groups = self.cfg.n_kv_groups
        v_heads = v.repeat_interleave(groups, dim=1) if groups > 1 else v  # [batch, head, key_pos, d_head]
        return _fast_unless_edited(
            fused_if_unedited and scores_read_only and pattern_read_only,
            lambda: self._fused_attention(q, k, v, mask),
            lambda: torch.matmul(pattern, v_heads),
            pattern,
        )


def _key_padding(ctx: AttentionContext) -> Bool[Tensor, "batch 1 1 key_pos"] | None:
    """Bidirectional attention's mask: every query sees every real key (``None``: no padding)."""
    return None if ctx.key_padding is None else ctx.key_padding[:, None, None, :]


def _run_hook(hook: HookPoint, x: Tensor) -> tuple[Tensor, bool]:
    """``hook(x)``, and whether its hooks only read ``x``: they returned ``x`` or a view of it
    with its layout and gradient tracking (as a backward hook's node is) and edited nothing in place.

    Inference-mode tensors keep no count of in-place edits; they count as edited.
    """
    edits = None if x.is_inference() else x._version
    out = hook(x)
    same = out is x or (
        out.data_ptr() == x.data_ptr() and out.stride() == x.stride() and out.requires_grad == x.requires_grad
    )  # a detached copy (e.g. a frozen norm scale) is an edit: it changes the gradient
    return out, same and edits is not None and edits == x._version


def _fast_unless_edited(
    read_only: bool, fast: Callable[[], Tensor], explicit: Callable[[], Tensor], hooked: Tensor
) -> Tensor:
    """The output of a sublayer whose hook point saw ``hooked``, an intermediate of ``explicit()``.

    When the hooks edited it, ``explicit()``. Otherwise the values of ``fast()`` (the same
    function through the fused kernel a plain forward runs, so a cached run gives exactly its
    logits), and when a gradient is needed the graph of ``explicit()``, so ``hooked`` stays in it.
    """
    if not read_only:
        return explicit()
    values = fast()  # in the caller's grad mode, so that torch picks the plain forward's kernel
    if not hooked.requires_grad:
        return values
    graph = explicit()
    return values.detach() + (graph - graph.detach())  # adding an exact zero keeps the values


class MLP(nn.Module):
    """Feed-forward layer: ``W_out(act(W_in x))``, or gated ``W_out(act(W_gate x) * W_in x)``.

    ``hook_pre`` is the pre-activation (the gate's, for gated MLPs), ``hook_pre_linear`` the
    linear branch of a gated MLP, ``hook_post`` the neuron activations ``[batch, pos, d_mlp]``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.act = activation_fn(cfg.act_fn)
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
    """Unembedding, stored as ``w_u [d_vocab, d_model]`` (``W_U`` is the transposed view). ``b_U`` is
    the bias or, without one, zeros ``[d_vocab_out]`` the forward does not add (TL's ``b_U``);
    ``hook_in`` sees the final normalised residual, ``hook_out`` the logits before soft-capping."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_u = _param(cfg.d_vocab_out, cfg.d_model)
        _optional_param(self, "b_U", cfg.unembed_bias, cfg.d_vocab_out)
        self.hook_in, self.hook_out = HookPoint(), HookPoint()

    def __getattr__(self, name: str):
        value = super().__getattr__(name)
        if value is None and name == "b_U":
            return self.w_u.new_zeros(self.w_u.shape[0])
        return value

    @property
    def bias(self) -> nn.Parameter | None:
        """The stored bias, ``None`` when the model has none."""
        return self._parameters["b_U"]

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.w_u.T

    def forward(self, x: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_vocab"]:
        return self.hook_out(F.linear(self.hook_in(x), self.w_u, self.bias))


class TransformerBlock(nn.Module):
    """One residual block: attention then MLP (or both reading ``resid_pre`` when parallel).

    Each sublayer reads ``ln1``/``ln2`` of its input (``cfg.pre_norm``) and its output passes
    through ``ln1_post``/``ln2_post`` (``cfg.post_norm``) before joining the residual stream;
    ``hook_attn_out`` and ``hook_mlp_out`` see exactly what is added.
    """

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.ln1 = make_norm(cfg, enabled=cfg.pre_norm, pre=True)
        self.attn = Attention(cfg, layer)
        self.ln1_post = make_norm(cfg, enabled=cfg.post_norm)
        self.hook_resid_pre = HookPoint()
        self.hook_attn_in = HookPoint(opt_in=True)
        self.hook_q_input = HookPoint(opt_in=True)
        self.hook_k_input = HookPoint(opt_in=True)
        self.hook_v_input = HookPoint(opt_in=True)
        self.hook_attn_out = HookPoint()
        if not cfg.attn_only:
            self.ln2 = make_norm(cfg, enabled=cfg.pre_norm, pre=True)
            self.mlp = MLP(cfg)
            self.ln2_post = make_norm(cfg, enabled=cfg.post_norm)
            if not cfg.parallel_attn_mlp:
                self.hook_resid_mid = HookPoint()
            self.hook_mlp_in = HookPoint(opt_in=True)
            self.hook_mlp_out = HookPoint()
        self.hook_resid_post = HookPoint()

    def _norm(self, norm: nn.Module | None, x: Tensor) -> Tensor:
        return x if norm is None else norm(x)

    def _attention_inputs(self, resid: Float[Tensor, "batch pos d_model"]) -> tuple[Tensor, Tensor, Tensor]:
        cfg = self.cfg
        if cfg.use_attn_in or self.hook_attn_in.has_hooks():
            resid = self.hook_attn_in(resid.clone())
        split = (
            cfg.use_split_qkv_input
            or self.hook_q_input.has_hooks()
            or self.hook_k_input.has_hooks()
            or self.hook_v_input.has_hooks()
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
        attn_out = self.hook_attn_out(self._norm(self.ln1_post, self.attn(*self._attention_inputs(resid_pre), ctx)))
        if self.cfg.attn_only:
            return self.hook_resid_post(resid_pre + attn_out)
        resid = resid_pre if self.cfg.parallel_attn_mlp else self.hook_resid_mid(resid_pre + attn_out)
        mlp_in = resid
        if self.cfg.use_hook_mlp_in or self.hook_mlp_in.has_hooks():
            mlp_in = self.hook_mlp_in(resid.clone())
        mlp_out = self.hook_mlp_out(self._norm(self.ln2_post, self.mlp(self._norm(self.ln2, mlp_in))))
        if self.cfg.parallel_attn_mlp:
            return self.hook_resid_post(resid_pre + attn_out + mlp_out)
        return self.hook_resid_post(resid + mlp_out)
