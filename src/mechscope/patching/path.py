"""Path patching (Wang et al. 2022, IOI): the effect of sender heads through chosen receivers only.

For each set of sender heads, with the clean run as the base and the corrupted run as source:

1. run the clean prompts with every head's output ``z`` frozen at its clean value, except the
   senders, which take their corrupted value (MLPs recompute, unless ``freeze_mlps``);
2. receivers ``"logits"``: the metric of that run is the result. Receiver heads: take the
   residual stream entering each receiver's layer in that run and feed it, through the
   per-head input hooks ``blocks.{l}.hook_q_input`` / ``hook_k_input`` / ``hook_v_input``, to
   the receivers' queries, keys or values only, in an otherwise clean run.

Every sender set is a batch element: two batched forwards (one for ``"logits"``), each
starting at the first layer that differs from the clean run, scheduled and chunked by the
patching engine (`mechscope.patching.engine.schedule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.names import act_name, layer_of
from mechscope.patching.activation import base_and_source
from mechscope.patching.engine import SweepOptions, resolve_logit_positions, rows_per_forward, schedule
from mechscope.patching.metrics import Metric

Head = tuple[int, int]
ReceiverInput = Literal["q", "k", "v"]


def _check_heads(model, heads: Sequence[Head], what: str, n_heads: int) -> list[Head]:
    out = []
    for item in heads:
        if len(item) != 2:
            raise InputError(f"{what} must be (layer, head) pairs, got {item!r}")
        layer, head = int(item[0]), int(item[1])
        if not (0 <= layer < model.cfg.n_layers and 0 <= head < n_heads):
            raise InputError(f"{what} ({layer}, {head}) is out of range: {model.cfg.n_layers} layers, {n_heads} heads")
        out.append((layer, head))
    return out


@torch.no_grad()
def path_patch(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    senders: Sequence[Sequence[Head]] | None = None,
    receivers: Literal["logits"] | Sequence[Head] = "logits",
    receiver_input: ReceiverInput = "q",
    *,
    freeze_mlps: bool = False,
    options: SweepOptions | None = None,
    **sweep,
) -> Tensor:
    """The metric after patching the paths from each sender set to the receivers.

    ``senders``: a list of sender sets, each a list of ``(layer, head)``; ``None`` sweeps every
    single head and returns ``[layer, head]``, otherwise ``[n_sets]`` (``per_prompt`` adds a
    trailing ``[n_prompts]`` axis). ``receivers``: ``"logits"`` or a list of ``(layer, head)``
    whose ``receiver_input`` (``"q"``, ``"k"`` or ``"v"``) is patched; for keys and values of
    grouped-query models the receiver index is the key-value head. Sweep options (``per_prompt``,
    ``batch_size``, ``memory_budget``, ``logit_positions``, ``progress``) as in `SweepOptions`;
    ``reuse_prefix`` does not apply (a head patch reaches every position).

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 7]
        >>> path_patch(model, clean, corrupted, metric).shape
        torch.Size([3, 4])
        >>> path_patch(model, clean, corrupted, metric, [[(0, 1)], [(0, 2), (1, 0)]], [(2, 3)], "k").shape
        torch.Size([2])
    """
    options = SweepOptions.of(options, sweep)
    cfg = model.cfg
    if receiver_input not in ("q", "k", "v"):
        raise InputError(f"receiver_input must be 'q', 'k' or 'v', got {receiver_input!r}")
    clean, corrupted = base_and_source(model, clean_tokens, corrupted_tokens, "noising")
    grid = senders is None
    if grid:
        senders = [[(layer, head)] for layer in range(cfg.n_layers) for head in range(cfg.n_heads)]
    sender_sets = [_check_heads(model, s, "sender", cfg.n_heads) for s in senders]
    if not sender_sets:
        raise InputError("senders is empty: pass at least one set of (layer, head) pairs, or None for every head")
    to_logits = isinstance(receivers, str)
    if to_logits and receivers != "logits":
        raise InputError(f"receivers must be 'logits' or a list of (layer, head), got {receivers!r}")
    receiver_heads = cfg.n_heads if receiver_input == "q" else cfg.n_key_value_heads
    receiver_list = [] if to_logits else _check_heads(model, receivers, "receiver", receiver_heads)
    if not to_logits and not receiver_list:
        raise InputError("receivers is empty: pass 'logits' or at least one (layer, head)")

    n_layers, n = cfg.n_layers, clean.shape[0]
    names = [act_name("z", layer) for layer in range(n_layers)] + [
        act_name("resid_pre", layer) for layer in range(n_layers)
    ]
    if freeze_mlps and not cfg.attn_only:
        names += [act_name("mlp_out", layer) for layer in range(n_layers)]
    _, clean_cache = model.run_with_cache(clean, names_filter=names)
    _, corrupted_cache = model.run_with_cache(
        corrupted, names_filter=[act_name("z", layer) for layer in range(n_layers)]
    )
    receiver_layers = sorted({layer for layer, _ in receiver_list})

    sender_mask = torch.zeros(len(sender_sets), n_layers, cfg.n_heads, dtype=torch.bool, device=model.device)
    for i, heads in enumerate(sender_sets):
        for layer, head in heads:
            sender_mask[i, layer, head] = True
    first_sender = torch.tensor([min(layer for layer, _ in s) for s in sender_sets])

    keep, metric = resolve_logit_positions(metric, options.logit_positions, clean.shape[1])
    rows = options.batch_size or rows_per_forward(model, clean.shape[1], options.memory_budget, keep and len(keep))
    per_chunk = max(1, rows // n)
    results = torch.empty(len(sender_sets), n, device=model.device)
    starts = torch.zeros(len(sender_sets), dtype=torch.long)
    order, chunks = schedule(first_sender, starts, per_chunk, n, clean.shape[1], n_layers)
    for chunk in tqdm(chunks, desc="path patching", disable=not options.progress):
        idx = order[chunk]
        k = len(idx)
        begin = int(first_sender[idx].min())
        if receiver_layers:
            begin = min(begin, receiver_layers[0])
        hooks = []
        for layer in range(begin, n_layers):
            mask = sender_mask[idx.to(model.device), layer].repeat_interleave(n, 0)[:, None, :, None]
            clean_z, corrupted_z = clean_cache["z", layer], corrupted_cache["z", layer]

            def freeze(z, *, hook, mask=mask, clean_z=clean_z, corrupted_z=corrupted_z, k=k):
                return torch.where(mask, corrupted_z.repeat(k, 1, 1, 1), clean_z.repeat(k, 1, 1, 1)).to(z.dtype)

            hooks.append((act_name("z", layer), freeze))
            if freeze_mlps and not cfg.attn_only:
                clean_mlp = clean_cache["mlp_out", layer]
                hooks.append((act_name("mlp_out", layer), lambda x, *, hook, c=clean_mlp, k=k: c.repeat(k, 1, 1)))
        resid = clean_cache["resid_pre", begin].repeat(k, 1, 1)
        if to_logits:
            resid = model.run_with_hooks(resid, start_at_layer=begin, stop_at_layer=n_layers, fwd_hooks=hooks)
            logits = _unembed(model, resid, keep)
        else:
            captured: dict[int, Tensor] = {}

            def capture(x, *, hook, captured=captured):
                captured[layer_of(hook.name)] = x

            hooks += [(act_name("resid_pre", layer), capture) for layer in receiver_layers]
            model.run_with_hooks(resid, start_at_layer=begin, stop_at_layer=receiver_layers[-1] + 1, fwd_hooks=hooks)
            logits = _run_receivers(model, clean_cache, captured, receiver_list, receiver_input, k, keep)
        values = metric(logits)
        if values.shape != (logits.shape[0],):
            raise InputError(f"the metric must return one value per row [batch], got shape {tuple(values.shape)}")
        results[idx.to(model.device)] = values.float().view(k, n)
    out = results if options.per_prompt else results.mean(-1)
    return out.reshape(n_layers, cfg.n_heads, *out.shape[1:]) if grid else out


def _unembed(model, resid: Tensor, keep: list[int] | None) -> Tensor:
    """The final norm and unembedding of ``resid`` at positions ``keep`` (every position for ``None``)."""
    return model(resid if keep is None else resid[:, keep], start_at_layer=model.cfg.n_layers)


def _run_receivers(
    model, clean_cache, captured: dict[int, Tensor], receivers: list[Head], which: str, k: int, keep: list[int] | None
) -> Tensor:
    """A clean run where each receiver's ``which`` input is the captured residual stream."""
    first = min(layer for layer, _ in receivers)
    hooks = []
    for layer in sorted({layer for layer, _ in receivers}):
        heads = torch.tensor([h for lay, h in receivers if lay == layer], device=model.device)

        def swap(x, *, hook, heads=heads, new=captured[layer]):
            x = x.clone()
            x[:, :, heads] = new[:, :, None].to(x.dtype)
            return x

        hooks.append((f"blocks.{layer}.hook_{which}_input", swap))
    resid = clean_cache["resid_pre", first].repeat(k, 1, 1)
    resid = model.run_with_hooks(resid, start_at_layer=first, stop_at_layer=model.cfg.n_layers, fwd_hooks=hooks)
    return _unembed(model, resid, keep)
