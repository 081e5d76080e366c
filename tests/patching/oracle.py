"""Naive references for the patching tests: one full forward per patch, simple hooks."""

from __future__ import annotations

import itertools

import torch

from mechscope.names import act_name
from mechscope.patching.activation import get_site


def naive_patch_grid(model, base_tokens, source_acts, metric, site, by, layers=None, attention_mask=None):
    """For every (layer, *index): a full forward of ``base_tokens`` with a hook copying the
    source entries at that index; returns the mean metric over prompts, in grid order."""
    site, by = get_site(site, by)
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    shape = source_acts[layers[0]].shape[1:]
    sizes = [shape[site.axes.index(axis)] for axis in by]
    out = torch.empty(len(layers), *sizes)
    for li, layer in enumerate(layers):
        for index in itertools.product(*[range(s) for s in sizes]):
            key = [slice(None)]  # batch
            idx = iter(index)
            for axis in site.axes:
                key.append(next(idx) if axis in by else slice(None))
            key = tuple(key)

            def hook(act, *, hook, key=key, source=source_acts[layer]):
                act = act.clone()
                act[key] = source.expand_as(act)[key]
                return act

            with torch.no_grad():
                logits = model.run_with_hooks(
                    base_tokens, attention_mask=attention_mask, fwd_hooks=[(act_name(site.name, layer), hook)]
                )
            out[(li, *index)] = metric(logits).mean()
    return out


def cache_site(model, tokens, site, layers=None, attention_mask=None):
    site, _ = get_site(site)
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    names = [site.hook(layer) for layer in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=attention_mask)
    return {layer: cache[site.hook(layer)] for layer in layers}
