"""Export a feature database in the JSON layout of SAEDashboard's Neuronpedia runner.

SAEDashboard 0.8.0 (``sae_dashboard.neuronpedia``) writes ``batch-{n}.json`` files, each a
``NeuronpediaDashboardBatch``: ``model_id``, ``layer``, ``sae_set``, ``sae_id_suffix`` and
``features``, a list of ``NeuronpediaDashboardFeature`` dicts (``feature_index``, ``pos_str`` /
``pos_values`` and ``neg_str`` / ``neg_values`` for the logit effects, ``frac_nonzero``,
``freq_hist_data_bar_values`` / ``_heights`` (bin centres and counts), ``logits_hist_data_*``,
``activations`` with ``bin_min``, ``bin_max``, ``bin_contains``, ``tokens``, ``values``,
``qualifying_token_index``, ``dfa_values``, ``dfa_maxValue`` and ``dfa_targetIndex`` (source
attributions for ``hook_z`` SAEs; ``[]``, ``0``, ``-1`` otherwise, as SAEDashboard writes them);
``decoder_weights_dist`` (head shares), ``n_prompts_total``,
``n_tokens_in_prompt``, ``dataset``, the ``neuron_alignment_*`` / ``correlated_*`` tables and
``vector``), values rounded to 3 decimals as there. Top examples carry ``bin_min = -1``,
``bin_contains = -1`` and ``bin_max`` the maximum, quantile examples their bin's range and
share. Differences: an example's ``tokens`` are its context window (the whole prompt when the
harvest kept ``left = right = context_size - 1``), the quantile bins hold equal shares of firing
tokens rather than equal activation ranges, and the correlation tables are left empty
(``correlated_features_indices`` lists the nearest features by decoder cosine).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mechscope.features.database import FeatureDB
from mechscope.names import layer_of


def _r(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def neuronpedia_feature(db: FeatureDB, feature: int, source: str | None = None, meta: dict | None = None) -> dict:
    """One feature as a ``NeuronpediaDashboardFeature`` dict (``meta``: the database's `FeatureDB.meta`,
    read here when not given).

    Example:
        >>> neuronpedia_feature(FeatureDB("features.db"), 0)["frac_nonzero"]  # doctest: +SKIP
        0.0123
    """
    rec = db.feature(feature, source)
    meta = db.meta() if meta is None else meta
    n_tokens_in_prompt = int(meta.get("context_size", 0))
    centres = [(a + b) / 2 for a, b in zip(rec.hist_edges[:-1], rec.hist_edges[1:], strict=True)]
    total = max(rec.fire_count, 1)

    def activation(ex, bin_min, bin_max, bin_contains) -> dict:
        keep = [i for i, t in enumerate(ex.tokens) if t >= 0]
        out = {
            "bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
            "tokens": [db.token_text(ex.tokens[i]) for i in keep],
            "values": _r(ex.acts[i] for i in keep),
            "qualifying_token_index": keep.index(ex.center),
        }  # fmt: skip
        if ex.dfa is not None:
            dfa = _r(ex.dfa[i] for i in keep)
            out.update(dfa_values=dfa, dfa_maxValue=max(dfa, default=0.0), dfa_targetIndex=keep.index(ex.center))
        else:  # as SAEDashboard writes them without DFA data
            out.update(dfa_values=[], dfa_maxValue=0, dfa_targetIndex=-1)
        return out

    acts = [activation(ex, -1, round(rec.max, 3), -1) for ex in rec.top]
    for i, section in enumerate(rec.quantiles):
        low, high = rec.quantile_edges[i], rec.quantile_edges[i + 1]
        share = sum(c for e, c in zip(rec.hist_edges[:-1], rec.hist_counts, strict=True) if low <= e < high) / total
        acts.extend(activation(ex, round(low, 3), round(high, 3), round(share * rec.density, 5)) for ex in section)
    return {
        "feature_index": rec.feature,
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [int(f) for f, _ in rec.neighbours[:3]],
        "correlated_features_l1": _r(c for _, c in rec.neighbours[:3]), "correlated_features_pearson": [],
        "neg_str": [db.token_text(int(t)) for t, _ in rec.logits_down], "neg_values": _r(v for _, v in rec.logits_down),
        "pos_str": [db.token_text(int(t)) for t, _ in rec.logits_up], "pos_values": _r(v for _, v in rec.logits_up),
        "frac_nonzero": rec.density,
        "freq_hist_data_bar_values": _r(centres), "freq_hist_data_bar_heights": list(rec.hist_counts),
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": int(meta.get("rows", 0)), "n_tokens_in_prompt": n_tokens_in_prompt, "dataset": "",
        "decoder_weights_dist": _r(rec.head_shares or []),
        "activations": acts,
        "vector": [],
    }  # fmt: skip


def export_neuronpedia(
    db: FeatureDB | str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    source: str | None = None,
    model_id: str | None = None,
    sae_set: str | None = None,
    features_per_batch: int = 128,
) -> list[Path]:
    """Write ``batch-{n}.json`` files (``features_per_batch`` features each) and ``run_settings.json``.

    Example:
        >>> export_neuronpedia("features.db", "neuronpedia")  # doctest: +SKIP
        [PosixPath('neuronpedia/batch-0.json'), ...]
    """
    db = db if isinstance(db, FeatureDB) else FeatureDB(db)
    source = db.source_name(source)
    info = next(s for s in db.sources() if s["name"] == source)
    meta = db.meta()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    features = list(db.all_features(source))
    paths = []
    for n, start in enumerate(range(0, len(features), features_per_batch)):
        chunk = features[start : start + features_per_batch]
        batch = {
            "model_id": model_id or meta.get("model_name", ""),
            "layer": layer_of(info["hook_name"]) or 0,
            "sae_set": sae_set or source,
            "sae_id_suffix": None,
            "features": [neuronpedia_feature(db, f, source, meta) for f in chunk],
        }
        path = out / f"batch-{n}.json"
        path.write_text(json.dumps(batch))
        paths.append(path)
    settings = {"source": source, "hook_name": info["hook_name"], "n_features": len(features), **meta}
    (out / "run_settings.json").write_text(json.dumps(settings, indent=2, default=str))
    return paths
