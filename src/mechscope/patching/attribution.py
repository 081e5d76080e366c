"""Attribution patching (AtP) and AtP* (Kramár et al. 2024).

AtP estimates the effect of patching a node ``n`` from the base run (the one being patched)
to the source run as ``(n_source - n_base) . dM/dn`` at the base run: two forwards and one
backward give an estimate for every node at once. Effects are changes of the metric,
``metric(patched) - metric(base)``, averaged over prompts; with ``direction="denoising"`` the
base is the corrupted run and the source the clean one, with ``"noising"`` the reverse.

AtP* adds, for attention heads:

* the **QK fix**: a head's effect is split into its query, key and value nodes. Values enter
  the head output linearly (``dM/dz . A (v_src - v_base)``); for queries the attention
  pattern with the source queries is recomputed exactly and the pattern change is weighted by
  ``dM/dA``; for keys each key position's change is applied exactly (one attention logit
  column at a time, in closed form) and the results are summed. Grouped-query models are
  handled per query head, reading its key-value head's keys and values; no weight is copied.
* **GradDrop**: the estimate is recomputed with the gradient through each layer's attention
  and MLP outputs dropped in turn (all layers in one batched backward); the score of a node is
  ``sum_l |estimate_without_l| / (n_layers - 1)``, which cancellation between paths cannot
  hide.
* **verification**: the top-k nodes are patched exactly with the batched engine, and a
  stratified random sample of the rest bounds the number of remaining false negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mechscope.cache import act_name
from mechscope.errors import ConfigError, InputError
from mechscope.patching.activation import Direction, activation_patch, get_site
from mechscope.patching.metrics import Metric

NodeType = Literal["heads", "neurons"]


def _pair(model, clean, corrupted, direction: Direction) -> tuple[Tensor, Tensor]:
    if direction not in ("denoising", "noising"):
        raise InputError(f"direction must be 'denoising' or 'noising', got {direction!r}")
    clean = model._tokens_and_mask(clean, None, None, "right")[0]
    corrupted = model._tokens_and_mask(corrupted, None, None, "right")[0]
    if clean.shape != corrupted.shape:
        raise InputError(f"clean tokens {tuple(clean.shape)} and corrupted tokens {tuple(corrupted.shape)} differ in shape")
    return (corrupted, clean) if direction == "denoising" else (clean, corrupted)


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
    for name, g in zip(names, grads):
        g = torch.zeros_like(store[name]) if g is None else g
        out[name] = g.detach().view(copies, n, *g.shape[1:])
    return acts, out


def _source_acts(model, tokens: Tensor, names: list[str], attention_mask: Tensor | None) -> dict[str, Tensor]:
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
    base, source = _pair(model, clean_tokens, corrupted_tokens, direction)
    resolved = [get_site(site) for site in sites]
    names = [s.hook(layer) for s, _ in resolved for layer in range(model.cfg.n_layers)]
    acts, grads = gradient_pass(model, base, names, metric, attention_mask=attention_mask)
    src = _source_acts(model, source, names, attention_mask)
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


def _final_qk_names(model, layer: int) -> tuple[str, str]:
    cfg = model.cfg
    if cfg.positional_embedding_type == "rotary":
        return act_name("rot_q", layer), act_name("rot_k", layer)
    if cfg.qk_norm is not None:
        raise ConfigError("the AtP* QK fix needs the final queries and keys; QK-norm without rotary is not supported")
    return act_name("q", layer), act_name("k", layer)


def _head_names(model, layer: int) -> list[str]:
    q, k = _final_qk_names(model, layer)
    return [act_name("z", layer), act_name("attn_scores", layer), act_name("pattern", layer), q, k, act_name("v", layer)]


def _logits(model, q: Tensor, k: Tensor) -> Tensor:
    """Attention logits ``[batch, head, query_pos, key_pos]`` from final q ``[b, p, head, d]`` and k."""
    cfg = model.cfg
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.d_head**-0.5
    k = k.repeat_interleave(cfg.n_kv_groups, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if cfg.attn_scores_soft_cap is not None:
        scores = torch.tanh(scores / cfg.attn_scores_soft_cap) * cfg.attn_scores_soft_cap
    return scores


def qk_fix_components(model, layer: int, base: dict[str, Tensor], source: dict[str, Tensor], grad_z: Tensor):
    """The AtP* query, key and value estimates of every head at ``layer``, per prompt.

    ``base``/``source``: the activations of `_head_names` (z, attention scores, pattern, final q
    and k, v) of the base and source runs; ``grad_z`` is ``dM/dz`` ``[..., n_prompts, pos,
    head, d_head]`` (leading axes, e.g. GradDrop copies, broadcast). Returns ``(query [...,
    n_prompts, head], key [..., n_prompts, head, key_pos], value [..., n_prompts, head])``.

    Example:
        >>> names = _head_names(model, 1)
        >>> acts, grads = gradient_pass(model, tokens, names, lambda x: x[:, -1, 0])
        >>> q, k, v = qk_fix_components(model, 1, acts, acts, grads[names[0]])
        >>> bool(q.abs().max() == 0 and k.abs().max() == 0 and v.abs().max() == 0)
        True
    """
    z_name, s_name, p_name, q_name, k_name, v_name = _head_names(model, layer)
    groups = model.cfg.n_kv_groups
    # Float64 throughout: near-saturated patterns need 1 - A to full precision.
    scores = base[s_name].double()
    masked = torch.isinf(scores)  # [n, head, query_pos, key_pos]
    pattern = scores.softmax(-1)
    v_base = base[v_name].repeat_interleave(groups, dim=2).double()  # [n, pos, head, d_head]
    v_src = source[v_name].repeat_interleave(groups, dim=2).double()
    g_z = grad_z.double()
    # dM/dA[t, s] = dM/dz[t] . v[s]
    g_pattern = torch.einsum("...qhd,...khd->...hqk", g_z, v_base)
    value = torch.einsum("...qhd,...hqk,...khd->...h", g_z, pattern, v_src - v_base)
    q_base, k_base = base[q_name].double(), base[k_name].double()
    base_logits = _logits(model, q_base, k_base)
    # The source queries' pattern, as a change of the cached scores (exactly zero for no change).
    logits_q = scores + (_logits(model, source[q_name].double(), k_base) - base_logits).masked_fill(masked, 0.0)
    query = (g_pattern * (logits_q.softmax(-1) - pattern)).sum((-1, -2))
    # One key at a time: with r = A_ts (exp(delta_ts) - 1), the pattern change weighted by dM/dA
    # sums to r (g_ts - G_t) / (1 + r), where G_t = sum_s g_ts A_ts.
    delta = _logits(model, q_base, source[k_name].double()) - base_logits
    delta = delta.masked_fill(masked, 0.0).clamp(max=300.0)
    r = pattern * torch.expm1(delta)
    weighted = (g_pattern * pattern).sum(-1, keepdim=True)
    key = (r * (g_pattern - weighted) / (1 + r).clamp(min=1e-300)).sum(-2)  # [..., n, head, key_pos]
    query, key, value = (t.to(grad_z.dtype) for t in (query, key, value))
    return query, key, value


@dataclass
class FalseNegativeEstimate:
    """How many unverified nodes may still have ``|effect| > threshold`` (stratified sample).

    ``estimate`` is the expected count; ``upper_bound`` a one-sided ``confidence`` bound
    (Clopper-Pearson per stratum, Bonferroni across strata); ``sampled``/``found`` the sample.
    """

    threshold: float
    sampled: int
    found: int
    estimate: float
    upper_bound: float
    confidence: float


@dataclass
class AtPStarResult:
    """AtP* output for one node type (``heads``: ``[layer, head]``; ``neurons``: ``[layer, d_mlp]``).

    ``estimates``: AtP* signed estimates of the metric change; ``atp``: plain AtP;
    ``graddrop``: GradDrop scores (``None`` when off); ``scores``: what nodes are ranked by;
    ``top``: the ``[k, 2]`` (layer, index) of the ranked top-k; ``verified``: their exact effects.
    """

    estimates: Tensor
    atp: Tensor
    graddrop: Tensor | None
    scores: Tensor
    top: Tensor
    verified: Tensor | None
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


def _head_estimates(model, base_tokens, source_tokens, metric, drops, attention_mask):
    """AtP* (QK fix) and plain AtP head estimates, ``[n_drops, n_prompts, layer, head]`` each."""
    names = [name for layer in range(model.cfg.n_layers) for name in _head_names(model, layer)]
    acts, grads = gradient_pass(model, base_tokens, names, metric, drops, attention_mask)
    src = _source_acts(model, source_tokens, names, attention_mask)
    star, plain = [], []
    for layer in range(model.cfg.n_layers):
        z = act_name("z", layer)
        query, key, value = qk_fix_components(model, layer, acts, src, grads[z])
        star.append(query + key.sum(-1) + value)
        plain.append(((src[z] - acts[z]) * grads[z]).sum((-3, -1)))
    return torch.stack(star, -2), torch.stack(plain, -2)


def _neuron_estimates(model, base_tokens, source_tokens, metric, drops, attention_mask):
    names = [act_name("post", layer) for layer in range(model.cfg.n_layers)]
    acts, grads = gradient_pass(model, base_tokens, names, metric, drops, attention_mask)
    src = _source_acts(model, source_tokens, names, attention_mask)
    est = torch.stack([((src[n] - acts[n]) * grads[n]).sum(-2) for n in names], -2)
    return est, est


def atp_star(
    model,
    clean_tokens: Tensor,
    corrupted_tokens: Tensor,
    metric: Metric,
    *,
    nodes: NodeType = "heads",
    direction: Direction = "denoising",
    qk_fix: bool = True,
    graddrop: bool = True,
    top_k: int = 10,
    verify: bool = True,
    n_samples: int = 0,
    threshold: float | None = None,
    confidence: float = 0.95,
    seed: int = 0,
    attention_mask: Tensor | None = None,
    batch_size: int | None = None,
    memory_budget: int = 2**30,
) -> AtPStarResult:
    """AtP* for every attention head (``nodes="heads"``) or MLP neuron (``"neurons"``).

    Ranks nodes by GradDrop score (or by ``|estimate|`` with ``graddrop=False``), verifies the
    ``top_k`` exactly with `activation_patch` (site ``z`` by head, or ``post`` by neuron), and
    with ``n_samples > 0`` verifies a stratified random sample of the other nodes to bound the
    false negatives: nodes whose exact ``|effect|`` exceeds ``threshold`` (default: the smallest
    ``|effect|`` among the verified top-k). ``qk_fix=False`` uses plain AtP for heads.

    Example:
        >>> clean, corrupted = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 5, 3, 4]])
        >>> result = atp_star(model, clean, corrupted, lambda x: x[:, -1, 7], top_k=3, n_samples=4)
        >>> result.estimates.shape, result.top.shape, result.verified.shape
        (torch.Size([3, 4]), torch.Size([3, 2]), torch.Size([3]))
    """
    if nodes not in ("heads", "neurons"):
        raise InputError(f"nodes must be 'heads' or 'neurons', got {nodes!r}")
    if n_samples and not verify and threshold is None:
        raise InputError("the false-negative estimate needs a threshold: pass threshold=... or verify=True")
    base, source = _pair(model, clean_tokens, corrupted_tokens, direction)
    n_layers = model.cfg.n_layers
    drops = [None] + (list(range(n_layers)) if graddrop and n_layers > 1 else [])
    fn = _head_estimates if nodes == "heads" else _neuron_estimates
    star, plain = fn(model, base, source, metric, drops, attention_mask)
    est = (star if qk_fix else plain).mean(1)  # [n_drops, layer, index]: mean over prompts
    estimates, atp = est[0], plain[0].mean(0)
    graddrop_scores = est[1:].abs().sum(0) / (n_layers - 1) if len(drops) > 1 else None
    scores = graddrop_scores if graddrop_scores is not None else estimates.abs()
    flat = scores.flatten()
    k = min(top_k, flat.numel())
    order = flat.argsort(descending=True)
    width = scores.shape[1]
    top = torch.stack((order[:k] // width, order[:k] % width), -1).cpu()
    verified, false_negatives = None, None
    # Verify the top-k and a stratified sample (by rank, up to three strata) of the other nodes.
    rest = order[k:].cpu()
    strata = list(torch.tensor_split(rest, min(3, len(rest)))) if n_samples and len(rest) else []
    gen = torch.Generator().manual_seed(seed)
    quotas = [len(q) for q in torch.tensor_split(torch.arange(max(n_samples, len(strata))), len(strata))] if strata else []
    sample = [c[torch.randperm(len(c), generator=gen)[:q]] for c, q in zip(strata, quotas)]
    picked = torch.cat([order[:k].cpu() if verify else order[:0].cpu(), *sample])
    if len(picked):
        patches = torch.stack((picked // width, picked % width), -1)
        with torch.no_grad():
            base_value = metric(model(base, attention_mask=attention_mask)).float().mean()
        effects = activation_patch(
            model, clean_tokens, corrupted_tokens, metric, "z" if nodes == "heads" else "post",
            direction=direction, patches=patches, attention_mask=attention_mask,
            batch_size=batch_size, memory_budget=memory_budget,
        ).cpu() - base_value.cpu()
        verified = effects[:k] if verify else None
    if n_samples:
        tail = effects[k if verify else 0 :] if len(picked) else torch.zeros(0)
        if threshold is None:
            threshold = float(verified.abs().min())
        false_negatives = _false_negatives(tail, [len(x) for x in sample], [len(c) for c in strata], threshold, confidence)
    return AtPStarResult(estimates, atp, graddrop_scores, scores, top, verified, false_negatives)


def _false_negatives(effects, sample_sizes, stratum_sizes, threshold, confidence) -> FalseNegativeEstimate:
    alpha = (1 - confidence) / max(1, len(stratum_sizes))
    estimate = upper = 0.0
    found_total, start = 0, 0
    for m, size in zip(sample_sizes, stratum_sizes):
        found = int((effects[start : start + m].abs() > threshold).sum())
        start += m
        found_total += found
        estimate += size * found / m
        upper += size * _binomial_upper(found, m, alpha)
    return FalseNegativeEstimate(threshold, sum(sample_sizes), found_total, estimate, upper, confidence)
