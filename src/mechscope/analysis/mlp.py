"""MLP linearisation: the Jacobian of an MLP at one input, read as an input-space direction.

Following "Case Studies in Reverse-Engineering Sparse Autoencoder Features by Using MLP
Linearization" (Kissane et al., 2024): at a given token position, the MLP (with the norm in
front of it) is linearised around its actual input. For a neuron, or for any direction in the
MLP's output space, the gradient of that scalar with respect to the MLP's input (the residual
stream entering ``ln2``) is the input direction the MLP responds to there; reading it through
the embedding gives the tokens that most excite it. The gradient is computed in closed form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer


def activation_derivative(act_fn: str, x: Float[Tensor, "*shape"]) -> Float[Tensor, "*shape"]:
    """Elementwise derivative of a model activation function.

    Example:
        >>> activation_derivative("relu", torch.tensor([-1.0, 2.0]))
        tensor([0., 1.])
    """
    if act_fn == "relu":
        return (x > 0).to(x.dtype)
    if act_fn == "silu":
        sig = torch.sigmoid(x)
        return sig * (1 + x * (1 - sig))
    if act_fn == "gelu":
        return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * torch.exp(-0.5 * x**2) / math.sqrt(2 * math.pi)
    if act_fn in ("gelu_new", "gelu_pytorch_tanh"):
        c = math.sqrt(2 / math.pi)
        t = torch.tanh(c * (x + 0.044715 * x**3))
        return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * c * (1 + 3 * 0.044715 * x**2)
    raise InputError(f"no derivative for act_fn {act_fn!r}; choose relu, silu, gelu, gelu_new or gelu_pytorch_tanh")


@dataclass
class MLPLinearisation:
    """Result of `linearise_mlp`.

    ``input_direction [d_model]`` is the gradient of the target with respect to the MLP's input
    (the residual stream), so ``value + input_direction @ delta`` approximates the target after a
    small change ``delta`` of that input. ``value`` is the target at the actual input.

    Example:
        >>> lin = linearise_mlp(model, tokens, layer=1, neuron=7)
        >>> lin.input_direction.shape, lin.layer, lin.pos  # pos: the last position, counted from 0
        (torch.Size([32]), 1, 3)
    """

    input_direction: Float[Tensor, " d_model"]
    value: float
    layer: int
    pos: int

    def top_tokens(self, model: HookedTransformer, k: int = 10) -> list[tuple[str, float]]:
        """Tokens whose embeddings align most with the direction: ``(token, W_E[t] @ direction)``.

        Example:
            >>> top = linearise_mlp(model, tokens, layer=1, neuron=7).top_tokens(model, k=3)
            >>> len(top), top[0][1] >= top[1][1] >= top[2][1]
            (3, True)
        """
        scores = model.W_E.detach() @ self.input_direction.to(model.dtype)
        top = scores.topk(k)
        return [
            (model.to_string([int(i)]) if model.tokenizer is not None else str(int(i)), round(float(s), 4))
            for s, i in zip(top.values, top.indices, strict=True)
        ]


def _norm_vjp(
    norm, norm_type: str | None, x: Float[Tensor, " d_model"], grad_out: Float[Tensor, " d_model"], freeze_norm: bool
) -> Float[Tensor, " d_model"]:
    """Vector-Jacobian product of a norm at ``x`` (``[d_model]``) with ``grad_out``."""
    if norm is None:
        return grad_out
    g = grad_out if norm.w is None else grad_out * norm.w.detach()
    centres = norm_type in ("LN", "LNPre")
    centred = x - x.mean() if centres else x
    scale = (centred.pow(2).mean() + norm.eps).sqrt()
    if not freeze_norm:
        normalized = centred / scale
        g = g - normalized * (g * normalized).mean()
    if centres:
        g = g - g.mean()
    return g / scale


def linearise_mlp(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"] | str,
    layer: int,
    pos: int = -1,
    *,
    neuron: int | None = None,
    direction: Float[Tensor, " d_model"] | None = None,
    batch: int = 0,
    freeze_norm: bool = False,
) -> MLPLinearisation:
    """Linearise ``layer``'s MLP at one position for a ``neuron`` (its ``hook_post`` value) or an
    output ``direction`` (``direction @ mlp_out``); give exactly one.

    ``freeze_norm=True`` treats the norm's scale as a constant (the linearisation used in the
    paper); the default differentiates through it too. Exact up to float rounding: equals the
    autograd gradient of the same scalar with respect to ``hook_resid_mid`` (``hook_resid_pre``
    in parallel blocks).

    Example:
        >>> lin = linearise_mlp(model, tokens, layer=1, neuron=7)
        >>> lin.input_direction.shape, len(lin.top_tokens(model, k=3))
        (torch.Size([32]), 3)
    """
    cfg = model.cfg
    if cfg.attn_only:
        raise InputError("this model has no MLPs (cfg.attn_only=True)")
    if not -cfg.n_layers <= layer < cfg.n_layers:
        raise InputError(f"layer {layer} is out of range for a model with {cfg.n_layers} layers")
    layer %= cfg.n_layers
    if (neuron is None) == (direction is None):
        raise InputError("give exactly one of neuron= (an MLP neuron) or direction= (a d_model output direction)")
    if neuron is not None and not 0 <= neuron < cfg.d_mlp:
        raise InputError(f"neuron {neuron} is out of range: d_mlp={cfg.d_mlp}")
    if direction is not None and tuple(direction.shape) != (cfg.d_model,):
        raise InputError(f"direction must have shape [{cfg.d_model}] (d_model), got {list(direction.shape)}")
    if isinstance(tokens, str):
        tokens = model.to_tokens(tokens)
    input_name = f"blocks.{layer}.hook_resid_pre" if cfg.parallel_attn_mlp else f"blocks.{layer}.hook_resid_mid"
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=input_name, stop_at_layer=layer + 1)
    x = cache[input_name][batch, pos]
    block = model.blocks[layer]
    mlp = block.mlp
    with torch.no_grad():
        normed = x if block.ln2 is None else block.ln2.forward(x)
        w_in, w_gate = mlp.w_in.detach(), getattr(mlp, "w_gate", None)
        pre_linear = torch.nn.functional.linear(normed, w_in, mlp.b_in)
        if cfg.gated_mlp:
            pre = torch.nn.functional.linear(normed, w_gate.detach(), mlp.b_gate)
            post = mlp.act(pre) * pre_linear
        else:
            pre = pre_linear
            post = mlp.act(pre)
        if neuron is not None:
            grad_post = torch.zeros_like(post)
            grad_post[neuron] = 1.0
            value = post[neuron]
        else:
            direction = direction.to(x.device, x.dtype)
            grad_post = direction @ mlp.w_out.detach()  # [d_mlp]
            value = direction @ torch.nn.functional.linear(post, mlp.w_out.detach(), mlp.b_out)
        d_act = activation_derivative(cfg.act_fn, pre)
        if cfg.gated_mlp:
            grad_normed = (grad_post * d_act * pre_linear) @ w_gate.detach() + (grad_post * mlp.act(pre)) @ w_in
        else:
            grad_normed = (grad_post * d_act) @ w_in
        grad_x = _norm_vjp(block.ln2, cfg.normalization_type, x.float(), grad_normed.float(), freeze_norm)
    return MLPLinearisation(grad_x.to(x.dtype), float(value), layer, pos % tokens.shape[-1])
