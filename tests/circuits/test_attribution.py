"""EAP and EAP-IG against naive derivatives: one forward and backward per edge (and step), with
``eps * delta`` added to the receiver's input by a hook."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.circuits import Graph, edge_patch, edge_scores
from tests.circuits.naive import deltas, edge_derivative, parse_sender, source_outputs
from tests.circuits.test_patch import ARCHITECTURES, _model, _prompts


def _metric(model):
    return lambda logits: logits[:, -1, 3] - logits[:, -1, 5] + 0.3 * logits[:, -2, 7]


def _sample_edges(graph: Graph, k: int = 10, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    logits = graph.edge_pairs[:, 1] == graph.logits_receiver
    picked = torch.randperm(graph.n_edges, generator=gen)[:k].tolist()
    return sorted(set(picked + logits.nonzero().flatten()[-2:].tolist()))


def _group_shift(model, sender: str, delta: dict, alpha: float):
    """Hooks moving a sender's group (embeddings, a layer's heads, an MLP) by ``alpha * delta``."""
    kind, layer, _ = parse_sender(sender)
    cfg = model.cfg
    if kind in ("input", "pos"):
        hooks = [("hook_embed", lambda x, *, hook: x + alpha * delta["input"])]
        if "pos" in delta:
            hooks.append(("hook_pos_embed", lambda x, *, hook: x + alpha * delta["pos"]))
        return hooks
    if kind == "head":
        step = sum(delta[f"a{layer}.h{h}"] for h in range(cfg.n_heads))
        return [(f"blocks.{layer}.hook_attn_out", lambda x, *, hook: x + alpha * step)]
    return [(f"blocks.{layer}.hook_mlp_out", lambda x, *, hook: x + alpha * delta[f"m{layer}"])]


def _naive_scores(model, graph, base_tokens, source_tokens, metric, edges, method, steps, ablation="patch"):
    base = source_outputs(model, base_tokens)
    source = source_outputs(model, source_tokens, ablation=ablation)
    source = {k: v.expand_as(base[k]) for k, v in source.items()}
    delta = deltas(model, base, source)
    out = []
    for e in edges:
        sender, receiver = graph.edge_names[e].split("->")
        if method == "eap":
            out.append(edge_derivative(model, base_tokens, delta[sender], receiver, metric))
            continue
        total = 0.0
        for k in range(steps):
            alpha = (k + 0.5) / steps
            if method == "eap-ig-inputs":
                shift = _group_shift(model, "input", delta, alpha)
            else:
                shift = _group_shift(model, sender, delta, alpha)
            total = total + edge_derivative(model, base_tokens, delta[sender], receiver, metric, shift)
        out.append(total / steps)
    return torch.stack(out)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "eap-ig-activations"])
def test_scores_match_naive_derivatives(arch, method, one_thread):
    model = _model(arch, seed=1)
    clean, corrupted = _prompts(model, n=2, seed=2)
    graph = Graph.of(model)
    metric = _metric(model)
    scores = edge_scores(model, clean, corrupted, metric, method=method, steps=3, steps_per_pass=2)
    edges = _sample_edges(graph, seed=len(arch))
    naive = _naive_scores(model, graph, clean, corrupted, metric, edges, method, 3)
    assert_close(scores[edges], naive, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("direction", ["noising", "denoising"])
@pytest.mark.parametrize("ablation", ["patch", "mean", "zero"])
def test_directions_and_ablations(direction, ablation, one_thread):
    model = _model("llama_like_gqa", seed=3)
    clean, corrupted = _prompts(model, n=3, seed=4)
    graph, metric = Graph.of(model), _metric(model)
    scores = edge_scores(model, clean, corrupted, metric, direction=direction, ablation=ablation)
    base, source = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    edges = _sample_edges(graph, seed=5)
    naive = _naive_scores(model, graph, base, source, metric, edges, "eap", 1, ablation)
    assert_close(scores[edges], naive, atol=1e-5, rtol=1e-4)


def test_edges_into_linear_logits_are_exact(one_thread):
    """Without a final norm the logits are linear in the residual stream, so the EAP score of an
    edge into the logits is that edge's exact patching effect on a linear metric."""
    model = _model("attn_only_no_norm", seed=6)
    clean, corrupted = _prompts(model, n=3, seed=7)
    graph = Graph.of(model)
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]  # noqa: E731
    scores = edge_scores(model, clean, corrupted, metric)
    into_logits = (graph.edge_pairs[:, 1] == graph.logits_receiver).nonzero().flatten()
    sets = torch.zeros(len(into_logits), graph.n_edges, dtype=torch.bool)
    sets[torch.arange(len(into_logits)), into_logits] = True
    with torch.no_grad():
        clean_value = metric(model(clean)).mean()
    exact = edge_patch(model, clean, corrupted, metric, sets) - clean_value
    assert_close(scores[into_logits], exact, atol=1e-5, rtol=1e-5)
