"""Harvest feature statistics and examples from one streaming pass over a corpus.

`harvest` runs the model over token rows once, batch by batch, stopping after the deepest
hooked block, and feeds every source (SAEs, neurons, directions; see
`mechscope.features.sources`) into its `FeatureSketch`. With a ``checkpoint`` path the sketches
and the number of rows done are saved atomically (a temporary file, then a rename) every
``checkpoint_every`` batches; calling `harvest` again with the same arguments resumes after the
last saved batch, so no token is lost or counted twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.features.effects import source_attribution
from mechscope.features.sketch import FeatureSketch
from mechscope.features.sources import FeatureSource, SAESource, as_sources
from mechscope.names import act_name, layer_of


@dataclass
class HarvestConfig:
    """Settings of a harvest (part of its fingerprint: a checkpoint resumes only the same settings).

    Example:
        >>> HarvestConfig(top_k=5).width
        33
    """

    context_size: int = 128
    """Tokens per row, BOS included (a 1-D token stream is cut into rows of this length)."""
    batch_size: int = 8
    """Rows per model forward."""
    prepend_bos: bool | None = None
    """Put BOS first in each row cut from a stream (default: the model's convention; never without a tokenizer)."""
    exclude_bos: bool = True
    """Leave the BOS position out of the statistics and examples (it still shows in contexts)."""
    top_k: int = 20
    """Top-activating examples kept per feature."""
    pool: int = 64
    """Uniform sample of firing tokens kept per feature, from which the quantile sections are drawn."""
    left: int = 24
    """Context tokens kept before an example's token."""
    right: int = 8
    """Context tokens kept after it."""
    hist_bins: int = 512
    """Fine histogram bins (regrouped for display; see `mechscope.features.sketch`)."""
    threshold: float = 0.0
    """A feature fires on a token when its activation is above this."""
    seed: int = 0
    """Seed of the quantile sample's keys."""
    dfa: bool = True
    """For ``hook_z`` SAEs, attribute each example to source positions (needs the attention pattern)."""
    checkpoint_every: int = 50
    """Batches between checkpoints."""

    @property
    def width(self) -> int:
        """Tokens in an example's context window (``left + 1 + right``)."""
        return self.left + 1 + self.right

    def __post_init__(self) -> None:
        for name in ("context_size", "batch_size", "top_k", "pool", "hist_bins", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.hist_bins & (self.hist_bins - 1):
            raise ConfigError(f"hist_bins must be a power of two (bins merge pairwise), got {self.hist_bins}")
        if self.left < 0 or self.right < 0:
            raise ConfigError("left and right context sizes must be >= 0")


@dataclass
class Harvest:
    """The result of `harvest`: one `FeatureSketch` per source, with what the dashboards need.

    Attributes:
        sources: the harvested sources, by name.
        sketches: their statistics, by name.
        config: the settings used.
        rows_done, n_rows: token rows processed and in total.
        model_name: the model's ``cfg.model_name``.

    Example:
        >>> from mechscope.features import NeuronSource, harvest
        >>> result = harvest(model, NeuronSource(model, 0), torch.randint(0, 50, (4, 8)), progress=False)
        >>> list(result.sources), result.rows_done, result.n_rows, result.n_tokens
        (['blocks.0.mlp.hook_post'], 4, 4, 32)
    """

    sources: dict[str, FeatureSource]
    sketches: dict[str, FeatureSketch]
    config: HarvestConfig
    rows_done: int
    n_rows: int
    model_name: str = ""
    bos_token: int | None = None

    @property
    def n_tokens(self) -> int:
        """Tokens counted (BOS positions excluded when configured)."""
        return int(next(iter(self.sketches.values())).n_tokens)


def token_rows(model, tokens: Int[Tensor, "..."], config: HarvestConfig) -> Int[Tensor, "batch pos"]:
    """Token rows ``[n_rows, context_size]``: a 2-D tensor as it is, a 1-D stream cut into rows
    (BOS first in each when ``config.prepend_bos``, or by default when the model prepends BOS).

    Example:
        >>> token_rows(model, torch.arange(10), HarvestConfig(context_size=4)).tolist()
        [[0, 1, 2, 3], [4, 5, 6, 7]]
    """
    tokens = torch.as_tensor(tokens).long()
    if tokens.dim() == 2:
        return tokens
    if tokens.dim() != 1:
        raise InputError(f"tokens must be a stream [n_tokens] or rows [n_rows, pos], got shape {tuple(tokens.shape)}")
    bos = bos_token(model)
    prepend = (
        config.prepend_bos
        if config.prepend_bos is not None
        else bool(model.cfg.default_prepend_bos and bos is not None)
    )
    if prepend and bos is None:
        raise ConfigError("prepend_bos=True needs a tokenizer with a BOS token; pass prepend_bos=False")
    body = config.context_size - int(prepend)
    n_rows = tokens.numel() // body
    if n_rows == 0:
        raise InputError(f"{tokens.numel()} tokens make no row of {config.context_size}; pass more text")
    rows = tokens[: n_rows * body].reshape(n_rows, body)
    if prepend:
        rows = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rows], dim=1)
    return rows


def bos_token(model) -> int | None:
    """The model's BOS token id, or ``None`` without a tokenizer."""
    tok = getattr(model, "codec", None)
    return None if tok is None else tok.bos_token_id


def _fingerprint(model, sources: list[FeatureSource], rows: Tensor, config: HarvestConfig) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([model.cfg.model_name, model.cfg.d_model, model.cfg.n_layers, asdict(config)]).encode())
    for src in sources:
        digest.update(json.dumps(src.describe(), sort_keys=True).encode())
        weights = src.sae.W_enc if isinstance(src, SAESource) else getattr(src, "directions", None)
        if weights is not None:
            digest.update(weights.detach().float().cpu().numpy().tobytes())
    digest.update(rows.cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


def _save_checkpoint(path: Path, sketches: dict[str, FeatureSketch], rows_done: int, fingerprint: str) -> None:
    from safetensors.torch import save_file

    tensors = {f"{name}/{key}": value for name, sk in sketches.items() for key, value in sk.state_dict().items()}
    meta = {"rows_done": str(rows_done), "fingerprint": fingerprint}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, sketches: dict[str, FeatureSketch], fingerprint: str) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                raise ConfigError(
                    f"the checkpoint {path} belongs to another harvest (model, sources, tokens or settings); "
                    "delete it or pass another checkpoint path"
                )
            for name, sk in sketches.items():
                sk.load_state_dict({key: f.get_tensor(f"{name}/{key}") for key in sk.state})
            return int(meta["rows_done"])
    except (OSError, KeyError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise LoadError(f"{path}: unreadable harvest checkpoint ({exc}); delete it to start again") from None


def _stop_layer(model, hooks: list[str]) -> int | None:
    layers = [layer_of(h) for h in hooks]
    if None in layers:
        return None
    stop = max(layers) + 1
    return None if stop >= model.cfg.n_layers else stop


def _dfa_hooks(sources: list[FeatureSource], config: HarvestConfig) -> dict[str, tuple[str, str]]:
    """``{source name: (hook_v, hook_pattern)}`` for the ``hook_z`` SAEs that get source attribution."""
    if not config.dfa:
        return {}
    out = {}
    for src in sources:
        if isinstance(src, SAESource) and src.reads_z and not src.sae.cfg.is_transcoder:
            layer = layer_of(src.hook_name)
            out[src.name] = (act_name("v", layer), act_name("pattern", layer))
    return out


@torch.no_grad()
def harvest(
    model,
    sources,
    tokens: Int[Tensor, "..."],
    config: HarvestConfig | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
) -> Harvest:
    """Stream ``tokens`` through ``model`` once and collect every source's feature statistics.

    Args:
        model: a `HookedTransformer`.
        sources: an SAE, a `FeatureSource`, or a list of them (one forward serves them all).
        tokens: a token stream ``[n_tokens]`` or rows ``[n_rows, pos]`` (see `token_rows`).
        config: a `HarvestConfig`.
        checkpoint: a file to save progress to and resume from.
        device: where the statistics live (default: the model's device).
        progress: show a progress bar with tokens/s.
        on_batch: called with the number of rows done after each batch (and its checkpoint).

    Example:
        >>> from mechscope.features.sources import NeuronSource
        >>> result = harvest(model, NeuronSource(model, 0), torch.randint(0, 50, (4, 8)), progress=False)
        >>> result.n_tokens, result.sketches["blocks.0.mlp.hook_post"].top_val.shape
        (32, torch.Size([20, 64]))
    """
    config = config or HarvestConfig()
    sources = as_sources(model, sources)
    rows = token_rows(model, tokens, config)
    n_rows, seq = rows.shape
    device = torch.device(device) if device is not None else model.device
    dfa_hooks = _dfa_hooks(sources, config)
    sketches = {
        src.name: FeatureSketch(
            src.n_features, top_k=config.top_k, pool=config.pool, left=config.left, right=config.right,
            hist_bins=config.hist_bins, threshold=config.threshold, with_dfa=src.name in dfa_hooks, device=device,
        )
        for src in sources
    }  # fmt: skip
    bos = bos_token(model)
    keep = torch.ones(seq, dtype=torch.bool)
    if config.exclude_bos and bos is not None and bool((rows[:, 0] == bos).all()):
        keep[0] = False
    fingerprint = _fingerprint(model, sources, rows, config)
    path = Path(checkpoint) if checkpoint is not None else None
    rows_done = _load_checkpoint(path, sketches, fingerprint) if path is not None and path.is_file() else 0
    hooks = sorted({src.hook_name for src in sources} | {h for pair in dfa_hooks.values() for h in pair})
    stop = _stop_layer(model, hooks)
    store: dict[str, Tensor] = {}

    def save(act: Tensor, *, hook) -> None:
        store[hook.name] = act

    bar = tqdm(total=n_rows * int(keep.sum()), initial=rows_done * int(keep.sum()), unit="tok", unit_scale=True,
               disable=not progress, desc="harvest")  # fmt: skip
    batch_index = rows_done // config.batch_size
    try:
        with model.hooks(fwd_hooks=[(h, save) for h in hooks]):
            while rows_done < n_rows:
                chunk = rows[rows_done : rows_done + config.batch_size]
                store.clear()
                model(chunk.to(model.device), stop_at_layer=stop)
                for src in sources:
                    dfa = None
                    if src.name in dfa_hooks:
                        v, pattern = (store[h] for h in dfa_hooks[src.name])
                        cfg = src.sae.cfg
                        w_enc = src.sae.W_enc.detach().reshape(cfg.n_heads, -1, cfg.d_sae)

                        def dfa(b, q, cols, pattern=pattern, v=v, w_enc=w_enc):
                            w = w_enc.to(device)[..., cols]
                            return source_attribution(pattern.to(device), v.to(device), w, b, q)

                    acts = src.encode(store[src.hook_name])
                    seed = config.seed * 1_000_003 + batch_index
                    sketches[src.name].update(acts, chunk, rows_done, keep, seed, dfa)
                rows_done += len(chunk)
                batch_index += 1
                bar.update(len(chunk) * int(keep.sum()))
                if path is not None and (batch_index % config.checkpoint_every == 0 or rows_done == n_rows):
                    _save_checkpoint(path, sketches, rows_done, fingerprint)
                if on_batch is not None:
                    on_batch(rows_done)
    finally:
        bar.close()
    return Harvest(
        sources={s.name: s for s in sources}, sketches=sketches, config=config, rows_done=rows_done,
        n_rows=n_rows, model_name=model.cfg.model_name, bos_token=bos,
    )  # fmt: skip


def harvest_sources(model, saes: Sequence = (), neurons: Sequence[int] = ()) -> list[FeatureSource]:
    """SAEs and the MLP neurons of ``neurons`` layers as sources (a convenience for the CLI).

    Example:
        >>> [s.name for s in harvest_sources(model, neurons=[0, 2])]
        ['blocks.0.mlp.hook_post', 'blocks.2.mlp.hook_post']
    """
    from mechscope.features.sources import NeuronSource

    return [SAESource(s) for s in saes] + [NeuronSource(model, layer) for layer in neurons]
