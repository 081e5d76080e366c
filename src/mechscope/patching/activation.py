"""Batched activation patching and ablation.

One engine, small strategies: a `Site` names an activation layout (its axes after the batch
axis) and ``by`` picks the axes a patch indexes. A patch is ``(layer, *index)``: at that layer
the activation entries matching the index are replaced by a *source* (the other run's
activation, zeros, a mean or a resampled prompt's activation) and the rest of the model runs
as usual.

Many patches run as the batch elements of one forward, patch-major (row ``r`` holds patch
``r // n_prompts`` applied to prompt ``r % n_prompts``). Each forward starts at the first
patched layer of its chunk from the cached residual stream of the run being patched, chunks
fit a memory budget, and metric values stay on the device until the end.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.cache import act_name
from mechscope.errors import InputError
from mechscope.hooks import unknown_name_error
from mechscope.patching.metrics import Metric

Direction = Literal["denoising", "noising"]
AblationKind = Literal["zero", "mean", "resample"]


@dataclass(frozen=True)
class Site:
    """An activation layout: its short hook name, its axes after ``batch``, and the default ``by``."""

    name: str
    axes: tuple[str, ...]
    default_by: tuple[str, ...]

    def hook(self, layer: int) -> str:
        return act_name(self.name, layer)


_RESID = ("pos", "d_model")
SITES: dict[str, Site] = {
    "resid_pre": Site("resid_pre", _RESID, ("pos",)),
    "resid_mid": Site("resid_mid", _RESID, ("pos",)),
    "resid_post": Site("resid_post", _RESID, ("pos",)),
    "attn_out": Site("attn_out", _RESID, ("pos",)),
    "mlp_out": Site("mlp_out", _RESID, ("pos",)),
    "z": Site("z", ("pos", "head", "d_head"), ("head",)),
    "result": Site("result", ("pos", "head", "d_model"), ("head",)),
    "q": Site("q", ("pos", "head", "d_head"), ("head",)),
    # Grouped-query models: keys and values are patched per key-value head.
    "k": Site("k", ("pos", "kv_head", "d_head"), ("kv_head",)),
    "v": Site("v", ("pos", "kv_head", "d_head"), ("kv_head",)),
    "pattern": Site("pattern", ("head", "query_pos", "key_pos"), ("head",)),
    "post": Site("post", ("pos", "d_mlp"), ("d_mlp",)),
}


def get_site(site: str | Site, by: tuple[str, ...] | list[str] | str | None = None) -> tuple[Site, tuple[str, ...]]:
    """Resolve a site name and the axes patched ``by`` (checked against the site's axes).

    Example:
        >>> get_site("z", by=("pos", "head"))
        (Site(name='z', axes=('pos', 'head', 'd_head'), default_by=('head',)), ('pos', 'head'))
    """
    if isinstance(site, str):
        if site not in SITES:
            raise unknown_name_error(site, SITES, "patching site")
        site = SITES[site]
    if by is None:
        return site, site.default_by
    by = (by,) if isinstance(by, str) else tuple(by)
    unknown = [axis for axis in by if axis not in site.axes]
    if unknown or len(set(by)) != len(by):
        raise InputError(f"cannot patch site {site.name!r} by {by}; choose axes among {site.axes}")
    return site, tuple(axis for axis in site.axes if axis in by)


def _check_site_exists(model, site: Site, layers: list[int]) -> None:
    for layer in layers:
        name = site.hook(layer)
        if name not in model.hook_dict:
            raise unknown_name_error(name, model.hook_dict)


def patch_grid(sizes: tuple[int, ...], layers: list[int]) -> Tensor:
    """Every patch index ``[n_patches, 1 + len(sizes)]`` (layer first), in row-major grid order.

    Example:
        >>> patch_grid((2,), layers=[0, 1]).tolist()
        [[0, 0], [0, 1], [1, 0], [1, 1]]
    """
    ranges = [layers, *[range(s) for s in sizes]]
    return torch.tensor(list(itertools.product(*ranges)), dtype=torch.long).reshape(-1, 1 + len(sizes))


def rows_per_forward(model, seq: int, memory_budget: int, logit_seq: int | None = None) -> int:
    """How many sequences of length ``seq`` one patched forward may hold within ``memory_budget`` bytes.

    An estimate of the activations alive at once under ``torch.no_grad`` (logits at
    ``logit_seq`` positions, default all; residual copies, attention scores and MLP
    activations, with a factor for temporaries).

    Example:
        >>> rows_per_forward(model, seq=4, memory_budget=2**20) > 0
        True
    """
    cfg = model.cfg
    logit_seq = seq if logit_seq is None else logit_seq
    per_row = logit_seq * cfg.d_vocab + seq * (8 * cfg.d_model + 3 * cfg.d_mlp + 3 * cfg.n_heads * seq)
    per_row *= 2 * torch.finfo(model.dtype).bits // 8
    return max(1, int(memory_budget // per_row))


@torch.no_grad()
def run_patches(
    model,
    base_resid: dict[int, Tensor],
    sources: dict[int, Tensor],
    site: Site,
    by: tuple[str, ...],
    patches: Tensor,
    metric: Metric,
    *,
    attention_mask: Tensor | None = None,
    batch_size: int | None = None,
    memory_budget: int = 2**30,
    logit_positions: int | list[int] | None = None,
    progress: bool = False,
) -> Tensor:
    """The engine: metric values ``[n_patches, n_prompts]`` for each patch of ``patches``.

    ``base_resid[l]`` is the residual stream ``[n_prompts, pos, d_model]`` entering layer ``l``
    in the run being patched; ``sources[l]`` is the replacement activation at layer ``l``
    (``[n_prompts or 1, *site.axes]``). ``patches`` is ``[n_patches, 1 + len(by)]`` (layer,
    then one index per ``by`` axis). ``batch_size`` caps the rows of one forward; otherwise
    `rows_per_forward` fits them to ``memory_budget`` bytes. ``logit_positions`` (e.g. ``-1``)
    unembeds only those positions: the metric then sees ``[batch, len(positions), d_vocab]``.

    Example:
        >>> _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("resid_pre"))
        >>> zeros = {l: torch.zeros(1, 4, 32) for l in range(3)}
        >>> site, by = get_site("resid_pre")
        >>> out = run_patches(model, {l: cache["resid_pre", l] for l in range(3)}, zeros, site, by,
        ...                   patch_grid((4,), [0, 1, 2]), lambda logits: logits[:, -1, 0])
        >>> out.shape
        torch.Size([12, 1])
    """
    n_prompts, seq = next(iter(base_resid.values())).shape[:2]
    axis_sizes = dict(zip(site.axes, next(iter(sources.values())).shape[1:]))
    mask_shape = [axis_sizes[a] if a in by else 1 for a in site.axes]
    if patches.dim() != 2 or patches.shape[1] != 1 + len(by):
        raise InputError(f"patches must be [n_patches, {1 + len(by)}] (layer, then {by}), got {tuple(patches.shape)}")
    keep = None if logit_positions is None else [logit_positions] if isinstance(logit_positions, int) else list(logit_positions)
    rows = batch_size or rows_per_forward(model, seq, memory_budget, None if keep is None else len(keep))
    per_chunk = max(1, rows // n_prompts)
    order = torch.argsort(patches[:, 0], stable=True)
    device = model.device
    results = torch.empty(len(patches), n_prompts, device=device)
    mask_rows = None if attention_mask is None else attention_mask.to(device)
    for idx in tqdm(_chunks(patches[order, 0], per_chunk, n_prompts * seq), desc=f"patching {site.name}", disable=not progress):
        idx = order[idx]
        chunk = patches[idx]
        first = int(chunk[:, 0].min())
        hooks = []
        for layer in chunk[:, 0].unique().tolist():
            local = (chunk[:, 0] == layer).nonzero()[:, 0]
            mask = torch.zeros(len(local), *mask_shape, dtype=torch.bool, device=device)
            index = [torch.arange(len(local), device=device)]
            cols = iter(range(1, chunk.shape[1]))
            for axis in site.axes:
                index.append(chunk[local, next(cols)].to(device) if axis in by else torch.zeros_like(index[0]))
            mask[tuple(index)] = True
            row_index = (local.to(device)[:, None] * n_prompts + torch.arange(n_prompts, device=device)).flatten()
            hooks.append((site.hook(layer), _patch_hook(row_index, mask.repeat_interleave(n_prompts, 0), sources[layer])))
        resid = base_resid[first].repeat(len(chunk), 1, 1)
        chunk_mask = None if mask_rows is None else mask_rows.repeat(len(chunk), 1)
        if keep is None:
            logits = model.run_with_hooks(resid, start_at_layer=first, attention_mask=chunk_mask, fwd_hooks=hooks)
        else:
            n_layers = model.cfg.n_layers
            resid = model.run_with_hooks(
                resid, start_at_layer=first, stop_at_layer=n_layers, attention_mask=chunk_mask, fwd_hooks=hooks
            )
            logits = model(resid[:, keep], start_at_layer=n_layers)  # the final norm and unembedding only
        values = metric(logits)
        if values.shape != (logits.shape[0],):
            raise InputError(f"the metric must return one value per row [batch], got shape {tuple(values.shape)}")
        results[idx.to(device)] = values.float().view(len(chunk), n_prompts)
    return results


def _chunks(layers: Tensor, per_chunk: int, tokens_per_patch: int, min_tokens: int = 512) -> list[Tensor]:
    """Split patches (sorted by layer) into forwards of at most ``per_chunk`` patches.

    A forward starts at its first patch's layer, so rows patched later run the layers in
    between for nothing: a chunk closes at a layer boundary once it holds ``min_tokens``
    tokens, large enough for efficient matrix products.

    Example:
        >>> [c.tolist() for c in _chunks(torch.tensor([0, 0, 1, 1, 2]), per_chunk=3, tokens_per_patch=300)]
        [[0, 1], [2, 3], [4]]
    """
    chunks, start = [], 0
    for i in range(1, len(layers) + 1):
        full = i - start == per_chunk
        boundary = i < len(layers) and layers[i] != layers[i - 1] and (i - start) * tokens_per_patch >= min_tokens
        if i == len(layers) or full or boundary:
            chunks.append(torch.arange(start, i))
            start = i
    return chunks


def _patch_hook(rows: Tensor, mask: Tensor, source: Tensor) -> Callable:
    """Replace the masked entries of ``rows`` with the source of each row's prompt."""
    n_src = source.shape[0]

    def hook(activation: Tensor, *, hook) -> Tensor:
        out = activation.clone()
        src = source[rows % n_src] if n_src > 1 else source.expand(len(rows), *source.shape[1:])
        out[rows] = torch.where(mask, src.to(out.dtype), out[rows])
        return out

    return hook


def _layers(model, layers: list[int] | range | None) -> list[int]:
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < n]
    if bad or not layers:
        raise InputError(f"layers must be a non-empty subset of range({n}), got {layers}")
    return layers


def _base_runs(model, tokens: Tensor, site: Site, layers: list[int], attention_mask: Tensor | None):
    names = [act_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    names += [site.hook(layer) for layer in layers]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=list(dict.fromkeys(names)), attention_mask=attention_mask)
    return logits, {layer: cache["resid_pre", layer] for layer in range(model.cfg.n_layers)}, cache


def _sweep(model, base_tokens, sources_fn, metric, site, by, layers, patches, attention_mask, per_prompt, **kw) -> Tensor:
    site, by = get_site(site, by)
    layers = _layers(model, layers)
    _check_site_exists(model, site, layers)
    base_tokens = model._tokens_and_mask(base_tokens, None, None, "right")[0]
    _, base_resid, base_cache = _base_runs(model, base_tokens, site, layers, attention_mask)
    sources = sources_fn(site, layers, base_cache)
    sizes = tuple(sources[layers[0]].shape[1 + site.axes.index(axis)] for axis in by)
    grid = patches is None
    if grid:
        patches = patch_grid(sizes, layers)
    else:
        patches = torch.as_tensor(patches, dtype=torch.long)
        if patches.dim() == 2 and patches.shape[1] == 1 + len(by) and len(patches):
            bad_layer = ~torch.isin(patches[:, 0], torch.tensor(layers))
            limits = torch.tensor(sizes, dtype=torch.long)
            if bool(bad_layer.any()) or bool(((patches[:, 1:] < 0) | (patches[:, 1:] >= limits)).any()):
                raise InputError(f"patch indices out of range: layers {layers}, {dict(zip(by, sizes))}")
    out = run_patches(model, base_resid, sources, site, by, patches, metric, attention_mask=attention_mask, **kw)
    out = out if per_prompt else out.mean(-1)
    return out.reshape(len(layers), *sizes, *out.shape[1:]) if grid else out


def activation_patch(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    site: str | Site = "resid_pre",
    by: tuple[str, ...] | str | None = None,
    *,
    direction: Direction = "denoising",
    layers: list[int] | None = None,
    patches: Tensor | None = None,
    attention_mask: Tensor | None = None,
    per_prompt: bool = False,
    batch_size: int | None = None,
    memory_budget: int = 2**30,
    logit_positions: int | list[int] | None = None,
    progress: bool = False,
) -> Tensor:
    """Patch one site at every ``(layer, *by)`` index and return the metric of each patched run.

    ``direction="denoising"`` runs the corrupted prompts with clean activations patched in;
    ``"noising"`` runs the clean prompts with corrupted activations patched in. ``site`` is one
    of `SITES` (``resid_pre/mid/post``, ``attn_out``, ``mlp_out`` by ``pos``; ``z``/``result``/
    ``q`` by ``head`` or ``("pos", "head")``; ``k``/``v`` by ``kv_head``; ``pattern`` by ``head``;
    ``post`` by ``d_mlp`` neuron); ``by=()`` patches a whole layer.

    Returns ``[len(layers), *sizes of by]`` (the metric averaged over prompts; ``per_prompt``
    keeps a trailing ``[n_prompts]`` axis), or ``[n_patches]`` for an explicit ``patches`` list
    ``[n_patches, 1 + len(by)]``. Prompts must share one length (or pass ``attention_mask``).
    ``logit_positions=-1`` skips the unembedding of the other positions (for metrics that read
    the final position only); ``batch_size``/``memory_budget`` bound each forward (see `run_patches`).

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 7]
        >>> activation_patch(model, clean, corrupted, metric, "resid_pre").shape
        torch.Size([3, 4])
        >>> activation_patch(model, clean, corrupted, metric, "z", by=("pos", "head")).shape
        torch.Size([3, 4, 4])
    """
    if direction not in ("denoising", "noising"):
        raise InputError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    clean_tokens = model._tokens_and_mask(clean_tokens, None, None, "right")[0]
    corrupted_tokens = model._tokens_and_mask(corrupted_tokens, None, None, "right")[0]
    if clean_tokens.shape != corrupted_tokens.shape:
        raise InputError(
            f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens {tuple(corrupted_tokens.shape)} differ in "
            "shape; build pairs of equal length (mechscope.data.tasks aligns them with align=True)"
        )
    base, source = (corrupted_tokens, clean_tokens) if direction == "denoising" else (clean_tokens, corrupted_tokens)

    def sources_fn(site: Site, layers: list[int], base_cache) -> dict[int, Tensor]:
        names = [site.hook(layer) for layer in layers]
        with torch.no_grad():
            _, cache = model.run_with_cache(source, names_filter=names, attention_mask=attention_mask)
        return {layer: cache[site.hook(layer)] for layer in layers}

    return _sweep(
        model, base, sources_fn, metric, site, by, layers, patches, attention_mask, per_prompt,
        batch_size=batch_size, memory_budget=memory_budget, logit_positions=logit_positions, progress=progress,
    )


def ablate(
    model,
    tokens: Tensor,
    metric: Metric,
    site: str | Site = "z",
    by: tuple[str, ...] | str | None = None,
    *,
    kind: AblationKind = "zero",
    reference: Tensor | None = None,
    seed: int = 0,
    layers: list[int] | None = None,
    patches: Tensor | None = None,
    per_prompt: bool = False,
    batch_size: int | None = None,
    memory_budget: int = 2**30,
    logit_positions: int | list[int] | None = None,
    progress: bool = False,
) -> Tensor:
    """Ablate one site at every ``(layer, *by)`` index: zero, mean or resample ablation.

    ``kind="mean"`` replaces entries with their mean over the ``reference`` prompts (per
    position, so they must have the same length as ``tokens``); ``"resample"`` gives each
    prompt the activation of a reference prompt drawn at random (``seed``). ``reference``
    defaults to ``tokens`` itself. Sites, ``by`` and the result layout are as in
    `activation_patch`.

    Example:
        >>> metric = lambda logits: logits[:, -1, 7]
        >>> ablate(model, tokens, metric, "z", kind="zero").shape
        torch.Size([3, 4])
    """
    if kind not in ("zero", "mean", "resample"):
        raise InputError(f"kind must be 'zero', 'mean' or 'resample', got {kind!r}")
    tokens = model._tokens_and_mask(tokens, None, None, "right")[0]
    ref = tokens if reference is None else model._tokens_and_mask(reference, None, None, "right")[0]
    if kind != "zero" and ref.shape[1] != tokens.shape[1]:
        raise InputError(
            f"reference prompts have {ref.shape[1]} tokens but the ablated prompts have {tokens.shape[1]}; "
            "mean and resample ablation replace activations position by position, so use prompts of equal length"
        )

    def sources_fn(site: Site, layers: list[int], base_cache) -> dict[int, Tensor]:
        if kind == "zero":
            return {layer: torch.zeros_like(base_cache[site.hook(layer)][:1]) for layer in layers}
        with torch.no_grad():
            _, cache = model.run_with_cache(ref, names_filter=[site.hook(layer) for layer in layers])
        if kind == "mean":
            return {layer: cache[site.hook(layer)].mean(0, keepdim=True) for layer in layers}
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(ref.shape[0], (tokens.shape[0],), generator=gen).to(model.device)
        return {layer: cache[site.hook(layer)][pick] for layer in layers}

    return _sweep(
        model, tokens, sources_fn, metric, site, by, layers, patches, None, per_prompt,
        batch_size=batch_size, memory_budget=memory_budget, logit_positions=logit_positions, progress=progress,
    )
