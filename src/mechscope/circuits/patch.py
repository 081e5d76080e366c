"""Edge patching: run the model with chosen edges carrying another run's contribution.

Patching the edge ``s -> r`` changes what receiver ``r`` reads and nothing else: its input
becomes ``input_r - (out_s - source_s)``, where ``out_s`` is what ``s`` wrote in this run and
``source_s`` what it wrote in the source run (or a mean, or zero; `activations.sources`). With
a set of edges patched, each receiver subtracts the sum over its patched incoming edges, and the
change propagates: a later sender writes what its (patched) inputs make it write. On post-norm
models the heads of one layer pass through the layer's attention post-norm together, so a
receiver reads ``post(sum_h head_h + b_O)`` with its patched heads swapped inside the norm.

Every edge set is a batch element of one forward (rows are set-major: row ``i * n_prompts +
p`` is set ``i`` on prompt ``p``). A forward starts at the first layer holding a receiver any
of its sets patches, from the base run's residual stream there; senders before that layer wrote
what they wrote in the base run, so their differences are computed once per prompt. Receivers
read through the opt-in hooks ``hook_q_input``/``hook_k_input``/``hook_v_input`` (per head or
per key-value head: grouped-query models are never ungrouped) and ``hook_mlp_in``; the logits
receiver is the residual stream entering the final norm. Sets are ordered and cut into forwards
by the patching engine's `schedule`, within a memory budget.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.circuits.activations import Ablation, SenderRun, prepare_runs
from mechscope.circuits.graph import Graph
from mechscope.errors import InputError
from mechscope.model.context import AttentionContext
from mechscope.patching.activation import Direction
from mechscope.patching.engine import (
    HookContext,
    LogitPositions,
    SweepOptions,
    resolve_logit_positions,
    rows_per_forward,
    schedule,
)
from mechscope.patching.metrics import Metric


class _PatchedForward:
    """The state of one batched forward: masks, sender differences, hooks.

    Differences are kept sender-major, ``[sender, n * pos * d_model]`` (shared by the sets) and
    ``[set, sender, n * pos * d_model]`` (per set), so that a receiver group's correction is one
    batched matrix product over contiguous memory.
    """

    def __init__(self, model, graph: Graph, base: SenderRun, source: Tensor, masks: Tensor, first: int) -> None:
        self.model, self.graph, self.base, self.first = model, graph, base, first
        self.k = masks.shape[0]
        self.n, self.seq = base.outputs.shape[:2]
        d = model.cfg.d_model
        device, dtype = model.device, model.dtype
        self.masks = masks.to(device=device, dtype=dtype)  # [k, sender, receiver]
        if graph.post_norm:  # heads reach receivers through their layer's post-norm (see `_head_groups`)
            self.linear = self.masks.clone()
            for layer in range(graph.n_layers):
                heads = graph.head_senders(layer)
                self.linear[:, heads.start : heads.stop] = 0
        else:
            self.linear = self.masks
        used = masks.any(dim=(0, 2)).to(device)  # senders with a patched edge in some set
        # Mostly-patched sets (circuits, ACDC): a receiver reads "every upstream difference minus the
        # kept ones", so only senders with a kept edge are multiplied; every difference is stored.
        patched_share = masks.sum((1, 2)).max() / graph.valid.sum()
        self.complement = not graph.post_norm and float(patched_share) > 0.5
        if self.complement:
            used = torch.ones_like(used)
        self.split = graph.n_embed + first * graph.senders_per_layer  # senders before `first` are the base run's
        index = torch.arange(graph.n_senders, device=device)
        self.shared_cols = index[: self.split][used[: self.split]]
        self.row_cols = index[self.split :][used[self.split :]]
        self.source = source.to(device=device, dtype=dtype)
        shared = base.outputs[:, :, self.shared_cols] - self.source[:, :, self.shared_cols]  # [n, pos, s, d]
        self.shared_diff = shared.permute(2, 0, 1, 3).reshape(len(self.shared_cols), self.n * self.seq * d)
        self.row_diff = torch.zeros(self.k, len(self.row_cols), self.n * self.seq * d, device=device, dtype=dtype)
        self.row_sums: dict[int, Tensor] = {}  # post-norm head sums of layers >= first, per row
        self.column = torch.full((graph.n_senders,), -1, dtype=torch.long, device=device)
        self.column[self.row_cols] = torch.arange(len(self.row_cols), device=device)
        self.attention: tuple[int, Tensor] | None = None  # (layer, its q/k/v corrections)
        self.total = self.shared_diff.sum(0).expand(self.k, -1).clone()  # sum of the differences stored so far
        self.stored = self.split  # senders below this index are in `total`
        self.before_heads: dict[int, Tensor] = {}  # `total` before each layer's heads were stored

    # ------------------------------------------------------------------ corrections
    def correction(self, receivers: range, limit: int) -> Float[Tensor, "rows pos receiver d_model"]:
        """``sum_s mask[s, r] (out_s - source_s)`` for each receiver: what it must stop reading.
        Only senders before index ``limit`` can reach these receivers."""
        lin = self.linear[:, :, receivers.start : receivers.stop]  # [k, sender, r]
        written = int(torch.searchsorted(self.row_cols, limit))
        kept = (1 - lin[:, :limit]).any(-1).any(0).nonzero().flatten() if self.complement else None
        if kept is not None and len(kept) < int(lin[:, :limit].any(-1).any(0).sum()):
            out = self._complement(lin[:, :limit], kept, limit)
        else:
            out = torch.matmul(lin[:, self.shared_cols].transpose(1, 2), self.shared_diff)  # [k, r, n * pos * d]
            if written:
                out = out + torch.bmm(lin[:, self.row_cols[:written]].transpose(1, 2), self.row_diff[:, :written])
        out = out.view(self.k, len(receivers), self.n, self.seq, -1).permute(0, 2, 3, 1, 4)  # [k, n, pos, r, d]
        if self.graph.post_norm:
            out = out + self._head_groups(receivers)
        return out.flatten(0, 1)  # [k * n, pos, r, d]

    def _complement(self, lin: Tensor, kept: Tensor, limit: int) -> Tensor:
        """``sum_{s < limit} diff_s - sum_s (1 - mask[s, r]) diff_s`` over the senders with a kept edge."""
        if limit >= self.stored:
            total = self.total
        else:  # a parallel block's MLP: the sum before its own layer's heads
            total = self.before_heads[int(self.graph.sender_layer[limit])]
        keep = 1 - lin  # [k, s < limit, r]
        shared, rows = kept[kept < self.split], kept[kept >= self.split]
        out = total[:, None, :] - torch.matmul(keep[:, shared].transpose(1, 2), self.shared_diff[shared])
        if len(rows):
            out = out - torch.bmm(keep[:, rows].transpose(1, 2), self.row_diff[:, self.column[rows]])
        return out

    def _head_groups(self, receivers: range) -> Tensor:
        """Post-norm models: ``post(sum) - post(sum - patched head differences)`` per upstream layer."""
        graph, d = self.graph, self.model.cfg.d_model
        out = torch.zeros(self.k, self.n, self.seq, len(receivers), d, device=self.masks.device, dtype=self.masks.dtype)
        for layer in range(graph.n_layers):
            heads = graph.head_senders(layer)
            mask = self.masks[:, heads.start : heads.stop, receivers.start : receivers.stop]  # [k, head, r]
            if not bool(mask.any()):
                continue
            norm = self.model.blocks[layer].ln1_post
            if heads.start < self.split:
                diff = self.base.outputs[:, :, heads.start : heads.stop] - self.source[:, :, heads.start : heads.stop]
                delta = torch.einsum("nphd,khr->knprd", diff, mask)
                total = self.base.head_sums[layer][None]  # [1, n, pos, d]
            else:  # heads without a patched edge have no column (-1); their mask is zero
                cols = self.column[heads.start : heads.stop].clamp(min=0)
                diff = self.row_diff[:, cols].view(self.k, len(heads), self.n, self.seq, d)
                delta = torch.einsum("khnpd,khr->knprd", diff, mask)
                total = self.row_sums[layer]
            total = total[:, :, :, None]  # [k or 1, n, pos, 1, d]
            out = out + (norm(total) - norm(total - delta))
        return out

    # ------------------------------------------------------------------ hooks
    def hooks(self) -> list:
        graph, masks = self.graph, self.masks
        hooks = []
        for layer in range(self.first, graph.n_layers):
            groups = graph.layer_receivers(layer)
            heads = graph.head_senders(layer)
            for which in ("q", "k", "v"):
                if bool(masks[:, :, groups[which].start : groups[which].stop].any()):
                    hooks.append((f"blocks.{layer}.hook_{which}_input", self._attention_hook(layer, which)))
            if bool(masks[:, heads.start : heads.stop].any()):
                hooks.append((f"blocks.{layer}.attn.hook_result", self._heads_hook(layer)))
            if graph.attn_only:
                continue
            mlp = graph.mlp_sender(layer)
            limit = heads.start if graph.parallel else mlp
            if bool(masks[:, :, groups["mlp"].start].any()):
                hooks.append((f"blocks.{layer}.hook_mlp_in", self._mlp_hook(groups["mlp"], limit)))
            if bool(masks[:, mlp].any()):
                hooks.append((f"blocks.{layer}.hook_mlp_out", self._sender_hook(mlp)))
        return hooks

    def _attention_hook(self, layer: int, which: str):
        """Queries, keys and values of a layer read the same senders: their corrections are
        computed together when the first of the three hooks runs."""
        groups = self.graph.layer_receivers(layer)
        every = range(groups["q"].start, groups["v"].stop)
        part = slice(groups[which].start - every.start, groups[which].stop - every.start)

        def hook(x: Tensor, *, hook) -> Tensor:  # x: [rows, pos, head or kv_head, d_model]
            if self.attention is None or self.attention[0] != layer:
                self.attention = (layer, self.correction(every, self.graph.head_senders(layer).start))
            return x - self.attention[1][:, :, part].to(x.dtype)

        return hook

    def _mlp_hook(self, receivers: range, limit: int):
        def hook(x: Tensor, *, hook) -> Tensor:
            return x - self.correction(receivers, limit)[:, :, 0].to(x.dtype)

        return hook

    def _store(self, sender: int, value: Tensor) -> None:
        col = int(self.column[sender])
        if col >= 0:
            rows = value.view(self.k, self.n, self.seq, -1) - self.source[:, :, sender]
            self.row_diff[:, col] = rows.reshape(self.k, -1)
            if self.complement:
                self.total += self.row_diff[:, col]
                self.stored = sender + 1

    def _sender_hook(self, sender: int):
        def hook(x: Tensor, *, hook) -> None:
            self._store(sender, x)

        return hook

    def _heads_hook(self, layer: int):
        heads = self.graph.head_senders(layer)
        b_o = self.model.blocks[layer].attn.b_o

        def hook(result: Tensor, *, hook) -> None:  # result: [rows, pos, head, d_model]
            if self.complement:
                self.before_heads[layer] = self.total.clone()
            for i, sender in enumerate(heads):
                self._store(sender, result[:, :, i])
            if self.graph.post_norm:
                total = result.sum(-2)
                total = total if b_o is None else total + b_o
                self.row_sums[layer] = total.view(self.k, self.n, self.seq, -1)

        return hook


@torch.no_grad()
def patched_logits(
    model,
    graph: Graph,
    base: SenderRun,
    source: Float[Tensor, "batch pos sender d_model"],
    masks: Bool[Tensor, "n_sets sender receiver"],
    *,
    attention_mask: Tensor | None = None,
    keep: list[int] | None = None,
    hook_context: HookContext | None = None,
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits ``[n_sets * n_prompts, pos or len(keep), d_vocab]`` of one forward with each set of
    edges (``masks[i, sender, receiver]``) patched from ``source`` (see the module docstring).

    Example:
        >>> from mechscope.circuits.activations import record_senders
        >>> graph = Graph.of(model)
        >>> clean, corrupted = record_senders(model, graph, tokens), record_senders(model, graph, tokens + 1)
        >>> masks = torch.zeros(2, graph.n_senders, graph.n_receivers, dtype=torch.bool)
        >>> masks[1] = graph.valid  # every edge: the corrupted run
        >>> logits = patched_logits(model, graph, clean, corrupted.outputs, masks)
        >>> torch.allclose(logits[0], clean.logits[0], atol=1e-5)
        True
        >>> torch.allclose(logits[1], corrupted.logits[0], atol=1e-5)
        True
    """
    n_layers = graph.n_layers
    k = masks.shape[0]
    patched = masks.any(dim=(0, 1))
    if not bool(patched.any()):
        logits = base.logits if keep is None else base.logits[:, keep]
        return logits.repeat(k, 1, 1)
    first = int(graph.receiver_layer[patched.cpu()].min())
    state = _PatchedForward(model, graph, base, source, masks, first)
    resid = base.resid[first].repeat(k, 1, 1)
    if first < n_layers:
        seq = resid.shape[1]
        mask_rows = None if attention_mask is None else attention_mask.to(model.device).repeat(k, 1)
        ctx = AttentionContext.build(mask_rows, resid.shape[0], seq, model.device)
        with (hook_context or model.hooks)(state.hooks()):
            resid = model.run_blocks(resid, first, n_layers, ctx)
    if bool(masks[:, :, graph.logits_receiver].any()):
        logits_receiver = range(graph.logits_receiver, graph.logits_receiver + 1)
        correction = state.correction(logits_receiver, graph.n_senders)[:, :, 0]
        resid = resid - correction.to(resid.dtype)
    if keep is not None:
        resid = resid[:, keep]
    return model(resid, start_at_layer=n_layers)


def set_bytes(model, graph: Graph, n_prompts: int, seq: int, memory_budget: int, keep: list[int] | None) -> int:
    """An estimate of the bytes one edge set adds to a patched forward (its ``n_prompts`` rows).

    Example:
        >>> set_bytes(model, Graph.of(model), 2, 4, 2**20, None) > 0
        True
    """
    cfg = model.cfg
    itemsize = torch.finfo(model.dtype).bits // 8
    model_row = memory_budget // rows_per_forward(model, seq, memory_budget, None if keep is None else len(keep))
    per_row = itemsize * seq * cfg.d_model * (graph.n_senders + 3 * graph.receivers_per_layer)
    return n_prompts * (per_row + model_row)


def run_edge_sets(
    model,
    graph: Graph,
    base: SenderRun,
    source: Tensor,
    sets: Bool[Tensor, "n_sets edge"],
    metric: Metric,
    *,
    attention_mask: Tensor | None = None,
    hook_context: HookContext | None = None,
    batch_size: int | None = None,
    memory_budget: int = 2**30,
    logit_positions: LogitPositions = "auto",
    progress: bool = False,
    desc: str = "edge patching",
) -> Float[Tensor, "n_sets n_prompts"]:
    """Metric values ``[n_sets, n_prompts]`` with each edge set (``sets [n_sets, edge]``) patched.

    Sets are ordered by the first layer they patch (the engine's `schedule`) and cut into
    forwards of at most ``batch_size`` rows, or as many as fit ``memory_budget`` bytes.

    Example:
        >>> from mechscope.circuits.activations import record_senders
        >>> graph = Graph.of(model)
        >>> clean, corrupted = record_senders(model, graph, tokens), record_senders(model, graph, tokens + 1)
        >>> sets = graph.edge_sets([["input->logits"], ["a2.h1->logits", "m1->a2.h0<v>"]])
        >>> run_edge_sets(model, graph, clean, corrupted.outputs, sets, lambda x: x[:, -1, 0]).shape
        torch.Size([2, 1])
    """
    n, seq = base.outputs.shape[:2]
    if sets.dim() != 2 or sets.shape[1] != graph.n_edges:
        raise InputError(f"edge sets must be [n_sets, {graph.n_edges}], got {tuple(sets.shape)}")
    keep, metric = resolve_logit_positions(metric, logit_positions, seq)
    receiver_layer = graph.receiver_layer[graph.edge_pairs[:, 1]]
    first = torch.where(sets, receiver_layer, graph.n_layers).min(-1).values
    if batch_size is not None:
        per_chunk = max(1, batch_size // n)
    else:
        per_chunk = max(1, memory_budget // set_bytes(model, graph, n, seq, memory_budget, keep))
    order, chunks = schedule(first, torch.zeros_like(first), per_chunk, n, seq, graph.n_layers + 1)
    results = torch.empty(len(sets), n, device=model.device)
    for chunk in tqdm(chunks, desc=desc, disable=not progress):
        idx = order[chunk]
        masks = graph.edge_matrix(sets[idx], False)
        logits = patched_logits(
            model, graph, base, source, masks, attention_mask=attention_mask, keep=keep, hook_context=hook_context
        )
        values = metric(logits)
        if values.shape != (logits.shape[0],):
            raise InputError(f"the metric must return one value per row [batch], got shape {tuple(values.shape)}")
        results[idx.to(model.device)] = values.float().view(len(idx), n)
    return results


def edge_patch(
    model,
    clean_tokens,
    corrupted_tokens,
    metric: Metric,
    edge_sets,
    *,
    direction: Direction = "noising",
    ablation: Ablation = "patch",
    attention_mask: Tensor | None = None,
    hook_context: HookContext | None = None,
    options: SweepOptions | None = None,
    **sweep,
) -> Tensor:
    """The metric with each set of edges patched: ``[n_sets]`` (``per_prompt``: ``[n_sets, n_prompts]``).

    ``edge_sets``: a list of edge collections (names ``"sender->receiver"``, ``(sender,
    receiver)`` pairs or edge indices of `Graph`) or a boolean mask ``[n_sets, n_edges]``.
    ``direction="noising"`` runs the clean prompts with the sets' edges carrying the corrupted
    run's contributions; ``"denoising"`` the reverse. ``ablation``: ``"patch"`` (the other run),
    ``"mean"`` (its mean over prompts) or ``"zero"``. Sweep options (``per_prompt``,
    ``batch_size``, ``memory_budget``, ``logit_positions``, ``progress``) as in `SweepOptions`.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> sets = [["input->logits"], ["a0.h1->m0", "m0->logits"]]
        >>> edge_patch(model, clean, corrupted, lambda x: x[:, -1, 7], sets).shape
        torch.Size([2])
    """
    options = SweepOptions.of(options, sweep)
    graph, base, source, _ = prepare_runs(
        model, clean_tokens, corrupted_tokens, direction, ablation, attention_mask, hook_context
    )
    values = run_edge_sets(
        model,
        graph,
        base,
        source,
        graph.edge_sets(edge_sets),
        metric,
        attention_mask=attention_mask,
        hook_context=hook_context,
        batch_size=options.batch_size,
        memory_budget=options.memory_budget,
        logit_positions=options.logit_positions,
        progress=options.progress,
    )
    return values if options.per_prompt else values.mean(-1)


def node_patch(
    model, clean_tokens, corrupted_tokens, metric: Metric, node_sets, *, options: SweepOptions | None = None, **kwargs
) -> Tensor:
    """Node-level patching: each set of senders (``"input"``, ``"a3.h2"``, ``"m5"``, ...) has every
    outgoing edge patched, which is patching the nodes' outputs. Keywords as in `edge_patch`.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> node_patch(model, clean, corrupted, lambda x: x[:, -1, 7], [["a0.h1"], ["m0", "a2.h3"]]).shape
        torch.Size([2])
    """
    graph = Graph.of(model)
    sets = torch.stack([graph.outgoing(nodes) for nodes in node_sets])
    return edge_patch(model, clean_tokens, corrupted_tokens, metric, sets, options=options, **kwargs)
