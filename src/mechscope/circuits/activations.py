"""What the senders of a run wrote, and the sources edges are patched from.

`record_senders` runs the model once and keeps every sender's output ``[batch, pos, sender,
d_model]`` (in `Graph` order), the residual stream entering each layer (where a patched forward
starts) and, on post-norm models, each attention layer's head sum before its post-norm.
`sources` turns a run into what ablated edges carry: the other run's outputs (``"patch"``),
their mean over prompts (``"mean"``) or zeros (``"zero"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.circuits.graph import Graph
from mechscope.errors import InputError
from mechscope.model.tokenize import input_tokens
from mechscope.names import act_name
from mechscope.patching.activation import Direction, base_and_source
from mechscope.patching.engine import HookContext

Ablation = Literal["patch", "mean", "zero"]
ABLATIONS = ("patch", "mean", "zero")


@dataclass
class SenderRun:
    """One run's sender outputs and the state a patched forward starts from.

    ``outputs`` ``[batch, pos, sender, d_model]``; ``resid`` ``[layer + 1, batch, pos, d_model]``
    (the residual stream entering each layer, then the one entering the final norm);
    ``head_sums`` ``[layer, batch, pos, d_model]``: each attention layer's ``sum of heads + b_O``
    before its post-norm (post-norm models only, else ``None``); ``logits`` of the run.
    """

    outputs: Float[Tensor, "batch pos sender d_model"]
    resid: Tensor | None
    head_sums: Tensor | None
    logits: Float[Tensor, "batch pos d_vocab"]


def sender_hooks(model, graph: Graph, write, head_sums: Tensor | None = None) -> list:
    """Hooks handing each sender's output to ``write(senders, value)`` as a forward runs
    (``senders`` a range of sender indices, ``value`` ``[batch, pos, len(senders), d_model]``),
    and, on post-norm models, each layer's head sum (with ``b_O``) to ``head_sums[layer]``.
    The hooks only read, so the forward is unchanged.

    Example:
        >>> graph = Graph.of(model)
        >>> outputs = torch.zeros(1, 4, graph.n_senders, 32)
        >>> def write(senders, value):
        ...     outputs[:, :, senders.start : senders.stop] = value
        >>> with model.hooks(fwd_hooks=sender_hooks(model, graph, write)):
        ...     logits = model(tokens)
        >>> bool(outputs[:, :, graph.sender_index("m2")].abs().sum() > 0)
        True
    """

    def writer(index: int):
        def hook(x: Tensor, *, hook) -> None:
            write(range(index, index + 1), x.detach()[:, :, None])

        return hook

    hooks = [("hook_embed", writer(0))]
    if graph.learned_pos:
        hooks.append(("hook_pos_embed", writer(1)))
    for layer in range(graph.n_layers):
        heads = graph.head_senders(layer)
        b_o = model.blocks[layer].attn.b_o

        def heads_writer(result: Tensor, *, hook, heads=heads, layer=layer, b_o=b_o) -> None:
            write(heads, result.detach())
            if head_sums is not None:
                total = result.detach().sum(-2)
                head_sums[layer] = total if b_o is None else total + b_o.detach()

        hooks.append((act_name("result", layer), heads_writer))
        if not graph.attn_only:
            hooks.append((act_name("mlp_out", layer), writer(graph.mlp_sender(layer))))
    return hooks


@torch.no_grad()
def record_senders(
    model,
    graph: Graph,
    tokens: Tensor,
    attention_mask: Tensor | None = None,
    *,
    resid: bool = True,
    hook_context: HookContext | None = None,
) -> SenderRun:
    """Run ``tokens`` once and keep its sender outputs (and, with ``resid``, the residual stream
    entering every layer).

    Example:
        >>> run = record_senders(model, Graph.of(model), tokens)
        >>> run.outputs.shape, run.resid.shape
        (torch.Size([1, 4, 17, 32]), torch.Size([4, 1, 4, 32]))
        >>> torch.allclose(run.outputs.sum(2), run.resid[-1], atol=1e-5)  # no biases in this model
        True
    """
    cfg = model.cfg
    n, seq = tokens.shape[:2]
    outputs = torch.zeros(n, seq, graph.n_senders, cfg.d_model, device=model.device, dtype=model.dtype)
    head_sums = None
    if graph.post_norm:
        head_sums = torch.zeros(cfg.n_layers, n, seq, cfg.d_model, device=model.device, dtype=model.dtype)

    def write(senders: range, value: Tensor) -> None:
        outputs[:, :, senders.start : senders.stop] = value

    hooks = sender_hooks(model, graph, write, head_sums)
    stream = None
    if resid:
        stream = torch.zeros(cfg.n_layers + 1, n, seq, cfg.d_model, device=model.device, dtype=model.dtype)

        def keep(x: Tensor, *, hook, index: int) -> None:
            stream[index] = x

        hooks += [(act_name("resid_pre", layer), _bind(keep, layer)) for layer in range(cfg.n_layers)]
        hooks.append((act_name("resid_post", cfg.n_layers - 1), _bind(keep, cfg.n_layers)))
    context = hook_context or model.hooks
    with context(hooks):
        logits = model(tokens, attention_mask=attention_mask)
    return SenderRun(outputs, stream, head_sums, logits)


def _bind(fn, index: int):
    def hook(x: Tensor, *, hook) -> None:
        fn(x, hook=hook, index=index)

    return hook


def sources(
    run: SenderRun | None, ablation: Ablation, like: SenderRun, attention_mask: Tensor | None = None
) -> Float[Tensor, "batch pos sender d_model"]:
    """What a patched edge carries instead of its sender's output, ``[batch or 1, pos, sender, d_model]``.

    ``"patch"``: ``run``'s outputs, prompt by prompt; ``"mean"``: their mean over prompts at each
    position (over the real tokens, with ``attention_mask``; ``run`` defaults to ``like``);
    ``"zero"``: zeros shaped like ``like``.

    Example:
        >>> graph = Graph.of(model)
        >>> run = record_senders(model, graph, torch.tensor([[1, 2, 3, 4], [1, 5, 3, 4]]))
        >>> sources(None, "mean", run).shape, float(sources(None, "zero", run).abs().sum())
        (torch.Size([1, 4, 17, 32]), 0.0)
    """
    if ablation not in ABLATIONS:
        raise InputError(f"ablation must be one of {list(ABLATIONS)}, got {ablation!r}")
    if ablation == "zero":
        return torch.zeros_like(like.outputs[:1])
    if ablation == "patch":
        if run is None:
            raise InputError("patching edges from another run needs its tokens (e.g. corrupted_tokens=...)")
        if run.outputs.shape != like.outputs.shape:
            raise InputError(
                f"the patched-in run has shape {tuple(run.outputs.shape[:2])} but the base run "
                f"{tuple(like.outputs.shape[:2])}; pair every prompt with a source of the same length"
            )
        return run.outputs
    outputs = (run or like).outputs
    if attention_mask is None:
        return outputs.mean(0, keepdim=True)
    weights = attention_mask.to(outputs.dtype)[:, :, None, None]
    return (outputs * weights).sum(0, keepdim=True) / weights.sum(0, keepdim=True).clamp_min(1)


def prepare_runs(
    model,
    clean_tokens,
    corrupted_tokens,
    direction: Direction,
    ablation: Ablation,
    attention_mask: Tensor | None = None,
    hook_context: HookContext | None = None,
) -> tuple[Graph, SenderRun, Tensor, SenderRun | None]:
    """The graph, the base run (the one patched), the sources and the source run, for a direction.

    ``"noising"``: the clean run is patched with the corrupted one's contributions (or their
    mean, or zeros); ``"denoising"``: the reverse. ``corrupted_tokens`` may be ``None`` for
    ``"mean"`` and ``"zero"`` (the mean is then over the clean prompts, and only noising applies).

    Example:
        >>> graph, base, source, _ = prepare_runs(model, tokens, tokens + 1, "noising", "patch")
        >>> source.shape
        torch.Size([1, 4, 17, 32])
    """
    graph = Graph.of(model)
    if ablation not in ABLATIONS:
        raise InputError(f"ablation must be one of {list(ABLATIONS)}, got {ablation!r}")
    if corrupted_tokens is None:
        if ablation == "patch" or direction != "noising":
            raise InputError("this needs corrupted_tokens: patching and denoising read the corrupted run")
        base_tokens, source_tokens = input_tokens(model, clean_tokens)[0], None
    else:
        base_tokens, source_tokens = base_and_source(model, clean_tokens, corrupted_tokens, direction)
    base = record_senders(model, graph, base_tokens, attention_mask, hook_context=hook_context)
    source_run = None
    if source_tokens is not None and ablation != "zero":
        source_run = record_senders(model, graph, source_tokens, attention_mask, resid=False, hook_context=hook_context)
    return graph, base, sources(source_run, ablation, base, attention_mask), source_run
