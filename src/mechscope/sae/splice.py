"""Running a model with SAEs spliced in at their hooks.

A spliced SAE replaces the activation at ``cfg.output_hook`` with its reconstruction (a
transcoder reads ``cfg.hook_name`` and replaces ``cfg.hook_name_out``). Its own hook points are
named after that hook, e.g. ``blocks.6.hook_resid_post.hook_sae_acts_post``, so feature
activations can be cached, patched or ablated with the usual ``fwd_hooks``.

With ``use_error_term=True`` the output is ``recons + error`` with ``error = act - recons``
(``hook_sae_error``): downstream activations equal the clean model's (to float rounding),
gradients to upstream activations are exact, and gradients still reach the latents. The error
is that of the unpatched SAE, so a hook that patches or ablates latents changes the output by
exactly the change of the reconstruction (`mechscope.sae.features` builds on this).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.cache import ActivationCache
from mechscope.errors import ConfigError, HookNameError
from mechscope.hooks import HookFn, HookTarget, NamesFilter
from mechscope.names import unknown_name_error
from mechscope.sae.base import SAE


def check_spliceable(model, saes: SAE | Sequence[SAE]) -> list[SAE]:
    """``saes`` as a list, after checking that each names hooks of ``model`` and no two write the same hook.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> [s.cfg.hook_name for s in check_spliceable(model, sae)]
        ['blocks.1.hook_resid_post']
    """
    saes = [saes] if isinstance(saes, SAE) else list(saes)
    outputs = [sae.cfg.output_hook for sae in saes]
    if len(set(outputs)) != len(outputs):
        raise ConfigError(f"two SAEs write the same hook: {sorted(o for o in outputs if outputs.count(o) > 1)}")
    for sae in saes:
        for name in {sae.cfg.hook_name, sae.cfg.output_hook}:
            if not name:
                raise ConfigError("an SAE without cfg.hook_name cannot be spliced; set hook_name")
            if name not in model.hook_dict:
                raise unknown_name_error(name, model.hook_dict)
    return saes


_INNER_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")


@contextmanager
def _inner_hooks_muted(sae: SAE) -> Iterator[None]:
    """Run the SAE's encoder and decoder without the hooks on its inner points."""
    points = [sae.hook_dict[name] for name in _INNER_POINTS]
    saved = [(point.fwd_hooks, point.bwd_hooks) for point in points]
    for point in points:
        point.fwd_hooks, point.bwd_hooks = [], []
    try:
        yield
    finally:
        for point, (fwd, bwd) in zip(points, saved, strict=True):
            point.fwd_hooks, point.bwd_hooks = fwd, bwd


def spliced_output(
    sae: SAE, act: Float[Tensor, "batch pos ..."], source: Float[Tensor, "batch pos ..."], use_error_term: bool
) -> Float[Tensor, "batch pos ..."]:
    """What a spliced SAE writes in place of the output activation ``act`` (same shape) given the
    SAE input ``source`` (``act`` itself unless a transcoder).

    With the error term, ``error = act - recons_clean`` where ``recons_clean`` is the
    reconstruction with no hook on the SAE's inner points, so a hook that patches latents or
    the reconstruction changes the output by exactly its change of the reconstruction.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16))
        >>> act = torch.randn(2, 3, 8)
        >>> torch.allclose(spliced_output(sae, act, act, use_error_term=True), act, atol=1e-6)
        True
    """
    shape = act.shape
    sae_in = source.detach() if use_error_term else source
    skip_in = sae_in if sae.W_skip is not None else None
    recons = sae.decode(sae.encode(sae_in), skip_in)
    flat_act = (
        act.reshape(*shape[:2], -1).to(recons.dtype) if act.shape[-1] != recons.shape[-1] else act.to(recons.dtype)
    )
    if use_error_term:
        if any(sae.hook_dict[name].has_hooks() for name in _INNER_POINTS):
            with torch.no_grad(), _inner_hooks_muted(sae):
                clean = sae.decode(sae.encode(sae_in), skip_in)
        else:
            clean = recons.detach()
        error = sae.hook_sae_error(flat_act - clean)
        out = recons + error
    else:
        out = recons
    return sae.hook_sae_output(out).reshape(shape).to(act.dtype)


@contextmanager
def splice(model, saes: SAE | Sequence[SAE], use_error_term: bool = False) -> Iterator[dict[str, SAE]]:
    """Attach ``saes`` to ``model`` for the duration of a ``with`` block.

    Yields ``{output_hook: sae}``; the SAEs' hook points are renamed to
    ``"{output_hook}.{hook_sae_*}"`` while spliced.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> with splice(model, sae, use_error_term=True):
        ...     spliced = model(tokens)
        >>> torch.allclose(spliced, model(tokens), atol=1e-5)
        True
    """
    saes = check_spliceable(model, saes)
    with ExitStack() as stack:
        hooks = []
        for sae in saes:
            cfg = sae.cfg
            prefix = cfg.output_hook
            for local, point in sae.hook_dict.items():
                point.name = f"{prefix}.{local}"
            stack.callback(_restore_names, sae)
            if cfg.is_transcoder:
                captured: dict[str, Tensor] = {}

                def capture(act, *, hook, captured=captured):
                    captured["input"] = act

                def write(act, *, hook, sae=sae, captured=captured):
                    if "input" not in captured:
                        raise HookNameError(
                            f"{sae.cfg.hook_name!r} must run before {sae.cfg.hook_name_out!r} for a transcoder"
                        )
                    return spliced_output(sae, act, captured.pop("input"), use_error_term)

                hooks += [(cfg.hook_name, capture), (cfg.hook_name_out, write)]
            else:
                hooks.append(
                    (cfg.hook_name, lambda act, *, hook, sae=sae: spliced_output(sae, act, act, use_error_term))
                )
        stack.enter_context(model.hooks(fwd_hooks=hooks))
        yield {sae.cfg.output_hook: sae for sae in saes}


def _restore_names(sae: SAE) -> None:
    for local, point in sae.hook_dict.items():
        point.name = local


def _split_hooks(saes: list[SAE], fwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None):
    """Separate hooks on SAE hook points (full spliced names) from hooks on the model."""
    by_prefix = {sae.cfg.output_hook + ".": sae for sae in saes}
    model_hooks, sae_hooks = [], []
    for target, fn in fwd_hooks or ():
        owner = next((p for p in by_prefix if isinstance(target, str) and target.startswith(p)), None)
        if owner is None:
            model_hooks.append((target, fn))
            continue
        sae, local = by_prefix[owner], target[len(owner) :]
        if local not in sae.hook_dict:
            raise unknown_name_error(target, [owner + n for n in sae.hook_dict], "SAE hook point")
        sae_hooks.append((sae, local, fn))
    return model_hooks, sae_hooks


@contextmanager
def spliced_hooks(
    model,
    saes: SAE | Sequence[SAE],
    use_error_term: bool = False,
    fwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
    bwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
) -> Iterator[dict[str, SAE]]:
    """`splice` plus temporary hooks: ``fwd_hooks`` may name model hook points or SAE hook points
    such as ``"blocks.1.hook_resid_post.hook_sae_acts_post"``; ``bwd_hooks`` name model hook points.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> seen = []
        >>> with spliced_hooks(model, sae, fwd_hooks=[("blocks.1.hook_resid_post.hook_sae_acts_post",
        ...                                           lambda acts, *, hook: seen.append(acts.shape))]):
        ...     logits = model(tokens)
        >>> seen
        [torch.Size([1, 4, 64])]
    """
    saes = check_spliceable(model, saes)
    with splice(model, saes, use_error_term) as spliced:
        model_hooks, sae_hooks = _split_hooks(saes, fwd_hooks)
        handles = []
        try:
            for sae, local, fn in sae_hooks:
                handles.extend(sae.add_hook(local, fn))
            with model.hooks(fwd_hooks=model_hooks, bwd_hooks=bwd_hooks):
                yield spliced
        finally:
            for handle in handles:
                handle.remove()


def run_with_saes(
    model,
    *args,
    saes: SAE | Sequence[SAE],
    use_error_term: bool = False,
    fwd_hooks: Sequence[tuple[HookTarget, HookFn]] | None = None,
    **kwargs,
):
    """`HookedTransformer.forward` with ``saes`` spliced in; ``fwd_hooks`` may name model hook
    points or SAE hook points such as ``"blocks.1.hook_resid_post.hook_sae_acts_post"``.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> def ablate_feature_3(acts, *, hook):
        ...     acts[..., 3] = 0
        >>> logits = run_with_saes(model, tokens, saes=sae,
        ...     fwd_hooks=[("blocks.1.hook_resid_post.hook_sae_acts_post", ablate_feature_3)])
    """
    with spliced_hooks(model, saes, use_error_term, fwd_hooks):
        return model(*args, **kwargs)


def run_with_cache_with_saes(
    model,
    *args,
    saes: SAE | Sequence[SAE],
    use_error_term: bool = False,
    names_filter: NamesFilter = None,
    device: torch.device | str | None = None,
    **kwargs,
) -> tuple[object, ActivationCache]:
    """Run with ``saes`` spliced in and cache model and SAE activations under their full names.

    ``names_filter`` (``None``, a name, a list or a callable) applies to both; ``None`` caches
    every default model hook and every SAE hook point that ran.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=32, d_sae=64, hook_name="blocks.1.hook_resid_post"))
        >>> _, cache = run_with_cache_with_saes(model, tokens, saes=sae,
        ...     names_filter=lambda n: n.endswith("hook_sae_acts_post"))
        >>> cache["blocks.1.hook_resid_post.hook_sae_acts_post"].shape
        torch.Size([1, 4, 64])
    """
    saes = check_spliceable(model, saes)
    sae_names = [f"{sae.cfg.output_hook}.{local}" for sae in saes for local in sae.hook_dict]
    if names_filter is None:
        model_names, wanted = model.hook_names(None), set(sae_names)
    elif callable(names_filter):
        model_names, wanted = model.hook_names(names_filter), {n for n in sae_names if names_filter(n)}
    else:
        names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
        wanted = {n for n in names if n in sae_names}
        model_names = model.hook_names([n for n in names if n not in wanted])
    store: dict[str, Tensor] = {}

    def save(act: Tensor, *, hook) -> None:
        act = act.detach()
        store[hook.name] = act if device is None else act.to(device)

    hooks = [(n, save) for n in model_names] + [(n, save) for n in sorted(wanted)]
    out = run_with_saes(model, *args, saes=saes, use_error_term=use_error_term, fwd_hooks=hooks, **kwargs)
    return out, ActivationCache(store, model)
