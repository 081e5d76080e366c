"""Subspace activation patching on the batched engine: replace only an activation's component in
a subspace (one direction or an orthonormal basis) by the source run's component.

While `subspace_hooks` is active, a site's hook ``blocks.{l}.hook_resid_pre`` also exposes the
coordinates of its activation in every basis of a batch of subspaces as a hook point
``blocks.{l}.hook_resid_pre.hook_subspace`` ``[batch, *site axes but the last, direction, d_sub]``.
A hook there that changes coordinates changes the activation by exactly ``B (new - old)`` per
subspace ``B``, and leaves it untouched where the coordinates are unchanged. Patching the
coordinates of one subspace is then ``x + B Bᵀ (source - x)``: the engine's ordinary
replacement patches, run as batch elements of few forwards that start at the patched layer (and
position) from cached activations, each patch swapping one subspace at one index.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.names import SITES, Site, act_name, unknown_name_error
from mechscope.patching.activation import Direction, base_and_source, get_site
from mechscope.patching.engine import SweepOptions, base_run, run_patches
from mechscope.patching.metrics import Metric
from mechscope.subspace.basis import Directions, as_bases, coordinates

COORDS = "hook_subspace"


@dataclass(frozen=True)
class SubspaceSite(Site):
    """The coordinates of a site's activations in a batch of subspaces, as a patching site.

    Example:
        >>> site = SubspaceSite.of(SITES["resid_pre"])
        >>> site.hook(2), site.axes
        ('blocks.2.hook_resid_pre.hook_subspace', ('pos', 'direction', 'd_sub'))
    """

    inner: str = ""

    @classmethod
    def of(cls, site: Site) -> SubspaceSite:
        """The subspace site of ``site``: named ``"{site.name}.subspace"``, its last axis replaced by
        ``direction, d_sub``, indexed by ``direction`` unless told otherwise."""
        return cls(f"{site.name}.subspace", (*site.axes[:-1], "direction", "d_sub"), ("direction",), site.name)

    def hook(self, layer: int) -> str:
        """The coordinates' hook point at ``layer``: the inner site's hook name with ``.hook_subspace``."""
        return f"{act_name(self.inner, layer)}.{COORDS}"


@contextmanager
def subspace_hooks(
    model, bases: Mapping[str, Float[Tensor, "direction d_act d_sub"]], fwd_hooks: list | None = None
) -> Iterator[None]:
    """Run ``fwd_hooks`` with the coordinates of every activation named in ``bases`` exposed at
    ``"{name}.hook_subspace"`` (see the module docstring); other hooks attach as usual.

    Used as the engine's hook context: ``partial(subspace_hooks, model, bases)``.

    Example:
        >>> bases = {"blocks.1.hook_resid_pre": as_bases(torch.eye(32)[:2])}
        >>> double = lambda c, *, hook: 2 * c
        >>> with subspace_hooks(model, bases, [("blocks.1.hook_resid_pre.hook_subspace", double)]):
        ...     logits = model(tokens)
        >>> logits.shape
        torch.Size([1, 4, 50])
    """
    plain, virtual = [], {}
    for name, fn in fwd_hooks or []:
        if isinstance(name, str) and name.endswith(f".{COORDS}"):
            inner = name[: -len(COORDS) - 1]
            if inner not in bases:
                raise unknown_name_error(name, [f"{n}.{COORDS}" for n in bases], "subspace hook point")
            virtual.setdefault(inner, []).append(fn)
        else:
            plain.append((name, fn))
    for inner in virtual:
        if inner not in model.hook_dict:
            raise unknown_name_error(inner, model.hook_dict)
    hooks = [(inner, coordinate_hook(bases[inner], fns, f"{inner}.{COORDS}")) for inner, fns in virtual.items()]
    with model.hooks(fwd_hooks=plain + hooks):
        yield


def coordinate_hook(bases: Tensor, fns: list, name: str):
    """A hook running ``fns`` on the coordinates of its activation in ``bases`` and adding back
    ``B (new - old)`` for each basis ``B`` (nothing where the coordinates are unchanged)."""
    point = SimpleNamespace(name=name)

    def hook(activation: Tensor, *, hook) -> Tensor | None:
        basis = bases.to(activation.device)
        old = coordinates(activation.float(), basis.float())
        new = old
        for fn in fns:
            out = fn(new, hook=point)
            new = new if out is None else out
        if new is old:
            return None
        delta = torch.einsum("...nk,ndk->...d", new - old, basis.float())
        return activation + delta.to(activation.dtype)

    return hook


def subspace_patch(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    directions: Directions | Mapping[int, Directions],
    metric: Metric,
    site: str | Site = "resid_pre",
    by: tuple[str, ...] | str | None = ("pos",),
    *,
    direction: Direction = "denoising",
    layers: list[int] | None = None,
    positions: list[int] | None = None,
    patches: Tensor | None = None,
    attention_mask: Tensor | None = None,
    options: SweepOptions | None = None,
    **sweep,
) -> Float[Tensor, "..."]:
    """Patch the component of a site's activation in each subspace, at every ``(layer, *by)`` index.

    ``directions`` are the subspaces (see `as_bases`: a direction ``[d_act]``, directions
    ``[direction, d_act]``, bases ``[direction, d_act, d_sub]`` or a list), living in the site's
    last axis; a dict ``{layer: directions}`` gives each layer its own (as many per layer).
    ``direction="denoising"`` runs the corrupted prompts with the clean component patched in,
    ``"noising"`` the reverse. ``by`` picks among the site's other axes (``("pos",)``: one
    position at a time; ``()``: every position at once; ``("pos", "head")`` for ``z``);
    ``positions`` limits the positions of a ``by``-position sweep.

    Returns ``[len(layers), *sizes of by, n_directions]`` (``per_prompt`` adds ``[n_prompts]``),
    or ``[n_patches]`` for explicit ``patches`` ``[n_patches, 1 + len(by) + 1]`` (layer, the
    ``by`` indices, then the subspace). Sweep options as in `SweepOptions`.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> metric = lambda logits: logits[:, -1, 7]
        >>> subspace_patch(model, clean, corrupted, torch.randn(5, 32), metric, "resid_pre").shape
        torch.Size([3, 4, 5])
        >>> subspace_patch(model, clean, corrupted, torch.randn(64), metric, "post", by=(), layers=[1]).shape
        torch.Size([1, 1])
    """
    options = SweepOptions.of(options, sweep)
    site, by = subspace_site(site, by)
    if isinstance(directions, Mapping):
        layers = sorted(int(layer) for layer in directions) if layers is None else list(layers)
    layers = list(range(model.cfg.n_layers)) if layers is None else [int(layer) for layer in layers]
    bad = [layer for layer in layers if not 0 <= layer < model.cfg.n_layers]
    if bad or not layers:
        raise InputError(f"layers must be a non-empty subset of range({model.cfg.n_layers}), got {layers}")
    for layer in layers:
        if site.hook(layer) not in model.hook_dict:
            raise unknown_name_error(site.hook(layer), model.hook_dict)
    base_tokens, source_tokens = base_and_source(model, clean_tokens, corrupted_tokens, direction)
    names = [act_name("resid_pre", layer) for layer in range(model.cfg.n_layers)]
    base, cache = base_run(model, base_tokens, attention_mask, names)
    with torch.no_grad():
        _, source_cache = model.run_with_cache(
            source_tokens, names_filter=[site.hook(layer) for layer in layers], attention_mask=attention_mask,
            stop_at_layer=max(layers) + 1,
        )  # fmt: skip
    bases = layer_bases(directions, layers, source_cache[site.hook(layers[0])].shape[-1])
    inner = SubspaceSite.of(site)
    sources = {layer: coordinates(source_cache[site.hook(layer)].float(), bases[layer].float()) for layer in layers}
    sizes = tuple(sources[layers[0]].shape[1 + site.axes.index(axis)] for axis in by) + (len(bases[layers[0]]),)
    grid = patches is None
    if grid:
        patches = patch_list(layers, by, sizes, positions)
    else:
        patches = torch.as_tensor(patches, dtype=torch.long)
        check_patches(patches, layers, sizes, by)
    out = run_patches(
        model, {layer: cache["resid_pre", layer] for layer in range(model.cfg.n_layers)}, sources, inner,
        (*by, "direction"), patches, metric, attention_mask=attention_mask,
        base=base if options.reuse_prefix else None,
        hook_context=partial(subspace_hooks, model, {site.hook(layer): bases[layer] for layer in layers}),
        batch_size=options.batch_size, memory_budget=options.memory_budget,
        logit_positions=options.logit_positions, progress=options.progress,
    )  # fmt: skip
    out = out if options.per_prompt else out.mean(-1)
    if not grid:
        return out
    if positions is not None and "pos" in by:
        sizes = tuple(len(positions) if axis == "pos" else s for axis, s in zip((*by, "direction"), sizes, strict=True))
    return out.reshape(len(layers), *sizes, *out.shape[1:])


def subspace_site(site: str | Site, by: tuple[str, ...] | str | None) -> tuple[Site, tuple[str, ...]]:
    """The site and the axes patched ``by``; the subspace lives in the last axis, which ``by`` cannot name.

    Example:
        >>> subspace_site("z", ("pos", "head"))[1]
        ('pos', 'head')
    """
    site, by = get_site(site, () if by is None else by)
    if site.axes[-1] in by or site.name == "pattern":
        raise InputError(
            f"subspaces of {site.name!r} live in its last axis {site.axes[-1]!r}; patch by axes among "
            f"{site.axes[:-1]} (sites with a width axis: {[n for n in SITES if n != 'pattern']})"
        )
    return site, by


def layer_bases(directions, layers: list[int], d_act: int) -> dict[int, Tensor]:
    """``{layer: [direction, d_act, d_sub]}``: the same subspaces at every layer, or one set per layer."""
    if isinstance(directions, Mapping):
        missing = [layer for layer in layers if layer not in directions]
        if missing:
            raise InputError(f"no directions for layers {missing}; the dict has layers {sorted(directions)}")
        bases = {layer: as_bases(directions[layer], d_act) for layer in layers}
        counts = {len(b) for b in bases.values()}
        if len(counts) != 1:
            raise InputError(f"every layer needs as many subspaces; got counts {sorted(counts)}")
        d_sub = max(b.shape[-1] for b in bases.values())
        return {layer: torch.nn.functional.pad(b, (0, d_sub - b.shape[-1])) for layer, b in bases.items()}
    shared = as_bases(directions, d_act)
    return {layer: shared for layer in layers}


def patch_list(layers: list[int], by: tuple[str, ...], sizes: tuple[int, ...], positions: list[int] | None) -> Tensor:
    """Every ``(layer, *by index, subspace)`` patch, in grid order (``positions`` restricts ``pos``)."""
    ranges = [layers]
    for axis, size in zip((*by, "direction"), sizes, strict=True):
        if axis == "pos" and positions is not None:
            bad = [p for p in positions if not -size <= p < size]
            if bad or not positions:
                raise InputError(f"positions {positions} out of range for {size} positions")
            ranges.append([p % size for p in positions])
        else:
            ranges.append(range(size))
    return torch.tensor(list(itertools.product(*ranges)), dtype=torch.long).reshape(-1, 1 + len(sizes))


def check_patches(patches: Tensor, layers: list[int], sizes: tuple[int, ...], by: tuple[str, ...]) -> None:
    """Explicit patches must be ``[n, 1 + len(by) + 1]`` with indices in range."""
    if patches.dim() != 2 or patches.shape[1] != 2 + len(by) or not len(patches):
        raise InputError(
            f"patches must be [n_patches, {2 + len(by)}] (layer, {', '.join(by) or 'no by axes'}, subspace), "
            f"got {tuple(patches.shape)}"
        )
    limits = torch.tensor(sizes, dtype=torch.long)
    bad_layer = ~torch.isin(patches[:, 0], torch.tensor(layers))
    if bool(bad_layer.any()) or bool(((patches[:, 1:] < 0) | (patches[:, 1:] >= limits)).any()):
        raise InputError(
            f"patch indices out of range: layers {layers}, {dict(zip((*by, 'direction'), sizes, strict=True))}"
        )
