"""ACDC against a naive ACDC: the same greedy rules, one edge per forward, naive hook patching."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from mechscope.circuits import Graph
from mechscope.circuits.acdc import acdc
from tests.circuits.naive import naive_patched_logits, parse_receiver, source_outputs
from tests.circuits.test_patch import _prompts
from tests.conftest import tiny_model


def _kl(clean_logits, logits):
    p = F.log_softmax(clean_logits[:, -1], -1)
    return (p.exp() * (p - F.log_softmax(logits[:, -1], -1))).sum(-1).mean()


def _receiver_order(model) -> list[str]:
    cfg = model.cfg
    kv = "h" if cfg.n_key_value_heads == cfg.n_heads else "kv"
    order = ["logits"]
    for layer in reversed(range(cfg.n_layers)):
        order += [] if cfg.attn_only else [f"m{layer}"]
        order += [f"a{layer}.h{h}<q>" for h in range(cfg.n_heads)]
        order += [f"a{layer}.{kv}{g}<{w}>" for w in "kv" for g in range(cfg.n_key_value_heads)]
    return order


def _writes(model, receiver: str) -> set[str]:
    which, layer, head = parse_receiver(receiver)
    if which == "logits":
        return set()
    if which == "mlp":
        return {f"m{layer}"}
    if which == "q":
        return {f"a{layer}.h{head}"}
    size = model.cfg.n_heads // model.cfg.n_key_value_heads
    return {f"a{layer}.h{h}" for h in range(head * size, (head + 1) * size)}


def naive_acdc(model, clean, corrupted, threshold):
    graph = Graph.of(model)
    source = source_outputs(model, corrupted)
    with torch.no_grad():
        clean_logits = model(clean)
    edges = [tuple(name.split("->")) for name in graph.edge_names]
    sender_rank = {name: i for i, name in enumerate(graph.senders)}
    removed, scores = set(), {}
    current = 0.0
    for receiver in _receiver_order(model):
        incoming = sorted((e for e in edges if e[1] == receiver), key=lambda e: -sender_rank[e[0]])
        writes = _writes(model, receiver)
        if writes and not any(e[0] in writes for e in edges if e not in removed):
            removed |= set(incoming)
            continue
        for edge in incoming:
            logits = naive_patched_logits(model, clean, source, sorted(removed | {edge}))
            value = float(_kl(clean_logits, logits))
            scores[edge] = value - current
            if value - current < threshold:
                removed.add(edge)
                current = value
    return {f"{s}->{r}" for s, r in edges if (s, r) not in removed}, scores


def test_acdc_matches_naive_greedy(one_thread):
    model = tiny_model(seed=5, n_layers=2, n_heads=2, d_model=16, d_mlp=16, n_key_value_heads=1,
                       normalization_type="RMS", positional_embedding_type="rotary")  # fmt: skip
    with torch.no_grad():
        model.unembed.w_u.mul_(8)  # sharper next-token distributions: KL divergences of a few 0.01
    clean, corrupted = _prompts(model, n=3, seq=6, seed=6)
    threshold = 0.01
    circuit = acdc(model, clean, corrupted, threshold=threshold, window=4)
    kept, naive_scores = naive_acdc(model, clean, corrupted, threshold)
    graph = circuit.graph
    tried = [graph.edge_index(e) for e in naive_scores]
    naive = torch.tensor(list(naive_scores.values()))
    assert (naive - threshold).abs().min() > 1e-4  # no decision within float noise of the threshold
    assert set(circuit.edge_names) == kept
    assert 0 < len(kept) < graph.n_edges
    assert_close(circuit.scores[tried], naive, atol=1e-5, rtol=1e-4)
    assert int(circuit.scores.isnan().logical_not().sum()) == len(tried)


def test_window_does_not_change_the_answer(one_thread):
    model = tiny_model(seed=8, n_layers=2, n_heads=2, d_model=16, d_mlp=16)
    clean, corrupted = _prompts(model, n=2, seq=6, seed=9)
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]  # noqa: E731
    one = acdc(model, clean, corrupted, threshold=0.01, metric=metric, window=1)
    many = acdc(model, clean, corrupted, threshold=0.01, metric=metric, window=64)
    assert one.edge_names == many.edge_names
    assert_close(one.scores, many.scores, atol=1e-5, rtol=1e-4, equal_nan=True)
    assert many.settings["batches"] < one.settings["batches"]
