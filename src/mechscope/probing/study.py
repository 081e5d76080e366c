"""A probing study: one labelled token dataset, one activation site at several layers, dense and k-sparse probes.

`probing_study` collects the activations (a capped number of labelled positions per
sequence), splits by sequence, fits a dense logistic probe and the k-sparse curve (and,
optionally, the exact search for small k) at every layer, and returns plain numbers: what
``mechscope probe`` prints and ``docs/probing.md`` tabulates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Bool
from torch import Tensor

from mechscope.errors import InputError
from mechscope.names import act_name
from mechscope.probing.data import collect_activations, split_by_sequence
from mechscope.probing.datasets import TokenDataset
from mechscope.probing.linear import ProbeConfig, fit_logistic
from mechscope.probing.sparse import Ranking, sparse_layer_sweep


def cap_positions(selected: Bool[Tensor, "batch pos"], per_sequence: int | None, seed: int = 0) -> Tensor:
    """At most ``per_sequence`` randomly chosen selected positions in each row.

    Example:
        >>> cap_positions(torch.ones(2, 10, dtype=torch.bool), 3).sum(1).tolist()
        [3, 3]
    """
    if per_sequence is None:
        return selected
    noise = torch.rand(selected.shape, generator=torch.Generator().manual_seed(seed))
    noise = torch.where(selected, noise, 2.0)
    rank = noise.argsort(1).argsort(1)
    return selected & (rank < per_sequence)


def _split_with_both_classes(sequence: Tensor, labels: Tensor, test_fraction: float, seed: int,
                             tries: int = 100) -> tuple[Tensor, Tensor, int]:  # fmt: skip
    """`split_by_sequence` with ``seed``, or the next seed whose two sides both hold labels 0 and 1
    (a small dataset labelled per text can put one class only on one side); returns the seed used."""
    for attempt in range(tries):
        train, test = split_by_sequence(sequence, test_fraction, seed + attempt)
        if all(len(labels[side].unique()) == 2 for side in (train, test)):
            return train, test, seed + attempt
    counts = torch.bincount(labels.long(), minlength=2).tolist()
    raise InputError(f"no split of the {len(sequence.unique())} texts by text (test fraction {test_fraction}) "
                     f"put both labels on both sides in {tries} tries (label counts {counts}); "
                     "add texts of the rarer label")  # fmt: skip


def probing_study(
    model, dataset: TokenDataset, site: str = "post", layers: Sequence[int] | None = None, *,
    ks: Sequence[int] = (1, 2, 4, 8, 16, 32), exact_k: Sequence[int] = (), method: Ranking = "f_statistic",
    per_sequence: int | None = 32, test_fraction: float = 0.25, cfg: ProbeConfig | None = None, seed: int = 0,
    batch_size: int = 8, progress: bool = False,
) -> dict:  # fmt: skip
    """Dense and k-sparse probes of ``dataset``'s labels on ``site`` (a short hook name) at ``layers``.

    The split is by sequence with ``seed``; when one side would hold a single label, the next
    seeds are tried (the report's ``split_seed`` is the one used).

    Returns ``{"dataset", "site", "n_train", "n_test", "split_seed", "positive_rate", "layers": [{"layer",
    "hook", "dense": metrics, "sparse": [{"k", "features", "f1", "accuracy", "auroc"}],
    "exact": [...]}]}``.

    Example:
        >>> data = TokenDataset("demo", torch.randint(50, (8, 6)), torch.randint(2, (8, 6)),
        ...                     torch.ones(8, 6, dtype=torch.bool), "random labels")
        >>> out = probing_study(model, data, "post", [0, 2], ks=(1, 2))
        >>> [row["layer"] for row in out["layers"]], [s["k"] for s in out["layers"][0]["sparse"]]
        ([0, 2], [1, 2])
    """
    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    hooks = [act_name(site, layer) for layer in layers]
    positions = cap_positions(dataset.selected, per_sequence, seed)
    data = collect_activations(model, dataset.tokens, hooks, positions, batch_size=batch_size, progress=progress)
    labels = data.labels_for(dataset.labels)
    train, test, split_seed = _split_with_both_classes(data.sequence, labels, test_fraction, seed)
    cfg = cfg or ProbeConfig(l2=1e-3)
    sweep = sparse_layer_sweep(data.activations, labels, train, test, ks, method, exact_k, cfg=cfg, progress=progress)
    rows = []
    for layer, hook in zip(layers, hooks, strict=True):
        x = data[hook]
        dense = fit_logistic(x[train], labels[train], cfg, hook=hook)
        scores = {k: float(v[0]) for k, v in dense.evaluate(x[test], labels[test]).items()}
        sparse = [{"k": p.k, "features": p.features, **p.test} for p in sweep[hook]["curve"]]
        exact = [{"k": p.k, "features": p.features, **p.test} for p in sweep[hook]["exact"]]
        rows.append({"layer": layer, "hook": hook, "dense": scores, "sparse": sparse, "exact": exact})
    return {"dataset": dataset.name, "description": dataset.description, "site": site, "method": method,
            "n_train": len(train), "n_test": len(test), "split_seed": split_seed,
            "positive_rate": float(labels.float().mean()), "layers": rows}  # fmt: skip
