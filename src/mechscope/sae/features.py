"""Patching, ablating and attributing SAE features with the batched patching engine.

The SAEs are spliced in with their error term, so an unpatched run equals the clean model and
patching a feature changes the SAE's output by exactly the change of its reconstruction.
Results are keyed by the full name of the patched hook point, e.g.
``"blocks.1.hook_resid_post.hook_sae_acts_post"``, and ``"...hook_sae_error"`` for the SAE's
error term, a node of its own.

``by="d_sae"`` patches a feature at every position; ``by=("pos", "d_sae")`` one position of
one feature (the axis names of the SAE's latents ``[batch, pos, d_sae]``, as ``by`` names axes
everywhere in `mechscope.patching`). ``features`` picks feature ids (a list for every SAE, or a dict keyed by the SAE's
hook); by default every *live* feature is patched, one whose activation differs between the
patched run and the source somewhere, and every other feature reports the unpatched metric
(patching it changes nothing). With ``error=True`` each SAE's error term is patched too, as one
node (or one per position).

Patches run as batch elements of `mechscope.patching.run_patches` under a hook context that
splices the SAEs in (`mechscope.sae.splice.spliced_hooks`): each forward starts at the SAE's
block from the cached residual stream, chunks fit ``memory_budget`` (the SAE's latents
included) and metric values stay on the device.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor

from mechscope.errors import ConfigError, InputError
from mechscope.model.tokenize import input_tokens
from mechscope.names import Site, act_name, layer_of
from mechscope.patching.activation import AblationKind, Direction, base_and_source
from mechscope.patching.engine import SweepOptions, base_run, resolve_logit_positions, rows_per_forward, run_patches
from mechscope.patching.metrics import Metric
from mechscope.sae.base import SAE
from mechscope.sae.splice import check_spliceable, run_with_cache_with_saes, run_with_saes, spliced_hooks

FeatureBy = Literal["d_sae"] | tuple[str, ...]
Features = Sequence[int] | Tensor | Mapping[str, Sequence[int] | Tensor] | None

ACTS = "hook_sae_acts_post"
ERROR = "hook_sae_error"


@dataclass(frozen=True)
class FeatureSite(Site):
    """The latents ``[batch, pos, d_sae]`` (or error term ``[batch, pos, d_out]``) of one spliced SAE
    as a patching site: its hook is the same at every "layer" (the patched forwards' start block).

    Example:
        >>> FeatureSite("f", ("pos", "d_sae"), ("d_sae",), "blocks.1.hook_resid_post.hook_sae_acts_post").hook(1)
        'blocks.1.hook_resid_post.hook_sae_acts_post'
    """

    hook_name: str = ""

    def hook(self, layer: int) -> str:
        """The SAE's hook name, whatever ``layer``."""
        return self.hook_name


def acts_name(sae: SAE) -> str:
    """The full name of a spliced SAE's latents, the key of its results.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> acts_name(make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post")))
        'blocks.1.hook_resid_post.hook_sae_acts_post'
    """
    return f"{sae.cfg.output_hook}.{ACTS}"


def _start_layer(sae: SAE) -> int:
    """The block where patched forwards start: the one holding the SAE's input hook."""
    layers = []
    for name in (sae.cfg.hook_name, sae.cfg.output_hook):
        layer = layer_of(name)
        if layer is None:
            raise ConfigError(
                f"feature patching starts the patched forwards at the SAE's block, but the SAE at {name!r} is "
                "outside the blocks; use an SAE on a blocks.{layer}.* hook (e.g. blocks.0.hook_resid_pre)"
            )
        layers.append(layer)
    return min(layers)


def _by_axes(by: FeatureBy) -> tuple[str, ...]:
    axes = (by,) if isinstance(by, str) else tuple(by)
    if sorted(axes) == ["d_sae"]:
        return ("d_sae",)
    if sorted(axes) == ["d_sae", "pos"]:
        return ("pos", "d_sae")
    raise InputError(f"by must be 'd_sae' (a feature at every position) or ('pos', 'd_sae'), got {by!r}")


def _feature_ids(features: Features, sae: SAE) -> Tensor | None:
    if features is None:
        return None
    if isinstance(features, Mapping):
        keys = (sae.cfg.output_hook, acts_name(sae))
        chosen = next((features[k] for k in keys if k in features), None)
        if chosen is None:
            raise InputError(f"features has no entry for the SAE at {sae.cfg.output_hook!r}; keys: {sorted(features)}")
        features = chosen
    ids = torch.as_tensor(features, dtype=torch.long).reshape(-1)
    if not len(ids) or int(ids.min()) < 0 or int(ids.max()) >= sae.cfg.d_sae:
        raise InputError(f"feature ids must be a non-empty list in [0, d_sae={sae.cfg.d_sae}), got {ids.tolist()[:10]}")
    return ids


def _rows(model, sae: SAE, seq: int, memory_budget: int, n_logits: int | None, batch_size: int | None) -> int:
    """Rows per patched forward: the model's activations plus the SAE's latents, masks and copies."""
    if batch_size is not None:
        return batch_size
    model_rows = rows_per_forward(model, seq, memory_budget, n_logits)
    sae_bytes = seq * (6 * sae.cfg.d_sae + 4 * sae.cfg.d_out) * torch.finfo(sae.dtype).bits // 8
    return max(1, int(memory_budget // (memory_budget / model_rows + sae_bytes)))


def _tokens(model, tokens) -> Tensor:
    return input_tokens(model, tokens)[0]


def _nodes(sae: SAE, axes: tuple[str, ...], error: bool) -> list[tuple[str, tuple[str, ...]]]:
    """``(hook name, by axes)`` of the nodes patched for ``sae``: its latents, then its error term."""
    nodes = [(acts_name(sae), axes)]
    if error:
        nodes.append((f"{sae.cfg.output_hook}.{ERROR}", ("pos",) if "pos" in axes else ()))
    return nodes


def _sweep(model, saes, base_tokens, sources_fn, metric, by, features, error, attention_mask,
           options: SweepOptions) -> dict[str, Tensor]:  # fmt: skip
    saes = check_spliceable(model, saes)
    axes = _by_axes(by)
    layers = {sae.cfg.output_hook: _start_layer(sae) for sae in saes}
    names = [name for sae in saes for name, _ in _nodes(sae, axes, error)]
    resid = [act_name("resid_pre", layer) for layer in sorted(set(layers.values()))]
    spliced = partial(spliced_hooks, model, saes, True)
    base, cache = base_run(model, base_tokens, attention_mask, resid + names, hook_context=spliced)
    with torch.no_grad():
        base_metric = metric(base.logits).float()
    sources = sources_fn(saes, names, cache)
    n_prompts, seq = base_tokens.shape
    keep, _ = resolve_logit_positions(metric, options.logit_positions, seq)
    n_logits = None if keep is None else len(keep)
    out = {}
    for sae in saes:
        layer, ids = layers[sae.cfg.output_hook], _feature_ids(features, sae)
        for name, node_by in _nodes(sae, axes, error):
            base_acts, source = cache[name], sources[name]
            device = base_acts.device
            dense = name.endswith(ACTS) and ids is None
            if dense:  # only live features: the others leave the run unchanged
                differs = (source != base_acts).any(0)  # [pos, d_sae]
                live = differs if "pos" in node_by else differs.any(0)
                index, grid = live.nonzero(), tuple(live.shape)  # [n_patches, len(node_by)]
            elif name.endswith(ACTS):
                chosen = ids.to(device)
                if "pos" in node_by:
                    index, grid = (
                        torch.cartesian_prod(torch.arange(seq, device=device), chosen).reshape(-1, 2),
                        (seq, len(chosen)),
                    )
                else:
                    index, grid = chosen[:, None], (len(chosen),)
            else:  # the error term: whole, or one position at a time
                index = (
                    torch.arange(seq, device=device)[:, None]
                    if node_by
                    else torch.zeros(1, 0, dtype=torch.long, device=device)
                )
                grid = (seq,) if node_by else ()
            values = base_metric.expand(*grid, n_prompts).clone()
            if len(index):
                patches = torch.cat([torch.full((len(index), 1), layer, device=device), index], 1).cpu()
                site = FeatureSite(name, ("pos", "d_sae" if name.endswith(ACTS) else "d_out"), node_by, name)
                got = run_patches(
                    model, {layer: cache["resid_pre", layer]}, {layer: source}, site, node_by, patches, metric,
                    attention_mask=attention_mask, base=base if options.reuse_prefix else None,
                    hook_context=partial(spliced_hooks, model, [sae], True), progress=options.progress,
                    batch_size=_rows(model, sae, seq, options.memory_budget, n_logits, options.batch_size),
                    logit_positions=options.logit_positions,
                ).to(values.device)  # fmt: skip
                if dense:
                    values[tuple(index.T)] = got
                else:
                    values = got.reshape(*grid, n_prompts)
            out[name] = values if options.per_prompt else values.mean(-1)
    return out


def feature_patch(
    model,
    saes: SAE | Sequence[SAE],
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    by: FeatureBy = "d_sae",
    *,
    direction: Direction = "denoising",
    features: Features = None,
    error: bool = False,
    attention_mask: Tensor | None = None,
    options: SweepOptions | None = None,
    **sweep,
) -> dict[str, Tensor]:
    """Activation patching of SAE features: the metric of each patched run, per SAE.

    ``direction="denoising"`` runs the corrupted prompts with clean feature activations patched
    in, ``"noising"`` the reverse. Returns ``{acts_name: values}`` with values ``[d_sae]`` for
    ``by="d_sae"`` or ``[pos, d_sae]`` for ``by=("pos", "d_sae")`` (``[n_features]`` /
    ``[pos, n_features]`` for an explicit ``features`` list, in its order), averaged over prompts
    (``per_prompt`` keeps a trailing ``[n_prompts]`` axis). ``error=True`` also patches each SAE's
    error term as one node (key ``"...hook_sae_error"``; ``[]``, or ``[pos]`` by position).
    Other arguments, and the sweep options (`mechscope.patching.SweepOptions`; ``reuse_prefix``
    included), as in `mechscope.patching.activation_patch`.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> out = feature_patch(model, sae, clean, corrupted, lambda logits: logits[:, -1, 7])
        >>> out["blocks.1.hook_resid_post.hook_sae_acts_post"].shape
        torch.Size([64])
        >>> feature_patch(model, sae, clean, corrupted, lambda logits: logits[:, -1, 7], by=("pos", "d_sae"),
        ...               features=[3, 5])["blocks.1.hook_resid_post.hook_sae_acts_post"].shape
        torch.Size([4, 2])
    """
    base, source = base_and_source(model, clean_tokens, corrupted_tokens, direction)

    def sources_fn(saes: list[SAE], names: list[str], base_cache) -> dict[str, Tensor]:
        with torch.no_grad():
            _, cache = run_with_cache_with_saes(
                model, source, saes=saes, use_error_term=True, names_filter=names, attention_mask=attention_mask
            )
        return {name: cache[name] for name in names}

    return _sweep(
        model, saes, base, sources_fn, metric, by, features, error, attention_mask, SweepOptions.of(options, sweep)
    )


def feature_ablate(
    model,
    saes: SAE | Sequence[SAE],
    tokens: Tensor,
    metric: Metric,
    by: FeatureBy = "d_sae",
    *,
    kind: AblationKind = "zero",
    reference: Tensor | None = None,
    seed: int = 0,
    features: Features = None,
    error: bool = False,
    options: SweepOptions | None = None,
    **sweep,
) -> dict[str, Tensor]:
    """Zero, mean or resample ablation of SAE features: the metric of each ablated run, per SAE.

    ``kind="mean"`` replaces a feature by its mean over the ``reference`` prompts at each
    position; ``"resample"`` gives each prompt the activations of a reference prompt drawn at
    random (``seed``, drawn as in `mechscope.patching.ablate`). ``reference`` defaults to
    ``tokens``. Results as in `feature_patch`; with ``error=True`` zero-ablating the error term
    gives the metric of the model with the plain SAE spliced in.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> out = feature_ablate(model, sae, tokens, lambda logits: logits[:, -1, 7], kind="zero")
        >>> out["blocks.1.hook_resid_post.hook_sae_acts_post"].shape
        torch.Size([64])
    """
    if kind not in ("zero", "mean", "resample"):
        raise InputError(f"kind must be 'zero', 'mean' or 'resample', got {kind!r}")
    tokens = _tokens(model, tokens)
    ref = tokens if reference is None else _tokens(model, reference)
    if kind != "zero" and ref.shape[1] != tokens.shape[1]:
        raise InputError(
            f"reference prompts have {ref.shape[1]} tokens but the ablated prompts have {tokens.shape[1]}; "
            "mean and resample ablation replace activations position by position, so use prompts of equal length"
        )

    def sources_fn(saes: list[SAE], names: list[str], base_cache) -> dict[str, Tensor]:
        if kind == "zero":
            return {name: torch.zeros_like(base_cache[name][:1]) for name in names}
        with torch.no_grad():
            _, cache = run_with_cache_with_saes(model, ref, saes=saes, use_error_term=True, names_filter=names)
        if kind == "mean":
            return {name: cache[name].mean(0, keepdim=True) for name in names}
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randint(ref.shape[0], (tokens.shape[0],), generator=gen).to(model.device)
        return {name: cache[name][pick] for name in names}

    return _sweep(model, saes, tokens, sources_fn, metric, by, features, error, None, SweepOptions.of(options, sweep))


def feature_attribution_patch(
    model,
    saes: SAE | Sequence[SAE],
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    by: FeatureBy = "d_sae",
    *,
    direction: Direction = "denoising",
    attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """AtP estimates for every feature and each SAE's error term: two forwards and one backward.

    The estimate of patching a node from the base run to the source run is
    ``(source - base) . d metric / d node`` at the base run (all SAEs spliced, error terms
    kept), summed over the node's other axes and averaged over prompts, as in
    `mechscope.patching.attribution_patch`. Returns, per SAE, ``{acts_name: [d_sae]}`` and
    ``{"...hook_sae_error": []}`` for ``by="d_sae"``, or ``[pos, d_sae]`` and ``[pos]`` for
    ``by=("pos", "d_sae")``. Compare with ``feature_patch(...) - metric(base)``.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> est = feature_attribution_patch(model, sae, clean, corrupted, lambda logits: logits[:, -1, 7])
        >>> name = "blocks.1.hook_resid_post"
        >>> est[f"{name}.hook_sae_acts_post"].shape, est[f"{name}.hook_sae_error"].shape
        (torch.Size([64]), torch.Size([]))
    """
    base, source = base_and_source(model, clean_tokens, corrupted_tokens, direction)
    saes = check_spliceable(model, saes)
    per_pos = _by_axes(by) == ("pos", "d_sae")
    names = [f"{sae.cfg.output_hook}.{point}" for sae in saes for point in (ACTS, ERROR)]
    store: dict[str, Tensor] = {}

    def leaf(x: Tensor, *, hook) -> Tensor | None:
        return None if x.requires_grad else x.detach().requires_grad_(True)

    def keep(x: Tensor, *, hook) -> Tensor:
        x = x if x.requires_grad else x.detach().requires_grad_(True)
        store[hook.name] = x
        return x

    with torch.enable_grad():
        logits = run_with_saes(
            model, base, saes=saes, use_error_term=True, attention_mask=attention_mask,
            fwd_hooks=[("hook_embed", leaf)] + [(name, keep) for name in names],
        )  # fmt: skip
        grads = torch.autograd.grad(metric(logits).sum(), [store[name] for name in names], allow_unused=True)
    with torch.no_grad():
        _, src = run_with_cache_with_saes(model, source, saes=saes, use_error_term=True, names_filter=names,
                                          attention_mask=attention_mask)  # fmt: skip
    out = {}
    for name, grad in zip(names, grads, strict=False):
        act = store[name].detach()
        grad = torch.zeros_like(act) if grad is None else grad
        prod = (src[name] - act) * grad  # [n_prompts, pos, d_sae or d_out]
        if name.endswith(ERROR):
            prod = prod.sum(-1)  # the error is one node per position: [n_prompts, pos]
        out[name] = (prod if per_pos else prod.sum(1)).mean(0)
    return out


__all__ = ["FeatureSite", "acts_name", "feature_ablate", "feature_attribution_patch", "feature_patch"]
