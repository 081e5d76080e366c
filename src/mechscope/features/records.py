"""One feature's dashboard data, as plain Python values: `FeatureRecord` and its `Example` s.

`feature_records` turns a `Harvest` into records, adding what needs the model's weights: logit
effects, nearest features by decoder cosine and, for ``hook_z`` SAEs, the heads' shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from mechscope.features.effects import logit_effects, nearest_features
from mechscope.features.harvest import Harvest
from mechscope.features.sketch import display_histogram, quantile_edges


@dataclass
class Example:
    """A token where a feature fired, with its context window.

    ``tokens`` are token ids (``-1`` outside the row), ``acts`` the feature's activation on each,
    ``center`` the index of the example's own token in the window, ``dfa`` (``hook_z`` SAEs) the
    direct feature attribution of each context token as a source position.

    Example:
        >>> from mechscope.features import NeuronSource, feature_records, harvest
        >>> result = harvest(model, NeuronSource(model, 0), torch.randint(0, 50, (4, 8)), progress=False)
        >>> record = next(feature_records(result, model, "blocks.0.mlp.hook_post"))  # neuron 0
        >>> example = record.top[0]  # the token where the neuron fired most
        >>> example.value == record.max == example.acts[example.center]
        True
        >>> example.token == example.tokens[example.center], len(example.tokens)  # 24 before, 8 after
        (True, 33)
    """

    value: float
    token_index: int
    tokens: list[int]
    acts: list[float]
    center: int
    dfa: list[float] | None = None

    @property
    def token(self) -> int:
        """The id of the example's own token."""
        return self.tokens[self.center]


@dataclass
class FeatureRecord:
    """Everything a feature's dashboard shows (see `mechscope.features.database.FeatureDB.feature`).

    Example:
        >>> from mechscope.features import NeuronSource, feature_records, harvest
        >>> result = harvest(model, NeuronSource(model, 0), torch.randint(0, 50, (4, 8)), progress=False)
        >>> record = next(feature_records(result, model, "blocks.0.mlp.hook_post"))
        >>> record.feature, record.n_tokens, len(record.logits_up), len(record.hist_counts) > 0
        (0, 32, 10, True)
        >>> record.density == record.fire_count / record.n_tokens
        True
    """

    source: str
    feature: int
    n_tokens: int
    fire_count: int
    max: float
    mean_all: float
    mean_active: float
    hist_edges: list[float] = field(default_factory=list)
    hist_counts: list[int] = field(default_factory=list)
    quantile_edges: list[float] = field(default_factory=list)
    top: list[Example] = field(default_factory=list)
    quantiles: list[list[Example]] = field(default_factory=list)
    logits_up: list[tuple[int, float]] = field(default_factory=list)
    logits_down: list[tuple[int, float]] = field(default_factory=list)
    neighbours: list[tuple[int, float]] = field(default_factory=list)
    head_shares: list[float] | None = None

    @property
    def density(self) -> float:
        """Fraction of tokens where the feature fires."""
        return self.fire_count / self.n_tokens if self.n_tokens else 0.0


def _examples(state: dict[str, np.ndarray], part: str, f: int, center: int) -> list[Example]:
    """The examples kept for feature ``f``: top ones by value, pool ones by key (their random order)."""
    values = state[f"{part}_val"][:, f]
    order = np.argsort(state["pool_key"][:, f], kind="stable") if part == "pool" else np.arange(len(values))
    out = []
    for j in order[np.isfinite(values[order])]:
        dfa = state.get(f"{part}_dfa")
        out.append(
            Example(
                value=float(values[j]),
                token_index=int(state[f"{part}_idx"][j, f]),
                tokens=state[f"{part}_tok"][j, f].tolist(),
                acts=state[f"{part}_act"][j, f].tolist(),
                center=center,
                dfa=None if dfa is None else dfa[j, f].tolist(),
            )
        )
    return out


def feature_records(
    harvest: Harvest,
    model,
    source: str,
    *,
    n_quantiles: int = 10,
    quantile_examples: int = 5,
    display_bins: int = 50,
    n_logits: int = 10,
    n_neighbours: int = 10,
) -> Iterator[FeatureRecord]:
    """The `FeatureRecord` of every feature of ``source``, in feature order.

    The quantile sections split the firing tokens into ``n_quantiles`` bins of about equal counts
    (edges from the histogram) and show up to ``quantile_examples`` tokens of the uniform sample
    falling in each, strongest first.

    Example:
        >>> from mechscope.features import harvest, NeuronSource
        >>> result = harvest(model, NeuronSource(model, 0), torch.randint(0, 50, (4, 8)), progress=False)
        >>> rec = next(feature_records(result, model, "blocks.0.mlp.hook_post"))
        >>> rec.feature, len(rec.top) <= 20, len(rec.logits_up)
        (0, True, 10)
    """
    sketch, src = harvest.sketches[source], harvest.sources[source]
    state = {k: v.numpy() for k, v in sketch.state_dict().items()}
    n_tokens = int(state["n_tokens"])
    directions = src.write_directions(model)
    logits = neighbours = None
    if directions is not None:
        up, up_ids, down, down_ids = logit_effects(model, directions, n_logits)
        logits = (up.tolist(), up_ids.tolist(), down.tolist(), down_ids.tolist())
        if n_neighbours and src.n_features > 1:
            cos, ids = nearest_features(directions, n_neighbours)
            neighbours = (cos.tolist(), ids.tolist())
    shares = src.head_shares()
    shares = shares.tolist() if shares is not None else None
    center = harvest.config.left
    for f in range(src.n_features):
        fire, hist, exp, mx = (
            int(state["fire"][f]),
            torch.from_numpy(state["hist"][f]),
            int(state["hist_exp"][f]),
            float(state["max"][f]),
        )
        edges, counts = display_histogram(hist, exp, mx if fire else -math.inf, display_bins)
        q_edges = quantile_edges(hist, exp, n_quantiles)
        pool = _examples(state, "pool", f, center)  # in key order: a uniform sample
        sections: list[list[Example]] = [[] for _ in range(max(len(q_edges) - 1, 0))]
        for ex in pool:
            i = min(max(int(np.searchsorted(q_edges, ex.value, side="right")) - 1, 0), len(sections) - 1)
            if len(sections[i]) < quantile_examples:
                sections[i].append(ex)
        rec = FeatureRecord(
            source=source, feature=f, n_tokens=n_tokens, fire_count=fire, max=mx if math.isfinite(mx) else 0.0,
            mean_all=float(state["sum_all"][f]) / max(n_tokens, 1),
            mean_active=float(state["sum_fire"][f]) / fire if fire else 0.0,
            hist_edges=edges, hist_counts=counts, quantile_edges=q_edges,
            top=_examples(state, "top", f, center),
            quantiles=[sorted(s, key=lambda e: -e.value) for s in sections],
            head_shares=None if shares is None else shares[f],
        )  # fmt: skip
        if logits is not None:
            rec.logits_up = list(zip(logits[1][f], logits[0][f], strict=True))
            rec.logits_down = list(zip(logits[3][f], logits[2][f], strict=True))
        if neighbours is not None:
            rec.neighbours = list(zip(neighbours[1][f], neighbours[0][f], strict=True))
        yield rec
