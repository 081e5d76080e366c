"""Circuit objects: JSON round trip, faithfulness curves and verification against plain runs."""

from __future__ import annotations

import math

import torch
from torch.testing import assert_close

from mechscope.circuits import Circuit, Graph, acdc, attribute, edge_patch, faithfulness_curve, verify_edges
from tests.circuits.test_patch import _model, _prompts


def _metric(logits):
    return logits[:, -1, 3] - logits[:, -1, 5]


def test_json_round_trip(tmp_path):
    model = _model("llama_like_gqa")
    graph = Graph.of(model)
    scores = torch.randn(graph.n_edges)
    scores[::7] = math.nan
    circuit = Circuit.from_scores(graph, scores, "eap", {"steps": 3}).top(25)
    loaded = Circuit.load(circuit.save(tmp_path / "c.json"))
    assert loaded.edge_names == circuit.edge_names and loaded.graph == circuit.graph
    assert_close(loaded.scores, circuit.scores, equal_nan=True)
    assert loaded.method == "eap" and loaded.settings == {"steps": 3, "top": 25}
    assert all(not math.isnan(circuit.scores[graph.edge_index(e)]) for e in circuit.edge_names)


def test_faithfulness_curve_matches_plain_runs(one_thread):
    model = _model("gpt2_like", seed=2)
    clean, corrupted = _prompts(model, seed=3)
    circuit = attribute(model, clean, corrupted, _metric)
    sizes = [5, 40, 150]
    curve = faithfulness_curve(model, circuit, clean, corrupted, _metric, sizes=sizes, batch_size=6)
    graph = circuit.graph
    with torch.no_grad():
        full = _metric(model(clean)).mean()
        empty = _metric(Circuit.from_edges(graph, []).run(model, clean, corrupted)).mean()
        for k, faithful, complete in zip(sizes, curve.faithfulness, curve.completeness, strict=True):
            kept = circuit.top(k)
            only = _metric(kept.run(model, clean, corrupted)).mean()
            removed = Circuit(graph, ~kept.edges, kept.scores).run(model, clean, corrupted)
            assert_close(faithful, float((only - empty) / (full - empty)), atol=1e-4, rtol=1e-4)
            assert_close(complete, float((_metric(removed).mean() - empty) / (full - empty)), atol=1e-4, rtol=1e-4)
    assert_close(curve.full, float(full), atol=1e-5, rtol=1e-5)


def test_verify_edges_are_single_edge_patches(one_thread):
    model = _model("neox_parallel", seed=4)
    clean, corrupted = _prompts(model, seed=5)
    circuit = attribute(model, clean, corrupted, _metric)
    checked = verify_edges(model, circuit, clean, corrupted, _metric, top=6)
    with torch.no_grad():
        base = _metric(model(clean)).mean()
    exact = edge_patch(model, clean, corrupted, _metric, [[e] for e in checked["edges"]]) - base
    assert_close(torch.tensor(checked["effects"]), exact, atol=1e-5, rtol=1e-5)
    top = circuit.top(6)
    assert set(checked["edges"]) == set(top.edge_names)


def test_acdc_prunes_only_the_chosen_receivers(one_thread):
    model = _model("gpt2_like", seed=6)
    clean, corrupted = _prompts(model, seed=7)
    circuit = acdc(model, clean, corrupted, threshold=1.0, metric=_metric, receivers=["logits", "m2"])
    graph = circuit.graph
    removed = [graph.edge_names[i].split("->")[1] for i in (~circuit.edges).nonzero().flatten().tolist()]
    assert removed and set(removed) <= {"logits", "m2"}
