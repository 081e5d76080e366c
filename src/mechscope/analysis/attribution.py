"""Direct logit attribution (DLA) and the logit lens.

The final norm is linear once its scale is fixed, so with the scale read from the cache the
logit of a token splits exactly into one term per residual-stream component. Nothing needs to
be folded: each component ``c`` contributes ``centre(c) / scale * ln_final.w @ direction``;
the norm's bias (LayerNorm) and the unembedding bias are components of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.cache import ActivationCache
    from mechscope.model.transformer import HookedTransformer

TokenLike = int | str | Sequence | Int[Tensor, "..."]
Direction = Float[Tensor, "*batch d_model"]
Position = int | Int[Tensor, "..."] | Sequence[int]
By = Literal["layer", "head", "neuron"]


# ---------------------------------------------------------------------- targets
@dataclass
class LogitTarget:
    """A logit, a logit difference, or any readout ``normed_resid @ direction + bias``.

    ``direction`` is ``[batch, d_model]`` in the space after the final norm (the unembedding's
    input); ``bias`` ``[batch]`` is the unembedding bias of the target (zero for a raw direction).

    Example:
        >>> target = logit_target(model, 3, against=7, batch=2)
        >>> target.direction.shape, target.bias.tolist()
        (torch.Size([2, 32]), [0.0, 0.0])
    """

    direction: Float[Tensor, "batch d_model"]
    bias: Float[Tensor, " batch"]


def _token_ids(model: HookedTransformer, tokens: TokenLike, batch: int | None) -> Int[Tensor, " batch"]:
    if isinstance(tokens, str):
        ids = torch.tensor([model.to_single_token(tokens)])
    elif isinstance(tokens, int):
        ids = torch.tensor([tokens])
    elif isinstance(tokens, Tensor):
        if tokens.is_floating_point():
            raise InputError("token ids must be integers; pass a float tensor as `answer` alone for a direction")
        ids = tokens.reshape(-1)
    else:
        ids = torch.tensor([model.to_single_token(t) if isinstance(t, str) else int(t) for t in tokens])
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab):
        raise InputError(f"answer token ids must lie in [0, {model.cfg.d_vocab}), got {ids.tolist()}")
    if batch is not None and ids.numel() not in (1, batch):
        raise InputError(f"got {ids.numel()} answer tokens for a batch of {batch}; give one per prompt or one for all")
    if batch is not None:
        ids = ids.expand(batch)
    return ids.to(model.device)


def logit_target(
    model: HookedTransformer,
    answer: TokenLike | Direction,
    against: TokenLike | None = None,
    batch: int | None = None,
) -> LogitTarget:
    """The readout for the logit of ``answer`` (minus that of ``against``), or along a direction.

    ``answer``/``against`` are token ids or single-token strings: one for every prompt, or one
    per prompt. A float tensor ``[d_model]`` or ``[batch, d_model]`` as ``answer`` is used as the
    direction itself (in the unembedding's input space).

    Example:
        >>> target = logit_target(model, 3, against=7)
        >>> torch.equal(target.direction[0], model.W_U[:, 3] - model.W_U[:, 7])
        True
    """
    if isinstance(answer, Tensor) and answer.is_floating_point():
        if against is not None:
            raise InputError("`against` needs token answers; subtract the directions yourself for raw directions")
        if answer.shape[-1] != model.cfg.d_model or answer.dim() > 2:
            raise InputError(
                f"a direction must be [d_model] or [batch, d_model] with d_model={model.cfg.d_model}, "
                f"got {tuple(answer.shape)}"
            )
        direction = answer.to(model.device, model.dtype).reshape(-1, model.cfg.d_model)
        if batch is not None:
            direction = direction.expand(batch, -1)
        return LogitTarget(direction, torch.zeros(direction.shape[0], device=model.device, dtype=model.dtype))
    ids = _token_ids(model, answer, batch)
    w_u, b_u = model.unembed.w_u, model.unembed.bias
    direction = w_u[ids]
    bias = b_u[ids] if b_u is not None else torch.zeros(ids.shape[0], device=model.device, dtype=model.dtype)
    if against is not None:
        other = _token_ids(model, against, ids.shape[0])
        direction = direction - w_u[other]
        if b_u is not None:
            bias = bias - b_u[other]
    return LogitTarget(direction.detach(), bias.detach())


# ---------------------------------------------------------------------- final norm
def apply_final_norm(model: HookedTransformer, resid: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
    """The model's final norm applied to ``resid`` (recomputing its scale), without running hooks.

    Example:
        >>> resid = torch.randn(2, 5, 32)
        >>> torch.allclose(apply_final_norm(model, resid), model.ln_final(resid), atol=1e-6)
        True
    """
    norm = model.ln_final
    if norm is None:
        return resid
    if model.cfg.normalization_type in ("LN", "LNPre"):
        return torch.nn.functional.layer_norm(resid, (norm.size,), norm.w, norm.b, norm.eps)
    x = resid.float()
    normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)).to(resid.dtype)
    return normed if norm.w is None else norm.w * normed


def _positions(pos: Position, batch: int, seq: int, device: torch.device) -> Int[Tensor, " batch"]:
    index = torch.as_tensor(pos, device=device).reshape(-1).long()
    if index.numel() not in (1, batch):
        raise InputError(f"pos must be one position or one per prompt ({batch}), got {index.numel()}")
    if int(index.min()) < -seq or int(index.max()) >= seq:
        raise InputError(f"pos {index.tolist()} is out of range for sequences of length {seq}")
    return (index % seq).expand(batch)


def _at(x: Float[Tensor, "batch pos *rest"], index: Int[Tensor, " batch"]) -> Float[Tensor, " batch *rest"]:
    """``x[b, index[b]]`` for every ``b``."""
    return x[torch.arange(x.shape[0], device=x.device), index]


def _readout(
    cache: ActivationCache, target: LogitTarget, index: Int[Tensor, " batch"]
) -> Float[Tensor, "batch d_model"]:
    """``u`` such that a component ``c`` at the read position contributes ``c @ u[b]`` to the target."""
    model = cache.model
    u = target.direction
    if model.ln_final is None:
        return u
    if model.ln_final.w is not None:
        u = u * model.ln_final.w.detach()
    u = u / _at(cache["ln_final.hook_scale"], index).to(u.dtype)
    if model.cfg.normalization_type in ("LN", "LNPre"):
        u = u - u.mean(-1, keepdim=True)  # centring is self-adjoint: centre(c) @ u == c @ centre(u)
    return u


# ---------------------------------------------------------------------- attribution
@dataclass
class Attribution:
    """Contributions ``values [component, batch]`` with one label per component.

    Example:
        >>> a = Attribution(torch.tensor([[1.0], [-3.0], [2.0]]), ["a", "b", "c"])
        >>> a.top(2, batch=0)
        [('b', -3.0), ('c', 2.0)]
    """

    values: Float[Tensor, "component batch"]
    labels: list[str]

    def total(self) -> Float[Tensor, " batch"]:
        """Sum over components (the full logit when the decomposition is complete).

        Example:
            >>> Attribution(torch.tensor([[1.0, 2.0], [0.5, -1.0]]), ["a", "b"]).total()
            tensor([1.5000, 1.0000])
        """
        return self.values.sum(0)

    def mean(self) -> Float[Tensor, " component"]:
        """Mean over the batch.

        Example:
            >>> Attribution(torch.tensor([[1.0, 2.0], [0.5, -1.0]]), ["a", "b"]).mean()
            tensor([ 1.5000, -0.2500])
        """
        return self.values.mean(-1)

    def __getitem__(self, label: str) -> Float[Tensor, " batch"]:
        if label not in self.labels:
            from mechscope.names import unknown_name_error

            raise unknown_name_error(label, self.labels, "component")
        return self.values[self.labels.index(label)]

    def top(self, k: int = 10, batch: int | None = None) -> list[tuple[str, float]]:
        """The ``k`` components of largest absolute contribution (batch mean, or one prompt).

        Example:
            >>> a = Attribution(torch.tensor([[1.0, 2.0], [0.5, -4.0]]), ["a", "b"])
            >>> a.top(1), a.top(1, batch=0)
            ([('b', -1.75)], [('a', 1.0)])
        """
        v = self.mean() if batch is None else self.values[:, batch]
        order = v.abs().argsort(descending=True)[:k]
        return [(self.labels[i], round(float(v[i]), 4)) for i in order]

    def table(self, k: int = 10, batch: int | None = None) -> str:
        """A printable table of `top` components.

        Example:
            >>> print(Attribution(torch.tensor([[1.0], [-3.0]]), ["L0H1", "L2H0"]).table(k=2))
            L2H0    -3.0000
            L0H1    +1.0000
        """
        rows = self.top(k, batch)
        width = max((len(label) for label, _ in rows), default=5)
        return "\n".join(f"{label:<{width}}  {value:+9.4f}" for label, value in rows)


def _layer_components(cache: ActivationCache, index: Int[Tensor, " batch"]) -> tuple[list[Tensor], list[str]]:
    stack, labels = cache.decompose_resid(return_labels=True)  # [component, batch, pos, d_model]
    return list(stack[:, torch.arange(stack.shape[1], device=index.device), index]), labels


def _head_components(cache: ActivationCache, index: Int[Tensor, " batch"]) -> tuple[list[Tensor], list[str]]:
    model, cfg = cache.model, cache.model.cfg
    rows = torch.arange(index.shape[0], device=index.device)
    parts, labels = [cache["hook_embed"][rows, index]], ["embed"]
    if "hook_pos_embed" in model.hook_dict:
        parts.append(cache["hook_pos_embed"][rows, index])
        labels.append("pos_embed")
    W_O, b_O = model.W_O.detach(), model.b_O.detach()  # stacked once for every layer
    for layer in range(cfg.n_layers):
        results = cache.head_results(layer, W_O)[rows, index]  # [batch, head, d_model]
        parts.extend(results.unbind(1))
        labels.extend(f"L{layer}H{h}" for h in range(cfg.n_heads))
        if cfg.attn_out_bias:
            parts.append(b_O[layer].expand_as(results[:, 0]))
            labels.append(f"L{layer}_attn_bias")
        if not cfg.attn_only:
            parts.append(cache["mlp_out", layer][rows, index])
            labels.append(f"{layer}_mlp_out")
    return parts, labels


def _neuron_components(
    cache: ActivationCache, index: Int[Tensor, " batch"], layer: int
) -> tuple[Float[Tensor, "batch d_mlp"], list[str], Float[Tensor, " d_model"] | None]:
    mlp = cache.model.blocks[layer].mlp
    post = _at(cache["post", layer], index)  # [batch, d_mlp]
    return post, [f"L{layer}N{n}" for n in range(post.shape[-1])], mlp.b_out


@torch.no_grad()
def direct_logit_attribution(
    cache: ActivationCache,
    answer: TokenLike | Direction,
    against: TokenLike | None = None,
    *,
    by: By = "layer",
    pos: Position = -1,
    layer: int | None = None,
) -> Attribution:
    """Split a logit (or logit difference, or direction) at position ``pos`` into its sources.

    ``by="layer"``: ``embed``, ``pos_embed``, ``{l}_attn_out`` and ``{l}_mlp_out``;
    ``by="head"``: every head ``L{l}H{h}`` instead of ``{l}_attn_out`` (attention output biases
    as ``L{l}_attn_bias``). Both end with ``ln_final.b`` (LayerNorm models) and ``unembed.b_U``
    (models with an unembedding bias) so that the components sum exactly to the model's logit.
    ``by="neuron"`` splits one ``layer``'s MLP output into ``L{layer}N{n}`` (and ``L{layer}_mlp_bias``);
    these sum to that layer's ``{layer}_mlp_out`` entry.

    The final norm's scale is read from the cache (``ln_final.hook_scale``, cached by a plain
    ``run_with_cache``), so no weight folding is needed. ``pos`` is one position or one per prompt
    (e.g. the last real token of right-padded prompts).

    Example:
        >>> logits, cache = model.run_with_cache(tokens)
        >>> dla = direct_logit_attribution(cache, answer=5, by="head")
        >>> torch.allclose(dla.total(), logits[:, -1, 5], atol=1e-4)
        True
        >>> dla.labels[:3]
        ['embed', 'pos_embed', 'L0H0']
    """
    if by not in ("layer", "head", "neuron"):
        raise InputError(f"by must be 'layer', 'head' or 'neuron', got {by!r}")
    model = cache.model
    embed = cache["hook_embed"]
    batch, seq = embed.shape[:2]
    index = _positions(pos, batch, seq, embed.device)
    target = logit_target(model, answer, against, batch=batch)
    u = _readout(cache, target, index)
    if by == "neuron":
        if layer is None or model.cfg.attn_only or not -model.cfg.n_layers <= layer < model.cfg.n_layers:
            raise InputError(f"by='neuron' needs layer= an MLP layer in [0, {model.cfg.n_layers}), got {layer}")
        layer %= model.cfg.n_layers
        post, labels, b_out = _neuron_components(cache, index, layer)
        w_out_u = u @ model.blocks[layer].mlp.w_out.detach().to(u.dtype)  # [batch, d_mlp]
        values = (post * w_out_u).T
        if b_out is not None:
            values = torch.cat([values, (u @ b_out.detach())[None]])
            labels = [*labels, f"L{layer}_mlp_bias"]
        return Attribution(values, labels)
    parts, labels = (_layer_components if by == "layer" else _head_components)(cache, index)
    values = torch.stack([(p.to(u.dtype) * u).sum(-1) for p in parts])  # [component, batch]
    extra, extra_labels = [], []
    norm = model.ln_final
    if norm is not None and getattr(norm, "b", None) is not None:
        extra.append(target.direction @ norm.b.detach())
        extra_labels.append("ln_final.b")
    if model.unembed.bias is not None:
        extra.append(target.bias)
        extra_labels.append("unembed.b_U")
    if extra:
        values = torch.cat([values, torch.stack(extra)])
    return Attribution(values, labels + extra_labels)


# ---------------------------------------------------------------------- logit lens
@dataclass
class LogitLens:
    """Logits read from the residual stream after each layer: ``logits [layer, batch, pos, d_vocab]``.

    ``labels`` name the residual streams (``"0_pre"`` ... ``"final_post"``); ``positions`` are the
    positions kept.

    Example:
        >>> _, cache = model.run_with_cache(tokens)
        >>> lens = logit_lens(cache)
        >>> lens.logits.shape, lens.labels[-1]
        (torch.Size([4, 1, 4, 50]), 'final_post')
    """

    logits: Float[Tensor, "layer batch pos d_vocab"]
    labels: list[str]
    positions: list[int]

    def top_tokens(self, k: int = 5) -> tuple[Float[Tensor, "layer batch pos k"], Int[Tensor, "layer batch pos k"]]:
        """Top-``k`` ``(probabilities, token ids)``, each ``[layer, batch, pos, k]``.

        Example:
            >>> probs, ids = logit_lens(model.run_with_cache(tokens)[1]).top_tokens(k=2)
            >>> probs.shape, ids.shape, bool((probs[..., 0] >= probs[..., 1]).all())
            (torch.Size([4, 1, 4, 2]), torch.Size([4, 1, 4, 2]), True)
        """
        top = self.logits.float().softmax(-1).topk(k, dim=-1)
        return top.values, top.indices

    def probs(self, token: int) -> Float[Tensor, "layer batch pos"]:
        """Probability of ``token`` at every layer, prompt and position.

        Example:
            >>> logit_lens(model.run_with_cache(tokens)[1]).probs(7).shape
            torch.Size([4, 1, 4])
        """
        return self.logits.float().softmax(-1)[..., token]

    def ranks(self, token: int) -> Int[Tensor, "layer batch pos"]:
        """Rank of ``token`` (0 = top prediction) at every layer, prompt and position.

        Example:
            >>> lens = logit_lens(model.run_with_cache(tokens)[1])
            >>> top = lens.logits[-1, 0, -1].argmax().item()
            >>> lens.ranks(top)[-1, 0, -1].item()
            0
        """
        return (self.logits > self.logits[..., token : token + 1]).sum(-1)

    def table(self, model: HookedTransformer, batch: int = 0, pos: int = -1, k: int = 3) -> str:
        """One line per layer: the top-``k`` tokens (and probabilities) at one position.

        Example:
            >>> smollm = ms.load("smollm2-135m")  # doctest: +SKIP
            >>> lens = logit_lens(smollm.run_with_cache("The capital of France is")[1])  # doctest: +SKIP
            >>> print(lens.table(smollm, k=2))  # doctest: +SKIP
        """
        probs, ids = self.top_tokens(k)
        lines = []
        for i, label in enumerate(self.labels):
            cells = [
                f"{model.to_string([int(t)])!r} {float(p):.2f}"
                for p, t in zip(probs[i, batch, pos], ids[i, batch, pos], strict=True)
            ]
            lines.append(f"{label:>10}  " + "  ".join(cells))
        return "\n".join(lines)


def logit_lens(cache: ActivationCache, pos: Position | None = None, incl_mid: bool = False) -> LogitLens:
    """Apply the final norm (recomputing its scale) and the unembedding to each accumulated residual.

    At the last entry (``final_post``) this equals the model's logits. ``pos`` keeps one
    position or a list of positions (default all).

    Example:
        >>> logits, cache = model.run_with_cache(tokens)
        >>> lens = logit_lens(cache)
        >>> lens.labels, torch.allclose(lens.logits[-1], logits, atol=1e-5)
        (['0_pre', '1_pre', '2_pre', 'final_post'], True)
    """
    model = cache.model
    resid, labels = cache.accumulated_resid(incl_mid=incl_mid, return_labels=True)  # [layer, batch, pos, d_model]
    seq = resid.shape[2]
    if pos is None:
        positions = list(range(seq))
    else:
        positions = [int(p) for p in torch.as_tensor(pos).reshape(-1)]
        bad = [p for p in positions if not -seq <= p < seq]
        if bad:
            raise InputError(f"positions {bad} are out of range for sequences of length {seq}")
        positions = [p % seq for p in positions]
        resid = resid[:, :, positions]
    with torch.no_grad():
        logits = model.unembed(apply_final_norm(model, resid))
    return LogitLens(logits, labels, positions)
