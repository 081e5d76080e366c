"""Attribution patching (AtP): first-order estimates of every patching effect at once.

AtP estimates the effect of patching a node ``n`` from the base run (the one being patched)
to the source run as ``(n_source - n_base) . dM/dn`` at the base run: two forwards and one
backward give an estimate for every node at once. Effects are changes of the metric,
``metric(patched) - metric(base)``, averaged over prompts; with ``direction="denoising"`` the
base is the corrupted run and the source the clean one, with ``"noising"`` the reverse.
`mechscope.patching.atp_star` builds AtP* on these pieces.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechscope.names import act_name
from mechscope.patching.activation import Direction, base_and_source, get_site
from mechscope.patching.metrics import Metric


def gradient_pass(
    model,
    tokens: Tensor,
    names: list[str],
    metric: Metric,
    drop_layers: list[int | None] | None = None,
    attention_mask: Tensor | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Activations ``[n_prompts, ...]`` and gradients ``[n_drops, n_prompts, ...]`` of ``sum(metric)``.

    ``drop_layers``: one entry per gradient copy; ``None`` is the plain gradient, a layer ``l``
    the gradient with the paths through ``blocks.{l}.hook_attn_out`` and ``hook_mlp_out``
    dropped (GradDrop). All copies run as one batch: one forward, one backward.

    Example:
        >>> acts, grads = gradient_pass(model, tokens, ["blocks.0.attn.hook_z"], lambda x: x[:, -1, 0], [None, 1])
        >>> grads["blocks.0.attn.hook_z"].shape
        torch.Size([2, 1, 4, 4, 8])
    """
    drop_layers = [None] if drop_layers is None else list(drop_layers)
    n, copies = tokens.shape[0], len(drop_layers)
    store: dict[str, Tensor] = {}

    def save(x: Tensor, *, hook) -> None:
        store[hook.name] = x

    def leaf(x: Tensor, *, hook) -> Tensor | None:
        return None if x.requires_grad else x.detach().requires_grad_(True)

    bwd = []
    for layer in sorted({d for d in drop_layers if d is not None}):
        keep = torch.tensor([d != layer for d in drop_layers], device=model.device, dtype=model.dtype)
        keep = keep.repeat_interleave(n)[:, None, None]  # [rows, 1, 1]
        for name in (act_name("attn_out", layer), act_name("mlp_out", layer)):
            if name in model.hook_dict:
                bwd.append((name, lambda g, *, hook, keep=keep: g * keep.to(g.dtype)))
    mask = None if attention_mask is None else attention_mask.repeat(copies, 1)
    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens.repeat(copies, 1),
            attention_mask=mask,
            fwd_hooks=[("hook_embed", leaf)] + [(name, save) for name in names],
            bwd_hooks=bwd,
        )
        grads = torch.autograd.grad(metric(logits).sum(), [store[name] for name in names], allow_unused=True)
    acts = {name: store[name][:n].detach() for name in names}
    out = {}
    for name, g in zip(names, grads, strict=False):
        g = torch.zeros_like(store[name]) if g is None else g
        out[name] = g.detach().view(copies, n, *g.shape[1:])
    return acts, out


def source_activations(model, tokens: Tensor, names: list[str], attention_mask: Tensor | None) -> dict[str, Tensor]:
    """The activations ``names`` of a no-grad run of ``tokens`` (the source side of an AtP estimate).

    Example:
        >>> source_activations(model, tokens, ["blocks.0.attn.hook_z"], None)["blocks.0.attn.hook_z"].shape
        torch.Size([1, 4, 4, 8])
    """
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=attention_mask)
    return {name: cache[name] for name in names}


def attribution_patch(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    sites: tuple[str, ...] | list[str] = ("z", "resid_pre", "attn_out", "mlp_out", "post"),
    *,
    direction: Direction = "denoising",
    attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """AtP estimates of the metric change for every node of each site (two forwards, one backward).

    Each site uses its default granularity (see `mechscope.patching.SITES`): ``z`` gives
    ``[layer, head]``, the residual stream, attention and MLP outputs ``[layer, pos]``, ``post``
    ``[layer, d_mlp]``. Compare with ``activation_patch(...) - metric(base)``.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> est = attribution_patch(model, clean, corrupted, lambda x: x[:, -1, 7], sites=["z", "resid_pre"])
        >>> est["z"].shape, est["resid_pre"].shape
        (torch.Size([3, 4]), torch.Size([3, 4]))
    """
    base, source = base_and_source(model, clean_tokens, corrupted_tokens, direction)
    resolved = [get_site(site) for site in sites]
    names = [s.hook(layer) for s, _ in resolved for layer in range(model.cfg.n_layers)]
    acts, grads = gradient_pass(model, base, names, metric, attention_mask=attention_mask)
    src = source_activations(model, source, names, attention_mask)
    out = {}
    for site, by in resolved:
        keep = [1 + site.axes.index(axis) for axis in by]
        per_layer = []
        for layer in range(model.cfg.n_layers):
            name = site.hook(layer)
            prod = (src[name] - acts[name]) * grads[name][0]  # [n_prompts, *axes]
            other = [d for d in range(1, prod.dim()) if d not in keep]
            per_layer.append((prod.sum(other) if other else prod).mean(0))
        out[site.name] = torch.stack(per_layer)
    return out
