"""Edge patching against the naive one-edge-at-a-time hook implementation (fp32, atol 1e-5)."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.circuits import Graph, edge_patch
from mechscope.circuits.activations import prepare_runs
from mechscope.circuits.patch import patched_logits
from tests.circuits.naive import naive_patched_logits, source_outputs
from tests.conftest import tiny_model

ARCHITECTURES = {
    "gpt2_like": dict(attn_qkv_bias=True, attn_out_bias=True, mlp_bias=True),
    "llama_like_gqa": dict(
        n_key_value_heads=2,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
    ),
    "neox_parallel": dict(
        parallel_attn_mlp=True,
        positional_embedding_type="rotary",
        attn_qkv_bias=True,
        attn_out_bias=True,
        mlp_bias=True,
    ),
    "gemma_post_norm_gqa": dict(
        n_key_value_heads=1,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        post_norm=True,
        attn_out_bias=True,
        qk_norm="head",
        gated_mlp=True,
        act_fn="gelu_pytorch_tanh",
    ),
    "olmo2_post_norm_only": dict(
        normalization_type="RMS",
        positional_embedding_type="rotary",
        pre_norm=False,
        post_norm=True,
        qk_norm="full",
        gated_mlp=True,
        act_fn="silu",
    ),
    "attn_only_no_norm": dict(attn_only=True, normalization_type=None),
}


def _model(name: str, seed: int = 0):
    return tiny_model(seed=seed, **ARCHITECTURES[name])


def _prompts(model, n: int = 3, seq: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(model.cfg.d_vocab, (n, seq), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2:5] = torch.randint(model.cfg.d_vocab, (n, 3), generator=gen)
    return clean, corrupted


def _random_sets(graph: Graph, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    single = torch.zeros(4, graph.n_edges, dtype=torch.bool)
    single[torch.arange(4), torch.randint(graph.n_edges, (4,), generator=gen)] = True
    sparse = torch.rand(3, graph.n_edges, generator=gen) < 0.1
    dense = torch.rand(2, graph.n_edges, generator=gen) < 0.6
    return torch.cat((single, sparse, dense, torch.ones(1, graph.n_edges, dtype=torch.bool)))


def _naive(model, graph, base_tokens, source, sets, attention_mask=None):
    out = []
    for row in sets:
        edges = [tuple(graph.edge_names[i].split("->")) for i in row.nonzero().flatten().tolist()]
        out.append(naive_patched_logits(model, base_tokens, source, edges, attention_mask))
    return torch.cat(out)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("direction", ["noising", "denoising"])
def test_patched_logits_match_naive(arch, direction, one_thread):
    model = _model(arch)
    clean, corrupted = _prompts(model)
    graph, base, source, _ = prepare_runs(model, clean, corrupted, direction, "patch")
    sets = _random_sets(graph, seed=len(arch))
    masks = graph.edge_matrix(sets, False)
    fast = patched_logits(model, graph, base, source, masks)
    base_tokens, source_tokens = (clean, corrupted) if direction == "noising" else (corrupted, clean)
    naive = _naive(model, graph, base_tokens, source_outputs(model, source_tokens), sets)
    assert_close(fast, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2_like", "llama_like_gqa", "gemma_post_norm_gqa"])
@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_ablations_match_naive(arch, ablation, one_thread):
    model = _model(arch, seed=3)
    clean, corrupted = _prompts(model, seed=1)
    graph, base, source, _ = prepare_runs(model, clean, corrupted, "noising", ablation)
    sets = _random_sets(graph, seed=2)
    fast = patched_logits(model, graph, base, source, graph.edge_matrix(sets, False))
    naive = _naive(model, graph, clean, source_outputs(model, corrupted, ablation=ablation), sets)
    assert_close(fast, naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2_like", "llama_like_gqa"])
def test_padding_mask(arch, one_thread):
    model = _model(arch, seed=4)
    clean, corrupted = _prompts(model, seed=5)
    mask = torch.ones_like(clean)
    mask[0, :2] = 0  # left padding on the first prompt
    graph, base, source, _ = prepare_runs(model, clean, corrupted, "noising", "patch", attention_mask=mask)
    sets = _random_sets(graph, seed=6)
    fast = patched_logits(model, graph, base, source, graph.edge_matrix(sets, False), attention_mask=mask)
    naive = _naive(model, graph, clean, source_outputs(model, corrupted, mask), sets, mask)
    real = mask.bool().repeat(len(sets), 1)
    assert_close(fast[real], naive[real], atol=1e-5, rtol=1e-5)


def test_no_edges_and_all_edges_are_the_two_runs(one_thread):
    model = _model("llama_like_gqa", seed=7)
    clean, corrupted = _prompts(model, seed=8)
    graph, base, source, _ = prepare_runs(model, clean, corrupted, "noising", "patch")
    sets = torch.stack((torch.zeros(graph.n_edges, dtype=torch.bool), torch.ones(graph.n_edges, dtype=torch.bool)))
    logits = patched_logits(model, graph, base, source, graph.edge_matrix(sets, False)).view(2, *clean.shape, -1)
    with torch.no_grad():
        assert_close(logits[0], model(clean), atol=1e-5, rtol=1e-5)
        assert_close(logits[1], model(corrupted), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch_size", [3, None])
def test_edge_patch_batches_equal_one_set_per_forward(batch_size, one_thread):
    model = _model("gpt2_like", seed=9)
    clean, corrupted = _prompts(model, seed=10)
    graph = Graph.of(model)
    sets = _random_sets(graph, seed=11)
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]  # noqa: E731
    batched = edge_patch(model, clean, corrupted, metric, sets, batch_size=batch_size, per_prompt=True)
    one_by_one = torch.stack(
        [edge_patch(model, clean, corrupted, metric, s[None], batch_size=3, per_prompt=True)[0] for s in sets]
    )
    assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)
    naive = _naive(model, graph, clean, source_outputs(model, corrupted), sets)
    assert_close(batched, metric(naive).view(len(sets), -1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2_like", "gemma_post_norm_gqa"])
def test_node_patch_is_activation_patching(arch, one_thread):
    """Patching every outgoing edge of a head or an MLP is patching its output."""
    from mechscope.circuits import node_patch
    from mechscope.patching import activation_patch

    model = _model(arch, seed=12)
    clean, corrupted = _prompts(model, seed=13)
    metric = lambda logits: logits[:, -1, 3] - logits[:, -1, 5]  # noqa: E731
    heads = [(0, 1), (1, 3), (2, 0)]
    nodes = node_patch(model, clean, corrupted, metric, [[f"a{layer}.h{h}"] for layer, h in heads] + [["m1"]])
    z = activation_patch(model, clean, corrupted, metric, "z", direction="noising", patches=torch.tensor(heads))
    mlp = activation_patch(model, clean, corrupted, metric, "mlp_out", by=(), direction="noising",
                           patches=torch.tensor([[1]]))  # fmt: skip
    assert_close(nodes, torch.cat((z, mlp)), atol=1e-5, rtol=1e-5)
