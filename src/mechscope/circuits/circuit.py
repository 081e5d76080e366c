"""`Circuit`: a set of edges of a model's graph, with scores, the method that found it and its settings.

A circuit saves to JSON and loads back (`save`/`load`; schema below), selects its best edges
(`top`), and runs: `Circuit.run` is the model restricted to the circuit, every other edge
ablated (patched from a corrupted run, mean- or zero-ablated) through the batched edge-patching
engine.

JSON schema (``"schema": "mechscope.circuit/1"``)::

    {
      "schema": "mechscope.circuit/1",
      "model": "smollm2-135m",                # the model's name
      "method": "eap-ig-inputs",              # what found or scored it
      "settings": {...},                      # the method's settings (task, direction, steps, ...)
      "graph": {"n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "learned_pos": false,
                "attn_only": false, "parallel": false, "post_norm": false, "model_name": "..."},
      "n_graph_edges": 70651,                 # edges of the full graph
      "edges": [{"sender": "a9.h3", "receiver": "logits", "score": 0.53}, ...],  # in the circuit
      "scores": [0.01, null, ...]             # every graph edge's score in graph order (null: none)
    }
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.circuits.activations import Ablation, prepare_runs
from mechscope.circuits.graph import Graph
from mechscope.circuits.patch import patched_logits
from mechscope.errors import InputError

SCHEMA = "mechscope.circuit/1"


@dataclass
class Circuit:
    """Edges of ``graph`` (``edges``, a mask in graph edge order) with per-edge ``scores``
    (``NaN`` where a method gave none), the ``method`` and its ``settings``.

    Example:
        >>> graph = Graph.of(model)
        >>> scores = torch.linspace(-1, 1, graph.n_edges)
        >>> circuit = Circuit.from_scores(graph, scores, "demo").top(3)
        >>> circuit.n_edges, circuit.edge_names[0]
        (3, 'input->a0.h0<q>')
    """

    graph: Graph
    edges: Bool[Tensor, " edge"]
    scores: Float[Tensor, " edge"]
    method: str = "manual"
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.graph.n_edges
        if self.edges.shape != (n,) or self.scores.shape != (n,):
            raise InputError(
                f"a circuit of this graph needs edges and scores of shape [{n}], got "
                f"{tuple(self.edges.shape)} and {tuple(self.scores.shape)}"
            )
        self.edges = self.edges.bool().cpu()
        self.scores = self.scores.float().cpu()

    @classmethod
    def from_scores(cls, graph: Graph, scores: Tensor, method: str, settings: dict | None = None) -> Circuit:
        """Every edge of the graph, with ``scores`` (choose a circuit with `top`)."""
        return cls(graph, torch.ones(graph.n_edges, dtype=torch.bool), scores, method, dict(settings or {}))

    @classmethod
    def from_edges(cls, graph: Graph, edges, method: str = "manual", settings: dict | None = None) -> Circuit:
        """A circuit of the given edges (names, pairs, indices or a mask; see `Graph.edge_mask`).

        Example:
            >>> Circuit.from_edges(Graph.of(model), ["a0.h1->logits", "input->a0.h1<q>"]).n_edges
            2
        """
        mask = graph.edge_mask(edges)
        return cls(graph, mask, torch.full((graph.n_edges,), math.nan), method, dict(settings or {}))

    # ------------------------------------------------------------------ views
    @property
    def n_edges(self) -> int:
        """The number of edges in the circuit (not in the whole graph: see `Graph.n_edges`)."""
        return int(self.edges.sum())

    @property
    def edge_names(self) -> list[str]:
        """``"sender->receiver"`` of the circuit's edges, in graph order."""
        return [self.graph.edge_names[i] for i in self.edges.nonzero().flatten().tolist()]

    @property
    def model_name(self) -> str:
        """The name of the model whose graph this is."""
        return self.graph.model_name

    def ranking(self) -> Tensor:
        """Edge indices by decreasing ``|score|`` (unscored edges last)."""
        key = self.scores.abs().nan_to_num(-1.0)
        return key.argsort(descending=True, stable=True)

    def top(self, n: int) -> Circuit:
        """The ``n`` edges of this circuit with the largest ``|score|``.

        Example:
            >>> graph = Graph.of(model)
            >>> Circuit.from_scores(graph, torch.arange(graph.n_edges).float(), "demo").top(2).edge_names
            ['a2.h3->logits', 'm2->logits']
        """
        if n < 0:
            raise InputError(f"n must be non-negative, got {n}")
        order = [i for i in self.ranking().tolist() if self.edges[i]][:n]
        mask = torch.zeros_like(self.edges)
        mask[order] = True
        return replace(self, edges=mask, settings={**self.settings, "top": n})

    def nodes(self) -> list[str]:
        """The components the circuit's edges touch: senders, and the heads, key-value heads, MLPs
        and logits they write into, in graph order.

        Example:
            >>> Circuit.from_edges(Graph.of(model), ["a0.h1->m1", "m1->logits"]).nodes()
            ['a0.h1', 'm1', 'logits']
        """
        names = set()
        for name in self.edge_names:
            sender, receiver = name.split("->")
            names |= {sender, receiver.split("<")[0]}
        senders = self.graph.senders

        def key(name: str) -> tuple[int, int]:
            if name in senders:
                return senders.index(name), 0
            if name == "logits":
                return len(senders), 0
            layer, group = name[1:].split(".kv")  # a key-value head of a grouped-query model
            return self.graph.head_senders(int(layer)).start + int(group), 1

        return sorted(names, key=key)

    def node_scores(self) -> dict[str, float]:
        """Node-level scores: each sender's scores summed over its outgoing edges in the circuit.
        For EAP this is the node's own attribution score (its difference times the gradient
        of everything that reads it).

        Example:
            >>> graph = Graph.of(model)
            >>> Circuit.from_scores(graph, torch.ones(graph.n_edges), "demo").node_scores()["a2.h0"]
            2.0
        """
        scores = self.scores.nan_to_num(0.0) * self.edges
        totals = torch.zeros(self.graph.n_senders).index_add_(0, self.graph.edge_pairs[:, 0], scores)
        return dict(zip(self.graph.senders, totals.tolist(), strict=True))

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        """The circuit as JSON-ready data in the module's schema (``NaN`` scores become ``None``);
        `from_dict` inverts it."""
        scores = [None if math.isnan(s) else s for s in self.scores.tolist()]
        edges = []
        for i in self.edges.nonzero().flatten().tolist():
            sender, receiver = self.graph.edge_names[i].split("->")
            edges.append({"sender": sender, "receiver": receiver, "score": scores[i]})
        return {
            "schema": SCHEMA,
            "model": self.graph.model_name,
            "method": self.method,
            "settings": self.settings,
            "graph": self.graph.to_dict(),
            "n_graph_edges": self.graph.n_edges,
            "edges": edges,
            "scores": scores,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Circuit:
        """The circuit of data in the module's schema (`to_dict`). Without ``"scores"``, the scores
        are read from the edges (``NaN`` elsewhere).

        Raises:
            InputError: the schema is not ``mechscope.circuit/1``, the edge count does not match the
                graph layout, or an edge does not exist in the graph.

        Example:
            >>> circuit = Circuit.from_edges(Graph.of(model), ["a0.h1->logits"])
            >>> Circuit.from_dict(circuit.to_dict()).edge_names
            ['a0.h1->logits']
        """
        if data.get("schema") != SCHEMA:
            raise InputError(f"not a circuit file: schema {data.get('schema')!r}, expected {SCHEMA!r}")
        graph = Graph.from_dict(data["graph"])
        if data.get("n_graph_edges", graph.n_edges) != graph.n_edges:
            raise InputError(f"the file's graph has {data['n_graph_edges']} edges, this layout {graph.n_edges}")
        mask = graph.edge_mask([(e["sender"], e["receiver"]) for e in data["edges"]])
        raw = data.get("scores")
        if raw is None:
            scores = torch.full((graph.n_edges,), math.nan)
            for e in data["edges"]:
                scores[graph.edge_index((e["sender"], e["receiver"]))] = math.nan if e["score"] is None else e["score"]
        else:
            scores = torch.tensor([math.nan if s is None else s for s in raw], dtype=torch.float)
        return cls(graph, mask, scores, data.get("method", "manual"), data.get("settings", {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the circuit as JSON (schema in the module docstring).

        Example:
            >>> import tempfile, pathlib
            >>> circuit = Circuit.from_edges(Graph.of(model), ["a0.h1->logits"])
            >>> path = circuit.save(pathlib.Path(tempfile.mkdtemp()) / "circuit.json")
            >>> Circuit.load(path).edge_names
            ['a0.h1->logits']
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict()))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Circuit:
        """A circuit read from a JSON file written by `save` (see `from_dict`)."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    # ------------------------------------------------------------------ running
    def check_model(self, model) -> None:
        """Raise unless ``model`` has this circuit's graph layout."""
        graph = Graph.of(model)
        if graph.to_dict() | {"model_name": ""} != self.graph.to_dict() | {"model_name": ""}:
            raise InputError(
                f"this circuit belongs to a model laid out as {self.graph.to_dict()}, not {graph.to_dict()}"
            )

    @torch.no_grad()
    def run(
        self,
        model,
        tokens,
        corrupted_tokens=None,
        *,
        ablation: Ablation = "patch",
        attention_mask: Tensor | None = None,
    ) -> Float[Tensor, "batch pos d_vocab"]:
        """Logits of ``model`` restricted to this circuit: every edge outside it carries the
        corrupted run's contribution (``ablation="patch"``, needs ``corrupted_tokens``), its mean
        over prompts (``"mean"``: of ``corrupted_tokens`` if given, else of ``tokens``) or zero.

        Example:
            >>> circuit = Circuit.from_edges(Graph.of(model), ["input->logits", "pos->logits"])
            >>> logits = circuit.run(model, tokens, ablation="zero")
            >>> embed = model.embed(tokens) + model.pos_embed(torch.arange(4)[None])
            >>> torch.allclose(logits, model(embed, start_at_layer=3), atol=1e-5)  # only the embeddings count
            True
        """
        self.check_model(model)
        graph, base, source, _ = prepare_runs(model, tokens, corrupted_tokens, "noising", ablation, attention_mask)
        masks = graph.edge_matrix((~self.edges)[None], False)
        return patched_logits(model, graph, base, source, masks, attention_mask=attention_mask)
