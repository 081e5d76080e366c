"""The computational graph of a hooked transformer: senders, receivers and the edges between them.

Every component writes into the residual stream and every component reads from it, so a model
is a graph whose edges run from each *sender* to each later *receiver*:

* senders write: the token embedding (``input``), the position embedding (``pos``, on models
  with learned positions), every attention head's output (``a{l}.h{h}``, the head's ``z W_O``
  without the output bias) and every MLP's output (``m{l}``);
* receivers read: every head's query input (``a{l}.h{h}<q>``), every key-value head's key and
  value input (``a{l}.h{g}<k>`` / ``<v>``; ``a{l}.kv{g}<k>`` on grouped-query models, where a
  key-value head serves a group of query heads and is never ungrouped), every MLP's input
  (``m{l}``) and the logits (``logits``, the residual stream entering the final norm).

An edge ``s -> r`` exists when ``s`` writes before ``r`` reads: heads of layer ``l`` read what
every earlier layer wrote; an MLP also reads its own layer's heads, except in parallel blocks
(GPT-J, GPT-NeoX), where attention and MLP both read the block's input. Biases are constants of
the model, in every run, and belong to no sender. With post-norms (Gemma 2/3, OLMo-2) the heads
of a layer join the residual stream through the layer's attention post-norm together; edge
patching and attribution apply that norm (see `mechscope.circuits.patch`).

Example:
    >>> graph = Graph.of(model)
    >>> graph.n_senders, graph.n_receivers, graph.n_edges
    (17, 40, 302)
    >>> graph.edge_names[:2]
    ['input->a0.h0<q>', 'input->a0.h1<q>']
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.names import closest_names

ReceiverInput = Literal["q", "k", "v", "mlp", "logits"]


@dataclass(frozen=True)
class Graph:
    """Senders, receivers and edges of a model with this layout (see the module docstring).

    Senders are ordered ``input, (pos), a0.h0 ... a0.h{H-1}, m0, a1.h0, ...``; receivers
    ``a0.h0<q> ... a0.h{H-1}<q>, a0 keys, a0 values, m0, a1 ..., logits``. Edges are numbered
    sender-major over the valid ``[sender, receiver]`` pairs (`edge_pairs`).

    Example:
        >>> graph = Graph.of(model)
        >>> graph.sender_index("a1.h2"), graph.receiver_index("m2"), graph.edge_index("a1.h2->m2")
        (9, 38, 262)
    """

    n_layers: int
    n_heads: int
    n_kv_heads: int
    learned_pos: bool = False
    attn_only: bool = False
    parallel: bool = False
    post_norm: bool = False
    model_name: str = "custom"

    @classmethod
    def of(cls, model) -> Graph:
        """The graph of ``model`` (read from its config).

        Example:
            >>> Graph.of(model).senders[:3]
            ['input', 'pos', 'a0.h0']
        """
        cfg = model.cfg
        return cls(
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            n_kv_heads=cfg.n_key_value_heads,
            learned_pos=cfg.positional_embedding_type == "standard",
            attn_only=cfg.attn_only,
            parallel=cfg.parallel_attn_mlp,
            post_norm=cfg.post_norm,
            model_name=cfg.model_name,
        )

    def to_dict(self) -> dict:
        """The layout as JSON-ready data; `from_dict` inverts it."""
        keys = ("n_layers", "n_heads", "n_kv_heads", "learned_pos", "attn_only", "parallel", "post_norm", "model_name")
        return {key: getattr(self, key) for key in keys}

    @classmethod
    def from_dict(cls, data: dict) -> Graph:
        """The graph of a layout saved by `to_dict`.

        Example:
            >>> graph = Graph.of(model)
            >>> Graph.from_dict(graph.to_dict()) == graph
            True
        """
        return cls(**data)

    # ------------------------------------------------------------------ layout
    @property
    def n_embed(self) -> int:
        """Embedding senders: the token embedding, and the position embedding when learned."""
        return 2 if self.learned_pos else 1

    @property
    def senders_per_layer(self) -> int:
        """Senders of each layer: its heads, and its MLP unless the model is attention-only."""
        return self.n_heads + (0 if self.attn_only else 1)

    @property
    def receivers_per_layer(self) -> int:
        """Receivers of each layer: a query input per head, a key and a value input per key-value
        head, and the MLP's input unless the model is attention-only."""
        return self.n_heads + 2 * self.n_kv_heads + (0 if self.attn_only else 1)

    @property
    def n_senders(self) -> int:
        """All senders: the embeddings and every layer's heads and MLP."""
        return self.n_embed + self.n_layers * self.senders_per_layer

    @property
    def n_receivers(self) -> int:
        """All receivers: every layer's inputs, and the logits."""
        return self.n_layers * self.receivers_per_layer + 1

    def head_senders(self, layer: int) -> range:
        """Sender indices of the heads of ``layer``.

        Example:
            >>> list(Graph.of(model).head_senders(1))
            [7, 8, 9, 10]
        """
        start = self.n_embed + layer * self.senders_per_layer
        return range(start, start + self.n_heads)

    def mlp_sender(self, layer: int) -> int:
        """The sender index of the MLP of ``layer`` (it follows the layer's heads).

        Raises:
            InputError: the model is attention-only.

        Example:
            >>> Graph.of(model).mlp_sender(1)
            11
        """
        if self.attn_only:
            raise InputError("this model is attention-only: it has no MLP senders")
        return self.head_senders(layer).stop

    def layer_receivers(self, layer: int) -> dict[str, range]:
        """Receiver indices of ``layer`` by input: ``q`` (one per head), ``k`` and ``v`` (one per
        key-value head), ``mlp``.

        Example:
            >>> {k: list(v) for k, v in Graph.of(model).layer_receivers(0).items()}
            {'q': [0, 1, 2, 3], 'k': [4, 5, 6, 7], 'v': [8, 9, 10, 11], 'mlp': [12]}
        """
        start = layer * self.receivers_per_layer
        h, kv = self.n_heads, self.n_kv_heads
        out = {
            "q": range(start, start + h),
            "k": range(start + h, start + h + kv),
            "v": range(start + h + kv, start + h + 2 * kv),
        }
        if not self.attn_only:
            out["mlp"] = range(start + h + 2 * kv, start + h + 2 * kv + 1)
        return out

    @property
    def logits_receiver(self) -> int:
        """The receiver index of the logits (the last receiver)."""
        return self.n_receivers - 1

    @cached_property
    def senders(self) -> list[str]:
        """Sender names in index order."""
        names = ["input"] + (["pos"] if self.learned_pos else [])
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}" for h in range(self.n_heads)]
            names += [] if self.attn_only else [f"m{layer}"]
        return names

    @cached_property
    def receivers(self) -> list[str]:
        """Receiver names in index order."""
        kv = "h" if self.n_kv_heads == self.n_heads else "kv"
        names = []
        for layer in range(self.n_layers):
            names += [f"a{layer}.h{h}<q>" for h in range(self.n_heads)]
            names += [f"a{layer}.{kv}{g}<k>" for g in range(self.n_kv_heads)]
            names += [f"a{layer}.{kv}{g}<v>" for g in range(self.n_kv_heads)]
            names += [] if self.attn_only else [f"m{layer}"]
        return names + ["logits"]

    @cached_property
    def sender_layer(self) -> Int[Tensor, " sender"]:
        """The layer of each sender (``-1`` for the embeddings)."""
        layers = [-1] * self.n_embed
        for layer in range(self.n_layers):
            layers += [layer] * self.senders_per_layer
        return torch.tensor(layers)

    @cached_property
    def receiver_layer(self) -> Int[Tensor, " receiver"]:
        """The layer of each receiver (``n_layers`` for the logits)."""
        layers = [layer for layer in range(self.n_layers) for _ in range(self.receivers_per_layer)]
        return torch.tensor(layers + [self.n_layers])

    @cached_property
    def valid(self) -> Bool[Tensor, "sender receiver"]:
        """``valid[s, r]``: whether sender ``s`` writes before receiver ``r`` reads."""
        # Stages: embeddings 0, attention of layer l 2l + 1, MLP of layer l 2l + 2.
        stage = [0] * self.n_embed
        for layer in range(self.n_layers):
            stage += [2 * layer + 1] * self.n_heads + ([] if self.attn_only else [2 * layer + 2])
        reads = []  # receivers read every stage before this one
        mlp_reads = 1 if self.parallel else 2
        for layer in range(self.n_layers):
            reads += [2 * layer + 1] * (self.n_heads + 2 * self.n_kv_heads)
            reads += [] if self.attn_only else [2 * layer + mlp_reads]
        reads.append(2 * self.n_layers + 1)
        return torch.tensor(stage)[:, None] < torch.tensor(reads)[None, :]

    @cached_property
    def edge_pairs(self) -> Int[Tensor, "edge 2"]:
        """``(sender, receiver)`` of every edge, in edge order (sender-major)."""
        return self.valid.nonzero()

    @property
    def n_edges(self) -> int:
        """All edges of the graph (the valid ``[sender, receiver]`` pairs)."""
        return int(self.edge_pairs.shape[0])

    @cached_property
    def edge_names(self) -> list[str]:
        """``"sender->receiver"`` of every edge, in edge order."""
        return [f"{self.senders[s]}->{self.receivers[r]}" for s, r in self.edge_pairs.tolist()]

    @cached_property
    def _edge_ids(self) -> Tensor:
        ids = torch.full(self.valid.shape, -1, dtype=torch.long)
        ids[self.valid] = torch.arange(self.n_edges)
        return ids

    # ------------------------------------------------------------------ look-ups
    def sender_index(self, name: str) -> int:
        """The index of the sender ``name`` (``"input"``, ``"pos"``, ``"a{l}.h{h}"``, ``"m{l}"``).

        Raises:
            InputError: no sender has this name (the message names the closest ones).
        """
        return _index(name, self.senders, "sender")

    def receiver_index(self, name: str) -> int:
        """The index of the receiver ``name`` (``"a{l}.h{h}<q>"``, ``"a{l}.h{g}<k>"``, ``"m{l}"``,
        ``"logits"``, ...).

        Raises:
            InputError: no receiver has this name (the message names the closest ones).
        """
        return _index(name, self.receivers, "receiver")

    def edge_index(self, edge: str | tuple[str, str]) -> int:
        """The index of an edge given as ``"sender->receiver"`` or ``(sender, receiver)``.

        Example:
            >>> Graph.of(model).edge_index(("input", "logits"))
            39
        """
        sender, receiver = edge.split("->") if isinstance(edge, str) else edge
        s, r = self.sender_index(sender), self.receiver_index(receiver)
        index = int(self._edge_ids[s, r])
        if index < 0:
            raise InputError(f"no edge {sender}->{receiver}: {receiver} reads before {sender} writes")
        return index

    def edge_matrix(self, values: Tensor, fill: float | bool = 0) -> Tensor:
        """Per-edge ``values [..., edge]`` laid out as ``[..., sender, receiver]`` (``fill`` elsewhere).

        Example:
            >>> graph = Graph.of(model)
            >>> graph.edge_matrix(torch.ones(graph.n_edges, dtype=torch.bool), False).equal(graph.valid)
            True
        """
        if values.shape[-1] != self.n_edges:
            raise InputError(f"expected {self.n_edges} edge values on the last axis, got {tuple(values.shape)}")
        out = torch.full((*values.shape[:-1], self.n_senders, self.n_receivers), fill, dtype=values.dtype)
        out = out.to(values.device)
        s, r = self.edge_pairs.to(values.device).unbind(-1)
        out[..., s, r] = values
        return out

    def edge_values(self, matrix: Tensor) -> Tensor:
        """The inverse of `edge_matrix`: ``[..., sender, receiver]`` to ``[..., edge]``."""
        s, r = self.edge_pairs.to(matrix.device).unbind(-1)
        return matrix[..., s, r]

    def edge_mask(self, edges: Iterable[str | tuple[str, str] | int] | Tensor) -> Bool[Tensor, " edge"]:
        """A boolean mask over edges from names, ``(sender, receiver)`` pairs or indices (a mask passes through).

        Example:
            >>> Graph.of(model).edge_mask(["input->logits", 0]).nonzero().flatten().tolist()
            [0, 39]
        """
        if isinstance(edges, Tensor):
            if edges.dtype == torch.bool:
                if edges.shape != (self.n_edges,):
                    raise InputError(f"an edge mask must have shape [{self.n_edges}], got {tuple(edges.shape)}")
                return edges.cpu()
            edges = edges.tolist()
        mask = torch.zeros(self.n_edges, dtype=torch.bool)
        for edge in edges:
            if isinstance(edge, int):
                if not 0 <= edge < self.n_edges:
                    raise InputError(f"edge index {edge} is out of range for {self.n_edges} edges")
                mask[edge] = True
            else:
                mask[self.edge_index(edge)] = True
        return mask

    def edge_sets(self, sets: Sequence | Tensor) -> Bool[Tensor, "n_sets edge"]:
        """Masks ``[n_sets, edge]`` from a mask tensor or a list of edge collections (see `edge_mask`)."""
        if isinstance(sets, Tensor) and sets.dtype == torch.bool:
            if sets.dim() != 2 or sets.shape[1] != self.n_edges:
                raise InputError(f"edge-set masks must be [n_sets, {self.n_edges}], got {tuple(sets.shape)}")
            return sets.cpu()
        if not len(sets):
            raise InputError("no edge sets given: pass a list of edge collections or a [n_sets, n_edges] mask")
        return torch.stack([self.edge_mask(s) for s in sets])

    def outgoing(self, senders: Iterable[str | int]) -> Bool[Tensor, " edge"]:
        """Every edge leaving the given senders (a node-level set of edges).

        Example:
            >>> int(Graph.of(model).outgoing(["a2.h0"]).sum())  # the MLP of layer 2 and the logits
            2
        """
        rows = [s if isinstance(s, int) else self.sender_index(s) for s in senders]
        chosen = torch.zeros(self.n_senders, dtype=torch.bool)
        chosen[rows] = True
        return chosen[self.edge_pairs[:, 0]]

    def counts(self) -> dict[str, int]:
        """Senders, receivers and edges; heads and MLPs as nodes.

        Example:
            >>> Graph.of(model).counts()["edges"]
            302
        """
        return {
            "senders": self.n_senders,
            "receivers": self.n_receivers,
            "edges": self.n_edges,
            "heads": self.n_layers * self.n_heads,
            "mlps": 0 if self.attn_only else self.n_layers,
        }


def _index(name: str, names: list[str], what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        close = closest_names(name, names)
        hint = f"closest: {close}" if close else f"e.g. {names[:4]}"
        raise InputError(f"unknown {what} {name!r}; {hint}") from None
