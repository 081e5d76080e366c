"""A reference ACDC for benchmarks/circuits.py: the same greedy rules as `mechscope.circuits.acdc`,
one edge per forward, every forward a full run of the model from its tokens with plain hooks
(as the original ACDC code runs it). Pre-norm models only (the heads' outputs add up linearly).

Each forward keeps every sender's output as the forward writes it and, at each receiver with a
patched incoming edge, subtracts ``sum over patched senders of (output - source output)``.
"""

from __future__ import annotations

import time

import torch

from mechscope.circuits import Graph
from mechscope.circuits.acdc import reverse_topological_receivers, writers
from mechscope.patching.metrics import KLDivergence


def store(buffer: torch.Tensor, start: int, stop: int):
    """A hook copying its activation into ``buffer[:, :, start:stop]``."""

    def hook(x, *, hook) -> None:
        buffer[:, :, start:stop] = x if x.dim() == 4 else x[:, :, None]

    return hook


def store_hooks(graph: Graph, buffer: torch.Tensor) -> list:
    hooks = [("hook_embed", store(buffer, 0, 1))]
    for layer in range(graph.n_layers):
        heads, mlp = graph.head_senders(layer), graph.mlp_sender(layer)
        hooks.append((f"blocks.{layer}.attn.hook_result", store(buffer, heads.start, heads.stop)))
        hooks.append((f"blocks.{layer}.hook_mlp_out", store(buffer, mlp, mlp + 1)))
    return hooks


def sender_outputs(model, graph: Graph, tokens: torch.Tensor) -> torch.Tensor:
    """``[n, pos, sender, d_model]`` of a plain run."""
    n, seq = tokens.shape
    out = torch.zeros(n, seq, graph.n_senders, model.cfg.d_model)
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=store_hooks(graph, out))
    return out


@torch.no_grad()
def patched_forward(model, graph: Graph, tokens, source: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
    """Logits of one full forward with the edges ``patched [sender, receiver]`` carrying ``source``."""
    n, seq = tokens.shape
    current = torch.zeros_like(source)
    mask = patched.to(source.dtype)
    hooks = store_hooks(graph, current)

    def receive(receivers: range, limit: int, per_head: bool):
        def hook(x, *, hook):
            diff = (current - source)[:, :, :limit]
            corr = torch.einsum("npsd,sr->nprd", diff, mask[:limit, receivers.start : receivers.stop])
            return x - (corr if per_head else corr[:, :, 0])

        return hook

    for layer in range(graph.n_layers):
        groups, heads, mlp = graph.layer_receivers(layer), graph.head_senders(layer), graph.mlp_sender(layer)
        for which in ("q", "k", "v"):
            if bool(patched[:, groups[which].start : groups[which].stop].any()):
                hooks.append((f"blocks.{layer}.hook_{which}_input", receive(groups[which], heads.start, True)))
        if bool(patched[:, groups["mlp"].start].any()):
            limit = heads.start if graph.parallel else mlp
            hooks.append((f"blocks.{layer}.hook_mlp_in", receive(groups["mlp"], limit, False)))
    logits_receiver = range(graph.logits_receiver, graph.logits_receiver + 1)
    hooks.append((f"blocks.{graph.n_layers - 1}.hook_resid_post", receive(logits_receiver, graph.n_senders, False)))
    return model.run_with_hooks(tokens, fwd_hooks=hooks)


@torch.no_grad()
def reference_acdc(model, clean, corrupted, threshold: float, receivers: list[str] | None = None) -> dict:
    """Greedy ACDC with KL divergence to the clean run, one edge per full forward."""
    graph = Graph.of(model)
    if graph.post_norm or graph.attn_only or graph.learned_pos:
        raise ValueError("the reference handles pre-norm models with MLPs and rotary positions (as SmolLM2)")
    source = sender_outputs(model, graph, corrupted)
    clean_logits = model(clean)
    metric = KLDivergence(clean_logits)
    patched = torch.zeros(graph.n_senders, graph.n_receivers, dtype=torch.bool)
    current, forwards, start = 0.0, 0, time.perf_counter()
    order = reverse_topological_receivers(graph)
    if receivers is not None:
        chosen = {graph.receiver_index(r) for r in receivers}
        order = [r for r in order if r in chosen]
    for r in order:
        upstream = graph.valid[:, r].nonzero().flatten().flip(0).tolist()  # latest sender first
        heads = writers(graph, r)
        if heads and not bool((graph.valid & ~patched)[heads].any()):
            patched[upstream, r] = True
            continue
        for s in upstream:
            patched[s, r] = True
            value = float(metric(patched_forward(model, graph, clean, source, patched)).mean())
            forwards += 1
            if value - current < threshold:
                current = value
            else:
                patched[s, r] = False
    kept = graph.valid & ~patched
    return {
        "edges": sorted(graph.edge_names[i] for i in graph.edge_values(kept).nonzero().flatten().tolist()),
        "forwards": forwards,
        "seconds": time.perf_counter() - start,
        "metric": current,
    }
