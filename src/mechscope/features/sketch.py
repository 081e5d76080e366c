"""Streaming statistics of many features at once, merged batch by batch, exact and resumable.

A batch is reduced to its firing entries (token, feature, activation) first, so its cost grows
with the number of firing entries rather than with ``tokens x features``. For every feature
`FeatureSketch` keeps, over all tokens seen:

* the count of tokens where it fires (activation above the threshold), the sum of its
  activations (over all tokens and over firing ones) and its maximum;
* the exact top-k firing tokens with their context window: token ids, the feature's activation
  on every context token and, for ``hook_z`` SAEs, the direct feature attribution by source
  position. A batch's candidates come from a stable sort of its firing entries and merges are
  stable, so among equal activations the earliest token wins;
* a uniform random sample (``pool``) of firing tokens with the same context data: every
  (token, feature) pair gets a key drawn from a generator seeded by the batch number, and the
  ``pool`` smallest keys are kept, unordered (a bottom-k sample: uniform, and the same after a
  resume). Only features whose new candidates enter are touched, so late batches cost little;
* a histogram of firing activations with ``hist_bins`` equal bins on ``[0, 2**e]``, where
  ``2**e`` is the smallest power of two at or above the running maximum. When the maximum
  grows past it the range doubles and adjacent bins merge, so every count stays exact.

Everything is a tensor in `state_dict`, so a checkpoint is a safetensors file.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

UNSET_EXP = -10_000

DFAFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``dfa(rows [k, c], query_pos [k, c], features [c]) -> [k, c, pos]``: attribution by source position."""


class FeatureSketch:
    """The running statistics of ``n_features`` features (see the module docstring).

    Example:
        >>> sk = FeatureSketch(3, top_k=2, pool=2, left=1, right=1, hist_bins=8)
        >>> acts = torch.tensor([[[0.0, 1.0, 0.5], [2.0, 0.0, 0.5], [0.0, 3.0, 0.0]]])  # [batch, pos, d_sae]
        >>> sk.update(acts, torch.tensor([[7, 8, 9]]), first_row=0, keep=torch.ones(3, dtype=torch.bool), seed=0)
        >>> sk.fire.tolist(), sk.top_val[0].tolist(), sk.top_tok[0, 1].tolist()
        ([1, 2, 2], [2.0, 3.0, 0.5], [8, 9, -1])
    """

    def __init__(
        self,
        n_features: int,
        *,
        top_k: int = 20,
        pool: int = 64,
        left: int = 24,
        right: int = 8,
        hist_bins: int = 512,
        threshold: float = 0.0,
        with_dfa: bool = False,
        device: torch.device | str = "cpu",
    ) -> None:
        self.n_features, self.top_k, self.pool, self.left, self.right = n_features, top_k, pool, left, right
        self.hist_bins, self.threshold, self.with_dfa = hist_bins, threshold, with_dfa
        self.width = left + 1 + right
        n, w, dev = n_features, self.width, torch.device(device)
        self.state: dict[str, Tensor] = {
            "n_tokens": torch.zeros((), dtype=torch.int64, device=dev),
            "fire": torch.zeros(n, dtype=torch.int64, device=dev),
            "sum_all": torch.zeros(n, dtype=torch.float64, device=dev),
            "sum_fire": torch.zeros(n, dtype=torch.float64, device=dev),
            "max": torch.full((n,), -math.inf, device=dev),
            "hist": torch.zeros(n, hist_bins, dtype=torch.int64, device=dev),
            "hist_exp": torch.full((n,), UNSET_EXP, dtype=torch.int64, device=dev),
        }
        for part, k in (("top", top_k), ("pool", pool)):
            self.state[f"{part}_val"] = torch.full((k, n), -math.inf, device=dev)
            self.state[f"{part}_idx"] = torch.full((k, n), -1, dtype=torch.int64, device=dev)
            self.state[f"{part}_tok"] = torch.full((k, n, w), -1, dtype=torch.int32, device=dev)
            self.state[f"{part}_act"] = torch.zeros(k, n, w, device=dev)
            if with_dfa:
                self.state[f"{part}_dfa"] = torch.zeros(k, n, w, device=dev)
        self.state["pool_key"] = torch.full((pool, n), math.inf, device=dev)

    def __getattr__(self, name: str) -> Tensor:
        state = self.__dict__.get("state")
        if state is not None and name in state:
            return state[name]
        raise AttributeError(name)

    def state_dict(self) -> dict[str, Tensor]:
        """Every statistic as a detached, contiguous CPU tensor, by name (a safetensors checkpoint)."""
        return {k: v.detach().cpu().contiguous() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore the statistics of a `state_dict`, in place and on this sketch's device; the sketch
        must have the same sizes (features, ``top_k``, ``pool``, context, bins).

        Example:
            >>> sk = FeatureSketch(3, top_k=2, pool=2, left=1, right=1, hist_bins=8)
            >>> acts = torch.tensor([[[0.0, 1.0, 0.5], [2.0, 0.0, 0.5]]])
            >>> sk.update(acts, torch.tensor([[7, 8]]), first_row=0, keep=torch.ones(2, dtype=torch.bool), seed=0)
            >>> copy = FeatureSketch(3, top_k=2, pool=2, left=1, right=1, hist_bins=8)
            >>> copy.load_state_dict(sk.state_dict())
            >>> copy.fire.tolist()
            [1, 1, 2]
        """
        for key, value in self.state.items():
            value.copy_(state[key].to(value.device))

    # ------------------------------------------------------------------ one batch
    @torch.no_grad()
    def update(
        self,
        acts: Float[Tensor, "batch pos d_sae"],
        tokens: Int[Tensor, "batch pos"],
        first_row: int,
        keep: Bool[Tensor, " pos"],
        seed: int,
        dfa: DFAFn | None = None,
    ) -> None:
        """Add the activations of rows ``first_row, first_row + 1, ...``; positions where ``keep`` is
        false (a BOS token) are neither counted nor examples, but do show in contexts."""
        st = self.state
        batch, seq, n = acts.shape
        dev = st["fire"].device
        acts, tokens, keep = acts.to(dev).float(), tokens.to(dev), keep.to(dev)
        flat = acts.reshape(batch * seq, n)  # [batch * pos, d_sae]
        every = bool(keep.all())
        valid = keep.repeat(batch)[:, None]  # [batch * pos, 1]
        firing = flat > self.threshold if every else (flat > self.threshold) & valid
        # the firing entries, token-major (so ascending token within each feature)
        token, feature = firing.nonzero(as_tuple=True)
        value = flat[token, feature]
        counts = torch.bincount(feature, minlength=n)
        st["n_tokens"] += valid.sum()
        st["fire"] += counts
        # a batch's sum in float32 (a few thousand terms), the running sum in float64
        st["sum_all"] += flat.sum(0) if every else torch.where(valid, flat, 0.0).sum(0)
        st["sum_fire"].index_add_(0, feature, value.double())
        batch_max = torch.full((n,), -math.inf, device=dev).scatter_reduce(0, feature, value, "amax")
        st["max"] = torch.maximum(st["max"], flat.amax(0) if every else torch.where(valid, flat, -math.inf).amax(0))
        self._histogram(token, feature, value, batch_max)

        def per_feature(sel: Tensor, score: Tensor, size: int, fill: float) -> tuple[Tensor, Tensor]:
            """Among the entries ``sel`` (the only ones that can enter), the ``size`` lowest
            ``score`` of each feature, ties by token: ``[size, d_sae]`` scores and flat positions
            (``fill`` where a feature has fewer)."""
            order = sel[torch.argsort(score[sel], stable=True)]
            order = order[torch.argsort(feature[order], stable=True)]  # by feature, ``score`` within
            per = torch.bincount(feature[sel], minlength=n)
            rank = torch.arange(len(order), device=dev) - (per.cumsum(0) - per)[feature[order]]
            chosen = order[rank < size]
            at = (rank[rank < size], feature[chosen])
            scores = torch.full((size, n), fill, device=dev)
            scores[at] = score[chosen]
            index = torch.zeros(size, n, dtype=torch.long, device=dev)
            index[at] = token[chosen]
            return scores, index

        rows = torch.arange(first_row, first_row + batch, device=dev)
        padded_acts = F.pad(acts, (0, 0, self.left, self.right))  # [batch, left + pos + right, d_sae]
        padded_tok = F.pad(tokens.to(torch.int32), (self.left, self.right), value=-1)

        def context(index: Tensor, cols: Tensor, j: Tensor, c: Tensor) -> dict[str, Tensor]:
            """Context data of the entries ``(j, c)`` of ``index [k, cols]`` (flat batch positions of
            features ``cols``), one row per entry: only the entries that enter are gathered."""
            pos, feat = index[j, c], cols[c]
            b, q = pos // seq, pos % seq
            window = q[:, None] + torch.arange(self.width, device=dev)  # [entries, width]
            out = {
                "val": flat[pos, feat],
                "idx": rows[b] * seq + q,
                "tok": padded_tok[b[:, None], window],
                "act": padded_acts[b[:, None], window, feat[:, None]],
            }
            if self.with_dfa:
                full = dfa(b[None], q[None], feat)[0] if dfa is not None else torch.zeros(len(b), seq, device=dev)
                out["dfa"] = F.pad(full, (self.left, self.right)).gather(1, window)
            return out

        # strongest first; ties go to the earliest token (a stable sort of token-major entries)
        sel = (value > st["top_val"][-1][feature]).nonzero().squeeze(1)
        values, index = per_feature(sel, -value, self.top_k, math.inf)
        values = -values
        # only features whose best new token beats their worst kept one change
        enter = values > st["top_val"][-1]  # [k, d_sae]; sorted, so a prefix of each column
        cols = enter[0].nonzero().squeeze(1)
        if len(cols):
            rows_in = int(enter.sum(0).max())
            values, index, enter = values[:rows_in, cols], index[:rows_in, cols], enter[:rows_in, cols]
            j, c = enter.nonzero(as_tuple=True)
            new = {"val": values}
            for name, data in context(index, cols, j, c).items():
                if name != "val":  # entries that do not enter are never picked: their context stays empty
                    new[name] = torch.zeros(rows_in, len(cols), *data.shape[1:], dtype=data.dtype, device=dev)
                    new[name][j, c] = data
            self._merge("top", new, -torch.cat([st["top_val"][:, cols], values]), cols)
        gen = torch.Generator(device=dev).manual_seed(seed)
        draws = torch.rand(len(value), generator=gen, device=dev)
        largest = st["pool_key"].amax(0)
        keys, index = per_feature((draws < largest[feature]).nonzero().squeeze(1), draws, self.pool, math.inf)
        enter = keys < largest
        cols = enter[0].nonzero().squeeze(1)
        if len(cols):
            rows_in = int(enter.sum(0).max())
            keys, index = keys[:rows_in, cols], index[:rows_in, cols]
            # a bottom-k sample keeps the ``pool`` smallest keys of old and new. The pool is
            # unordered: each entering key takes the slot of an evicted one, in place. The sort is
            # stable, so an empty new entry (key inf) never displaces an empty old slot.
            picked = torch.cat([st["pool_key"][:, cols], keys]).sort(dim=0, stable=True).indices[: self.pool]
            kept = torch.zeros(self.pool + rows_in, len(cols), dtype=torch.bool, device=dev)
            kept.scatter_(0, picked, True)
            c_in, j = kept[self.pool :].T.nonzero(as_tuple=True)  # by column, then rank: pairs with
            c_out, slot = (~kept[: self.pool]).T.nonzero(as_tuple=True)  # the evicted slots, by column
            where = (slot, cols[c_out])
            st["pool_key"][where] = keys[j, c_in]
            for name, data in context(index, cols, j, c_in).items():
                st[f"pool_{name}"][where] = data.to(st[f"pool_{name}"].dtype)

    def _merge(self, part: str, new: dict[str, Tensor], order: Tensor, cols: Tensor) -> None:
        """For features ``cols``, keep the first entries of ``old + new`` by ``order`` (ascending,
        stable: old first on ties)."""
        st = self.state
        size = st[f"{part}_val"].shape[0]
        pick = order.sort(dim=0, stable=True).indices[:size]  # [size, c]
        for name, value in new.items():
            key = f"{part}_{name}"
            joined = torch.cat([st[key][:, cols], value.to(st[key].dtype)])
            index = pick if joined.dim() == 2 else pick[..., None].expand(-1, -1, joined.shape[-1])
            st[key][:, cols] = joined.gather(0, index)

    def _histogram(self, token: Tensor, feature: Tensor, value: Tensor, batch_max: Tensor) -> None:
        st, bins = self.state, self.hist_bins
        grow = batch_max > torch.exp2(st["hist_exp"].clamp_min(-1000).double()).float()
        grow &= batch_max > 0
        if bool(grow.any()):
            need = torch.ceil(torch.log2(batch_max[grow].double())).long()
            old = st["hist_exp"][grow]
            shift = torch.where(old == UNSET_EXP, 0, need - old)
            rows = st["hist"][grow]
            for d in shift.unique().tolist():
                chosen = shift == d
                if d == 0:
                    continue
                group = 2 ** min(d, int(math.log2(bins)))
                merged = rows[chosen].reshape(-1, bins // group, group).sum(-1)
                rows[chosen] = F.pad(merged, (0, bins - merged.shape[1]))
            st["hist"][grow] = rows
            st["hist_exp"][grow] = need
        if not len(token):
            return
        top = torch.exp2(st["hist_exp"][feature].double())
        index = (value.double() / top * bins).long().clamp(0, bins - 1)
        st["hist"].view(-1).index_add_(0, feature * bins + index, torch.ones_like(index))


def display_histogram(
    hist: Int[Tensor, " bins"], hist_exp: int, max_value: float, n_bins: int = 50
) -> tuple[list[float], list[int]]:
    """Bin edges and counts of a fine histogram regrouped into about ``n_bins`` bins on ``[0, max]``.

    Bins are whole groups of fine bins, so every count is exact; the last edge lies at most one
    group past the maximum.

    Example:
        >>> edges, counts = display_histogram(torch.tensor([1, 0, 2, 5, 0, 0, 0, 0]), 3, 3.5, n_bins=2)
        >>> edges, counts
        ([0.0, 2.0, 4.0], [1, 7])
    """
    fine = len(hist)
    if hist_exp == UNSET_EXP or not math.isfinite(max_value) or max_value <= 0:
        return [], []
    width = 2.0**hist_exp / fine
    last = min(int(max_value / width), fine - 1)
    group = max(1, math.ceil((last + 1) / n_bins))
    n_out = math.ceil((last + 1) / group)
    padded = F.pad(hist[: n_out * group], (0, max(0, n_out * group - fine)))
    counts = padded.reshape(n_out, group).sum(-1)
    return [i * group * width for i in range(n_out + 1)], counts.tolist()


def quantile_edges(hist: Int[Tensor, " bins"], hist_exp: int, n_quantiles: int) -> list[float]:
    """Activation edges of ``n_quantiles`` bins holding about equal shares of the firing tokens
    (edges fall on fine-bin edges; repeated edges are merged).

    Example:
        >>> quantile_edges(torch.tensor([2, 0, 1, 1]), 2, 2)
        [0.0, 1.0, 4.0]
    """
    total = int(hist.sum())
    fine = len(hist)
    if total == 0 or hist_exp == UNSET_EXP:
        return []
    width = 2.0**hist_exp / fine
    cum = hist.cumsum(0)
    edges = [0.0]
    for i in range(1, n_quantiles):
        j = int(torch.searchsorted(cum, torch.tensor(math.ceil(i * total / n_quantiles))))
        edge = (j + 1) * width
        if edge > edges[-1] and edge < fine * width:
            edges.append(edge)
    edges.append(fine * width)
    return edges
