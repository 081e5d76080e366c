"""Faithfulness and completeness of a scored circuit, for several sizes, in one batched sweep.

For each size ``k`` the circuit's ``k`` best edges (by ``|score|``) are kept:

* faithfulness: the model restricted to them (every other edge ablated);
* completeness: the model with them removed (only they are ablated).

Each value is the metric normalised between the model with every edge ablated (0) and the full
model (1): ``(m - m_ablated) / (m_full - m_ablated)``, means over prompts. A faithful circuit
scores near 1; a complete one leaves its complement near 0. Every size, both variants and the
two references are edge sets of one `run_edge_sets` sweep.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from mechscope.circuits.activations import Ablation, prepare_runs
from mechscope.circuits.circuit import Circuit
from mechscope.circuits.patch import run_edge_sets
from mechscope.errors import InputError
from mechscope.patching.activation import Direction
from mechscope.patching.engine import HookContext, SweepOptions
from mechscope.patching.metrics import Metric

DEFAULT_SIZES = (50, 100, 200, 500)


@dataclass
class FaithfulnessCurve:
    """Normalised metric against the number of edges kept (see the module docstring).

    ``sizes`` are the edge counts evaluated (clipped to the circuit's size); ``full`` and
    ``ablated`` the raw metric of the full model and of the model with every edge ablated.

    Example:
        >>> from mechscope.circuits import attribute
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 7] - logits[:, -1, 8]
        >>> curve = faithfulness_curve(model, attribute(model, clean, corrupted, metric), clean, corrupted, metric,
        ...                            sizes=[10, 302])
        >>> curve.sizes, curve.faithfulness[-1], curve.completeness[-1]  # all 302 edges: the full model
        ([10, 302], 1.0, 0.0)
        >>> sorted(curve.to_dict())[:3]
        ['ablated', 'ablation', 'completeness']
    """

    sizes: list[int]
    faithfulness: list[float]
    completeness: list[float]
    full: float
    ablated: float
    method: str
    ablation: str

    def to_dict(self) -> dict:
        """The curve as plain values (what ``faithfulness.json`` holds)."""
        return asdict(self)

    def figure(self, title: str | None = None):
        """A plotly line chart of both curves (save it with `mechscope.viz.save_png`)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        fig.add_trace(go.Scatter(x=self.sizes, y=self.faithfulness, mode="lines+markers", name="circuit only"))
        fig.add_trace(go.Scatter(x=self.sizes, y=self.completeness, mode="lines+markers", name="circuit removed"))
        fig.update_layout(
            title=title or f"{self.method}: normalised metric against edges kept ({self.ablation} ablation)",
            xaxis_title="edges in the circuit",
            yaxis_title="normalised metric (full model = 1, all ablated = 0)",
        )
        return fig


def faithfulness_curve(
    model,
    circuit: Circuit,
    clean_tokens,
    corrupted_tokens,
    metric: Metric,
    *,
    sizes: Sequence[int] = DEFAULT_SIZES,
    ablation: Ablation = "patch",
    attention_mask: Tensor | None = None,
    hook_context: HookContext | None = None,
    options: SweepOptions | None = None,
    **sweep,
) -> FaithfulnessCurve:
    """Faithfulness and completeness of ``circuit``'s best ``sizes`` edges.

    Example:
        >>> from mechscope.circuits import Graph, edge_scores
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> metric = lambda x: x[:, -1, 7] - x[:, -1, 8]
        >>> circuit = Circuit.from_scores(Graph.of(model), edge_scores(model, clean, corrupted, metric), "eap")
        >>> curve = faithfulness_curve(model, circuit, clean, corrupted, metric, sizes=[10, 302])
        >>> curve.sizes, round(curve.faithfulness[-1], 4), round(curve.completeness[-1], 4)
        ([10, 302], 1.0, 0.0)
    """
    options = SweepOptions.of(options, sweep)
    circuit.check_model(model)
    if not sizes or any(int(k) < 0 for k in sizes):
        raise InputError(f"sizes must be a non-empty list of non-negative edge counts, got {list(sizes)}")
    graph, base, source, _ = prepare_runs(
        model, clean_tokens, corrupted_tokens, "noising", ablation, attention_mask, hook_context
    )
    sizes = [min(int(k), circuit.n_edges) for k in sizes]
    kept = torch.stack([circuit.top(k).edges for k in sizes])  # [n_sizes, edge]
    everything = torch.ones(1, graph.n_edges, dtype=torch.bool)
    sets = torch.cat((torch.zeros_like(everything), everything, ~kept, kept))
    values = run_edge_sets(
        model, graph, base, source, sets, metric, attention_mask=attention_mask, hook_context=hook_context,
        batch_size=options.batch_size, memory_budget=options.memory_budget,
        logit_positions=options.logit_positions, progress=options.progress, desc="faithfulness",
    ).mean(-1).cpu()  # fmt: skip
    full, ablated = float(values[0]), float(values[1])
    if abs(full - ablated) < 1e-12:
        raise InputError("the full and the fully ablated model give the same metric; the curve cannot be normalised")
    normalised = ((values[2:] - ablated) / (full - ablated)).tolist()
    n = len(sizes)
    return FaithfulnessCurve(sizes, normalised[:n], normalised[n:], full, ablated, circuit.method, ablation)


def verify_edges(
    model,
    circuit: Circuit,
    clean_tokens,
    corrupted_tokens,
    metric: Metric,
    *,
    top: int = 20,
    direction: Direction = "noising",
    ablation: Ablation = "patch",
    attention_mask: Tensor | None = None,
    hook_context: HookContext | None = None,
    options: SweepOptions | None = None,
    **sweep,
) -> dict:
    """Exact effects of patching each of the ``top`` best-scored edges alone (one batched sweep):
    ``{"edges": names, "scores": the circuit's scores, "effects": metric(patched) - metric(base)}``,
    means over prompts.

    Example:
        >>> from mechscope.circuits import Graph, attribute
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> metric = lambda x: x[:, -1, 7] - x[:, -1, 8]
        >>> checked = verify_edges(model, attribute(model, clean, corrupted, metric), clean, corrupted, metric, top=3)
        >>> len(checked["edges"]), len(checked["effects"])
        (3, 3)
    """
    options = SweepOptions.of(options, sweep)
    circuit.check_model(model)
    graph, base, source, _ = prepare_runs(
        model, clean_tokens, corrupted_tokens, direction, ablation, attention_mask, hook_context
    )
    chosen = circuit.top(top).edges.nonzero().flatten()
    chosen = chosen[circuit.scores[chosen].abs().nan_to_num(-1.0).argsort(descending=True)]
    sets = torch.zeros(len(chosen) + 1, graph.n_edges, dtype=torch.bool)
    sets[torch.arange(1, len(chosen) + 1), chosen] = True
    values = run_edge_sets(
        model, graph, base, source, sets, metric, attention_mask=attention_mask, hook_context=hook_context,
        batch_size=options.batch_size, memory_budget=options.memory_budget,
        logit_positions=options.logit_positions, progress=options.progress, desc="verifying",
    ).mean(-1).cpu()  # fmt: skip
    return {
        "edges": [graph.edge_names[i] for i in chosen.tolist()],
        "scores": circuit.scores[chosen].tolist(),
        "effects": (values[1:] - values[0]).tolist(),
    }
