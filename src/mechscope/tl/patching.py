"""TransformerLens' ``patching``: ``get_act_patch_*`` with its signatures and output layouts, run on
mechscope's batched engine (`mechscope.patching.run_patches`) instead of one forward per patch.

Every function takes ``(model, corrupted_tokens, clean_cache, patching_metric)``: the corrupted
run is patched with activations from ``clean_cache`` and ``patching_metric(logits)`` turns the
logits of one patched run (``[batch, pos, d_vocab]``, every prompt of ``corrupted_tokens``) into
a scalar, exactly as in TransformerLens. Grouped-query models patch keys and values per
key-value head (``[..., n_key_value_heads]``), as TransformerLens does.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.names import act_name
from mechscope.patching import base_run, get_site, run_patches
from mechscope.tl.utils import get_act_name

Metric = Callable[[Tensor], Any]

# TransformerLens index axis -> mechscope Site axis, per activation.
_BY = {
    ("layer", "pos"): ("pos",),
    ("layer", "pos", "head"): ("pos", "head"),
    ("layer", "head"): ("head",),
    ("layer", "head_index"): ("head",),
    ("layer", "head_index", "dest_pos"): ("head", "query_pos"),
    ("layer", "head_index", "dest_pos", "src_pos"): ("head", "query_pos", "key_pos"),
}


def _scalar_metric(patching_metric: Metric, n_prompts: int) -> Callable[[Tensor], Tensor]:
    """mechscope's metric contract (one value per row of a batch of patched copies) from
    TransformerLens' (one scalar per patched run of all prompts): each copy's value, repeated per prompt."""

    def metric(logits: Tensor) -> Tensor:
        copies = logits.shape[0] // n_prompts
        values = []
        for i in range(copies):
            value = torch.as_tensor(patching_metric(logits[i * n_prompts : (i + 1) * n_prompts]), device=logits.device)
            if value.numel() != 1:
                raise InputError(f"patching_metric must return a scalar, got shape {tuple(value.shape)}")
            values.append(value.reshape(()).float())
        return torch.stack(values).repeat_interleave(n_prompts)

    return metric


def _patch(
    model,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    activation_name: str,
    index_axis_names: Sequence[str],
) -> Float[Tensor, "..."]:
    site_name = activation_name
    by = _BY[tuple(index_axis_names)]
    if site_name in ("k", "v"):
        by = tuple("kv_head" if axis == "head" else axis for axis in by)
    site, by = get_site(site_name, by)
    tokens = corrupted_tokens[None] if corrupted_tokens.dim() == 1 else corrupted_tokens
    tokens = tokens.to(model.device)
    n_layers, n_prompts = model.cfg.n_layers, tokens.shape[0]
    names = [act_name("resid_pre", layer) for layer in range(n_layers)]
    base, cache = base_run(model, tokens, names=names)
    base_resid = {layer: cache[names[layer]] for layer in range(n_layers)}
    sources = {layer: clean_cache[site.hook(layer)].to(model.device) for layer in range(n_layers)}
    first = sources[0]
    if first.shape[0] != n_prompts:
        raise InputError(f"clean_cache holds {first.shape[0]} prompts, corrupted_tokens {n_prompts}; they must match")
    sizes = tuple(first.shape[1 + site.axes.index(axis)] for axis in by)
    grid = torch.tensor(list(itertools.product(range(n_layers), *(range(s) for s in sizes))), dtype=torch.long)
    out = run_patches(model, base_resid, sources, site, by, grid, _scalar_metric(patching_metric, n_prompts), base=base)
    return out.mean(-1).reshape(n_layers, *sizes)


def generic_activation_patch(
    model,
    corrupted_tokens: Int[Tensor, "batch pos"],
    clean_cache,
    patching_metric: Metric,
    patch_setter: Callable[[Tensor, Sequence[int], Tensor], Tensor],
    activation_name: str,
    index_axis_names: Sequence[str] | None = None,
    index_df: Any = None,
    return_index_df: bool = False,
):
    """TransformerLens' generic patching loop: for each index (``layer`` first), run the corrupted
    tokens with ``patch_setter(corrupted_activation, index, clean_activation)`` applied at
    ``activation_name`` of that layer and record ``patching_metric(logits)``.

    With ``index_axis_names`` the result has one axis per name (``layer``: ``n_layers``; ``pos``,
    ``dest_pos``, ``src_pos``: the sequence length; ``head``/``head_index``: heads, or key-value
    heads for ``k``/``v``); with ``index_df`` (a pandas DataFrame of indices) it is flat, one
    entry per row. The setters of this module run batched; any other setter runs one forward
    per index, as in TransformerLens.
    """
    if index_df is None:
        if index_axis_names is None:
            raise InputError("give index_axis_names or index_df")
        kind = _SETTERS.get(patch_setter)
        if kind is not None and tuple(index_axis_names) in _BY and not return_index_df:
            return _patch(model, corrupted_tokens, clean_cache, patching_metric, activation_name, index_axis_names)
        heads = model.cfg.n_key_value_heads if activation_name in ("k", "v") else model.cfg.n_heads
        ranges = {"layer": model.cfg.n_layers, "pos": corrupted_tokens.shape[-1], "head_index": heads, "head": heads}
        ranges["src_pos"] = ranges["dest_pos"] = ranges["pos"]
        sizes = [ranges[name] for name in index_axis_names]
        rows = list(itertools.product(*(range(s) for s in sizes)))
        out = torch.zeros(sizes, device=model.device)
    else:
        if index_axis_names is not None:
            raise InputError("give index_axis_names or index_df, not both")
        rows = [tuple(int(v) for v in row) for row in index_df.to_numpy()]
        out = torch.zeros(len(rows), device=model.device)
    for c, index in enumerate(rows):
        name = get_act_name(activation_name, layer=index[0])
        clean = clean_cache[name]

        def hook(activation: Tensor, *, hook, index=index, clean=clean) -> Tensor:
            return patch_setter(activation.clone(), list(index), clean)

        logits = model.run_with_hooks(corrupted_tokens, fwd_hooks=[(name, hook)])
        value = float(torch.as_tensor(patching_metric(logits)).item())
        if index_df is not None:
            out[c] = value
        else:
            out[index] = value
    if return_index_df:
        return out, _index_frame(rows, index_axis_names, index_df)
    return out


def _index_frame(rows, names, index_df):
    if index_df is not None:
        return index_df
    import pandas as pd

    return pd.DataFrame(rows, columns=list(names))


def layer_pos_patch_setter(corrupted_activation, index, clean_activation):
    """Patch ``[:, pos]`` (index ``[layer, pos]``)."""
    layer, pos = index
    corrupted_activation[:, pos, ...] = clean_activation[:, pos, ...]
    return corrupted_activation


def layer_pos_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """Patch ``[:, pos, head]`` (index ``[layer, pos, head_index]``)."""
    layer, pos, head_index = index
    corrupted_activation[:, pos, head_index] = clean_activation[:, pos, head_index]
    return corrupted_activation


def layer_head_vector_patch_setter(corrupted_activation, index, clean_activation):
    """Patch ``[:, :, head]`` (index ``[layer, head_index]``)."""
    layer, head_index = index
    corrupted_activation[:, :, head_index] = clean_activation[:, :, head_index]
    return corrupted_activation


def layer_head_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """Patch a head's whole pattern ``[:, head]`` (index ``[layer, head_index]``)."""
    layer, head_index = index
    corrupted_activation[:, head_index, :, :] = clean_activation[:, head_index, :, :]
    return corrupted_activation


def layer_head_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """Patch one query row of a head's pattern (index ``[layer, head_index, dest_pos]``)."""
    layer, head_index, dest_pos = index
    corrupted_activation[:, head_index, dest_pos, :] = clean_activation[:, head_index, dest_pos, :]
    return corrupted_activation


def layer_head_dest_src_pos_pattern_patch_setter(corrupted_activation, index, clean_activation):
    """Patch one entry of a head's pattern (index ``[layer, head_index, dest_pos, src_pos]``)."""
    layer, head_index, dest_pos, src_pos = index
    corrupted_activation[:, head_index, dest_pos, src_pos] = clean_activation[:, head_index, dest_pos, src_pos]
    return corrupted_activation


_SETTERS = {
    layer_pos_patch_setter: "pos",
    layer_pos_head_vector_patch_setter: "pos_head",
    layer_head_vector_patch_setter: "head",
    layer_head_pattern_patch_setter: "pattern_head",
    layer_head_pos_pattern_patch_setter: "pattern_dest",
    layer_head_dest_src_pos_pattern_patch_setter: "pattern_dest_src",
}


def _named(setter, activation: str, axes: tuple[str, ...], shape: str):
    fn = partial(generic_activation_patch, patch_setter=setter, activation_name=activation, index_axis_names=axes)
    fn.__doc__ = f"Activation patching of ``{activation}`` by {axes[1:]}: a tensor of shape [{shape}]."
    return fn


get_act_patch_resid_pre = _named(layer_pos_patch_setter, "resid_pre", ("layer", "pos"), "n_layers, pos")
get_act_patch_resid_mid = _named(layer_pos_patch_setter, "resid_mid", ("layer", "pos"), "n_layers, pos")
get_act_patch_attn_out = _named(layer_pos_patch_setter, "attn_out", ("layer", "pos"), "n_layers, pos")
get_act_patch_mlp_out = _named(layer_pos_patch_setter, "mlp_out", ("layer", "pos"), "n_layers, pos")
get_act_patch_attn_head_out_by_pos = _named(
    layer_pos_head_vector_patch_setter, "z", ("layer", "pos", "head"), "n_layers, pos, n_heads"
)
get_act_patch_attn_head_q_by_pos = _named(
    layer_pos_head_vector_patch_setter, "q", ("layer", "pos", "head"), "n_layers, pos, n_heads"
)
get_act_patch_attn_head_k_by_pos = _named(
    layer_pos_head_vector_patch_setter, "k", ("layer", "pos", "head"), "n_layers, pos, n_key_value_heads"
)
get_act_patch_attn_head_v_by_pos = _named(
    layer_pos_head_vector_patch_setter, "v", ("layer", "pos", "head"), "n_layers, pos, n_key_value_heads"
)
get_act_patch_attn_head_pattern_by_pos = _named(
    layer_head_pos_pattern_patch_setter, "pattern", ("layer", "head_index", "dest_pos"), "n_layers, n_heads, dest_pos"
)
get_act_patch_attn_head_pattern_dest_src_pos = _named(
    layer_head_dest_src_pos_pattern_patch_setter,
    "pattern",
    ("layer", "head_index", "dest_pos", "src_pos"),
    "n_layers, n_heads, dest_pos, src_pos",
)
get_act_patch_attn_head_out_all_pos = _named(
    layer_head_vector_patch_setter, "z", ("layer", "head"), "n_layers, n_heads"
)
get_act_patch_attn_head_q_all_pos = _named(layer_head_vector_patch_setter, "q", ("layer", "head"), "n_layers, n_heads")
get_act_patch_attn_head_k_all_pos = _named(
    layer_head_vector_patch_setter, "k", ("layer", "head"), "n_layers, n_key_value_heads"
)
get_act_patch_attn_head_v_all_pos = _named(
    layer_head_vector_patch_setter, "v", ("layer", "head"), "n_layers, n_key_value_heads"
)
get_act_patch_attn_head_pattern_all_pos = _named(
    layer_head_pattern_patch_setter, "pattern", ("layer", "head_index"), "n_layers, n_heads"
)


def _pad_heads(result: Tensor, like: Tensor) -> Tensor:
    return torch.nn.functional.pad(result, (0, like.size(-1) - result.size(-1)))


def get_act_patch_attn_head_all_pos_every(
    model, corrupted_tokens, clean_cache, metric
) -> Float[Tensor, "5 layer head"]:
    """Output, query, key, value and pattern of every head, across positions: ``[5, n_layers, n_heads]``
    (key/value results of grouped-query models zero-padded to ``n_heads``, as in TransformerLens)."""
    args = (model, corrupted_tokens, clean_cache, metric)
    out = [get_act_patch_attn_head_out_all_pos(*args), get_act_patch_attn_head_q_all_pos(*args)]
    out.append(_pad_heads(get_act_patch_attn_head_k_all_pos(*args), out[-1]))
    out.append(_pad_heads(get_act_patch_attn_head_v_all_pos(*args), out[-1]))
    out.append(get_act_patch_attn_head_pattern_all_pos(*args))
    return torch.stack(out, dim=0)


def get_act_patch_attn_head_by_pos_every(
    model, corrupted_tokens, clean_cache, metric
) -> Float[Tensor, "5 layer pos head"]:
    """As `get_act_patch_attn_head_all_pos_every`, by position: ``[5, n_layers, pos, n_heads]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    out = [get_act_patch_attn_head_out_by_pos(*args), get_act_patch_attn_head_q_by_pos(*args)]
    out.append(_pad_heads(get_act_patch_attn_head_k_by_pos(*args), out[-1]))
    out.append(_pad_heads(get_act_patch_attn_head_v_by_pos(*args), out[-1]))
    out.append(get_act_patch_attn_head_pattern_by_pos(*args).transpose(-1, -2))
    return torch.stack(out, dim=0)


def get_act_patch_block_every(model, corrupted_tokens, clean_cache, metric) -> Float[Tensor, "3 layer pos"]:
    """Residual stream before each block, attention output and MLP output, by position: ``[3, n_layers, pos]``."""
    args = (model, corrupted_tokens, clean_cache, metric)
    return torch.stack(
        [get_act_patch_resid_pre(*args), get_act_patch_attn_out(*args), get_act_patch_mlp_out(*args)], dim=0
    )
