"""`TrainConfig`: the optimisation settings of `mechscope.sae.trainer.SAETrainer`, and which of
them a resumed run may change."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal

from mechscope.errors import ConfigError


@dataclass
class TrainConfig:
    """Optimisation settings shared by every SAE a trainer trains.

    Example:
        >>> TrainConfig(steps=100, lr_warmup_steps=10).lr_at(4)
        0.0001...
    """

    steps: int = 1000
    """Optimisation steps (each on one batch from the source)."""
    lr: float = 2e-4
    """Peak Adam learning rate."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_warmup_steps: int = 0
    """Linear warm-up of the learning rate from 0 over these steps."""
    lr_decay_steps: int = 0
    """Linear decay to ``lr * lr_end_fraction`` over the final steps."""
    lr_end_fraction: float = 0.0
    coefficient_warmup_steps: int = 0
    """Linear warm-up of the sparsity coefficient (L1 / L0) from 0 over these steps."""
    decoder_constraint: Literal["unit_norm", "norm_penalty"] = "unit_norm"
    """``unit_norm``: renormalise decoder rows after each step and project their gradient;
    ``norm_penalty``: leave norms free (the penalties weight latents by decoder norm)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias, from the first batch."""
    normalize_activations: bool = True
    """Scale inputs (and targets) so their mean norm is ``sqrt(d)``; folded back at the end."""
    dead_window: int = 1000
    """A latent that has not fired for this many steps counts as dead (aux-K, resampling, stats)."""
    resample_steps: tuple[int, ...] = ()
    """Steps at which dead latents are resampled (Anthropic, Towards Monosemanticity)."""
    max_grad_norm: float | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    """Write ``checkpoint_dir/checkpoint.pt`` every this many steps (0: never)."""
    log_every: int = 50
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        self.adam_betas = tuple(self.adam_betas)
        self.resample_steps = tuple(self.resample_steps)
        if self.checkpoint_dir is not None:
            self.checkpoint_dir = str(self.checkpoint_dir)
        if self.steps <= 0:
            raise ConfigError(f"steps must be positive, got {self.steps}")
        if self.lr_warmup_steps + self.lr_decay_steps > self.steps:
            raise ConfigError(
                f"lr_warmup_steps + lr_decay_steps = {self.lr_warmup_steps + self.lr_decay_steps} "
                f"exceeds steps={self.steps}"
            )
        if self.decoder_constraint not in ("unit_norm", "norm_penalty"):
            raise ConfigError(
                f"decoder_constraint must be 'unit_norm' or 'norm_penalty', got {self.decoder_constraint!r}"
            )
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ConfigError(f"b_dec_init must be 'geometric_median', 'mean' or 'zeros', got {self.b_dec_init!r}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("checkpoint_every needs checkpoint_dir")

    def lr_at(self, step: int) -> float:
        """Learning rate used at ``step`` (0-based)."""
        factor = 1.0
        if self.lr_warmup_steps and step < self.lr_warmup_steps:
            factor = (step + 1) / self.lr_warmup_steps
        decay_start = self.steps - self.lr_decay_steps
        if self.lr_decay_steps and step >= decay_start:
            progress = (step - decay_start + 1) / self.lr_decay_steps
            factor *= 1 - (1 - self.lr_end_fraction) * progress
        return self.lr * factor

    def coefficient_scale_at(self, step: int) -> float:
        """The factor on the sparsity coefficient at ``step`` (0-based): ``(step + 1) /
        coefficient_warmup_steps`` during the warm-up, 1 after it (and without one).

        Example:
            >>> [TrainConfig(coefficient_warmup_steps=4).coefficient_scale_at(s) for s in (0, 3, 10)]
            [0.25, 1.0, 1.0]
        """
        if not self.coefficient_warmup_steps:
            return 1.0
        return min(1.0, (step + 1) / self.coefficient_warmup_steps)

    def resume_conflicts(self, saved: dict) -> list[str]:
        """The settings of a saved run (``asdict`` of its config) that this config changes in a way
        a resumed run cannot honour, as ``name=saved -> new``. Bookkeeping fields may change
        (`RESUMABLE`); ``steps`` too, unless an LR decay makes the schedule depend on it.

        Example:
            >>> saved = asdict(TrainConfig(steps=100))
            >>> TrainConfig(steps=200, lr=1e-3).resume_conflicts(saved)
            ['lr=0.0002 -> 0.001']
            >>> decaying = asdict(TrainConfig(steps=100, lr_decay_steps=50))
            >>> TrainConfig(steps=200, lr_decay_steps=50).resume_conflicts(decaying)
            ['steps=100 -> 200']
        """
        current = asdict(self)
        free = set(RESUMABLE) | ({"steps"} if not (self.lr_decay_steps or saved.get("lr_decay_steps")) else set())

        def same(a, b) -> bool:
            return (list(a) == list(b)) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

        return [
            f"{name}={saved.get(name)!r} -> {value!r}"
            for name, value in current.items()
            if name not in free and not same(saved.get(name), value)
        ]

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """A config from a dict of its fields (missing ones take their defaults).

        Raises:
            ConfigError: a key is not a field (the message suggests the closest one).

        Example:
            >>> TrainConfig.from_dict({"steps": 10, "lr": 1e-3}).steps
            10
        """
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            import difflib

            near = difflib.get_close_matches(unknown[0], valid, n=1)
            raise ConfigError(
                f"unknown train config key {unknown[0]!r}" + (f"; did you mean {near[0]!r}?" if near else "")
            )
        return cls(**data)


RESUMABLE = ("checkpoint_dir", "checkpoint_every", "log_every", "progress")
"""`TrainConfig` fields a resumed run may change (``steps`` too when there is no LR decay)."""
