"""Weight-space analysis of attention heads: per-head circuits, composition and copying scores.

Everything here reads weights only. The circuits are those of the attention layers themselves:
the norms in front of them and rotary position embeddings are not included (fold the norms
first for norm-aware circuits; with RoPE, ``QK`` is the position-free content part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import einops
import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.analysis.factored import FactoredMatrix
from mechscope.errors import InputError

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer


@dataclass
class HeadWeights:
    """Every head's weights, stacked ``[layer, head, ...]``; key/value weights are repeated per
    query head for grouped-query models (``kv_head = head // n_kv_groups``).

    Example:
        >>> w = head_weights(model)
        >>> w.W_Q.shape, w.W_O.shape, w.QK.shape, w.OV[2, 1].shape
        (torch.Size([3, 4, 32, 8]), torch.Size([3, 4, 8, 32]), torch.Size([3, 4, 32, 32]), torch.Size([32, 32]))
    """

    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer head d_model d_head"]
    W_V: Float[Tensor, "layer head d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T [layer, head, d_model, d_model]``: ``query_resid @ QK @ key_resid`` is the score (unscaled)."""
        return FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V W_O [layer, head, d_model, d_model]``: ``source_resid @ OV`` is what the head writes."""
        return FactoredMatrix(self.W_V, self.W_O)


def head_weights(model: HookedTransformer) -> HeadWeights:
    """Stacked per-head ``W_Q, W_K, W_V, W_O`` (detached), with grouped-query key/value heads expanded.

    Example:
        >>> head_weights(model).W_K.shape
        torch.Size([3, 4, 32, 8])
    """
    groups = model.cfg.n_kv_groups

    def stack(name: str) -> Tensor:
        return torch.stack([getattr(block.attn, name).detach() for block in model.blocks])

    def per_query_head(w: Float[Tensor, "layer kv_head d_model d_head"]) -> Float[Tensor, "layer head d_model d_head"]:
        return einops.repeat(w, "layer kv_head d_model d_head -> layer (kv_head group) d_model d_head", group=groups)

    return HeadWeights(stack("W_Q"), per_query_head(stack("W_K")), per_query_head(stack("W_V")), stack("W_O"))


def composition_scores(
    model: HookedTransformer, mode: Literal["Q", "K", "V"]
) -> Float[Tensor, "layer head layer head"]:
    """How much each head's output is read by each later head's query, key or value input.

    ``scores[l1, h1, l2, h2] = ||OV_1 @ M_2||_F / (||OV_1||_F ||M_2||_F)`` with ``M_2`` = ``QK_2``
    (Q-composition), ``QK_2^T`` (K-composition) or ``OV_2`` (V-composition), as in "A Mathematical
    Framework for Transformer Circuits". Entries with ``l2 <= l1`` are zero. Computed through
    ``d_head``-sized matrices only.

    Example:
        >>> composition_scores(model, "K").shape
        torch.Size([3, 4, 3, 4])
    """
    if mode not in ("Q", "K", "V"):
        raise InputError(f"mode must be 'Q', 'K' or 'V', got {mode!r}")
    w = head_weights(model)
    n_layers, n_heads = w.W_Q.shape[:2]
    # Reader factors: M_2 = X_2 @ Y_2^T with the writer's output meeting X_2.
    x, y = {"Q": (w.W_Q, w.W_K), "K": (w.W_K, w.W_Q), "V": (w.W_V, w.W_O.transpose(-1, -2))}[mode]
    ov_norm = w.OV.norm()  # [layer, head]
    reader_norm = FactoredMatrix(x, y.transpose(-1, -2)).norm()
    gram_v = w.W_V.transpose(-1, -2) @ w.W_V  # [layer, head, d_head, d_head]
    gram_y = y.transpose(-1, -2) @ y
    scores = torch.zeros(n_layers, n_heads, n_layers, n_heads, dtype=w.W_Q.dtype, device=w.W_Q.device)
    for l1 in range(n_layers - 1):
        # ||V_1 (O_1 X_2) Y_2^T||^2 = sum((G_V1 @ C) * (C @ G_Y2)) with C = O_1 X_2 [d_head, d_head].
        cross = torch.einsum("hed,mgdf->hmgef", w.W_O[l1], x[l1 + 1 :])  # [head, layer2, head2, d_head, d_head]
        left = torch.einsum("hae,hmgef->hmgaf", gram_v[l1], cross)
        right = torch.einsum("hmgef,mgfb->hmgeb", cross, gram_y[l1 + 1 :])
        norms = (left * right).sum((-1, -2)).clamp(min=0).sqrt()  # [head, layer2, head2]
        denom = ov_norm[l1][:, None, None] * reader_norm[l1 + 1 :][None]
        scores[l1, :, l1 + 1 :] = norms / denom
    return scores


def ov_copying_scores(model: HookedTransformer) -> Float[Tensor, "layer head"]:
    """Copying score of each head's full OV circuit ``W_E W_V W_O W_U`` (``[d_vocab, d_vocab]``).

    The score is ``sum(eigenvalues).real / sum(|eigenvalues|)`` in ``[-1, 1]``: near 1 when the
    circuit maps tokens to themselves (copying), near -1 for negative copying (suppression).
    The eigenvalues come from the ``d_head x d_head`` matrix ``W_O W_U W_E W_V``.

    Example:
        >>> scores = ov_copying_scores(model)
        >>> scores.shape, bool(((scores >= -1) & (scores <= 1)).all())
        (torch.Size([3, 4]), True)
    """
    w = head_weights(model)
    unembed_embed = model.W_U.detach() @ model.W_E.detach()  # [d_model, d_model]
    inner = w.W_O @ unembed_embed @ w.W_V  # [layer, head, d_head, d_head]
    eig = torch.linalg.eigvals(inner.double())
    return (eig.sum(-1).real / eig.abs().sum(-1).clamp(min=1e-30)).to(w.W_Q.dtype)


@dataclass
class SingularDirection:
    """One singular direction of a head's circuit: its value and the tokens at each end.

    Example:
        >>> print(SingularDirection(0, 2.5, [" cat", " dog"], [" cats", " dogs"]))
        #0 s=2.500  in:  cat |  dog  ->  out:  cats |  dogs
    """

    index: int
    singular_value: float
    input_tokens: list[str]
    output_tokens: list[str]

    def __str__(self) -> str:
        return (
            f"#{self.index} s={self.singular_value:.3f}  in: {' | '.join(self.input_tokens)}"
            f"  ->  out: {' | '.join(self.output_tokens)}"
        )


def svd_top_tokens(
    model: HookedTransformer,
    layer: int,
    head: int,
    circuit: Literal["OV", "QK"] = "OV",
    n_directions: int = 3,
    k: int = 5,
) -> list[SingularDirection]:
    """Top tokens along the leading singular directions of a head's ``OV`` or ``QK`` matrix.

    For ``OV`` the input side is read through the embedding (``W_E @ u``) and the output side
    through the unembedding (``v @ W_U``); for ``QK`` both sides (query and key) through the
    embedding. Tokens print as their ids when the model has no tokenizer.

    Example:
        >>> dirs = svd_top_tokens(model, layer=1, head=2, n_directions=2, k=3)
        >>> len(dirs), len(dirs[0].input_tokens), dirs[0].singular_value >= dirs[1].singular_value
        (2, 3, True)
    """
    if circuit not in ("OV", "QK"):
        raise InputError(f"circuit must be 'OV' or 'QK', got {circuit!r}")
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    if not (0 <= layer < n_layers and 0 <= head < n_heads):
        raise InputError(f"no head L{layer}H{head}: layers are 0..{n_layers - 1}, heads 0..{n_heads - 1}")
    w = head_weights(model)
    matrix = (w.OV if circuit == "OV" else w.QK)[layer, head]
    U, S, V = matrix.svd()  # matrix = U diag(S) V^T
    w_e = model.W_E.detach()
    w_out = model.W_U.detach().T if circuit == "OV" else w_e  # [d_vocab, d_model]

    def names(ids: Tensor) -> list[str]:
        if model.tokenizer is None:
            return [str(int(i)) for i in ids]
        return [repr(model.to_string([int(i)])) for i in ids]

    out = []
    for i in range(min(n_directions, S.shape[0])):
        in_ids = (w_e @ U[:, i]).topk(k).indices
        out_ids = (w_out @ V[:, i]).topk(k).indices
        out.append(SingularDirection(i, float(S[i]), names(in_ids), names(out_ids)))
    return out
