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


@pytest.fixture(scope="module")
def induction_toy():
    """The attention-only toy, trained until a previous-token head and induction heads form (~30 s)."""
    from mechscope.toys import induction

    cfg = induction.InductionConfig(d_vocab=16, seq_len=16, d_model=32, n_heads=2, lr=1e-2, steps=400, seed=0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = induction.train_induction(cfg, progress=False)
    finally:
        torch.set_num_threads(previous)
    summary = induction.induction_summary(run, n_sequences=64)
    prev, ind = summary["previous_token_head"], summary["induction_head"]
    # Prompts "A A[:-1]": the answer is A[-1], found after the earlier occurrence of the last token.
    # Corrupted: that earlier occurrence is replaced, so the previous-token head's output there (the
    # induction head's key) changes while the queries and the copied value stay the same.
    half, n = 7, 16
    gen = torch.Generator().manual_seed(0)
    perm = torch.stack([torch.randperm(cfg.d_vocab, generator=gen) for _ in range(n)])
    first, replacement = perm[:, :half], perm[:, half]
    clean = torch.cat((first, first[:, :-1]), dim=1)
    corrupted = clean.clone()
    corrupted[:, half - 2] = replacement
    edges = {f"a0.h{prev[1]}->a1.h{ind[1]}<k>", f"a1.h{ind[1]}->logits"}
    return run.model, clean, corrupted, LogitDiff(first[:, -1], replacement), edges


@pytest.mark.parametrize("method", METHODS)
def test_attribution_ranks_the_induction_edges_at_the_top(induction_toy, method):
    model, clean, corrupted, metric, edges = induction_toy
    circuit = attribute(model, clean, corrupted, metric, method=method, steps=5)
    assert edges <= set(circuit.top(3).edge_names)


def test_acdc_keeps_the_induction_edges(induction_toy):
    model, clean, corrupted, metric, edges = induction_toy
    circuit = acdc(model, clean, corrupted, threshold=0.1)
    assert edges <= set(circuit.edge_names)
    assert circuit.n_edges <= 8
