"""The graph: counts, names, and that each receiver reads exactly what its upstream senders wrote."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.circuits import Graph
from mechscope.circuits.activations import prepare_runs
from mechscope.circuits.patch import patched_logits
from tests.circuits.test_patch import ARCHITECTURES, _model, _prompts


def _expected_edges(cfg) -> int:
    """Counted from the definition: receivers of layer l read the embeddings and every earlier
    layer's senders; an MLP also reads its own layer's heads unless the block is parallel."""
    embed = 1 + (cfg.positional_embedding_type == "standard")
    per_layer = cfg.n_heads + (not cfg.attn_only)
    total = 0
    for layer in range(cfg.n_layers):
        upstream = embed + layer * per_layer
        total += (cfg.n_heads + 2 * cfg.n_key_value_heads) * upstream
        if not cfg.attn_only:
            total += upstream + (0 if cfg.parallel_attn_mlp else cfg.n_heads)
    return total + embed + cfg.n_layers * per_layer


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_counts(arch):
    model = _model(arch)
    graph = Graph.of(model)
    assert graph.n_edges == _expected_edges(model.cfg)
    assert len(graph.edge_names) == len(set(graph.edge_names)) == graph.n_edges
    assert [graph.edge_index(name) for name in graph.edge_names[::17]] == list(range(graph.n_edges))[::17]


def test_grouped_query_receivers_are_key_value_heads():
    graph = Graph.of(_model("llama_like_gqa"))
    assert "a1.kv1<k>" in graph.receivers and "a1.kv2<k>" not in graph.receivers
    assert sum(name.endswith("<v>") for name in graph.receivers) == graph.n_layers * 2


def test_unknown_names_name_the_closest():
    graph = Graph.of(_model("gpt2_like"))
    with pytest.raises(Exception, match="closest"):
        graph.edge_index("a0.h1->a1.h0<z>")
    with pytest.raises(Exception, match="reads before"):
        graph.edge_index("m2->a1.h0<q>")


def _receiver_input_names(graph: Graph, receiver: str, parallel: bool) -> tuple[str, str, int | None]:
    """The hook a receiver reads from, the hook holding the same values in a plain run, and its head."""
    if receiver == "logits":
        name = f"blocks.{graph.n_layers - 1}.hook_resid_post"
        return name, name, None
    if receiver.startswith("m"):
        layer = int(receiver[1:])
        plain = f"blocks.{layer}.hook_resid_pre" if parallel else f"blocks.{layer}.hook_resid_mid"
        return f"blocks.{layer}.hook_mlp_in", plain, None
    body, which = receiver[:-1].split("<")
    layer, head = body[1:].split(".")
    return f"blocks.{layer}.hook_{which}_input", f"blocks.{layer}.hook_resid_pre", int(head.lstrip("hkv"))


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_patching_every_incoming_edge_gives_the_source_input(arch, one_thread):
    """With all of a receiver's incoming edges patched it reads the source run's input: the graph
    has every edge the forward pass has (parallel blocks, post-norms), and no other."""
    model = _model(arch, seed=2)
    clean, corrupted = _prompts(model, seed=3)
    graph, base, source, _ = prepare_runs(model, clean, corrupted, "noising", "patch")
    receivers = graph.receivers[:: max(1, graph.n_receivers // 12)] + ["logits"]
    for receiver in receivers:
        r = graph.receiver_index(receiver)
        mask = torch.zeros(1, graph.n_senders, graph.n_receivers, dtype=torch.bool)
        mask[0, :, r] = graph.valid[:, r]
        name, plain, head = _receiver_input_names(graph, receiver, model.cfg.parallel_attn_mlp)
        seen = {}

        def capture(x, *, hook, seen=seen, head=head):
            seen["x"] = x if head is None else x[:, :, head].clone()

        if receiver == "logits":  # the engine edits the final residual after the blocks run
            logits = patched_logits(model, graph, base, source, mask)
            _, cache = model.run_with_cache(corrupted, names_filter=[name])
            expected = model(cache[name], start_at_layer=model.cfg.n_layers)
            assert_close(logits, expected, atol=1e-5, rtol=1e-5)
            continue
        context = lambda hooks, name=name, capture=capture: model.hooks(hooks + [(name, capture)])  # noqa: E731
        patched_logits(model, graph, base, source, mask, hook_context=context)
        _, cache = model.run_with_cache(corrupted, names_filter=[plain])
        expected = cache[plain]
        assert_close(seen["x"], expected, atol=1e-5, rtol=1e-5)
