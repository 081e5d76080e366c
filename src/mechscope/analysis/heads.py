"""Head detectors: score every attention head for a behaviour.

Pattern detectors (previous-token, duplicate-token, induction, custom) score a head by the
attention mass it puts on the target key positions, averaged over the queries that have a
target. The copy-suppression detector scores what a head writes about the tokens it attends to.
Every detector returns a ``[layer, head]`` tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import einops
import torch
from jaxtyping import Bool, Float, Int, Shaped
from torch import Tensor

from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer

KeyTarget = Bool[Tensor, "batch query_pos key_pos"] | Float[Tensor, "batch query_pos key_pos"]
"""Key positions to attend to, as a mask or as non-negative weights."""
Target = Bool[Tensor, "... query_pos key_pos"] | Float[Tensor, "... query_pos key_pos"] | Callable[[Tensor], KeyTarget]
Tokens = Int[Tensor, "... pos"] | str | list[str]

COPY_SUPPRESSION_TEXT = (
    "When Mary and John went to the store, John gave a drink to Mary. Then Tom and Anna walked "
    "to the park, where Anna threw a ball to Tom. The cat chased the dog, and the dog ran from "
    "the cat. All's fair in love and war, and in war the love of a country is fair. Alice sent "
    "a letter to Bob, and Bob wrote back to Alice about the letter."
)
"""A default text for `copy_suppression_scores`: names, objects and phrases that recur."""


def repeated_random_tokens(
    model: HookedTransformer, seq_len: int = 40, batch: int = 8, seed: int = 0, prepend_bos: bool | None = None
) -> Int[Tensor, "batch pos"]:
    """Random token sequences repeated twice, ``[batch, 2 * seq_len]`` (plus BOS when prepended).

    Tokens are drawn from the whole vocabulary minus the tokenizer's special tokens.
    ``prepend_bos`` defaults to the model's convention (``cfg.default_prepend_bos``) when it
    has a tokenizer with a BOS token, and to no BOS otherwise.

    Example:
        >>> toks = repeated_random_tokens(model, seq_len=5, batch=2, prepend_bos=False)
        >>> toks.shape, torch.equal(toks[:, :5], toks[:, 5:])
        (torch.Size([2, 10]), True)
    """
    if seq_len < 1 or batch < 1:
        raise InputError(f"seq_len and batch must be positive, got seq_len={seq_len}, batch={batch}")
    special = set(getattr(model.tokenizer, "all_special_ids", None) or [])
    allowed = torch.tensor([t for t in range(model.cfg.d_vocab) if t not in special])
    gen = torch.Generator().manual_seed(seed)
    half = allowed[torch.randint(len(allowed), (batch, seq_len), generator=gen)]
    tokens = torch.cat([half, half], dim=1)
    bos = model.codec.bos_token_id if model.codec is not None else None
    prepend = (model.cfg.default_prepend_bos and bos is not None) if prepend_bos is None else prepend_bos
    if prepend:
        if bos is None:
            raise InputError("prepend_bos=True needs a tokenizer with a BOS token; pass prepend_bos=False")
        tokens = torch.cat([torch.full((batch, 1), bos), tokens], dim=1)
    return tokens.to(model.device)


# ---------------------------------------------------------------------- target patterns
def previous_token_target(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch query_pos key_pos"]:
    """``True`` where ``key_pos == query_pos - 1``.

    Example:
        >>> previous_token_target(torch.tensor([[5, 6, 7]]))[0].int()
        tensor([[0, 0, 0],
                [1, 0, 0],
                [0, 1, 0]], dtype=torch.int32)
    """
    batch, seq = tokens.shape
    eye = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril(-1).triu(-1)
    return eye.expand(batch, seq, seq)


def duplicate_token_target(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch query_pos key_pos"]:
    """``True`` where an earlier key holds the query's token.

    Example:
        >>> duplicate_token_target(torch.tensor([[5, 6, 5]]))[0, 2].int()
        tensor([1, 0, 0], dtype=torch.int32)
    """
    seq = tokens.shape[1]
    earlier = torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril(-1)
    return (tokens[:, :, None] == tokens[:, None, :]) & earlier


def induction_target(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch query_pos key_pos"]:
    """``True`` at keys ``k < query`` whose previous token ``k - 1`` is the query's token.

    Example:
        >>> induction_target(torch.tensor([[5, 6, 7, 5]]))[0, 3].int()
        tensor([0, 1, 0, 0], dtype=torch.int32)
    """
    target = torch.zeros_like(duplicate_token_target(tokens))
    target[:, :, 1:] = duplicate_token_target(tokens)[:, :, :-1]  # key k matches where key k-1 duplicates
    seq = tokens.shape[1]
    return target & torch.ones(seq, seq, dtype=torch.bool, device=tokens.device).tril(-1)


# ---------------------------------------------------------------------- scoring
def attention_patterns(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Shaped[Tensor, "batch pos"] | None = None,
) -> Float[Tensor, "layer batch head query_pos key_pos"]:
    """Every layer's attention pattern for ``tokens``, stacked.

    Example:
        >>> attention_patterns(model, tokens).shape
        torch.Size([3, 1, 4, 4, 4])
    """
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter=lambda n: n.endswith("hook_pattern"), attention_mask=attention_mask, return_type=None
        )
    return cache.stack_activation("pattern")


def score_patterns(
    patterns: Float[Tensor, "layer batch head query_pos key_pos"],
    target: KeyTarget,
) -> Float[Tensor, "layer head"]:
    """Attention mass on ``target`` keys, averaged over the queries that have a target.

    A weighted ``target`` (non-negative) weights each key's attention. Raises when no query has
    a target (nothing to score).

    Example:
        >>> pattern = torch.eye(3)[None, None, None]        # every query attends to itself
        >>> previous = previous_token_target(torch.zeros(1, 3, dtype=torch.long))
        >>> score_patterns(pattern, torch.eye(3)[None]), score_patterns(pattern, previous)
        (tensor([[1.]]), tensor([[0.]]))
    """
    target = target.to(patterns.dtype)
    if target.shape != patterns.shape[1:2] + patterns.shape[3:]:
        raise InputError(
            f"target must be [batch, query_pos, key_pos] = {list(patterns.shape[1:2] + patterns.shape[3:])}, "
            f"got {list(target.shape)}"
        )
    has_target = target.sum(-1) > 0  # [batch, query_pos]
    if not bool(has_target.any()):
        raise InputError("no query position has a target key; the tokens do not exhibit this pattern")
    mass = einops.einsum(
        patterns, target, "layer batch head query_pos key_pos, batch query_pos key_pos -> layer head batch query_pos"
    )
    return (mass * has_target).sum((-1, -2)) / has_target.sum()


def detect_head(model: HookedTransformer, tokens: Tokens, target: Target) -> Float[Tensor, "layer head"]:
    """Score every head against a target pattern: a ``[query_pos, key_pos]`` or
    ``[batch, query_pos, key_pos]`` tensor, or a function ``tokens -> [batch, query_pos, key_pos]``.
    ``tokens`` are ids (``[batch, pos]`` or ``[pos]``) or text.

    Example:
        >>> diagonal = torch.eye(tokens.shape[1])          # a custom "attend to self" detector
        >>> detect_head(model, tokens, diagonal).shape
        torch.Size([3, 4])
    """
    tokens = _as_tokens(model, tokens)
    target = target(tokens) if callable(target) else torch.as_tensor(target, device=tokens.device)
    if target.dim() == 2:
        target = target.expand(tokens.shape[0], -1, -1)
    if target.dim() != 3 or target.shape[1:] != (tokens.shape[1], tokens.shape[1]):
        raise InputError(
            f"target must be [query_pos, key_pos] or [batch, query_pos, key_pos] with pos={tokens.shape[1]}, "
            f"got {list(target.shape)}"
        )
    return score_patterns(attention_patterns(model, tokens), target)


def _as_tokens(model: HookedTransformer, tokens: Tokens | None) -> Int[Tensor, "batch pos"]:
    if tokens is None:
        return repeated_random_tokens(model)
    if isinstance(tokens, (str, list)):
        return model.to_tokens(tokens)
    return (tokens[None] if tokens.dim() == 1 else tokens).to(model.device)


def previous_token_scores(model: HookedTransformer, tokens: Tokens | None = None) -> Float[Tensor, "layer head"]:
    """Attention to the previous token (default tokens: `repeated_random_tokens`).

    Example:
        >>> previous_token_scores(model, tokens).shape
        torch.Size([3, 4])
    """
    return detect_head(model, _as_tokens(model, tokens), previous_token_target)


def duplicate_token_scores(model: HookedTransformer, tokens: Tokens | None = None) -> Float[Tensor, "layer head"]:
    """Attention to earlier copies of the current token (default: `repeated_random_tokens`).

    Example:
        >>> duplicate_token_scores(model, torch.tensor([[1, 2, 3, 1, 2, 3]])).shape
        torch.Size([3, 4])
    """
    return detect_head(model, _as_tokens(model, tokens), duplicate_token_target)


def induction_scores(model: HookedTransformer, tokens: Tokens | None = None) -> Float[Tensor, "layer head"]:
    """Attention to the token after an earlier copy of the current token (default: `repeated_random_tokens`).

    Example:
        >>> induction_scores(model, torch.tensor([[1, 2, 3, 1, 2, 3]])).shape
        torch.Size([3, 4])
    """
    return detect_head(model, _as_tokens(model, tokens), induction_target)


def copy_suppression_scores(model: HookedTransformer, tokens: Tokens | None = None) -> Float[Tensor, "layer head"]:
    """Attention-weighted negative copying: how much each head lowers the logits of the tokens it attends to.

    For a head, the value written from key position ``k`` is ``o_k = v_k W_O``; its direct effect
    on the logits (through the final norm's weight) is standardised over the vocabulary and read
    at ``k``'s own token, giving ``z_k``. The score is the mean over queries ``q`` of
    ``sum_{k<q} pattern[q, k] * -z_k``: large when the head both attends to earlier tokens and
    writes against predicting them (as the copy-suppression heads of McDougall et al., 2023),
    negative for heads that copy what they attend to. ``tokens`` default to
    `COPY_SUPPRESSION_TEXT`. The final norm's scale is a positive factor per query and cancels in
    the standardisation.

    Example:
        >>> copy_suppression_scores(model, torch.tensor([[1, 2, 3, 1, 2, 3]])).shape
        torch.Size([3, 4])
    """
    tokens = _as_tokens(model, COPY_SUPPRESSION_TEXT if tokens is None else tokens)
    if tokens.shape[1] < 2:
        raise InputError("copy suppression needs at least two tokens")
    cfg = model.cfg
    with torch.no_grad():
        _, cache = model.run_with_cache(
            tokens, names_filter=lambda n: n.endswith(("hook_pattern", "attn.hook_v")), return_type=None
        )
        w_u = model.unembed.w_u.detach().float()  # [d_vocab, d_model]
        w_mean = w_u.mean(0)
        centred = w_u - w_mean
        cov = centred.T @ centred / w_u.shape[0]  # [d_model, d_model]
        context = (w_u[tokens] - w_mean).float()  # [batch, key_pos, d_model]
        ln_w = getattr(model.ln_final, "w", None)
        ln_w = None if ln_w is None else ln_w.detach().float()
        earlier = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device).tril(-1)
        scores = torch.zeros(cfg.n_layers, cfg.n_heads, device=tokens.device)
        for layer in range(cfg.n_layers):
            v = einops.repeat(
                cache["v", layer].float(),
                "batch key_pos kv_head d_head -> batch key_pos (kv_head group) d_head",
                group=cfg.n_kv_groups,
            )
            w_o = model.blocks[layer].attn.W_O.detach().float()
            out = einops.einsum(v, w_o, "batch key_pos head d_head, head d_head d_model -> batch key_pos head d_model")
            if cfg.normalization_type in ("LN", "LNPre"):
                out = out - out.mean(-1, keepdim=True)
            if ln_w is not None:
                out = out * ln_w
            own = einops.einsum(out, context, "batch key_pos head d_model, batch key_pos d_model -> batch head key_pos")
            variance = einops.einsum(
                out,
                cov,
                out,
                "batch key_pos head d_model, d_model d_model2, batch key_pos head d_model2 -> batch head key_pos",
            )
            spread = variance.clamp(min=1e-30).sqrt()
            z = own / spread  # [batch, head, key_pos]
            pattern = cache["pattern", layer].float() * earlier  # [batch, head, query_pos, key_pos]
            per_query = -(pattern * z[:, :, None, :]).sum(-1)[:, :, 1:]  # queries with an earlier key
            scores[layer] = per_query.mean((0, 2))
    return scores


def top_heads(scores: Float[Tensor, "layer head"], k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` highest-scoring heads as ``("L{layer}H{head}", score)``.

    Example:
        >>> top_heads(torch.tensor([[0.1, 0.9], [0.5, 0.2]]), k=2)
        [('L0H1', 0.9), ('L1H0', 0.5)]
    """
    flat = scores.flatten()
    order = flat.argsort(descending=True)[:k]
    n_heads = scores.shape[1]
    return [(f"L{int(i) // n_heads}H{int(i) % n_heads}", round(float(flat[i]), 4)) for i in order]
