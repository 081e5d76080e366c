"""Edge attribution: EAP and EAP-IG scores for every edge from a few forwards and backwards.

Patching edge ``s -> r`` adds ``delta_s = source_s - base_s`` to what receiver ``r`` reads
(`mechscope.circuits.patch`), so to first order it changes the metric by
``sum_pos delta_s . dM/d(input_r)``: EAP (Syed et al. 2023). EAP-IG (Hanna et al. 2024)
replaces the gradient by its mean along a path from the base run to the source run:

* ``"eap-ig-inputs"``: the input embeddings move from the base prompts' to the source's;
* ``"eap-ig-activations"``: for each sender group (the embeddings, one layer's heads, one MLP),
  that group's outputs move from base to source while the rest of the model recomputes; the
  group's edges take the gradients of their own path.

Steps sit at the midpoints ``(k + 1/2) / steps`` and run as batch rows of one forward and
backward. Scores are accumulated layer by layer during the backward pass (a receiver group's
gradient meets the stored ``delta`` of its upstream senders in one matrix product and is then
dropped), so memory holds one ``[sender, batch, pos, d_model]`` buffer of differences, never a
tensor per edge. Receiver gradients come from the projections' gradients through the pre-norm's
vector-Jacobian product, per query head and per key-value head: no per-head copies of the
residual stream are kept for the backward, and grouped-query models are never ungrouped.
On post-norm models a head's ``delta`` is its change of ``post(sum of heads + b_O)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.circuits.activations import Ablation, sender_hooks
from mechscope.circuits.circuit import Circuit
from mechscope.circuits.graph import Graph
from mechscope.errors import InputError
from mechscope.model.tokenize import input_tokens
from mechscope.names import act_name, layer_of
from mechscope.patching.activation import Direction, base_and_source
from mechscope.patching.engine import HookContext, resolve_logit_positions, rows_per_forward
from mechscope.patching.metrics import Metric

Method = Literal["eap", "eap-ig-inputs", "eap-ig-activations"]
METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations")


@contextmanager
def frozen_parameters(model) -> Iterator[None]:
    """Parameters stop requiring gradients inside the block (the backward then keeps only what
    input gradients need), and are restored after it."""
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def norm_vjp(norm, x: Float[Tensor, "batch pos d_model"], cotangent: Float[Tensor, "batch pos n d_model"]) -> Tensor:
    """``cotangent`` pulled back through ``norm`` at ``x``, for ``n`` cotangents per position.

    Example:
        >>> norm = model.blocks[0].ln1
        >>> x, cot = torch.randn(1, 2, 32), torch.randn(1, 2, 3, 32)
        >>> leaf = x.clone().requires_grad_(True)
        >>> expected = torch.autograd.grad(norm(leaf), leaf, cot[:, :, 1])[0]
        >>> torch.allclose(norm_vjp(norm, x, cot)[:, :, 1], expected, atol=1e-6)
        True
    """
    if norm is None:
        return cotangent
    with torch.enable_grad():
        leaf = x.detach()[:, :, None].expand_as(cotangent).clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(norm(leaf), leaf, cotangent)
    return grad


class Attributor:
    """Hooks that accumulate ``scores[sender, receiver] += delta_s . grad_r`` during a backward.

    ``delta`` is ``[sender, n_prompts, pos, d_model]``; forwards may run ``copies`` of the prompts
    (IG steps; rows are copy-major), whose gradients are summed. Only senders in ``senders``
    (a range; default all) are scored, and only receivers from layer ``first`` on are hooked.
    """

    def __init__(self, model, graph: Graph, delta: Tensor, scores: Tensor, copies: int = 1, first: int = 0,
                 senders: range | None = None) -> None:  # fmt: skip
        self.model, self.graph, self.delta, self.scores = model, graph, delta, scores
        self.copies, self.first = copies, first
        self.senders = senders or range(graph.n_senders)
        self.resid: dict[int, Tensor] = {}
        self.pending: dict[int, dict] = {}

    def accumulate(self, receivers: range, limit: int, grad: Tensor) -> None:
        """Take the gradient ``[rows, pos, r, d_model]`` of receivers ``receivers``, whose upstream
        senders are those before index ``limit``. A layer's receiver groups are collected and met
        with ``delta`` in one matrix product once all have arrived (one read of ``delta`` per layer)."""
        n = self.delta.shape[1]
        grad = grad.float().view(self.copies, n, *grad.shape[1:]).sum(0)  # [n, pos, r, d]
        layer = int(self.graph.receiver_layer[receivers.start])
        if layer == self.graph.n_layers:
            self._product(receivers, limit, grad)
            return
        pending = self.pending.setdefault(layer, {})
        pending[receivers.start] = (receivers, limit, grad)
        if len(pending) == len(self.graph.layer_receivers(layer)):
            self.flush(layer)

    def flush(self, layer: int | None = None) -> None:
        """Score the collected receiver groups of ``layer`` (default: every layer still pending)."""
        for key in [layer] if layer is not None else list(self.pending):
            groups = sorted(self.pending.pop(key).values(), key=lambda g: g[0].start)
            start, stop = groups[0][0].start, groups[-1][0].stop
            if stop - start != sum(len(g[0]) for g in groups):  # not contiguous: one product per group
                for receivers, limit, grad in groups:
                    self._product(receivers, limit, grad)
                continue
            # Entries of senders past a group's own limit are not edges; edge_values never reads them.
            grad = torch.cat([g[2] for g in groups], dim=2)
            self._product(range(start, stop), max(g[1] for g in groups), grad)

    def _product(self, receivers: range, limit: int, grad: Tensor) -> None:
        lo, hi = self.senders.start, min(self.senders.stop, limit)
        if hi <= lo:
            return
        grad = grad.permute(2, 0, 1, 3).reshape(len(receivers), -1)  # [r, n * pos * d]
        delta = self.delta[lo:hi].reshape(hi - lo, -1)  # [s, n * pos * d]
        self.scores[lo:hi, receivers.start : receivers.stop] += delta.float() @ grad.T

    def hooks(self) -> tuple[list, list]:
        """``(forward hooks, backward hooks)``."""
        graph, model = self.graph, self.model
        fwd, bwd = [], []
        for layer in range(self.first, graph.n_layers):
            block, groups, heads = model.blocks[layer], graph.layer_receivers(layer), graph.head_senders(layer)
            fwd.append((act_name("resid_pre", layer), self._keep_resid(layer)))
            weights = {"q": block.attn.W_Q, "k": block.attn.W_K, "v": block.attn.W_V}
            for which, weight in weights.items():
                bwd.append((act_name(which, layer), self._projection_grad(layer, groups[which], heads.start, weight)))
            if not graph.attn_only:
                mlp = graph.mlp_sender(layer)
                limit = heads.start if graph.parallel else mlp
                bwd.append((act_name("mlp_in", layer), self._plain_grad(groups["mlp"], limit)))
        logits = range(graph.logits_receiver, graph.logits_receiver + 1)
        bwd.append((act_name("resid_post", graph.n_layers - 1), self._plain_grad(logits, graph.n_senders)))
        return fwd, bwd

    def _keep_resid(self, layer: int):
        def hook(x: Tensor, *, hook) -> None:
            self.resid[layer] = x.detach()

        return hook

    def _projection_grad(self, layer: int, receivers: range, limit: int, weight: Tensor):
        norm = self.model.blocks[layer].ln1

        def hook(grad: Tensor, *, hook) -> None:  # grad: [rows, pos, head or kv_head, d_head]
            normed = torch.einsum("bphk,hdk->bphd", grad, weight.detach())  # [rows, pos, head, d_model]
            self.accumulate(receivers, limit, norm_vjp(norm, self.resid[layer], normed))

        return hook

    def _plain_grad(self, receivers: range, limit: int):
        def hook(grad: Tensor, *, hook) -> None:  # grad: [rows, pos, d_model]
            self.accumulate(receivers, limit, grad[:, :, None])

        return hook


def subtract_base_hooks(model, graph: Graph, delta: Tensor) -> list:
    """Hooks turning ``delta`` (holding the source outputs, ``[sender, n, pos, d_model]``) into
    ``source - base`` as the base run's forward passes (post-norm heads: the change of the
    layer's post-normed output). They only read, so the forward is unchanged.

    Example:
        >>> graph = Graph.of(model)
        >>> delta = torch.zeros(graph.n_senders, 1, 4, 32)
        >>> with torch.no_grad(), model.hooks(fwd_hooks=subtract_base_hooks(model, graph, delta)):
        ...     logits = model(tokens)
        >>> bool(delta[0].abs().sum() > 0)  # minus the embedding
        True
    """
    hooks = []

    def minus(index: int):
        def hook(x: Tensor, *, hook) -> None:
            delta[index] -= x.detach()

        return hook

    hooks.append(("hook_embed", minus(0)))
    if graph.learned_pos:
        hooks.append(("hook_pos_embed", minus(1)))
    for layer in range(graph.n_layers):
        heads, attn = graph.head_senders(layer), model.blocks[layer].attn
        post = model.blocks[layer].ln1_post if graph.post_norm else None

        def heads_hook(z: Tensor, *, hook, heads=heads, attn=attn, post=post) -> None:
            with torch.no_grad():
                result = torch.einsum("bphk,hkd->hbpd", z.detach(), attn.W_O)  # [head, n, pos, d_model]
                if post is None:
                    delta[heads.start : heads.stop] -= result
                    return
                total = result.sum(0) if attn.b_o is None else result.sum(0) + attn.b_o
                changed = total + (delta[heads.start : heads.stop] - result)
                delta[heads.start : heads.stop] = post(changed) - post(total)[None]

        hooks.append((act_name("z", layer), heads_hook))
        if not graph.attn_only:
            hooks.append((act_name("mlp_out", layer), minus(graph.mlp_sender(layer))))
    return hooks


@torch.no_grad()
def source_buffer(model, graph: Graph, base_tokens, source_tokens, ablation: Ablation, attention_mask,
                  hook_context: HookContext | None) -> Tensor:  # fmt: skip
    """``[sender, n, pos, d_model]`` holding what patched edges carry (see `activations.sources`)."""
    n, seq = base_tokens.shape
    if ablation == "zero":
        return torch.zeros(graph.n_senders, n, seq, model.cfg.d_model, device=model.device, dtype=model.dtype)
    buffer = torch.zeros(graph.n_senders, *source_tokens.shape, model.cfg.d_model, device=model.device,
                         dtype=model.dtype)  # fmt: skip

    def write(senders: range, value: Tensor) -> None:
        buffer[senders.start : senders.stop] = value.movedim(2, 0)

    with (hook_context or model.hooks)(sender_hooks(model, graph, write)):
        model(source_tokens, attention_mask=attention_mask)
    if ablation == "patch":
        return buffer
    if attention_mask is None:
        mean = buffer.mean(1, keepdim=True)
    else:
        weights = attention_mask.to(buffer.dtype)[None, :, :, None]
        mean = (buffer * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
    return mean.expand(-1, n, -1, -1).clone()


def _logits(model, start: Tensor, layer: int, attention_mask, keep) -> Tensor:
    """Logits at ``keep`` of a forward from ``start`` (tokens, or the residual stream entering ``layer``)."""
    n_layers = model.cfg.n_layers
    if layer == 0 and start.dim() == 2:
        resid = model(start, attention_mask=attention_mask, stop_at_layer=n_layers)
    else:
        resid = model(start, start_at_layer=layer, stop_at_layer=n_layers, attention_mask=attention_mask)
    return model(resid if keep is None else resid[:, keep], start_at_layer=n_layers)


def edge_scores(
    model,
    clean_tokens,
    corrupted_tokens,
    metric: Metric,
    *,
    method: Method = "eap",
    steps: int = 5,
    direction: Direction = "noising",
    ablation: Ablation = "patch",
    attention_mask: Tensor | None = None,
    hook_context: HookContext | None = None,
    steps_per_pass: int | None = None,
    memory_budget: int = 2**30,
    progress: bool = False,
) -> Float[Tensor, " edge"]:
    """Attribution scores of every edge of `Graph` (in edge order): estimated changes of the
    metric, averaged over prompts, when that edge alone is patched (see the module docstring).

    ``direction``/``ablation`` as in `edge_patch`. ``steps`` (EAP-IG) points along the path;
    ``steps_per_pass`` of them run as one batch (default: as many as fit ``memory_budget``).

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> scores = edge_scores(model, clean, corrupted, lambda x: x[:, -1, 7], method="eap-ig-inputs", steps=3)
        >>> scores.shape
        torch.Size([302])
    """
    if method not in METHODS:
        raise InputError(f"method must be one of {list(METHODS)}, got {method!r}")
    if steps < 1:
        raise InputError(f"steps must be at least 1, got {steps}")
    graph = Graph.of(model)
    if corrupted_tokens is None:
        if ablation == "patch" or direction != "noising":
            raise InputError("this needs corrupted_tokens: patching and denoising read the corrupted run")
        base_tokens = source_tokens = input_tokens(model, clean_tokens)[0]
    else:
        base_tokens, source_tokens = base_and_source(model, clean_tokens, corrupted_tokens, direction)
    n, seq = base_tokens.shape
    keep, metric = resolve_logit_positions(metric, "auto", seq)
    delta = source_buffer(model, graph, base_tokens, source_tokens, ablation, attention_mask, hook_context)
    scores = torch.zeros(graph.n_senders, graph.n_receivers, device=model.device)
    context = hook_context or model.hooks
    if method == "eap":
        attributor = Attributor(model, graph, delta, scores)
        fwd, bwd = attributor.hooks()
        fwd += subtract_base_hooks(model, graph, delta) + [("hook_embed", _requires_grad)]
        with frozen_parameters(model), torch.enable_grad(), context(fwd), model.hooks(bwd_hooks=bwd):
            metric(_logits(model, base_tokens, 0, attention_mask, keep)).sum().backward()
        attributor.flush()
        return graph.edge_values(scores.cpu()) / n
    resid = torch.zeros(graph.n_layers, n, seq, model.cfg.d_model, device=model.device, dtype=model.dtype)

    def keep_resid(x: Tensor, *, hook) -> None:
        resid[layer_of(hook.name)] = x

    with torch.no_grad(), context(subtract_base_hooks(model, graph, delta)):
        with model.hooks([(act_name("resid_pre", layer), keep_resid) for layer in range(graph.n_layers)]):
            model(base_tokens, attention_mask=attention_mask)
    rows = rows_per_forward(model, seq, memory_budget, None if keep is None else len(keep))
    per_pass = steps_per_pass or max(1, rows // (n * (graph.n_layers + 1)))  # a backward keeps every layer
    groups = [("inputs", range(graph.n_senders), 0)] if method == "eap-ig-inputs" else _sender_groups(graph)
    passes = [(g, k) for g in groups for k in range(0, steps, per_pass)]
    for (name, senders, layer), start in tqdm(passes, desc=method, disable=not progress):
        copies = min(per_pass, steps - start)
        alphas = ((torch.arange(start, start + copies, device=model.device) + 0.5) / steps).repeat_interleave(n)
        alphas = alphas[:, None, None].to(model.dtype)
        attributor = Attributor(model, graph, delta, scores, copies, layer, senders)
        fwd, bwd = attributor.hooks()
        fwd += _interpolation_hooks(graph, name, senders, layer, delta, alphas, copies)
        mask = None if attention_mask is None else attention_mask.repeat(copies, 1)
        start_input = base_tokens.repeat(copies, 1) if layer == 0 else resid[layer].repeat(copies, 1, 1)
        if start_input.dim() == 3:
            start_input.requires_grad_(True)
        else:
            fwd.append(("hook_embed", _requires_grad))
        with frozen_parameters(model), torch.enable_grad(), context(fwd), model.hooks(bwd_hooks=bwd):
            metric(_logits(model, start_input, layer, mask, keep)).sum().backward()
        attributor.flush()
    return graph.edge_values(scores.cpu()) / (n * steps)


def _requires_grad(x: Tensor, *, hook) -> Tensor | None:
    """Make the embedding a leaf that requires a gradient (parameters are frozen)."""
    return None if x.requires_grad else x.detach().requires_grad_(True)


def _sender_groups(graph: Graph) -> list[tuple[str, range, int]]:
    """``(kind, senders, first layer)`` of each group the activations variant interpolates."""
    groups = [("inputs", range(graph.n_embed), 0)]
    for layer in range(graph.n_layers):
        groups.append(("heads", graph.head_senders(layer), layer))
        if not graph.attn_only:
            mlp = graph.mlp_sender(layer)
            groups.append(("mlp", range(mlp, mlp + 1), layer))
    return groups


def _interpolation_hooks(graph: Graph, kind: str, senders: range, layer: int, delta: Tensor, alphas: Tensor,
                         copies: int) -> list:  # fmt: skip
    """Forward hooks moving a sender group's outputs by ``alpha * delta`` (its straight path)."""

    def shift(index: range):
        def hook(x: Tensor, *, hook) -> Tensor:
            step = delta[index.start : index.stop].sum(0).repeat(copies, 1, 1)  # [rows, pos, d_model]
            return x + alphas * step.to(x.dtype)

        return hook

    if kind == "inputs":
        hooks = [("hook_embed", shift(range(0, 1)))]
        if graph.learned_pos:
            hooks.append(("hook_pos_embed", shift(range(1, 2))))
        return hooks
    if kind == "heads":
        return [(act_name("attn_out", layer), shift(senders))]
    return [(act_name("mlp_out", layer), shift(senders))]


def attribute(
    model,
    clean_tokens,
    corrupted_tokens,
    metric: Metric,
    *,
    method: Method = "eap",
    steps: int = 5,
    direction: Direction = "noising",
    ablation: Ablation = "patch",
    attention_mask: Tensor | None = None,
    hook_context: HookContext | None = None,
    steps_per_pass: int | None = None,
    memory_budget: int = 2**30,
    progress: bool = False,
) -> Circuit:
    """`edge_scores` as a `Circuit` of every edge (pick edges with ``.top(n)``), with its settings.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> circuit = attribute(model, clean, corrupted, lambda x: x[:, -1, 7], method="eap").top(10)
        >>> circuit.method, circuit.n_edges
        ('eap', 10)
    """
    scores = edge_scores(
        model, clean_tokens, corrupted_tokens, metric, method=method, steps=steps, direction=direction,
        ablation=ablation, attention_mask=attention_mask, hook_context=hook_context, steps_per_pass=steps_per_pass,
        memory_budget=memory_budget, progress=progress,
    )  # fmt: skip
    n_prompts = int(input_tokens(model, clean_tokens)[0].shape[0])
    settings = {"direction": direction, "ablation": ablation, "n_prompts": n_prompts}
    if method != "eap":
        settings["steps"] = steps
    return Circuit.from_scores(Graph.of(model), scores, method, settings)
