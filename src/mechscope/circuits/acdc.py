"""ACDC (Conmy et al. 2023): prune edges whose removal costs less than a threshold.

Receivers are visited in reverse topological order (the logits, then each layer's MLP and its
heads' queries, keys and values, from the last layer down). For each receiver its incoming
edges are tried one at a time, latest sender first: an edge is removed (patched from the
source run) when the damage, the increase of the metric over the current circuit (for KL
divergence to the base run, the default) or its decrease (for a task metric, higher is better),
is below ``threshold``; the current circuit then drops it before the next edge is tried.
A receiver whose component no longer writes into the circuit (no outgoing edge left) loses its
incoming edges without a test: patching them cannot change the output.

The greedy order is kept exactly, with the tests batched: each batch holds the current circuit
minus the first ``1, 2, ..., w`` untried edges of the receiver (the guess that every edge goes).
The batch's values are read in order; at the first edge that stays, the rows after it are
dropped and a new batch starts from the edge after it. So a receiver costs one batched forward
plus one per edge kept, and every forward starts at the receiver's layer: the circuit only
differs from the base run from there on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.circuits.activations import Ablation, prepare_runs
from mechscope.circuits.circuit import Circuit
from mechscope.circuits.graph import Graph
from mechscope.circuits.patch import run_edge_sets
from mechscope.errors import InputError
from mechscope.patching.activation import Direction
from mechscope.patching.engine import HookContext, SweepOptions
from mechscope.patching.metrics import KLDivergence, Metric


def reverse_topological_receivers(graph: Graph) -> list[int]:
    """Receiver indices from the logits back to the first layer (MLP before its layer's heads).

    Example:
        >>> [Graph.of(model).receivers[r] for r in reverse_topological_receivers(Graph.of(model))[:3]]
        ['logits', 'm2', 'a2.h0<q>']
    """
    order = [graph.logits_receiver]
    for layer in reversed(range(graph.n_layers)):
        groups = graph.layer_receivers(layer)
        order += list(groups.get("mlp", []))
        order += [*groups["q"], *groups["k"], *groups["v"]]
    return order


def writers(graph: Graph, receiver: int) -> list[int]:
    """The senders whose output depends on ``receiver``'s input: the head of a query, the heads of
    a key-value group, the MLP of an MLP input; none for the logits.

    Example:
        >>> graph = Graph.of(model)
        >>> [graph.senders[s] for s in writers(graph, graph.receiver_index("a1.h2<k>"))]
        ['a1.h2']
    """
    if receiver == graph.logits_receiver:
        return []
    layer = int(graph.receiver_layer[receiver])
    groups, heads = graph.layer_receivers(layer), graph.head_senders(layer)
    if "mlp" in groups and receiver in groups["mlp"]:
        return [graph.mlp_sender(layer)]
    if receiver in groups["q"]:
        return [heads.start + receiver - groups["q"].start]
    group = receiver - (groups["k"].start if receiver in groups["k"] else groups["v"].start)
    size = graph.n_heads // graph.n_kv_heads
    return list(range(heads.start + group * size, heads.start + (group + 1) * size))


@torch.no_grad()
def acdc(
    model,
    clean_tokens,
    corrupted_tokens,
    *,
    threshold: float,
    metric: Metric | None = None,
    lower_is_better: bool | None = None,
    direction: Direction = "noising",
    ablation: Ablation = "patch",
    attention_mask: Tensor | None = None,
    hook_context: HookContext | None = None,
    window: int = 16,
    receivers: Sequence[str] | None = None,
    options: SweepOptions | None = None,
    **sweep,
) -> Circuit:
    """The circuit ACDC keeps at ``threshold`` (see the module docstring); each edge's score is the
    damage measured when it was tried (``NaN`` for edges never tried).

    ``metric``: default the KL divergence of the base run's final-position distribution to the
    circuit's (lower is better); any other metric is taken as higher-is-better unless
    ``lower_is_better=True``. ``window``: the most edges tried per batch (it doubles while every
    tried edge goes and shrinks to what was used when one stays). ``receivers``: prune only the
    incoming edges of these receivers (names, e.g. ``["logits", "m11"]``); every other edge stays.
    Sweep options as in `SweepOptions` (``per_prompt`` does not apply).

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> circuit = acdc(model, clean, corrupted, threshold=0.01)
        >>> circuit.method, circuit.n_edges < circuit.graph.n_edges
        ('acdc', True)
    """
    options = SweepOptions.of(options, sweep)
    if window < 1:
        raise InputError(f"window must be at least 1, got {window}")
    graph, base, source, _ = prepare_runs(
        model, clean_tokens, corrupted_tokens, direction, ablation, attention_mask, hook_context
    )
    if metric is None:
        metric = KLDivergence(base.logits)
        lower_is_better = True if lower_is_better is None else lower_is_better
    elif lower_is_better is None:
        lower_is_better = isinstance(metric, KLDivergence)
    sign = 1.0 if lower_is_better else -1.0
    stats = {"batches": 0, "evaluations": 0}

    def evaluate(sets: Tensor) -> list[float]:
        stats["batches"] += 1
        stats["evaluations"] += len(sets)
        values = run_edge_sets(
            model, graph, base, source, sets, metric, attention_mask=attention_mask, hook_context=hook_context,
            batch_size=options.batch_size, memory_budget=options.memory_budget,
            logit_positions=options.logit_positions,
        )  # fmt: skip
        return values.mean(-1).tolist()

    n_edges = graph.n_edges
    removed = torch.zeros(n_edges, dtype=torch.bool)
    scores = torch.full((n_edges,), float("nan"))
    edge_senders, edge_receivers = graph.edge_pairs.unbind(-1)
    current = evaluate(torch.zeros(1, n_edges, dtype=torch.bool))[0]
    start_value = current
    order = reverse_topological_receivers(graph)
    if receivers is not None:
        chosen = {graph.receiver_index(name) for name in receivers}
        order = [r for r in order if r in chosen]
    for r in tqdm(order, desc="acdc", disable=not options.progress):
        incoming = (edge_receivers == r).nonzero().flatten()
        incoming = incoming[edge_senders[incoming].argsort(descending=True)].tolist()  # latest sender first
        alive = not writers(graph, r) or bool(torch.isin(edge_senders[~removed], torch.tensor(writers(graph, r))).any())
        if not alive:
            removed[incoming] = True
            continue
        while incoming:
            tried = incoming[:window]
            sets = removed.repeat(len(tried), 1)
            for i in range(len(tried)):
                sets[i:, tried[i]] = True  # row i: the first i + 1 tried edges removed
            values = evaluate(sets)
            kept_at = None
            for i, (edge, value) in enumerate(zip(tried, values, strict=True)):
                damage = sign * (value - current)
                scores[edge] = damage
                if damage < threshold:
                    removed[edge] = True
                    current = value
                else:
                    kept_at = i
                    break
            if kept_at is None:
                incoming = incoming[len(tried) :]
                window = min(2 * window, 1024) if len(tried) == window else window
            else:
                incoming = incoming[kept_at + 1 :]
                window = max(1, kept_at + 1)
    settings = {
        "threshold": threshold, "metric": type(metric).__name__, "lower_is_better": lower_is_better,
        "direction": direction, "ablation": ablation, "metric_full": start_value, "metric_circuit": current, **stats,
    }  # fmt: skip
    return Circuit(graph, ~removed, scores, "acdc", settings)
