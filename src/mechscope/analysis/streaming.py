"""Direct logit attribution, the logit lens and head detectors computed as the forward runs, without a cache.

Each hook reduces its activation at once (a dot product with the readout direction for DLA, the
final norm and unembedding at the kept positions for the logit lens) and drops it, so memory
holds one layer's activation at a time instead of every layer's (head detectors score each layer's
pattern in its hook). The forward stops before the
unembedding (DLA needs no logits). The results equal `direct_logit_attribution` (``by="layer"``)
and `logit_lens` on a full cache, and work on `HookedTransformer` and on the generic block-level
wrapper (`mechscope.model.generic.GenericModel`) alike.

Example:
    >>> from mechscope.analysis.streaming import streaming_dla, streaming_logit_lens
    >>> dla = streaming_dla(model, tokens, answer=5)
    >>> torch.allclose(dla.total(), model(tokens)[:, -1, 5], atol=1e-4)
    True
    >>> streaming_logit_lens(model, tokens, pos=-1).logits.shape
    torch.Size([4, 1, 1, 50])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.analysis.attribution import Attribution, LogitLens
from mechscope.analysis.heads import score_patterns
from mechscope.decompose import norm_centres
from mechscope.errors import InputError
from mechscope.model.generic_probe import NormForm
from mechscope.model.tokenize import input_tokens

TokenLike = int | str | Sequence | Int[Tensor, "..."]


@dataclass
class Stream:
    """Hooks that reduce activations as a forward runs, and ``finish()`` turning the reductions into
    a result; `run_streams` runs several in one forward."""

    hooks: list[tuple[str, Callable]]
    finish: Callable[[], Any]


def final_norm_form(model: Any) -> NormForm | None:
    """The model's final norm as a `NormForm` (``None`` for a model without one).

    Example:
        >>> form = final_norm_form(model)
        >>> x = torch.randn(2, 32)
        >>> torch.allclose(form(x), model.ln_final(x), atol=1e-5)
        True
    """
    if hasattr(model, "final_norm_form"):  # the generic wrapper probed it at load time
        if model.final_norm_form is None:
            raise InputError(f"the final norm of this model could not be linearised: {model.notice}")
        return model.final_norm_form
    norm = model.ln_final
    if norm is None:
        return None
    weight = torch.ones(norm.size, device=model.device) if norm.w is None else norm.w.detach()  # folded: no weight
    return NormForm(norm_centres(model.cfg), weight, getattr(norm, "b", None), norm.eps)


def _head_bias(model: Any) -> Tensor | None:
    unembed = getattr(model, "unembed", None)
    return unembed.bias if unembed is not None else model.layout.head.bias


def _ids(model: Any, tokens: TokenLike, batch: int) -> Int[Tensor, " batch"]:
    if isinstance(tokens, str):
        tokens = [tokens]
    if isinstance(tokens, (list, tuple)):
        tokens = [model.to_single_token(t) if isinstance(t, str) else int(t) for t in tokens]
    ids = torch.as_tensor(tokens).reshape(-1).long()
    if ids.is_floating_point() or ids.numel() not in (1, batch):
        raise InputError(f"give one answer token id for every prompt or one per prompt ({batch}), got {tokens!r}")
    if int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab:
        raise InputError(f"answer token ids must lie in [0, {model.cfg.d_vocab}), got {ids.tolist()}")
    return ids.expand(batch).to(model.W_U.device)


def _positions(pos: int | Sequence[int] | Tensor, batch: int, seq: int, device) -> Int[Tensor, " batch"]:
    index = torch.as_tensor(pos, device=device).reshape(-1).long()
    if index.numel() not in (1, batch) or int(index.min()) < -seq or int(index.max()) >= seq:
        raise InputError(f"pos must be one position or one per prompt, in [-{seq}, {seq}), got {index.tolist()}")
    return (index % seq).expand(batch)


def _component_hooks(model: Any, by: str = "layer") -> list[tuple[str, str, int]]:
    """``(hook name, label, sign)`` of the residual-stream components, in forward order; with
    ``by="head"`` each layer's attention is ``("blocks.{l}.attn.hook_z", "L{l}", 0)``, split per head."""
    names, n = model.hook_dict, model.cfg.n_layers
    parts = [("hook_embed", "embed", 1)] if "hook_embed" in names else [("blocks.0.hook_resid_pre", "embed", 1)]
    if "hook_pos_embed" in names:
        parts.append(("hook_pos_embed", "pos_embed", 1))
    split = "blocks.0.hook_attn_out" in names and (model.cfg.attn_only or "blocks.0.hook_mlp_out" in names)
    for layer in range(n):
        if by == "head":
            parts.append((f"blocks.{layer}.attn.hook_z", f"L{layer}", 0))
            if not model.cfg.attn_only:
                parts.append((f"blocks.{layer}.hook_mlp_out", f"{layer}_mlp_out", 1))
        elif split:
            parts.append((f"blocks.{layer}.hook_attn_out", f"{layer}_attn_out", 1))
            if not model.cfg.attn_only:
                parts.append((f"blocks.{layer}.hook_mlp_out", f"{layer}_mlp_out", 1))
        else:  # blocks whose attention and MLP outputs cannot be read apart: one delta per block
            parts.append((f"blocks.{layer}.hook_resid_pre", f"{layer}_block_out", -1))
            parts.append((f"blocks.{layer}.hook_resid_post", f"{layer}_block_out", 1))
    return parts


def dla_stream(
    model: Any,
    tokens: Any,
    answer: TokenLike,
    against: TokenLike | None = None,
    *,
    by: Literal["layer", "head"] = "layer",
    pos: int | Sequence[int] | Tensor = -1,
) -> Stream:
    """The `Stream` of `streaming_dla` (to run with others in one forward, see `run_streams`)."""
    if by not in ("layer", "head"):
        raise InputError(f"by must be 'layer' or 'head' when streaming, got {by!r}")
    tokens = input_tokens(model, tokens)[0]
    batch, seq = tokens.shape
    index = _positions(pos, batch, seq, tokens.device)
    rows = torch.arange(batch, device=tokens.device)
    ids = _ids(model, answer, batch)
    w_u, b_u = model.W_U.detach(), _head_bias(model)
    direction = w_u[:, ids].T.float()  # [batch, d_model]
    bias = None if b_u is None else b_u.detach()[ids].float()
    if against is not None:
        other = _ids(model, against, batch)
        direction = direction - w_u[:, other].T.float()
        bias = None if bias is None else bias - b_u.detach()[other].float()
    form = final_norm_form(model)
    readout = direction if form is None else direction * form.weight.float()
    if form is not None and form.centre:
        readout = readout - readout.mean(-1, keepdim=True)  # centre(c) @ u == c @ centre(u)
    sums: dict[str, Tensor] = {}
    final: dict[str, Tensor] = {}
    parts = _component_hooks(model, by)
    order = list(dict.fromkeys(label for _, label, sign in parts if sign))  # a block delta has two hooks
    if by == "head":  # each layer's heads through W_O, then its output bias (a component of its own)
        model.hook_names([name for name, _, sign in parts if sign == 0])  # names the fix where z is missing
        W_O, b_O, n_heads = model.W_O.detach(), model.b_O.detach(), model.cfg.n_heads
        for layer in range(model.cfg.n_layers):
            at = order.index(f"{layer}_mlp_out") if f"{layer}_mlp_out" in order else len(order)
            bias_label = [f"L{layer}_attn_bias"] if model.cfg.attn_out_bias else []
            order[at:at] = [f"L{layer}H{h}" for h in range(n_heads)] + bias_label
            if bias_label:
                sums[bias_label[0]] = b_O[layer].float() @ readout.T

    def reduce(label: str, sign: int):
        def hook(x: Tensor, *, hook) -> None:
            x, u = x[rows, index.to(x.device)].float(), readout.to(x.device)
            if sign == 0:  # hook_z [batch, head, d_head]: each head's output written through W_O
                per_head = torch.einsum("bhk,hkd,bd->bh", x, W_O[hook.layer()].float().to(x.device), u)
                sums.update({f"{label}H{h}": per_head[:, h] for h in range(per_head.shape[1])})
                return
            value = sign * (x * u).sum(-1)
            sums[label] = sums[label] + value if label in sums else value

        return hook

    def keep_final(x: Tensor, *, hook) -> None:
        final["resid"] = x[rows, index.to(x.device)].float()

    hooks = [(name, reduce(label, sign)) for name, label, sign in parts]
    hooks.append((f"blocks.{model.cfg.n_layers - 1}.hook_resid_post", keep_final))

    def finish() -> Attribution:
        scale = 1.0 if form is None else form.scale(final["resid"]).squeeze(-1).to(readout.device)
        labels = list(order)
        values = [sums[label].to(readout.device) / scale for label in labels]
        if form is not None and form.bias is not None:
            values.append(direction @ form.bias.float())
            labels.append("ln_final.b")
        if bias is not None:
            values.append(bias)
            labels.append("unembed.b_U")
        return Attribution(torch.stack(values), labels)

    return Stream(hooks, finish)


@torch.no_grad()
def streaming_dla(
    model: Any,
    tokens: Any,
    answer: TokenLike,
    against: TokenLike | None = None,
    *,
    by: Literal["layer", "head"] = "layer",
    pos: int | Sequence[int] | Tensor = -1,
    attention_mask: Tensor | None = None,
) -> Attribution:
    """`direct_logit_attribution` by layer (``embed``, ``pos_embed``, ``{l}_attn_out``,
    ``{l}_mlp_out``, ``ln_final.b``, ``unembed.b_U``), reduced inside the forward's hooks.

    Only ``[batch, d_model]`` per component is ever kept (the activation at the read position);
    each is projected on the readout at once, and the final norm's scale, known only at the end,
    divides the projections (the norm is linear once its scale is fixed). On a generic model whose
    blocks cannot be split, components are whole blocks (``{l}_block_out``). ``by="head"`` splits
    each attention output into heads ``L{l}H{h}`` (from ``hook_z`` and ``W_O``) and its bias
    ``L{l}_attn_bias``, as `direct_logit_attribution` does (models with per-head hooks only).

    Example:
        >>> from mechscope.analysis import direct_logit_attribution
        >>> cached = direct_logit_attribution(model.run_with_cache(tokens)[1], answer=5, against=7)
        >>> streamed = streaming_dla(model, tokens, answer=5, against=7)
        >>> streamed.labels == cached.labels, torch.allclose(streamed.values, cached.values, atol=1e-5)
        (True, True)
    """
    stream = dla_stream(model, tokens, answer, against, by=by, pos=pos)
    return run_streams(model, tokens, stream, attention_mask=attention_mask)[0]


def logit_lens_stream(model: Any, tokens: Any, pos: int | Sequence[int] | None = None) -> Stream:
    """The `Stream` of `streaming_logit_lens` (to run with others in one forward, see `run_streams`)."""
    tokens = input_tokens(model, tokens)[0]
    seq, n = tokens.shape[1], model.cfg.n_layers
    positions = list(range(seq)) if pos is None else [int(p) for p in torch.as_tensor(pos).reshape(-1)]
    bad = [p for p in positions if not -seq <= p < seq]
    if bad:
        raise InputError(f"positions {bad} are out of range for sequences of length {seq}")
    positions = [p % seq for p in positions]
    form = final_norm_form(model)
    w_u, b_u = model.W_U.detach(), _head_bias(model)
    layers: dict[str, Float[Tensor, "batch pos d_vocab"]] = {}

    def lens(label: str):
        def hook(x: Tensor, *, hook) -> None:
            resid = x[:, positions]
            normed = resid if form is None else form(resid)
            logits = normed.to(w_u.device, w_u.dtype) @ w_u
            layers[label] = logits if b_u is None else logits + b_u.detach()

        return hook

    hooks = [(f"blocks.{layer}.hook_resid_pre", lens(f"{layer}_pre")) for layer in range(n)]
    hooks.append((f"blocks.{n - 1}.hook_resid_post", lens("final_post")))
    return Stream(hooks, lambda: LogitLens(torch.stack(list(layers.values())), list(layers), positions))


@torch.no_grad()
def streaming_logit_lens(
    model: Any,
    tokens: Any,
    pos: int | Sequence[int] | None = None,
    *,
    attention_mask: Tensor | None = None,
) -> LogitLens:
    """`logit_lens` (labels ``"{l}_pre"`` and ``"final_post"``) computed layer by layer: each
    residual stream is normed and unembedded at the kept positions inside its hook.

    Keep few positions (``pos``) on large vocabularies: the result itself is
    ``[layer, batch, len(pos), d_vocab]``.

    Example:
        >>> from mechscope.analysis import logit_lens
        >>> cached = logit_lens(model.run_with_cache(tokens)[1], pos=-1)
        >>> torch.allclose(streaming_logit_lens(model, tokens, pos=-1).logits, cached.logits, atol=1e-5)
        True
    """
    return run_streams(model, tokens, logit_lens_stream(model, tokens, pos), attention_mask=attention_mask)[0]


def head_detector_stream(model: Any, tokens: Any, target: Any) -> Stream:
    """The `Stream` of `streaming_detect_head` (to run with others in one forward, see `run_streams`)."""
    tokens = input_tokens(model, tokens)[0]
    batch, seq = tokens.shape
    target = target(tokens) if callable(target) else torch.as_tensor(target, device=tokens.device)
    target = target.expand(batch, -1, -1) if target.dim() == 2 else target
    if tuple(target.shape) != (batch, seq, seq):
        raise InputError(
            f"target must be [query_pos, key_pos] or [batch, query_pos, key_pos] with pos={seq}, "
            f"got {list(target.shape)}"
        )
    scores: dict[int, Tensor] = {}

    def score(pattern: Tensor, *, hook) -> None:
        scores[hook.layer()] = score_patterns(pattern[None], target.to(pattern.device))[0]

    n = model.cfg.n_layers
    hooks = [(f"blocks.{layer}.attn.hook_pattern", score) for layer in range(n)]
    return Stream(hooks, lambda: torch.stack([scores[layer] for layer in range(n)]))


@torch.no_grad()
def streaming_detect_head(model: Any, tokens: Any, target: Any) -> Float[Tensor, "layer head"]:
    """`detect_head` scored layer by layer: each layer's pattern is reduced to one score per head in
    its hook and dropped, so no ``[layer, batch, head, query_pos, key_pos]`` stack is ever held.

    Example:
        >>> from mechscope.analysis import detect_head, induction_target
        >>> repeated = torch.tensor([[1, 2, 3, 1, 2, 3]])
        >>> torch.allclose(streaming_detect_head(model, repeated, induction_target),
        ...                detect_head(model, repeated, induction_target), atol=1e-6)
        True
    """
    return run_streams(model, tokens, head_detector_stream(model, tokens, target))[0]


@torch.no_grad()
def run_streams(model: Any, tokens: Any, *streams: Stream, attention_mask: Tensor | None = None) -> list[Any]:
    """Run one forward (stopping before the unembedding) under every stream's hooks; each stream's result.

    Example:
        >>> dla, lens = run_streams(model, tokens, dla_stream(model, tokens, 5), logit_lens_stream(model, tokens, -1))
        >>> dla.labels[0], lens.labels[-1]
        ('embed', 'final_post')
    """
    tokens, attention_mask = input_tokens(model, tokens, attention_mask)
    hooks = [hook for stream in streams for hook in stream.hooks]
    model.run_with_hooks(tokens, fwd_hooks=hooks, attention_mask=attention_mask, stop_at_layer=model.cfg.n_layers)
    return [stream.finish() for stream in streams]
