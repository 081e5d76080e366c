"""Activation patching and ablation: thin entry points on the batched engine (`mechscope.patching.engine`).

A `Site` names an activation layout (its axes after the batch axis) and ``by`` picks the axes a
patch indexes; each entry point builds the sources (the other run's activations, zeros, a mean
or resampled prompts) and hands every ``(layer, *index)`` patch to `run_patches`.
"""

from __future__ import annotations

from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError
from mechscope.model.tokenize import check_mask, input_tokens
from mechscope.names import SITES, Site, act_name, unknown_name_error
from mechscope.patching.engine import SweepOptions, base_run, patch_grid, run_patches
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
    model, base_tokens, sources_fn, metric, site, by, layers, patches, attention_mask, options: SweepOptions
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
                raise InputError(f"patch indices out of range: layers {layers}, {dict(zip(by, sizes, strict=False))}")
    out = run_patches(
        model,
        base_resid,
        sources,
        site,
        by,
        patches,
        metric,
        attention_mask=attention_mask,
        base=base if options.reuse_prefix and getattr(model, "reuses_prefix", True) else None,
        batch_size=options.batch_size,
        memory_budget=options.memory_budget,
        logit_positions=options.logit_positions,
        progress=options.progress,
    )
    out = out if options.per_prompt else out.mean(-1)
    return out.reshape(len(layers), *sizes, *out.shape[1:]) if grid else out


def base_and_source(
    model, clean_tokens, corrupted_tokens, direction: Direction
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
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
    options: SweepOptions | None = None,
    **sweep,
) -> Float[Tensor, "..."]:
    """Patch one site at every ``(layer, *by)`` index and return the metric of each patched run.

    ``direction="denoising"`` runs the corrupted prompts with clean activations patched in;
    ``"noising"`` runs the clean prompts with corrupted activations patched in. ``site`` is one
    of `SITES` (``resid_pre/mid/post``, ``attn_out``, ``mlp_out`` by ``pos``; ``z``/``result``/
    ``q`` by ``head`` or ``("pos", "head")``; ``k``/``v`` by ``kv_head``; ``pattern`` by ``head``;
    ``post`` by ``d_mlp`` neuron); ``by=()`` patches a whole layer.

    Returns ``[len(layers), *sizes of by]`` (the metric averaged over prompts; ``per_prompt``
    keeps a trailing ``[n_prompts]`` axis), or ``[n_patches]`` for an explicit ``patches`` list
    ``[n_patches, 1 + len(by)]``. Prompts must share one length (or pass ``attention_mask``).

    Sweep options (keywords, or ``options=SweepOptions(...)``; see `SweepOptions`):
    ``per_prompt``, ``batch_size``, ``memory_budget``, ``progress``, ``logit_positions``
    (default ``"auto"``: only the positions the metric declares it reads are unembedded, e.g. the
    final one for `LogitDiff`; a plain callable sees every position) and ``reuse_prefix``
    (patches by position run only the positions from the patched one on; same results).

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

    options = SweepOptions.of(options, sweep)
    return _sweep(model, base, sources_fn, metric, site, by, layers, patches, attention_mask, options)


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
    options: SweepOptions | None = None,
    **sweep,
) -> Float[Tensor, "..."]:
    """Ablate one site at every ``(layer, *by)`` index: zero, mean or resample ablation.

    ``kind="mean"`` replaces entries with their mean over the ``reference`` prompts (per
    position, so they must have the same length as ``tokens``); ``"resample"`` gives each
    prompt the activation of a reference prompt drawn at random (``seed``). ``reference``
    defaults to ``tokens`` itself. Sites, ``by``, the result layout and the other options are as
    in `activation_patch` (sweep options included).

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
    options = SweepOptions.of(options, sweep)
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

    return _sweep(model, tokens, sources_fn, metric, site, by, layers, patches, attention_mask, options)


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
