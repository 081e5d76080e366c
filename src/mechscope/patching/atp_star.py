"""AtP* (Kramár et al. 2024): attribution patching with its false negatives fixed and bounded.

Sites (`mechscope.names.SITES`, each verified with `activation_patch` on that site at its
default ``by``): ``"z"`` (head outputs, by head), ``"q"`` (queries, by head), ``"k"`` and
``"v"`` (keys and values by key-value head: grouped-query models keep their grouping, nothing
is ungrouped or copied), ``"post"`` (MLP neurons).

* **QK fix**: AtP linearises the attention softmax, which fails where it saturates. For query
  nodes the pattern with the source queries is recomputed exactly and its change is weighted
  by ``dM/dA``; for key nodes each key position's change is applied exactly (one attention
  logit column at a time, in closed form) and summed over positions. A head output ``z`` taken
  from the source run already went through its own softmax exactly, so heads and values use AtP.
* **GradDrop**: estimates are recomputed with the gradient through each layer's attention and
  MLP outputs dropped in turn; a node's score is ``sum_l |estimate_without_l| / (n_layers - 1)``,
  which cancelling paths cannot hide. Dropping layer ``l`` leaves the gradient of later layers
  unchanged and only the skip path at layer ``l``, so one forward and one ordinary backward
  serve every ``l``, plus a backward over the layers below ``l`` (see `graddrop_pass`).
* **Verification**: the best-scored candidates are patched exactly with the batched engine,
  and a stratified random sample of the remaining nodes bounds the false negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import Tensor

from mechscope.errors import ConfigError, InputError
from mechscope.names import act_name, parse_act_name
from mechscope.patching.activation import Direction, activation_patch, base_and_source
from mechscope.patching.attribution import gradient_pass, source_activations
from mechscope.patching.engine import SweepOptions
from mechscope.patching.metrics import Metric

AtPSite = Literal["z", "q", "k", "v", "post"]
ATP_STAR_SITES = ("z", "q", "k", "v", "post")


def _final_qk_names(model, layer: int) -> tuple[str, str]:
    cfg = model.cfg
    if cfg.positional_embedding_type == "rotary":
        return act_name("rot_q", layer), act_name("rot_k", layer)
    if cfg.qk_norm is not None:
        raise ConfigError("the AtP* QK fix needs the final queries and keys; QK-norm without rotary is not supported")
    return act_name("q", layer), act_name("k", layer)


def head_names(model, layer: int) -> list[str]:
    """Hooks the QK fix reads at ``layer``: z, attention scores, pattern, final q and k, v.

    Example:
        >>> head_names(model, 0)[:3]
        ['blocks.0.attn.hook_z', 'blocks.0.attn.hook_attn_scores', 'blocks.0.attn.hook_pattern']
    """
    q, k = _final_qk_names(model, layer)
    return [
        act_name("z", layer),
        act_name("attn_scores", layer),
        act_name("pattern", layer),
        q,
        k,
        act_name("v", layer),
    ]


def qk_fix_components(model, layer: int, base: dict[str, Tensor], source: dict[str, Tensor], grad_z: Tensor):
    """The AtP* query and key estimates of every head at ``layer``, per prompt.

    ``base``/``source``: the `head_names` activations of the base and source runs; ``grad_z``
    is ``dM/dz`` ``[..., n_prompts, pos, head, d_head]`` (leading axes, e.g. GradDrop copies,
    broadcast). Returns ``(query [..., n_prompts, head], key [..., n_prompts, head, key_pos])``:
    the source queries of a head, or the source key at one position, with the softmax exact.

    Example:
        >>> names = head_names(model, 1)
        >>> acts, grads = gradient_pass(model, tokens, names, lambda x: x[:, -1, 0])
        >>> query, key = qk_fix_components(model, 1, acts, acts, grads[names[0]])
        >>> bool(query.abs().max() == 0 and key.abs().max() == 0)
        True
    """
    _, s_name, _, q_name, k_name, v_name = head_names(model, layer)
    # Float64 throughout: near-saturated patterns need 1 - A to full precision.
    scores = base[s_name].double()
    masked = torch.isinf(scores)  # [n, head, query_pos, key_pos]
    pattern = scores.softmax(-1)
    v_base = base[v_name].repeat_interleave(model.cfg.n_kv_groups, dim=2).double()  # [n, pos, head, d_head]
    g_pattern = torch.einsum("...qhd,...khd->...hqk", grad_z.double(), v_base)  # dM/dA[t, s] = dM/dz[t] . v[s]
    q_base, k_base = base[q_name].double(), base[k_name].double()
    attn_logits = model.blocks[layer].attn.scores  # [..., head, query_pos, key_pos], scaled and soft-capped
    base_logits = attn_logits(q_base, k_base)
    # The source queries' pattern, as a change of the cached scores (exactly zero for no change).
    logits_q = scores + (attn_logits(source[q_name].double(), k_base) - base_logits).masked_fill(masked, 0.0)
    query = (g_pattern * (logits_q.softmax(-1) - pattern)).sum((-1, -2))
    # One key at a time: with r = A_ts (exp(delta_ts) - 1), the pattern change weighted by dM/dA
    # sums to r (g_ts - G_t) / (1 + r), where G_t = sum_s g_ts A_ts.
    delta = (attn_logits(q_base, source[k_name].double()) - base_logits).masked_fill(masked, 0.0)
    r = pattern * torch.expm1(delta.clamp(max=300.0))
    weighted = (g_pattern * pattern).sum(-1, keepdim=True)
    key = (r * (g_pattern - weighted) / (1 + r).clamp(min=1e-300)).sum(-2)  # [..., n, head, key_pos]
    return query.to(grad_z.dtype), key.to(grad_z.dtype)


def graddrop_pass(
    model, tokens: Tensor, names: list[str], metric: Metric, attention_mask: Tensor | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Activations and gradients ``[1 + n_layers, n_prompts, ...]``: the plain gradient, then
    GradDrop of each layer, for nodes inside attention and MLP sublayers (``blocks.{l}.attn.*``,
    ``blocks.{l}.mlp.*``). Equals ``gradient_pass(..., drop_layers=[None, 0, 1, ...])``.

    Dropping layer ``l``'s attention and MLP outputs from the backward zeroes the gradient of
    layer ``l``'s nodes, leaves later layers' nodes as they are, and makes the gradient entering
    layer ``l`` equal to the one leaving it (the skip path only). So one forward and the plain
    backward give every layer's gradient, and each ``l`` adds one backward over layers ``< l``
    only: about half the layer-backwards of running every drop through the whole model.

    Example:
        >>> names = ["blocks.0.attn.hook_z", "blocks.2.mlp.hook_post"]
        >>> acts, grads = graddrop_pass(model, tokens, names, lambda x: x[:, -1, 0])
        >>> grads["blocks.0.attn.hook_z"].shape
        torch.Size([4, 1, 4, 4, 8])
    """
    n_layers = model.cfg.n_layers
    layer_of = {}
    for name in names:
        parsed = parse_act_name(name)
        if parsed.module not in ("attn", "mlp"):
            raise InputError(
                f"graddrop_pass takes attention and MLP nodes (blocks.{{l}}.attn.*, blocks.{{l}}.mlp.*), got {name!r}"
            )
        layer_of[name] = parsed.layer
    store: dict[str, Tensor] = {}

    def save(x: Tensor, *, hook) -> None:
        store[hook.name] = x

    def leaf(x: Tensor, *, hook) -> Tensor | None:
        return None if x.requires_grad else x.detach().requires_grad_(True)

    resid = [act_name("resid_pre", layer) for layer in range(1, n_layers)]
    post = [act_name("resid_post", layer) for layer in range(1, n_layers)]
    with torch.enable_grad():
        logits = model.run_with_hooks(
            tokens,
            attention_mask=attention_mask,
            fwd_hooks=[("hook_embed", leaf)] + [(name, save) for name in [*names, *resid, *post]],
        )
        wanted = [*names, *post]
        plain = torch.autograd.grad(
            metric(logits).sum(), [store[n] for n in wanted], retain_graph=True, allow_unused=True
        )
        plain = {n: torch.zeros_like(store[n]) if g is None else g for n, g in zip(wanted, plain, strict=False)}
        grads = {name: [plain[name]] + [None] * n_layers for name in names}
        for drop in range(n_layers):
            below = [n for n in names if layer_of[n] < drop]
            if below:
                # Gradient entering layer `drop` := gradient leaving it; backward through layers < drop.
                partial = torch.autograd.grad(
                    store[resid[drop - 1]],
                    [store[n] for n in below],
                    grad_outputs=plain[post[drop - 1]],
                    retain_graph=True,
                    allow_unused=True,
                )
                for name, g in zip(below, partial, strict=False):
                    grads[name][1 + drop] = torch.zeros_like(store[name]) if g is None else g
            for name in names:
                if layer_of[name] == drop:
                    grads[name][1 + drop] = torch.zeros_like(store[name])
                elif layer_of[name] > drop:
                    grads[name][1 + drop] = plain[name]
    acts = {name: store[name].detach() for name in names}
    return acts, {name: torch.stack(g).detach() for name, g in grads.items()}


def _estimates(model, site: AtPSite, base_tokens, source_tokens, metric, graddrop: bool, attention_mask):
    """AtP* and plain AtP estimates ``[n_drops, n_prompts, layer, index]`` for one site: the plain
    gradient, then (with ``graddrop``) each layer's GradDrop."""
    n_layers, groups = model.cfg.n_layers, model.cfg.n_kv_groups
    if site == "post":
        names = [act_name("post", layer) for layer in range(n_layers)]
    else:
        names = [name for layer in range(n_layers) for name in head_names(model, layer)]
    if graddrop:
        acts, grads = graddrop_pass(model, base_tokens, names, metric, attention_mask)
    else:
        acts, grads = gradient_pass(model, base_tokens, names, metric, attention_mask=attention_mask)
    src = source_activations(model, source_tokens, names, attention_mask)

    def atp(name: str) -> Tensor:  # sum over positions and feature dims, keep the head/neuron axis
        prod = (src[name] - acts[name]) * grads[name]
        return prod.sum(-2) if site == "post" else prod.sum((-3, -1))

    star, plain = [], []
    for layer in range(n_layers):
        if site == "post":
            star.append(atp(names[layer]))
            plain.append(star[-1])
            continue
        z, _, _, q, k, v = head_names(model, layer)
        if site in ("z", "v"):
            plain.append(atp(z if site == "z" else v))
            star.append(plain[-1])
            continue
        query, key = qk_fix_components(model, layer, acts, src, grads[z])
        if site == "q":
            star.append(query)
            plain.append(atp(q))
        else:  # keys: each key-value head sums over its query heads and key positions
            star.append(key.sum(-1).unflatten(-1, (-1, groups)).sum(-1))
            plain.append(atp(k))
    return torch.stack(star, -2), torch.stack(plain, -2)


@dataclass
class FalseNegativeEstimate:
    """How many unverified nodes may still have ``|effect| > threshold`` (stratified sample).

    ``estimate`` is the expected count; ``upper_bound`` a one-sided ``confidence`` bound
    (Clopper-Pearson per stratum, Bonferroni across strata); ``sampled``/``found`` the sample.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> result = atp_star(model, clean, corrupted, lambda x: x[:, -1, 7], top_k=3, n_samples=4)
        >>> fn = result.false_negatives  # 4 of the 6 unverified heads patched exactly
        >>> fn.sampled, fn.found, fn.estimate <= fn.upper_bound, fn.confidence
        (4, 0, True, 0.95)
    """

    threshold: float
    sampled: int
    found: int
    estimate: float
    upper_bound: float
    confidence: float


@dataclass
class AtPStarResult:
    """AtP* output for one site, on the ``[layer, index]`` grid of that site (index: head,
    key-value head or neuron).

    ``estimates``: AtP* signed estimates of the metric change; ``atp``: plain AtP; ``graddrop``:
    GradDrop scores (``None`` when off); ``scores``: what candidates are ranked by;
    ``candidates`` ``[n_verify, 2]`` (layer, index) in score order and ``verified`` their exact
    effects; ``top``: the ``top_k`` candidates with the largest ``|verified|`` (or the best
    scored, without verification).

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> result = atp_star(model, clean, corrupted, lambda x: x[:, -1, 7], top_k=3)
        >>> result.site, result.estimates.shape  # [layer, head]
        ('z', torch.Size([3, 4]))
        >>> layer, head = result.candidates[0].tolist()  # the best-scored head, patched exactly
        >>> bool(torch.isclose(result.estimates[layer, head], result.verified[0], atol=2e-3))
        True
    """

    site: str
    estimates: Tensor
    atp: Tensor
    graddrop: Tensor | None
    scores: Tensor
    candidates: Tensor
    verified: Tensor | None
    top: Tensor
    false_negatives: FalseNegativeEstimate | None


def _binomial_upper(found: int, n: int, alpha: float) -> float:
    """Clopper-Pearson one-sided upper bound on a proportion after ``found`` of ``n``."""
    if found >= n:
        return 1.0

    def cdf(p: float) -> float:
        return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(found + 1))

    lo, hi = found / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) > alpha else (lo, mid)
    return hi


def _false_negatives(effects, sample_sizes, stratum_sizes, threshold, confidence) -> FalseNegativeEstimate:
    alpha = (1 - confidence) / max(1, len(stratum_sizes))
    estimate = upper = 0.0
    found_total, start = 0, 0
    for m, size in zip(sample_sizes, stratum_sizes, strict=False):
        found = int((effects[start : start + m].abs() > threshold).sum())
        start += m
        found_total += found
        estimate += size * found / m
        upper += size * _binomial_upper(found, m, alpha)
    return FalseNegativeEstimate(threshold, sum(sample_sizes), found_total, estimate, upper, confidence)


def atp_star(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    *,
    site: AtPSite = "z",
    direction: Direction = "denoising",
    qk_fix: bool = True,
    graddrop: bool = True,
    top_k: int = 10,
    n_verify: int | None = None,
    n_samples: int = 0,
    threshold: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    attention_mask: Tensor | None = None,
    options: SweepOptions | None = None,
    **sweep,
) -> AtPStarResult:
    """AtP* for every node of one site (see the module docstring), with exact verification.

    Ranks nodes by GradDrop score (by ``|estimate|`` with ``graddrop=False``), patches the
    ``n_verify`` best (default ``2 * top_k``; ``0`` skips verification) exactly in a few batched
    forwards and keeps the ``top_k`` largest verified effects. With ``n_samples > 0`` a stratified
    random sample of the other nodes is verified too, to bound how many nodes with ``|effect| >
    threshold`` (default: the smallest ``|effect|`` among the top-k) were missed.
    Sweep options (``batch_size``, ``memory_budget``, ``logit_positions``, ``progress``; see
    `SweepOptions`) go to the verifying `activation_patch`.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> result = atp_star(model, clean, corrupted, lambda x: x[:, -1, 7], top_k=3, n_samples=4)
        >>> result.estimates.shape, result.top.shape, result.verified.shape
        (torch.Size([3, 4]), torch.Size([3, 2]), torch.Size([6]))
    """
    options = SweepOptions.of(options, sweep)
    if site not in ATP_STAR_SITES:
        raise InputError(f"atp_star takes site one of {list(ATP_STAR_SITES)}, got {site!r}")
    n_verify = 2 * top_k if n_verify is None else n_verify
    if n_samples and not n_verify and threshold is None:
        raise InputError("the false-negative estimate needs a threshold: pass threshold=... or verify (n_verify > 0)")
    base, source = base_and_source(model, clean_tokens, corrupted_tokens, direction)
    n_layers = model.cfg.n_layers
    graddrop = graddrop and n_layers > 1
    star, plain = _estimates(model, site, base, source, metric, graddrop, attention_mask)
    est = (star if qk_fix else plain).mean(1)  # [n_drops, layer, index]: mean over prompts
    estimates, atp = est[0], plain[0].mean(0)
    graddrop_scores = est[1:].abs().sum(0) / (n_layers - 1) if graddrop else None
    scores = graddrop_scores if graddrop_scores is not None else estimates.abs()
    order = scores.flatten().argsort(descending=True).cpu()
    width = scores.shape[1]
    n_verify = min(n_verify, len(order))
    candidates = torch.stack((order[:n_verify] // width, order[:n_verify] % width), -1)
    # A stratified sample (by rank, up to three strata) of the unverified nodes.
    rest = order[n_verify:]
    strata = list(torch.tensor_split(rest, min(3, len(rest)))) if n_samples and len(rest) else []
    gen = torch.Generator().manual_seed(seed)
    quotas = (
        [len(q) for q in torch.tensor_split(torch.arange(max(n_samples, len(strata))), len(strata))] if strata else []
    )
    sample = [c[torch.randperm(len(c), generator=gen)[:q]] for c, q in zip(strata, quotas, strict=False)]
    picked = torch.cat([order[:n_verify], *sample])
    effects = torch.zeros(0)
    if len(picked):
        with torch.no_grad():
            base_value = metric(model(base, attention_mask=attention_mask)).float().mean().cpu()
        effects = (
            activation_patch(
                model,
                clean_tokens,
                corrupted_tokens,
                metric,
                site,
                direction=direction,
                patches=torch.stack((picked // width, picked % width), -1),
                attention_mask=attention_mask,
                options=replace(options, per_prompt=False),
            ).cpu()
            - base_value
        )
    verified = effects[:n_verify] if n_verify else None
    if verified is not None:
        top = candidates[verified.abs().argsort(descending=True)[:top_k]]
    else:
        top = torch.stack((order[:top_k] // width, order[:top_k] % width), -1)
    false_negatives = None
    if n_samples:
        if threshold is None:
            threshold = float(verified[verified.abs().argsort(descending=True)[:top_k]].abs().min())
        false_negatives = _false_negatives(
            effects[n_verify:], [len(x) for x in sample], [len(c) for c in strata], threshold, confidence
        )
    return AtPStarResult(site, estimates, atp, graddrop_scores, scores, candidates, verified, top, false_negatives)
