"""Modular addition and grokking ("Progress measures for grokking via mechanistic interpretability").

A one-layer transformer reads ``a b =`` and predicts ``(a + b) mod p`` at the ``=`` position.
Trained full-batch on 30% of the pairs with strong weight decay, it first memorises the training
set, then (thousands of epochs later) generalises: it *groks*. `train_grokking` trains it with
the paper's defaults and keeps checkpoints; `progress_measures` computes, at every checkpoint,
the losses and the paper's restricted and excluded losses from the key frequencies.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.model.components import AttentionContext
from mechscope.model.config import ModelConfig
from mechscope.model.transformer import HookedTransformer
from mechscope.toys import fourier
from mechscope.toys.checkpoint import atomic_save, read_state


@dataclass
class GrokkingConfig:
    """Task, model and optimiser of a modular-addition run; the defaults are the paper's.

    Example:
        >>> cfg = GrokkingConfig(p=23, n_epochs=10)
        >>> cfg.n_train, cfg.model_config().d_vocab
        (158, 24)
    """

    p: int = 113
    """The modulus; the vocabulary is the numbers ``0 ... p-1`` and the ``=`` token (id ``p``)."""
    frac_train: float = 0.3
    """Fraction of the ``p * p`` pairs used for training (the rest is the test set)."""
    d_model: int = 128
    """Residual stream width."""
    n_layers: int = 1
    """Number of transformer blocks."""
    n_heads: int = 4
    """Attention heads per block."""
    d_mlp: int = 512
    """MLP hidden width."""
    act_fn: str = "relu"
    """MLP non-linearity."""
    init_std: float | None = None
    """Standard deviation of the initial weights; ``None`` means ``d_model ** -0.5``."""
    lr: float = 1e-3
    """AdamW learning rate."""
    weight_decay: float = 1.0
    """AdamW (decoupled) weight decay."""
    betas: tuple[float, float] = (0.9, 0.98)
    """AdamW betas."""
    warmup_epochs: int = 10
    """Linear learning-rate warm-up, in epochs (one full-batch step per epoch)."""
    n_epochs: int = 25000
    """Number of full-batch training steps."""
    stop_after_grokking: int | None = None
    """If set, stop this many epochs after test accuracy first reaches 99%."""
    seed: int = 0
    """Seed of the weight initialisation."""
    data_seed: int = 598
    """Seed of the train/test split."""
    log_every: int = 50
    """Record train/test loss and accuracy every this many epochs."""
    checkpoint_every: int = 200
    """Keep the weights every this many epochs (for `progress_measures`)."""
    save_every: int = 1000
    """With an output directory, write the resumable training state every this many epochs."""

    def __post_init__(self) -> None:
        if self.p < 3:
            raise ConfigError(f"p must be at least 3, got {self.p}")
        if not 0 < self.frac_train < 1:
            raise ConfigError(f"frac_train must be in (0, 1), got {self.frac_train}")
        for name in ("n_epochs", "log_every", "checkpoint_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        self.betas = tuple(self.betas)
        self.model_config()  # validates the architecture

    @classmethod
    def quick(cls, **overrides) -> GrokkingConfig:
        """A reduced run that still groks in well under a minute on one CPU core.

        ``p = 31``, half the pairs for training, ``d_model`` 64, ``d_mlp`` 128, learning rate
        3e-3 and weight decay 2 (the rest as the paper); it fits the training set within about
        a hundred epochs and generalises several hundred epochs later.

        Example:
            >>> GrokkingConfig.quick(seed=1).p
            31
        """
        settings = {"p": 31, "frac_train": 0.5, "d_model": 64, "d_mlp": 128, "lr": 3e-3, "weight_decay": 2.0,
                    "n_epochs": 2000, "stop_after_grokking": 100, "log_every": 20, "checkpoint_every": 50}  # fmt: skip
        settings.update(overrides)
        return cls(**settings)

    @property
    def n_train(self) -> int:
        """Number of training pairs."""
        return int(self.frac_train * self.p * self.p)

    def model_config(self) -> ModelConfig:
        """The `ModelConfig` of the transformer: no LayerNorm, learned positions, context 3."""
        return ModelConfig(d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads, d_mlp=self.d_mlp,
                           d_vocab=self.p + 1, n_ctx=3, act_fn=self.act_fn, normalization_type=None,
                           model_name=f"modular-addition-p{self.p}")  # fmt: skip

    def to_dict(self) -> dict:
        """The settings as plain values (what a run directory's ``config.json`` holds)."""
        return dataclasses.asdict(self)


@dataclass
class ModularData:
    """All ``p * p`` inputs ``[a, b, =]`` (``a``-major: row ``a * p + b``), labels and the split."""

    tokens: Int[Tensor, "pair 3"]
    labels: Int[Tensor, " pair"]
    train_idx: Int[Tensor, " n_train"]
    test_idx: Int[Tensor, " n_test"]


def modular_addition_data(p: int, frac_train: float = 0.3, seed: int = 598) -> ModularData:
    """Every pair ``(a, b)`` as tokens ``[a, b, p]`` with label ``(a + b) % p``, split at random.

    Example:
        >>> data = modular_addition_data(5, frac_train=0.4, seed=0)
        >>> data.tokens[7].tolist(), data.labels[7].item(), len(data.train_idx), len(data.test_idx)
        ([1, 2, 5], 3, 10, 15)
    """
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    order = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n_train = int(frac_train * p * p)
    return ModularData(tokens, (a + b) % p, order[:n_train].sort().values, order[n_train:].sort().values)


def final_logits(model: HookedTransformer, tokens: Int[Tensor, "batch pos"]) -> Float[Tensor, "batch d_vocab"]:
    """The logits at the last position, computing the last block's MLP only there.

    Equal to ``model(tokens)[:, -1]``, but the last block's MLP and the unembedding run on one
    position instead of all (a training step of the 3-token task runs 1.7-2x faster; see
    BENCHMARKS.md); it fires no hooks in the last block (use the model's forward for analysis).

    Example:
        >>> torch.allclose(final_logits(model, tokens), model(tokens)[:, -1], atol=1e-5)
        True
    """
    cfg = model.cfg
    if cfg.parallel_attn_mlp:
        raise ConfigError("final_logits does not support parallel attention/MLP blocks; use model(tokens)[:, -1]")
    resid = model(tokens, stop_at_layer=cfg.n_layers - 1)  # [batch, pos, d_model]
    block = model.blocks[-1]
    ctx = AttentionContext.build(None, tokens.shape[0], tokens.shape[1], tokens.device)
    x = resid if block.ln1 is None else block.ln1(resid)
    resid = (resid + block.attn(x, x, x, ctx))[:, -1:]  # [batch, 1, d_model]
    if not cfg.attn_only:
        resid = resid + block.mlp(resid if block.ln2 is None else block.ln2(resid))
    if model.ln_final is not None:
        resid = model.ln_final(resid)
    return model.unembed(resid)[:, 0]


@dataclass
class GrokkingRun:
    """The outcome of `train_grokking`: the final model, the logged curves and the checkpoints.

    Example:
        >>> run = train_grokking(GrokkingConfig(p=11, d_model=16, d_mlp=32, n_epochs=20), progress=False)
        >>> run.epoch, sorted(run.history[-1]), sorted(run.checkpoints)
        (20, ['epoch', 'test_acc', 'test_loss', 'train_acc', 'train_loss'], [0, 20])
        >>> run.data.tokens.shape  # every pair (a, b) of residues mod 11, then "="
        torch.Size([121, 3])
    """

    config: GrokkingConfig
    model: HookedTransformer
    data: ModularData
    history: list[dict] = field(default_factory=list)
    """One entry per ``log_every`` epochs: epoch, train/test loss and accuracy."""
    checkpoints: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    """Weights every ``checkpoint_every`` epochs (and at the end), by epoch."""

    @property
    def epoch(self) -> int:
        """The number of epochs trained."""
        return self.history[-1]["epoch"] if self.history else 0

    def grokking_epoch(self, threshold: float = 0.99) -> int | None:
        """The first logged epoch whose test accuracy is at least ``threshold`` (``None`` if never)."""
        return next((h["epoch"] for h in self.history if h["test_acc"] >= threshold), None)

    def model_at(self, epoch: int) -> HookedTransformer:
        """A copy of the model with the weights of checkpoint ``epoch``."""
        if epoch not in self.checkpoints:
            nearest = min(self.checkpoints, key=lambda e: abs(e - epoch), default=None)
            raise InputError(f"no checkpoint at epoch {epoch}; the nearest is epoch {nearest}")
        model = HookedTransformer(self.config.model_config())
        model.load_state_dict(self.checkpoints[epoch])
        return model.to(self.model.device)


@torch.no_grad()
def _evaluate(model: HookedTransformer, data: ModularData, p: int) -> dict:
    logits = final_logits(model, data.tokens)[:, :p]
    out = {}
    for split, idx in (("train", data.train_idx), ("test", data.test_idx)):
        out[f"{split}_loss"] = fourier.modular_loss(logits[idx], data.labels[idx]).item()
        out[f"{split}_acc"] = (logits[idx].argmax(-1) == data.labels[idx]).double().mean().item()
    return out


def _atomic_save_file(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _checkpoint_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / "checkpoints" / f"epoch_{epoch:06d}.safetensors"


def _snapshot(model: HookedTransformer) -> dict[str, Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def train_grokking(
    config: GrokkingConfig | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> GrokkingRun:
    """Train the modular-addition transformer full-batch with AdamW, keeping checkpoints.

    With ``out_dir`` the run is resumable: each checkpoint is written once to
    ``out_dir/checkpoints/epoch_NNNNNN.safetensors`` and the training state (weights, optimiser,
    curves) to ``out_dir/state.pt`` every ``save_every`` epochs, atomically; calling again with
    the same directory and config continues from the last saved state.

    Example:
        >>> run = train_grokking(GrokkingConfig(p=11, d_model=16, d_mlp=32, n_epochs=20), progress=False)
        >>> run.epoch, sorted(run.checkpoints), run.history[-1]["train_loss"] < run.history[0]["train_loss"]
        (20, [0, 20], True)
    """
    cfg = config or GrokkingConfig()
    device = torch.device(device)
    data = modular_addition_data(cfg.p, cfg.frac_train, cfg.data_seed)
    data = ModularData(*(t.to(device) for t in dataclasses.astuple(data)))
    std = cfg.init_std if cfg.init_std is not None else cfg.d_model**-0.5
    model = HookedTransformer(cfg.model_config()).init_weights(seed=cfg.seed, std=std).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / cfg.warmup_epochs, 1.0) if cfg.warmup_epochs else 1.0
    )
    run = GrokkingRun(cfg, model, data)
    out = Path(out_dir) if out_dir is not None else None
    start = 0
    if out is not None:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        start = _resume(run, optimizer, scheduler, out)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    if start == 0:
        run.checkpoints[0] = _snapshot(model)
        run.history.append({"epoch": 0, **_evaluate(model, data, cfg.p)})
        if out is not None:
            _atomic_save_file(run.checkpoints[0], _checkpoint_path(out, 0))
    x_train, y_train = data.tokens[data.train_idx], data.labels[data.train_idx]
    grokked_at = run.grokking_epoch()
    end = cfg.n_epochs
    if cfg.stop_after_grokking is not None and grokked_at is not None:
        end = min(end, max(start, grokked_at + cfg.stop_after_grokking))  # a finished run stays finished
    bar = tqdm(range(start + 1, end + 1), desc="grokking", disable=not progress, initial=start, total=end, leave=False)
    model.train()
    for epoch in bar:
        loss = fourier.modular_loss(final_logits(model, x_train)[:, : cfg.p], y_train)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        last = epoch == cfg.n_epochs
        if epoch % cfg.log_every == 0 or last:
            run.history.append({"epoch": epoch, **_evaluate(model, data, cfg.p)})
            bar.set_postfix(train=f"{run.history[-1]['train_loss']:.2e}", test=f"{run.history[-1]['test_loss']:.2e}")
            if grokked_at is None:
                grokked_at = run.grokking_epoch()
            if cfg.stop_after_grokking is not None and grokked_at is not None:
                last = last or epoch >= grokked_at + cfg.stop_after_grokking
        if epoch % cfg.checkpoint_every == 0 or last:
            run.checkpoints[epoch] = _snapshot(model)
            if out is not None:
                _atomic_save_file(run.checkpoints[epoch], _checkpoint_path(out, epoch))
        if out is not None and (epoch % cfg.save_every == 0 or last):
            _save_state(run, optimizer, scheduler, out, epoch)
        if last:
            break
    bar.close()
    model.eval()
    return run


def _save_state(run: GrokkingRun, optimizer, scheduler, out: Path, epoch: int) -> None:
    state = {
        "epoch": epoch,
        "config": run.config.to_dict(),
        "model": run.model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "history": run.history,
    }
    atomic_save(state, out / "state.pt")


_RESUMABLE = ("n_epochs", "stop_after_grokking", "save_every")
"""Config fields that may change when a run resumes."""


def _resume(run: GrokkingRun, optimizer, scheduler, out: Path) -> int:
    path = out / "state.pt"
    if not path.exists():
        return 0
    state = read_state(path, run.model.device, keys=("config", "model", "optimizer", "scheduler", "history", "epoch"))
    saved = GrokkingConfig(**state["config"]).to_dict()
    current = run.config.to_dict()
    changed = sorted(k for k in current if k not in _RESUMABLE and saved[k] != current[k])
    if changed:
        raise LoadError(
            f"{out} holds a run with a different config ({', '.join(f'{k}={saved[k]!r}' for k in changed)}); "
            "use another directory or the same settings"
        )
    run.model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    run.history = state["history"]
    epoch = state["epoch"]
    for file in sorted((out / "checkpoints").glob("epoch_*.safetensors")):
        ckpt_epoch = int(file.stem.split("_")[1])
        if ckpt_epoch <= epoch:
            run.checkpoints[ckpt_epoch] = load_file(str(file))
    return epoch


def load_grokking_run(out_dir: str | os.PathLike, device: str | torch.device = "cpu") -> GrokkingRun:
    """Load a run written by `train_grokking` with an output directory (weights, curves, checkpoints).

    Example:
        >>> run = load_grokking_run("runs/grokking")  # doctest: +SKIP
    """
    out = Path(out_dir)
    if not (out / "state.pt").exists():
        raise LoadError(f"{out} has no state.pt; train with train_grokking(config, out_dir={str(out)!r}) first")
    state = read_state(out / "state.pt", keys=("config", "epoch"))
    cfg = GrokkingConfig(**state["config"])
    return train_grokking(dataclasses.replace(cfg, n_epochs=state["epoch"]), out, device=device, progress=False)


@torch.no_grad()
def neuron_activations(model: HookedTransformer, data: ModularData) -> Float[Tensor, "p p d_mlp"]:
    """The last block's MLP activations at the ``=`` position over the ``(a, b)`` grid.

    Example:
        >>> cfg = GrokkingConfig(p=7, d_model=16, d_mlp=8)
        >>> acts = neuron_activations(HookedTransformer(cfg.model_config()).init_weights(0), modular_addition_data(7))
        >>> acts.shape
        torch.Size([7, 7, 8])
    """
    p = round(data.labels.numel() ** 0.5)
    name = f"blocks.{model.cfg.n_layers - 1}.mlp.hook_post"
    _, cache = model.run_with_cache(data.tokens, names_filter=name)
    return cache[name][:, -1].reshape(p, p, -1)


def neuron_logit_weights(model: HookedTransformer, p: int) -> Float[Tensor, "d_mlp p"]:
    """``W_out @ W_U`` of the last block, restricted to the ``p`` number outputs: each neuron's effect on the logits."""
    return model.blocks[-1].mlp.W_out @ model.W_U[:, :p]


@torch.no_grad()
def key_frequencies(model: HookedTransformer, data: ModularData, *, rule: str = "gap", **options) -> list[int]:
    """The model's key frequencies, from its neurons: `fourier.key_frequencies_from_neurons` by ``rule``.

    ``rule="gap"`` (default) cuts at the largest drop of `fourier.neurons_per_frequency`;
    ``rule="threshold"`` keeps the frequencies that explain at least half of the variance of at
    least 1% of the neurons. ``options`` are that function's options of the chosen rule.

    Example:
        >>> cfg = GrokkingConfig(p=7, d_model=16, d_mlp=8)
        >>> untrained = HookedTransformer(cfg.model_config()).init_weights(0)
        >>> data = modular_addition_data(7)
        >>> key_frequencies(untrained, data), key_frequencies(untrained, data, rule="threshold", min_neurons=1)
        ([], [1, 2])

        An untrained model's neurons have no gap between frequencies: none is key. The threshold
        rule, asked for single neurons, still finds two.
    """
    return fourier.key_frequencies_from_neurons(neuron_activations(model, data), rule=rule, **options)


@torch.no_grad()
def progress_measures(
    run: GrokkingRun,
    key_freqs: list[int] | None = None,
    epochs: list[int] | None = None,
    progress: bool = False,
    *,
    rule: str | None = None,
) -> list[dict]:
    """The paper's progress measures at each checkpoint.

    For each checkpoint: ``train_loss``, ``test_loss``, ``train_acc``, ``test_acc``,
    ``restricted_loss`` (all pairs, only the key frequencies of the neurons kept; see
    `fourier.restricted_logits`), ``excluded_loss`` (training pairs, key frequencies removed
    from the logits; see `fourier.excluded_logits`), ``sum_sq_weights`` (total squared norm of
    the weights) and ``embed_key_share`` (fraction of the embedding's non-constant squared norm
    in the key frequencies). ``key_freqs`` defaults to those of the final model's neurons by
    ``rule`` (`key_frequencies`; ``"gap"`` unless given).

    Example:
        >>> run = train_grokking(GrokkingConfig(p=11, d_model=16, d_mlp=32, n_epochs=20), progress=False)
        >>> rows = progress_measures(run, key_freqs=[1, 2])
        >>> [r["epoch"] for r in rows], sorted(rows[0])[:3]
        ([0, 20], ['embed_key_share', 'epoch', 'excluded_loss'])
    """
    cfg, data = run.config, run.data
    p = cfg.p
    if key_freqs is None:
        key_freqs = key_frequencies(run.model, data, rule=rule or "gap")
    elif rule is not None:
        raise ConfigError(
            f"progress_measures got both key_freqs={key_freqs} and rule={rule!r}; "
            "pass key_freqs to use given frequencies, or rule to choose them from the final model"
        )
    rows = []
    for epoch in tqdm(sorted(epochs or run.checkpoints), desc="progress measures", disable=not progress, leave=False):
        model = run.model_at(epoch).eval()
        acts = neuron_activations(model, data)
        logits = model(data.tokens)[:, -1, :p]
        restricted = fourier.restricted_logits(
            acts.reshape(p * p, -1), neuron_logit_weights(model, p), logits, key_freqs, p
        )
        excluded = fourier.excluded_logits(logits, key_freqs, p)
        embed_norms = fourier.frequency_norms(model.W_E[:p], dim=0)
        row = {"epoch": epoch, **_evaluate(model, data, p)}
        row["restricted_loss"] = fourier.modular_loss(restricted, data.labels).item()
        row["excluded_loss"] = fourier.modular_loss(excluded[data.train_idx], data.labels[data.train_idx]).item()
        row["sum_sq_weights"] = sum(t.double().pow(2).sum().item() for t in model.state_dict().values())
        key_idx = [k - 1 for k in key_freqs]
        row["embed_key_share"] = (embed_norms[key_idx].sum() / embed_norms.sum()).item() if key_idx else 0.0
        rows.append(row)
    return rows


@torch.no_grad()
def analyse_model(model: HookedTransformer, data: ModularData, p: int, *, rule: str = "gap") -> dict:
    """Fourier analysis of one model: embedding frequency norms, key frequencies, per-neuron frequencies.

    Returns a JSON-serialisable dict: ``embed_freq_norms`` and ``neurons_per_frequency`` (index
    ``k - 1``; see `fourier.frequency_norms` and `fourier.neurons_per_frequency`),
    ``key_freqs_embed`` and ``key_freqs_neurons`` (chosen by ``rule``, recorded as
    ``key_frequency_rule``: ``"gap"``, the largest drop of the sorted values, or ``"threshold"``,
    see `fourier.KEY_FREQUENCY_RULES`), ``neuron_freq`` and ``neuron_frac_explained`` (per
    neuron), and ``frac_explained_by_key`` (mean over neurons whose dominant frequency is key).

    Example:
        >>> cfg = GrokkingConfig(p=7, d_model=16, d_mlp=8)
        >>> m = HookedTransformer(cfg.model_config()).init_weights(0)
        >>> sorted(analyse_model(m, modular_addition_data(7), 7))[:3]
        ['embed_freq_norms', 'frac_explained_by_key', 'key_freqs_embed']
    """
    acts = neuron_activations(model, data)
    freqs, frac = fourier.neuron_frequencies(acts)
    key_neurons = fourier.key_frequencies_from_neurons(acts, rule=rule)
    in_key = [f for k, f in zip(freqs, frac.tolist(), strict=True) if k in key_neurons]
    return {
        "embed_freq_norms": fourier.frequency_norms(model.W_E[:p], dim=0).tolist(),
        "neurons_per_frequency": fourier.neurons_per_frequency(acts).tolist(),
        "key_frequency_rule": rule,
        "key_freqs_embed": fourier.key_frequencies_from_embedding(model.W_E[:p], rule=rule),
        "key_freqs_neurons": key_neurons,
        "neuron_freq": freqs,
        "neuron_frac_explained": frac.tolist(),
        "frac_explained_by_key": sum(in_key) / len(in_key) if in_key else 0.0,
    }
