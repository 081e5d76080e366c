"""TransformerLens' ``refactor_factored_attn_matrices``: the same attention, factored so that the
query, key, value and output weights are easier to read.

Only ``W_Q W_K^T`` (with the biases) and ``W_V W_O`` decide what a head does; any factorisation
of them computes the same model. This one takes the SVD of each: ``W_V = U S`` and ``W_O = V^T``
(``W_O`` becomes a rotation, so ``z`` keeps the norm of the head's output) and
``W_Q = U S^1/2``, ``W_K = V S^1/2`` (queries and keys get equal column norms). The query and key
biases ride along as an extra input coordinate that is always one; the value bias moves into
``b_O`` (each pattern row sums to one).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechscope.analysis.factored import FactoredMatrix
from mechscope.errors import ConfigError


def _set(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace parameter ``name`` of ``module`` (creating it when the model had none)."""
    setattr(module, name, nn.Parameter(value.detach().contiguous()))


@torch.no_grad()
def refactor_factored_attn_matrices(model: nn.Module) -> None:
    """Refactor every attention layer of ``model`` in place (TransformerLens' processing step of
    that name); logits and attention patterns are unchanged, ``q``, ``k``, ``v`` and ``z`` change.
    Biases a model lacks are created (the query and key biases generally become non-zero).

    Raises `ConfigError` for rotary models (their ``QK`` depends on the positions, as
    TransformerLens asserts) and grouped-query models (a shared key head cannot be refactored
    for each of its query heads).

    Example:
        >>> from mechscope.tl import HookedTransformer
        >>> tl_model = HookedTransformer(model.cfg).init_weights(seed=0)
        >>> tokens = torch.tensor([[1, 2, 3, 4]])
        >>> before = tl_model(tokens)
        >>> refactor_factored_attn_matrices(tl_model)
        >>> torch.allclose(before, tl_model(tokens), atol=1e-4)
        True
    """
    cfg = model.cfg
    if cfg.positional_embedding_type == "rotary":
        raise ConfigError(
            "refactor_factored_attn_matrices needs absolute positions: with rotary embeddings QK depends on them"
        )
    if cfg.n_key_value_heads != cfg.n_heads:
        raise ConfigError(
            f"refactor_factored_attn_matrices needs one key/value head per query head; this model has "
            f"{cfg.n_key_value_heads} for {cfg.n_heads}"
        )
    heads, d_head, d_model = cfg.n_heads, cfg.d_head, cfg.d_model
    for block in model.blocks:
        attn = block.attn
        like = attn.w_q
        zeros = torch.zeros(heads, d_head, dtype=like.dtype, device=like.device)
        b_q = zeros if attn.b_q is None else attn.b_q.view(heads, d_head)
        b_k = zeros if attn.b_k is None else attn.b_k.view(heads, d_head)
        b_v = zeros if attn.b_v is None else attn.b_v.view(heads, d_head)
        b_o = torch.zeros(d_model, dtype=like.dtype, device=like.device) if attn.b_o is None else attn.b_o
        # QK: [head, d_model + 1, d_head] with the bias as the last input row
        q_eff = torch.cat([attn.W_Q, b_q[:, None, :]], dim=1)
        k_eff = torch.cat([attn.W_K, b_k[:, None, :]], dim=1)
        q_even, k_even_t = FactoredMatrix(q_eff, k_eff.transpose(-1, -2)).make_even().pair
        k_even = k_even_t.transpose(-1, -2)
        # OV: the value bias reaches the output through W_O once per head
        b_o = b_o + torch.einsum("hk,hkd->d", b_v, attn.W_O)
        U, S, V = FactoredMatrix(attn.W_V, attn.W_O).svd()
        W_V, W_O = U * S[..., None, :], V.transpose(-1, -2)  # [head, d_model, d_head], [head, d_head, d_model]
        _set(attn, "w_q", q_even[:, :-1, :].transpose(1, 2).reshape(heads * d_head, d_model))
        _set(attn, "w_k", k_even[:, :-1, :].transpose(1, 2).reshape(heads * d_head, d_model))
        _set(attn, "b_q", q_even[:, -1, :].reshape(heads * d_head))
        _set(attn, "b_k", k_even[:, -1, :].reshape(heads * d_head))
        _set(attn, "w_v", W_V.transpose(1, 2).reshape(heads * d_head, d_model))
        _set(attn, "b_v", torch.zeros(heads * d_head, dtype=like.dtype, device=like.device))
        _set(attn, "w_o", W_O.permute(2, 0, 1).reshape(d_model, heads * d_head))
        _set(attn, "b_o", b_o)
