"""The patching engine: many interventions as the batch elements of few forwards.

A *site* (`mechscope.names.Site`) names an activation layout and ``by`` the axes a patch
indexes. A patch is ``(layer, *index)``: at that layer the activation entries matching the
index are replaced by a *source* (another run's activation, zeros, a mean, a resampled prompt's
activation) and the rest of the model runs as usual.

Patches run patch-major (row ``r`` holds patch ``r // n_prompts`` applied to prompt
``r % n_prompts``). `schedule` orders them and cuts them into forwards; each forward starts at
its first patched layer from the cached residual stream of the run being patched and, for
patches by position, at its first patched position (`BaseRun`). Forwards fit a memory budget,
only the logit positions the metric reads are unembedded, and metric values stay on the device.

Every forward runs under a *hook context* (``hook_context(fwd_hooks)``, a context manager):
the model's own `hooks` by default, or e.g. `mechscope.sae.splice.spliced_hooks` with SAEs
spliced in, so site hooks may name SAE hook points. This is the seam other methods (SAE
features, edge patching) build on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.cache import ActivationCache
from mechscope.errors import InputError
from mechscope.model.context import AttentionContext, KVCache
from mechscope.names import Site, closest_names
from mechscope.patching.metrics import Metric, metric_positions

HookContext = Callable[[list], AbstractContextManager]
LogitPositions = Literal["auto"] | None | int | list[int]


@dataclass(frozen=True)
class SweepOptions:
    """How a sweep runs; every batched entry point (`activation_patch`, `ablate`, `path_patch`,
    `mechscope.sae.feature_patch`, …) takes these as keywords or as ``options=SweepOptions(...)``.

    Example:
        >>> SweepOptions.of(None, {"batch_size": 8}).batch_size
        8
        >>> SweepOptions.of(None, {"batchsize": 8})
        Traceback (most recent call last):
        mechscope.errors.InputError: unknown sweep option 'batchsize'; closest: ['batch_size']
    """

    per_prompt: bool = False
    """Keep a trailing ``[n_prompts]`` axis instead of averaging the metric over prompts."""
    batch_size: int | None = None
    """Rows (patched copies x prompts) per forward; ``None`` fits them to ``memory_budget``."""
    memory_budget: int = 2**30
    """Bytes of activations one forward may hold (see `rows_per_forward`)."""
    logit_positions: LogitPositions = "auto"
    """Positions to unembed. ``"auto"``: the positions the metric declares it reads (the metrics
    of `mechscope.patching.metrics` do; any other callable sees every position); ``None``: every
    position; an int or a list: those positions (the metric then sees ``[batch, len, d_vocab]``)."""
    progress: bool = False
    """A progress bar over the forwards."""
    reuse_prefix: bool = True
    """Patches by position run only the positions from the patched one on (see `BaseRun`)."""

    @classmethod
    def of(cls, options: SweepOptions | None, keywords: dict) -> SweepOptions:
        """``options`` (or the defaults) updated with ``keywords``, each checked by name."""
        names = [f.name for f in fields(cls)]
        for key in keywords:
            if key not in names:
                raise InputError(f"unknown sweep option {key!r}; closest: {closest_names(key, names) or names}")
        if options is not None and not isinstance(options, SweepOptions):
            raise InputError(f"options must be a SweepOptions, got {type(options).__name__}")
        return replace(options or cls(), **keywords)


def patch_grid(sizes: tuple[int, ...], layers: list[int]) -> Int[Tensor, "n_patches index"]:
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

    logits: Float[Tensor, "batch pos d_vocab"]
    kv: KVCache


def base_run(
    model,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None = None,
    names: list[str] | None = None,
    hook_context: HookContext | None = None,
):
    """Run ``tokens`` once, keeping a `BaseRun`; with ``names``, also return an activation cache of them.

    ``hook_context`` is the context the run happens under (default: ``model.hooks``); names may
    be any hook it knows (e.g. SAE hook points when SAEs are spliced in).

    Example:
        >>> base, cache = base_run(model, tokens, names=["blocks.0.hook_resid_pre"])
        >>> torch.equal(base.logits, model(tokens)), cache["resid_pre", 0].shape
        (True, torch.Size([1, 4, 32]))
    """
    kv = KVCache(model.cfg.n_layers)
    store: dict[str, Tensor] = {}

    def save(x: Tensor, *, hook) -> None:
        store[hook.name] = x.detach()

    context = hook_context or model.hooks
    with torch.no_grad(), context([(name, save) for name in names or []]):
        logits = model(tokens, attention_mask=attention_mask, past_kv_cache=kv)
    run = BaseRun(logits, kv)
    return run if names is None else (run, ActivationCache(store, model))


class PrefixKV(KVCache):
    """A read-only key/value cache holding the base run's positions ``< start``, repeated per patch.

    Example:
        >>> base = base_run(model, tokens)
        >>> k, v = PrefixKV(base.kv, start=2, copies=3).append(0, torch.zeros(3, 4, 2, 8), torch.zeros(3, 4, 2, 8))
        >>> k.shape
        torch.Size([3, 4, 4, 8])
    """

    def __init__(self, kv: KVCache, start: int, copies: int) -> None:
        super().__init__(len(kv.keys))
        self.source, self.start, self.copies = kv, start, copies

    def append(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        past_k = self.source.keys[layer][:, :, : self.start].to(k.device)
        past_v = self.source.values[layer][:, :, : self.start].to(v.device)
        k = torch.cat((past_k.repeat(self.copies, 1, 1, 1), k), dim=2)  # [rows, kv_head, pos, d_head]
        v = torch.cat((past_v.repeat(self.copies, 1, 1, 1), v), dim=2)
        return k, v


def suffix_context(attention_mask: Tensor | None, rows: int, seq: int, start: int, prefix: PrefixKV, device):
    """The `AttentionContext` of positions ``start:`` of ``seq``, attending to ``prefix`` before them."""
    full = AttentionContext.build(attention_mask, rows, seq, device)
    return AttentionContext(full.positions[:, start:], full.key_padding, prefix, full.positions)


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


def resolve_logit_positions(
    metric: Metric, logit_positions: LogitPositions, seq: int
) -> tuple[list[int] | None, Metric]:
    """The positions to unembed and the metric to call on logits at those positions.

    ``"auto"`` takes the positions the metric declares (`metric_positions`) and the metric's
    view of them; ``None`` keeps every position; explicit positions are checked and passed as is.

    Example:
        >>> from mechscope.patching.metrics import LogitDiff
        >>> keep, metric = resolve_logit_positions(LogitDiff([3], [5]), "auto", seq=4)
        >>> keep, metric(torch.zeros(1, 1, 10))
        ([3], tensor([0.]))
    """
    if logit_positions == "auto":
        declared = metric_positions(metric, seq)
        return (None, metric) if declared is None else declared
    if logit_positions is None:
        return None, metric
    keep = [logit_positions] if isinstance(logit_positions, int) else list(logit_positions)
    if not keep or any(not isinstance(k, int) or not -seq <= k < seq for k in keep):
        raise InputError(
            f"logit_positions {logit_positions!r} out of range for {seq} positions; use ints in [-{seq}, {seq})"
        )
    return keep, metric


@torch.no_grad()
def run_patches(
    model,
    base_resid: dict[int, Tensor],
    sources: dict[int, Tensor],
    site: Site,
    by: tuple[str, ...],
    patches: Int[Tensor, "n_patches index"],
    metric: Metric,
    *,
    attention_mask: Tensor | None = None,
    base: BaseRun | None = None,
    hook_context: HookContext | None = None,
    batch_size: int | None = None,
    memory_budget: int = 2**30,
    logit_positions: LogitPositions = "auto",
    progress: bool = False,
) -> Float[Tensor, "n_patches n_prompts"]:
    """The engine: metric values ``[n_patches, n_prompts]`` for each patch of ``patches``.

    ``base_resid[l]`` is the residual stream ``[n_prompts, pos, d_model]`` entering layer ``l``
    in the run being patched; ``sources[l]`` is the replacement activation at layer ``l``
    (``[n_prompts or 1, *site.axes]``). ``patches`` is ``[n_patches, 1 + len(by)]`` (layer,
    then one index per ``by`` axis). ``batch_size`` caps the rows of one forward; otherwise
    `rows_per_forward` fits them to ``memory_budget`` bytes. ``logit_positions`` as in
    `SweepOptions` (by default only the positions the metric reads are unembedded).
    ``hook_context`` is what every forward runs under (default ``model.hooks``).

    With ``base`` (the `BaseRun` of the run being patched) and a site patched by position, a
    forward whose patches all sit at positions ``>= p`` runs positions ``p:`` only (see
    `BaseRun`); the metric still sees logits at every position it reads, taken from ``base``
    before ``p``. `schedule` groups patches so that each forward has one start layer and one
    start position.

    Example:
        >>> base, cache = base_run(model, tokens, names=[f"blocks.{l}.hook_resid_pre" for l in range(3)])
        >>> zeros = {l: torch.zeros(1, 4, 32) for l in range(3)}
        >>> from mechscope.names import SITES
        >>> out = run_patches(model, {l: cache["resid_pre", l] for l in range(3)}, zeros, SITES["resid_pre"], ("pos",),
        ...                   patch_grid((4,), [0, 1, 2]), lambda logits: logits[:, -1, 0], base=base)
        >>> out.shape
        torch.Size([12, 1])
    """
    n_prompts, seq = next(iter(base_resid.values())).shape[:2]
    if patches.dim() != 2 or patches.shape[1] != 1 + len(by):
        raise InputError(f"patches must be [n_patches, {1 + len(by)}] (layer, then {by}), got {tuple(patches.shape)}")
    keep, metric = resolve_logit_positions(metric, logit_positions, seq)
    context = hook_context or model.hooks
    rows = batch_size or rows_per_forward(model, seq, memory_budget, None if keep is None else len(keep))
    per_chunk = max(1, rows // n_prompts)
    # positions before a patch are unchanged only under causal attention; bidirectional models rerun them
    suffix = base is not None and "pos" in by and site.axes[0] == "pos" and getattr(model.cfg, "causal", True)
    starts = patches[:, 1 + by.index("pos")] if suffix else torch.zeros(len(patches), dtype=torch.long)
    order, chunks = schedule(patches[:, 0], starts, per_chunk, n_prompts, seq, model.cfg.n_layers)
    device = model.device
    results = torch.empty(len(patches), n_prompts, device=device)
    mask_rows = None if attention_mask is None else attention_mask.to(device)
    n_layers = model.cfg.n_layers
    for idx in tqdm(chunks, desc=f"patching {site.name}", disable=not progress):
        idx = order[idx]
        chunk = patches[idx]
        first, start = int(chunk[:, 0].min()), int(starts[idx].min())
        hooks = patch_hooks(site, by, chunk, sources, n_prompts, start, device)
        chunk_mask = None if mask_rows is None else mask_rows.repeat(len(chunk), 1)
        resid = base_resid[first][:, start:].repeat(len(chunk), 1, 1)
        with context(hooks):
            if start > 0:
                ctx = suffix_context(
                    chunk_mask, resid.shape[0], seq, start, PrefixKV(base.kv, start, len(chunk)), device
                )
            else:
                ctx = AttentionContext.build(chunk_mask, resid.shape[0], seq, device)
            resid = model.run_blocks(resid, first, n_layers, ctx)
            logits = unembed_positions(model, resid, None if base is None else base.logits, start, keep, len(chunk))
        values = metric(logits)
        if values.shape != (logits.shape[0],):
            raise InputError(f"the metric must return one value per row [batch], got shape {tuple(values.shape)}")
        results[idx.to(device)] = values.float().view(len(chunk), n_prompts)
    return results


def unembed_positions(
    model, resid: Tensor, base_logits: Tensor | None, start: int, keep: list[int] | None, copies: int
) -> Float[Tensor, "batch pos d_vocab"]:
    """Logits at every position (or at ``keep``) of a forward that ran positions ``start:``:
    the base run's logits before ``start``, the final norm and unembedding of ``resid`` after."""
    n_layers = model.cfg.n_layers
    if keep is None:
        late = model(resid, start_at_layer=n_layers)
        if start == 0:
            return late
        return torch.cat((base_logits[:, :start].repeat(copies, 1, 1).to(late.device), late), dim=1)
    seq = start + resid.shape[1]
    keep = [k % seq for k in keep]
    late = [i for i, k in enumerate(keep) if k >= start]
    if start == 0 or len(late) == len(keep):
        return model(resid[:, [k - start for k in keep]], start_at_layer=n_layers)
    logits = base_logits[:, keep].repeat(copies, 1, 1)
    if late:
        logits[:, late] = model(resid[:, [keep[i] - start for i in late]], start_at_layer=n_layers).to(logits.device)
    return logits


def patch_hooks(site: Site, by, chunk: Tensor, sources: dict[int, Tensor], n_prompts: int, start: int, device) -> list:
    """One patch hook per layer of ``chunk``; positions count from ``start`` (the forward's first)."""
    source_shape = next(iter(sources.values())).shape[1:]
    mask_shape = [size if axis in by else 1 for axis, size in zip(site.axes, source_shape, strict=False)]
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
        hooks.append((site.hook(layer), replace_hook(row_index, mask.repeat_interleave(n_prompts, 0), source)))
    return hooks


def replace_hook(rows: Tensor, mask: Tensor, source: Tensor) -> Callable:
    """A hook replacing the ``mask``ed entries of ``rows`` with the source of each row's prompt.

    Example:
        >>> hook = replace_hook(torch.tensor([1]), torch.tensor([[True, False]]), torch.ones(1, 2))
        >>> hook(torch.zeros(2, 2), hook=None)
        tensor([[0., 0.],
                [1., 0.]])
    """
    n_src = source.shape[0]

    def hook(activation: Tensor, *, hook) -> Tensor:
        out = activation.clone()
        src = source[rows % n_src] if n_src > 1 else source.expand(len(rows), *source.shape[1:])
        out[rows] = torch.where(mask, src.to(out.dtype), out[rows])
        return out

    return hook


def schedule(layers: Tensor, starts: Tensor, per_chunk: int, n_prompts: int, seq: int, n_layers: int):
    """Order patches and split them into forwards; returns ``(order, chunks of positions in order)``.

    ``layers``/``starts``: each patch's first layer and first position that differ from the
    base run. A forward costs about ``rows x (n_layers - first layer) x (seq - first position)``.
    Without start positions, patches go layer-major. With them, layer-major, position-major and
    tilings of the (position, layer) grid are scored with that cost and the cheapest is kept.

    Example:
        >>> order, chunks = schedule(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 3, 0, 3]), 2, 1, 4, 2)
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
        chunks = split_chunks(boundary[order], per_chunk, n_prompts * (seq - starts[order]))
        first_layer = [int(layers[order[c]].min()) for c in chunks]
        first_pos = [int(starts[order[c]].min()) for c in chunks]
        cost = sum(
            len(c) * (n_layers - fl) * (seq - fp) for c, fl, fp in zip(chunks, first_layer, first_pos, strict=False)
        )
        if best is None or cost < best[0]:
            best = (cost, order, chunks)
    return best[1], best[2]


def split_chunks(keys: Tensor, per_chunk: int, tokens_per_patch: int | Tensor, min_tokens: int = 512) -> list[Tensor]:
    """Split patches (sorted by ``keys``: their start layer, or start layer and position) into
    forwards of at most ``per_chunk`` patches.

    A forward starts at its first patch's layer (and position), so rows patched later run the
    layers in between for nothing: a chunk closes where the key changes once it holds
    ``min_tokens`` tokens, large enough for efficient matrix products.

    Example:
        >>> [c.tolist() for c in split_chunks(torch.tensor([0, 0, 1, 1, 2]), per_chunk=3, tokens_per_patch=300)]
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
