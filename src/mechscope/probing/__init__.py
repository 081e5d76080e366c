"""Probes: what an activation encodes, read off linearly.

- `fit_logistic` (binary or multi-class, many targets as one batched fit, L2, early stopping),
  `fit_linear` (ridge) and `fit_mean_difference`, all in torch, full batch (L-BFGS) or minibatch
  (Adam), on the GPU when there is one; each returns a `LinearProbe` (predictions, metrics,
  directions in model space, ``save``/``load`` as safetensors + JSON).
- `collect_activations` (any hooks, any positions) and `split_by_sequence` (no text on both
  sides of a split); `probe_layers` fits one probe per hook.
- k-sparse probes (`rank_features`, `sparse_probe_curve`, `exact_sparse_search`,
  `sparse_layer_sweep`) after Gurnee et al. (2023).
- `mechscope.probing.datasets`: labelled token datasets built offline from the default corpus.

Example:
    >>> from mechscope import probing
    >>> data = probing.collect_activations(model, torch.randint(50, (8, 6)), "blocks.1.hook_resid_post")
    >>> train, test = probing.split_by_sequence(data.sequence, 0.25)
    >>> labels = data.position % 2
    >>> result = probing.probe_layers(data.activations, labels, train, test)
    >>> sorted(result["blocks.1.hook_resid_post"]["test"])
    ['accuracy', 'auroc', 'f1']
"""

from mechscope.probing.data import ProbeData, collect_activations, split_by_sequence
from mechscope.probing.linear import (
    ProbeConfig,
    fit_linear,
    fit_logistic,
    fit_mean_difference,
    fit_weights,
    group_split,
)
from mechscope.probing.metrics import accuracy, auroc, f1_score
from mechscope.probing.probe import LinearProbe
from mechscope.probing.sparse import (
    SparseProbe,
    exact_sparse_search,
    rank_features,
    sparse_layer_sweep,
    sparse_probe_curve,
)
from mechscope.probing.sweep import fit_probe, probe_layers

__all__ = [
    "LinearProbe",
    "ProbeConfig",
    "ProbeData",
    "SparseProbe",
    "accuracy",
    "auroc",
    "collect_activations",
    "exact_sparse_search",
    "f1_score",
    "fit_linear",
    "fit_logistic",
    "fit_mean_difference",
    "fit_probe",
    "fit_weights",
    "group_split",
    "probe_layers",
    "rank_features",
    "sparse_layer_sweep",
    "sparse_probe_curve",
    "split_by_sequence",
]
