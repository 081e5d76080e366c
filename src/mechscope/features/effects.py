"""What a feature does and whom it resembles: logit effects, decoder neighbours, and the direct
feature attribution of ``hook_z`` SAE features by source position.

Logit effects read a feature's write direction ``d`` through the unembedding as SAE-vis and
Neuronpedia do: the final norm's scale is a constant (dropped), so the effect on the logits is
``norm(d) @ W_U`` where ``norm`` centres ``d`` for LayerNorm (RMSNorm does not centre) and
multiplies by the final norm's weight. The unembedding bias is left out (it does not depend on
the feature).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError


@torch.no_grad()
def logit_effects(
    model, directions: Float[Tensor, "d_sae d_model"], k: int = 10, chunk: int = 512
) -> tuple[Float[Tensor, "d_sae k"], Int[Tensor, "d_sae k"], Float[Tensor, "d_sae k"], Int[Tensor, "d_sae k"]]:
    """The ``k`` most boosted and most suppressed tokens of each direction: ``(up_values, up_ids,
    down_values, down_ids)``, down values ascending (most negative first).

    Example:
        >>> up, up_ids, down, down_ids = logit_effects(model, torch.randn(4, 32), k=3)
        >>> up.shape, bool((up[:, 0] >= up[:, 1]).all()), bool((down[:, 0] <= down[:, 1]).all())
        (torch.Size([4, 3]), True, True)
    """
    if directions.dim() != 2 or directions.shape[1] != model.cfg.d_model:
        raise InputError(f"directions must be [n, d_model={model.cfg.d_model}], got {tuple(directions.shape)}")
    w_u = model.W_U.detach().float()
    k = min(k, w_u.shape[1])
    norm = model.ln_final
    weight = norm.w.detach().float() if norm is not None and norm.w is not None else None
    outs: list[list[Tensor]] = [[], [], [], []]
    for start in range(0, len(directions), chunk):
        d = directions[start : start + chunk].to(w_u.device).float()
        if model.cfg.normalization_type in ("LN", "LNPre"):
            d = d - d.mean(-1, keepdim=True)
        if weight is not None:
            d = d * weight
        logits = d @ w_u  # [chunk, d_vocab]
        up = logits.topk(k, dim=-1)
        down = logits.topk(k, dim=-1, largest=False)
        for out, value in zip(outs, (up.values, up.indices, down.values, down.indices), strict=True):
            out.append(value.cpu())
    return tuple(torch.cat(o) for o in outs)


@torch.no_grad()
def nearest_features(
    directions: Float[Tensor, "d_sae d_model"], k: int = 10, chunk: int = 1024
) -> tuple[Float[Tensor, "d_sae k"], Int[Tensor, "d_sae k"]]:
    """For each direction, the ``k`` others with the highest cosine similarity: ``(cosines, ids)``.

    Example:
        >>> dirs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
        >>> cos, ids = nearest_features(dirs, k=1)
        >>> ids[:, 0].tolist()
        [1, 0, 1]
    """
    unit = directions.float() / directions.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    k = min(k, len(unit) - 1)
    values, ids = [], []
    for start in range(0, len(unit), chunk):
        cos = unit[start : start + chunk] @ unit.T  # [chunk, d_sae]
        rows = torch.arange(start, start + len(cos), device=cos.device)
        cos[torch.arange(len(cos)), rows] = -float("inf")
        top = cos.topk(k, dim=-1)
        values.append(top.values.cpu())
        ids.append(top.indices.cpu())
    return torch.cat(values), torch.cat(ids)


def source_attribution(
    pattern: Float[Tensor, "batch head query_pos key_pos"],
    v: Float[Tensor, "batch key_pos head d_head"],
    w_enc: Float[Tensor, "head d_head d_sae"],
    rows: Int[Tensor, "k d_sae"],
    query: Int[Tensor, "k d_sae"],
    chunk: int = 256,
) -> Float[Tensor, "k d_sae key_pos"]:
    """Direct feature attribution of ``hook_z`` SAE features by source position.

    For feature ``f`` read at query position ``q`` of row ``b``, the contribution of source
    position ``s`` to its encoder input is ``sum_h pattern[b, h, q, s] * v[b, s, h] @ W_enc[h, :, f]``;
    summed over ``s`` it is ``z[b, q] @ W_enc[:, f]``, the pre-activation without its bias terms.

    Example:
        >>> pattern = torch.softmax(torch.randn(1, 2, 3, 3), -1); v = torch.randn(1, 3, 2, 4)
        >>> w_enc = torch.randn(2, 4, 5); rows = torch.zeros(1, 5, dtype=torch.long); q = torch.full((1, 5), 2)
        >>> z = torch.einsum("bhqs,bshd->bqhd", pattern, v)
        >>> dfa = source_attribution(pattern, v, w_enc, rows, q)
        >>> torch.allclose(dfa.sum(-1)[0], torch.einsum("hd,hdf->f", z[0, 2], w_enc), atol=1e-5)
        True
    """
    n_heads = pattern.shape[1]
    if v.shape[2] != n_heads:  # grouped-query: each key/value head serves n_heads / kv_head query heads
        v = v.repeat_interleave(n_heads // v.shape[2], dim=2)
    by_query = pattern.permute(0, 2, 1, 3)  # [batch, query_pos, head, key_pos]
    out = []
    for start in range(0, w_enc.shape[-1], chunk):
        stop = min(start + chunk, w_enc.shape[-1])
        vw = torch.einsum("bshd,hdf->bfsh", v.float(), w_enc[..., start:stop].float())  # [batch, f, key_pos, head]
        b, q = rows[:, start:stop], query[:, start:stop]
        feature = torch.arange(stop - start, device=b.device)[None, :]
        pat = by_query[b, q].float()  # [k, f, head, key_pos]
        out.append(torch.einsum("kfhs,kfsh->kfs", pat, vw[b, feature]))
    return torch.cat(out, dim=1)
