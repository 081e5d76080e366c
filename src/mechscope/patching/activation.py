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

from mechscope.errors import InputError
from mechscope.names import SITES, Site, act_name, unknown_name_error
from mechscope.model.context import AttentionContext, KVCache
from mechscope.model.tokenize import check_mask, input_tokens
from mechscope.patching.metrics import Metric

Direction = Literal["denoising", "noising"]
AblationKind = Literal["zero", "mean", "resample"]


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


@dataclass
class BaseRun:
    """What the suffix path of `run_patches` reuses from the unpatched run being patched.

    ``logits`` ``[n_prompts, pos, d_vocab]`` and ``kv`` (a `KVCache` of every layer's keys
    and values, as attention sees them). A patch at position ``p`` leaves every position
    before ``p`` as in this run (attention is causal), so those positions are not recomputed:
    the patched forward runs positions ``p:`` only, attends to this run's keys and values for
    the earlier ones, and the metric sees this run's logits there.

    Example:
        >>> base = base_run(model, tokens)
        >>> base.logits.shape, base.kv.keys[0].shape
        (torch.Size([1, 4, 50]), torch.Size([1, 4, 4, 8]))
    """

    logits: Tensor
    kv: KVCache


def base_run(model, tokens: Tensor, attention_mask: Tensor | None = None, names: list[str] | None = None):
    """Run ``tokens`` once, keeping a `BaseRun`; with ``names``, also return an activation cache of them.

    Example:
        >>> base, cache = base_run(model, tokens, names=["blocks.0.hook_resid_pre"])
        >>> torch.equal(base.logits, model(tokens)), cache["resid_pre", 0].shape
        (True, torch.Size([1, 4, 32]))
    """
    kv = KVCache(model.cfg.n_layers)
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            tokens, names_filter=names or [], attention_mask=attention_mask, past_kv_cache=kv
        )
    run = BaseRun(logits, kv)
    return run if names is None else (run, cache)


class _PrefixKV(KVCache):
    """A read-only key/value cache holding the base run's positions ``< start``, repeated per patch."""

    def __init__(self, kv: KVCache, start: int, copies: int) -> None:
        super().__init__(len(kv.keys))
        self.source, self.start, self.copies = kv, start, copies

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        past_k = self.source.keys[layer][:, :, : self.start].to(k.device)
        past_v = self.source.values[layer][:, :, : self.start].to(v.device)
        k = torch.cat((past_k.repeat(self.copies, 1, 1, 1), k), dim=2)  # [rows, kv_head, pos, d_head]
        v = torch.cat((past_v.repeat(self.copies, 1, 1, 1), v), dim=2)
        return k, v


def _suffix_forward(model, resid: Tensor, first: int, start: int, attention_mask: Tensor | None, prefix: _PrefixKV):
    """Blocks ``first:`` on positions ``start:`` of ``resid`` ``[rows, pos - start, d_model]``;
    returns the residual stream after the last block."""
    rows, seq = resid.shape[0], resid.shape[1] + start
    full = AttentionContext.build(attention_mask, rows, seq, resid.device)
    ctx = AttentionContext(full.positions[:, start:], full.key_padding, prefix, full.positions)
    for block in model.blocks[first:]:
        device = block.attn.w_o.device
        if resid.device != device:  # blocks placed over several devices (see `device_map`)
            resid, ctx = resid.to(device), ctx.to(device)
        resid = block(resid, ctx)
    return resid


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
    base: BaseRun | None = None,
) -> Tensor:
    """The engine: metric values ``[n_patches, n_prompts]`` for each patch of ``patches``.

    ``base_resid[l]`` is the residual stream ``[n_prompts, pos, d_model]`` entering layer ``l``
    in the run being patched; ``sources[l]`` is the replacement activation at layer ``l``
    (``[n_prompts or 1, *site.axes]``). ``patches`` is ``[n_patches, 1 + len(by)]`` (layer,
    then one index per ``by`` axis). ``batch_size`` caps the rows of one forward; otherwise
    `rows_per_forward` fits them to ``memory_budget`` bytes. ``logit_positions`` (e.g. ``-1``)
    unembeds only those positions: the metric then sees ``[batch, len(positions), d_vocab]``.

    With ``base`` (the `BaseRun` of the run being patched) and a site patched by position, a
    forward whose patches all sit at positions ``>= p`` runs positions ``p:`` only (see
    `BaseRun`); the metric still sees logits at every position (or at ``logit_positions``),
    taken from ``base`` before ``p``. Patches are grouped so that each forward has one start
    layer and one start position.

    Example:
        >>> base, cache = base_run(model, tokens, names=[f"blocks.{l}.hook_resid_pre" for l in range(3)])
        >>> zeros = {l: torch.zeros(1, 4, 32) for l in range(3)}
        >>> site, by = get_site("resid_pre")
        >>> out = run_patches(model, {l: cache["resid_pre", l] for l in range(3)}, zeros, site, by,
        ...                   patch_grid((4,), [0, 1, 2]), lambda logits: logits[:, -1, 0], base=base)
        >>> out.shape
        torch.Size([12, 1])
    """
    n_prompts, seq = next(iter(base_resid.values())).shape[:2]
    if patches.dim() != 2 or patches.shape[1] != 1 + len(by):
        raise InputError(f"patches must be [n_patches, {1 + len(by)}] (layer, then {by}), got {tuple(patches.shape)}")
    keep = None if logit_positions is None else [logit_positions] if isinstance(logit_positions, int) else list(logit_positions)
    if keep is not None and any(not -seq <= k < seq for k in keep):
        raise InputError(f"logit_positions {keep} out of range for {seq} positions")
    rows = batch_size or rows_per_forward(model, seq, memory_budget, None if keep is None else len(keep))
    per_chunk = max(1, rows // n_prompts)
    suffix = base is not None and "pos" in by and site.axes[0] == "pos"
    starts = patches[:, 1 + by.index("pos")] if suffix else torch.zeros(len(patches), dtype=torch.long)
    order, chunks = _schedule(patches[:, 0], starts, per_chunk, n_prompts, seq, model.cfg.n_layers)
    device = model.device
    results = torch.empty(len(patches), n_prompts, device=device)
    mask_rows = None if attention_mask is None else attention_mask.to(device)
    n_layers = model.cfg.n_layers
    for idx in tqdm(chunks, desc=f"patching {site.name}", disable=not progress):
        idx = order[idx]
        chunk = patches[idx]
        first, start = int(chunk[:, 0].min()), int(starts[idx].min())
        hooks = _chunk_hooks(site, by, chunk, sources, n_prompts, start, device)
        chunk_mask = None if mask_rows is None else mask_rows.repeat(len(chunk), 1)
        if start > 0:
            resid = base_resid[first][:, start:].repeat(len(chunk), 1, 1)
            with model.hooks(fwd_hooks=hooks):
                resid = _suffix_forward(model, resid, first, start, chunk_mask, _PrefixKV(base.kv, start, len(chunk)))
            logits = _suffix_logits(model, resid, base.logits, start, keep, len(chunk))
        elif keep is None:
            resid = base_resid[first].repeat(len(chunk), 1, 1)
            logits = model.run_with_hooks(resid, start_at_layer=first, attention_mask=chunk_mask, fwd_hooks=hooks)
        else:
            resid = model.run_with_hooks(
                base_resid[first].repeat(len(chunk), 1, 1), start_at_layer=first, stop_at_layer=n_layers,
                attention_mask=chunk_mask, fwd_hooks=hooks,
            )
            logits = model(resid[:, keep], start_at_layer=n_layers)  # the final norm and unembedding only
        values = metric(logits)
        if values.shape != (logits.shape[0],):
            raise InputError(f"the metric must return one value per row [batch], got shape {tuple(values.shape)}")
        results[idx.to(device)] = values.float().view(len(chunk), n_prompts)
    return results


def _chunk_hooks(site: Site, by, chunk: Tensor, sources: dict[int, Tensor], n_prompts: int, start: int, device) -> list:
    """One patch hook per layer of ``chunk``; positions count from ``start`` (the forward's first)."""
    source_shape = next(iter(sources.values())).shape[1:]
    mask_shape = [size if axis in by else 1 for axis, size in zip(site.axes, source_shape)]
    if start:
        mask_shape[0] -= start  # the position axis: only positions start: run
    hooks = []
    for layer in chunk[:, 0].unique().tolist():
        local = (chunk[:, 0] == layer).nonzero()[:, 0]
        mask = torch.zeros(len(local), *mask_shape, dtype=torch.bool, device=device)
        index = [torch.arange(len(local), device=device)]
        cols = iter(range(1, chunk.shape[1]))
        for axis in site.axes:
            if axis in by:
                index.append(chunk[local, next(cols)].to(device) - (start if axis == "pos" else 0))
            else:
                index.append(torch.zeros_like(index[0]))
        mask[tuple(index)] = True
        row_index = (local.to(device)[:, None] * n_prompts + torch.arange(n_prompts, device=device)).flatten()
        source = sources[layer][:, start:] if start else sources[layer]
        hooks.append((site.hook(layer), _patch_hook(row_index, mask.repeat_interleave(n_prompts, 0), source)))
    return hooks


def _suffix_logits(model, resid: Tensor, base_logits: Tensor, start: int, keep: list[int] | None, copies: int) -> Tensor:
    """Logits at every position (or at ``keep``): the base run's before ``start``, ``resid``'s after."""
    n_layers, seq = model.cfg.n_layers, base_logits.shape[1]
    if keep is None:
        late = model(resid, start_at_layer=n_layers)  # the final norm and unembedding only
        return torch.cat((base_logits[:, :start].repeat(copies, 1, 1).to(late.device), late), dim=1)
    keep = [k % seq for k in keep]
    logits = base_logits[:, keep].repeat(copies, 1, 1)
    late = [i for i, k in enumerate(keep) if k >= start]
    if late:
        logits[:, late] = model(resid[:, [keep[i] - start for i in late]], start_at_layer=n_layers).to(logits.device)
    return logits


def _schedule(layers: Tensor, starts: Tensor, per_chunk: int, n_prompts: int, seq: int, n_layers: int):
    """Order patches and split them into forwards; returns ``(order, chunks of positions in order)``.

    A forward costs about ``rows x (n_layers - first layer) x (seq - first position)``. Without
    start positions, patches go layer-major. With them, layer-major, position-major and tilings
    of the (position, layer) grid are scored with that cost and the cheapest is kept.

    Example:
        >>> order, chunks = _schedule(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 3, 0, 3]), 2, 1, 4, 2)
        >>> order.tolist(), [c.tolist() for c in chunks]
        ([0, 2, 1, 3], [[0, 1], [2, 3]])
    """
    by_layer = layers * seq + starts
    plans = [(by_layer, by_layer)]
    if bool(starts.any()):
        by_pos = starts * n_layers + layers
        plans.append((by_pos, by_pos))
        for tile_pos, tile_layer in itertools.product((2, 4, 8), (2, 4, 8)):
            tile = (starts // tile_pos) * n_layers + layers // tile_layer
            plans.append((tile * seq * n_layers + by_pos, tile))
    best = None
    for sort_key, boundary in plans:
        order = torch.argsort(sort_key, stable=True)
        chunks = _chunks(boundary[order], per_chunk, n_prompts * (seq - starts[order]))
        first_layer = [int(layers[order[c]].min()) for c in chunks]
        first_pos = [int(starts[order[c]].min()) for c in chunks]
        cost = sum(len(c) * (n_layers - fl) * (seq - fp) for c, fl, fp in zip(chunks, first_layer, first_pos))
        if best is None or cost < best[0]:
            best = (cost, order, chunks)
    return best[1], best[2]


def _chunks(keys: Tensor, per_chunk: int, tokens_per_patch: int | Tensor, min_tokens: int = 512) -> list[Tensor]:
    """Split patches (sorted by ``keys``: their start layer, or start layer and position) into
    forwards of at most ``per_chunk`` patches.

    A forward starts at its first patch's layer (and position), so rows patched later run the
    layers in between for nothing: a chunk closes where the key changes once it holds
    ``min_tokens`` tokens, large enough for efficient matrix products.

    Example:
        >>> [c.tolist() for c in _chunks(torch.tensor([0, 0, 1, 1, 2]), per_chunk=3, tokens_per_patch=300)]
        [[0, 1], [2, 3], [4]]
    """
    tokens = torch.as_tensor(tokens_per_patch).expand(len(keys)).tolist()
    chunks, start, count = [], 0, 0
    for i in range(1, len(keys) + 1):
        count += tokens[i - 1]
        full = i - start == per_chunk
        boundary = i < len(keys) and keys[i] != keys[i - 1] and count >= min_tokens
        if i == len(keys) or full or boundary:
            chunks.append(torch.arange(start, i))
            start, count = i, 0
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
    base, cache = base_run(model, tokens, attention_mask, list(dict.fromkeys(names)))
    return base, {layer: cache["resid_pre", layer] for layer in range(model.cfg.n_layers)}, cache


def _sweep(
    model, base_tokens, sources_fn, metric, site, by, layers, patches, attention_mask, per_prompt, reuse_prefix, **kw
) -> Tensor:
    site, by = get_site(site, by)
    layers = _layers(model, layers)
    _check_site_exists(model, site, layers)
    base_tokens = input_tokens(model, base_tokens)[0]
    base, base_resid, base_cache = _base_runs(model, base_tokens, site, layers, attention_mask)
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
    out = run_patches(
        model, base_resid, sources, site, by, patches, metric, attention_mask=attention_mask,
        base=base if reuse_prefix else None, **kw,
    )
    out = out if per_prompt else out.mean(-1)
    return out.reshape(len(layers), *sizes, *out.shape[1:]) if grid else out


def base_and_source(model, clean_tokens, corrupted_tokens, direction: Direction) -> tuple[Tensor, Tensor]:
    """Token ids ``(run patched, run patched from)``: (corrupted, clean) for denoising, (clean,
    corrupted) for noising; strings are tokenised, and the two must have the same shape.

    Example:
        >>> base, source = base_and_source(model, torch.tensor([[1, 2]]), torch.tensor([[1, 3]]), "denoising")
        >>> base.tolist(), source.tolist()
        ([[1, 3]], [[1, 2]])
    """
    if direction not in ("denoising", "noising"):
        raise InputError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    clean_tokens = input_tokens(model, clean_tokens)[0]
    corrupted_tokens = input_tokens(model, corrupted_tokens)[0]
    if clean_tokens.shape != corrupted_tokens.shape:
        raise InputError(
            f"clean tokens {tuple(clean_tokens.shape)} and corrupted tokens {tuple(corrupted_tokens.shape)} differ in "
            "shape; build pairs of equal length (mechscope.data.tasks aligns them with align=True)"
        )
    return (corrupted_tokens, clean_tokens) if direction == "denoising" else (clean_tokens, corrupted_tokens)


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
    reuse_prefix: bool = True,
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
    Patches by position run only the positions from the patched one on (``reuse_prefix``; see
    `BaseRun`), with the same results.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 7]
        >>> activation_patch(model, clean, corrupted, metric, "resid_pre").shape
        torch.Size([3, 4])
        >>> activation_patch(model, clean, corrupted, metric, "z", by=("pos", "head")).shape
        torch.Size([3, 4, 4])
    """
    base, source = base_and_source(model, clean_tokens, corrupted_tokens, direction)

    def sources_fn(site: Site, layers: list[int], base_cache) -> dict[int, Tensor]:
        names = [site.hook(layer) for layer in layers]
        with torch.no_grad():
            _, cache = model.run_with_cache(source, names_filter=names, attention_mask=attention_mask)
        return {layer: cache[site.hook(layer)] for layer in layers}

    return _sweep(
        model, base, sources_fn, metric, site, by, layers, patches, attention_mask, per_prompt,
        batch_size=batch_size, memory_budget=memory_budget, logit_positions=logit_positions, progress=progress,
        reuse_prefix=reuse_prefix,
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
    attention_mask: Tensor | None = None,
    reference_mask: Tensor | None = None,
    per_prompt: bool = False,
    batch_size: int | None = None,
    memory_budget: int = 2**30,
    logit_positions: int | list[int] | None = None,
    progress: bool = False,
    reuse_prefix: bool = True,
) -> Tensor:
    """Ablate one site at every ``(layer, *by)`` index: zero, mean or resample ablation.

    ``kind="mean"`` replaces entries with their mean over the ``reference`` prompts (per
    position, so they must have the same length as ``tokens``); ``"resample"`` gives each
    prompt the activation of a reference prompt drawn at random (``seed``). ``reference``
    defaults to ``tokens`` itself. Sites, ``by``, the result layout and the other options are as
    in `activation_patch`.

    Padded prompts: ``attention_mask`` ``[batch, pos]`` (1 = real token) goes with ``tokens`` and
    ``reference_mask`` with ``reference`` (default: ``attention_mask`` when ``reference`` is
    ``tokens``). The mean then counts real tokens only (per position; along ``query_pos`` and
    ``key_pos`` for ``pattern``), and resampling draws among reference prompts padded exactly
    like the prompt.

    Example:
        >>> metric = lambda logits: logits[:, -1, 7]
        >>> ablate(model, tokens, metric, "z", kind="zero").shape
        torch.Size([3, 4])
    """
    if kind not in ("zero", "mean", "resample"):
        raise InputError(f"kind must be 'zero', 'mean' or 'resample', got {kind!r}")
    tokens, attention_mask = input_tokens(model, tokens, attention_mask)
    if reference is None:
        ref, reference_mask = tokens, attention_mask if reference_mask is None else reference_mask
    else:
        ref = input_tokens(model, reference)[0]
    if kind != "zero" and ref.shape[1] != tokens.shape[1]:
        raise InputError(
            f"reference prompts have {ref.shape[1]} tokens but the ablated prompts have {tokens.shape[1]}; "
            "mean and resample ablation replace activations position by position, so use prompts of equal length"
        )
    reference_mask = check_mask(reference_mask, tuple(ref.shape), model.device)
    mask = torch.ones_like(tokens, dtype=torch.bool) if attention_mask is None else attention_mask
    ref_mask = torch.ones_like(ref, dtype=torch.bool) if reference_mask is None else reference_mask
    if kind == "mean" and bool((mask.any(0) & ~ref_mask.any(0)).any()):
        missing = (mask.any(0) & ~ref_mask.any(0)).nonzero()[:, 0].tolist()
        raise InputError(f"no reference prompt has a real token at positions {missing}, so there is no mean there")

    def sources_fn(site: Site, layers: list[int], base_cache) -> dict[int, Tensor]:
        if kind == "zero":
            return {layer: torch.zeros_like(base_cache[site.hook(layer)][:1]) for layer in layers}
        with torch.no_grad():
            _, cache = model.run_with_cache(
                ref, names_filter=[site.hook(layer) for layer in layers], attention_mask=reference_mask
            )
        if kind == "mean":
            return {layer: _masked_mean(cache[site.hook(layer)], site, ref_mask) for layer in layers}
        pick = _resample(mask, ref_mask, seed, plain=attention_mask is None and reference_mask is None)
        return {layer: cache[site.hook(layer)][pick.to(model.device)] for layer in layers}

    return _sweep(
        model, tokens, sources_fn, metric, site, by, layers, patches, attention_mask, per_prompt,
        batch_size=batch_size, memory_budget=memory_budget, logit_positions=logit_positions, progress=progress,
        reuse_prefix=reuse_prefix,
    )


def _masked_mean(act: Tensor, site: Site, ref_mask: Tensor) -> Tensor:
    """Mean over reference prompts ``[1, *site.axes]``, counting only real tokens at each position."""
    weight = torch.ones(act.shape[0], *[1] * len(site.axes), device=act.device, dtype=act.dtype)
    for i, axis in enumerate(site.axes):
        if axis in ("pos", "query_pos", "key_pos"):
            shape = [act.shape[0]] + [1] * len(site.axes)
            shape[1 + i] = act.shape[1 + i]
            weight = weight * ref_mask.to(act.device, act.dtype).view(shape)
    return (act * weight).sum(0, keepdim=True) / weight.sum(0, keepdim=True).clamp(min=1)


def _resample(mask: Tensor, ref_mask: Tensor, seed: int, plain: bool) -> Tensor:
    """For each prompt, a reference prompt drawn at random among those padded like it."""
    gen = torch.Generator().manual_seed(seed)
    if plain:
        return torch.randint(ref_mask.shape[0], (mask.shape[0],), generator=gen)
    picks = []
    for row in mask.cpu():
        same = (ref_mask.cpu() == row).all(-1).nonzero()[:, 0]
        if not len(same):
            raise InputError(
                f"no reference prompt is padded like prompt {len(picks)}; resampling needs, for each prompt, "
                "reference prompts with the same attention_mask"
            )
        picks.append(int(same[torch.randint(len(same), (1,), generator=gen)]))
    return torch.tensor(picks)
