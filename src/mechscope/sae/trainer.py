"""Training SAEs: `TrainConfig`, `SAETrainer` (several SAEs from one activation stream) and `train_sae`.

One step per batch for every SAE: sparsity-coefficient warm-up, Adam with LR warm-up and
decay, the unit-norm decoder constraint with its gradient projection, dead-latent tracking,
Anthropic-style resampling and the aux-K loss. Activations are normalised to mean norm
``sqrt(d_in)`` during training and the scale is folded back into the returned weights.
Checkpoints are written atomically and resume exactly; under ``torchrun`` gradients and
statistics are averaged over ranks.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import ConfigError, LoadError
from mechscope.sae import distributed as ddp
from mechscope.sae.base import SAE, make_sae
from mechscope.sae.config import SAEConfig
from mechscope.sae.train_config import TrainConfig


@runtime_checkable
class BatchSource(Protocol):
    """Anything that yields training batches ``{hook_name: [batch, d]}`` and can resume exactly."""

    def next_batch(self) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def geometric_median(
    points: Float[Tensor, "batch d_out"], max_iter: int = 100, tol: float = 1e-6
) -> Float[Tensor, " d_out"]:
    """Geometric median of the rows of ``points`` (Weiszfeld's algorithm).

    Example:
        >>> geometric_median(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [100.0, 100.0]]))
        tensor([0.5000, 0.5000])
    """
    points = points.double()
    median = points.mean(0)
    for _ in range(max_iter):
        dist = (points - median).norm(dim=-1).clamp_min(1e-12)
        weights = 1.0 / dist
        new = (weights[:, None] * points).sum(0) / weights.sum()
        if (new - median).norm() <= tol * max(1.0, float(median.norm())):
            median = new
            break
        median = new
    return median.float()


class _SAEState:
    """One SAE's optimiser, schedule, normalisation scales and firing statistics."""

    def __init__(self, sae: SAE, cfg: TrainConfig) -> None:
        self.sae = sae
        self.optimizer = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=cfg.adam_betas)
        self.steps_since_fired = torch.zeros(sae.cfg.d_sae, dtype=torch.long, device=sae.device)
        self.scale_in = 1.0
        self.scale_out = 1.0

    def state_dict(self) -> dict:
        return {
            "sae_cfg": self.sae.cfg.to_dict(),
            "sae": self.sae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "steps_since_fired": self.steps_since_fired,
            "scale_in": self.scale_in,
            "scale_out": self.scale_out,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sae.load_state_dict(state["sae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.steps_since_fired.copy_(state["steps_since_fired"])
        self.scale_in = float(state["scale_in"])
        self.scale_out = float(state["scale_out"])


class SAETrainer:
    """Train one or several SAEs on the batches of one source (e.g. several hooks of one model pass).

    Example:
        >>> from mechscope.sae import SAEConfig, TensorSource
        >>> acts = torch.randn(512, 8)
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2, hook_name="x"))
        >>> trainer = SAETrainer([sae], TensorSource({"x": acts}, batch_size=64),
        ...                      TrainConfig(steps=20, progress=False))
        >>> [trained] = trainer.train()
        >>> trainer.step, len(trainer.history) > 0
        (20, True)
    """

    def __init__(self, saes: list[SAE] | SAE, source: BatchSource, cfg: TrainConfig) -> None:
        self.saes = [saes] if isinstance(saes, SAE) else list(saes)
        if not self.saes:
            raise ConfigError("SAETrainer needs at least one SAE")
        self.source = source
        self.cfg = cfg
        self.states = [_SAEState(sae, cfg) for sae in self.saes]
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.rank, self.world_size = ddp.rank_and_world()
        self.segment_rows = 0
        """Rows (tokens) this process trained on since it started or resumed; a checkpoint's
        earlier rows are not counted, so ``segment_rows / segment_seconds`` is this run's throughput."""
        self.segment_seconds = 0.0
        """Seconds spent in `train` since the trainer was built (or resumed)."""

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint_dir/checkpoint.pt``; under DDP one file per rank (each holds its data position)."""
        if not self.cfg.checkpoint_dir:
            return None
        name = "checkpoint.pt" if self.world_size == 1 else f"checkpoint-rank{self.rank}-of-{self.world_size}.pt"
        return Path(self.cfg.checkpoint_dir) / name

    def state_dict(self) -> dict:
        """The full training state, what `save_checkpoint` writes and `load_state_dict` restores: the
        step, each SAE's weights, optimiser, normalisation scales and firing counters (with its
        config), the source's position, the logged history and the train config."""
        return {
            "step": self.step,
            "states": [s.state_dict() for s in self.states],
            "source": self.source.state_dict(),
            "history": self.history,
            "train_cfg": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint; a `LoadError` names any setting that differs from the saved run's."""
        conflicts = self.cfg.resume_conflicts(state.get("train_cfg") or {})
        if conflicts:
            raise LoadError(
                f"the checkpoint was trained with other settings ({', '.join(conflicts)}); resume with the "
                "saved settings, or start a new checkpoint_dir"
            )
        if len(state["states"]) != len(self.states):
            raise LoadError(f"checkpoint holds {len(state['states'])} SAEs, this trainer has {len(self.states)}")
        for s, saved in zip(self.states, state["states"], strict=True):
            if saved["sae_cfg"] != s.sae.cfg.to_dict():
                raise LoadError(
                    "checkpoint SAE config differs from this trainer's SAE config; start a new checkpoint_dir"
                )
            s.load_state_dict(saved)
        self.source.load_state_dict(state["source"])
        self.history = list(state["history"])
        self.step = int(state["step"])

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Write the full training state atomically (temp file, then ``os.replace``)."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None:
            raise ConfigError("no checkpoint path: set TrainConfig.checkpoint_dir or pass a path")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> bool:
        """Resume from ``path`` (default ``checkpoint_dir/checkpoint.pt``); ``False`` when it does not exist."""
        path = Path(path) if path is not None else self.checkpoint_path
        if path is None or not path.exists():
            return False
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            reason = str(exc).split("\n")[0] or type(exc).__name__
            raise LoadError(f"cannot read checkpoint {path} ({reason}); delete it to start afresh") from None
        try:
            self.load_state_dict(state)
        except LoadError as exc:
            raise LoadError(f"{path}: {exc}") from None
        return True

    # ------------------------------------------------------------------ training
    def _batch_for(self, sae: SAE, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor | None]:
        names = (sae.cfg.hook_name, sae.cfg.output_hook)
        for name in names:
            if name not in batch:
                raise ConfigError(f"the batch source has no activations for {name!r}; it provides {sorted(batch)}")
        x = sae.flatten_input(batch[names[0]].to(sae.device))
        target = batch[names[1]].to(sae.device) if sae.cfg.is_transcoder else None
        return x, target

    @torch.no_grad()
    def _initialise(self, state: _SAEState, x: Tensor, target: Tensor | None) -> None:
        sae, cfg = state.sae, self.cfg
        x_all = ddp.all_gather_cat(x)
        target_all = x_all if target is None else ddp.all_gather_cat(target)
        if cfg.normalize_activations:
            state.scale_in = math.sqrt(sae.cfg.d_in) / float(x_all.norm(dim=-1).mean())
            state.scale_out = (
                state.scale_in if target is None else math.sqrt(sae.cfg.d_out) / float(target_all.norm(dim=-1).mean())
            )
        out = target_all * state.scale_out
        if cfg.b_dec_init == "geometric_median":
            sae.b_dec.copy_(geometric_median(out))
        elif cfg.b_dec_init == "mean":
            sae.b_dec.copy_(out.mean(0))
        if cfg.decoder_constraint == "unit_norm":
            sae.set_decoder_norm_to_unit_norm()

    def _train_step(self, state: _SAEState, x: Tensor, target: Tensor | None) -> dict[str, float]:
        sae, cfg = state.sae, self.cfg
        x = x * state.scale_in
        target = None if target is None else target * state.scale_out
        for group in state.optimizer.param_groups:
            group["lr"] = cfg.lr_at(self.step)
        dead_mask = state.steps_since_fired >= cfg.dead_window
        out = sae.training_loss(x, target, coefficient_scale=cfg.coefficient_scale_at(self.step), dead_mask=dead_mask)
        state.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        ddp.average_gradients(sae)
        if cfg.decoder_constraint == "unit_norm":
            sae.remove_gradient_parallel_to_decoder_directions()
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.max_grad_norm)
        state.optimizer.step()
        if cfg.decoder_constraint == "unit_norm":
            sae.set_decoder_norm_to_unit_norm()
        with torch.no_grad():
            if hasattr(sae, "threshold") and isinstance(sae.threshold, Tensor) and sae.threshold.dim() == 0:
                ddp.all_reduce_mean_(sae.threshold)
            fired = ddp.all_reduce_max_((out.acts > 0).any(0).to(torch.long))
            state.steps_since_fired.add_(1).mul_(1 - fired)
            if self.step + 1 in cfg.resample_steps:
                self._resample(state, x, target)
            return self._metrics(out, x if target is None else target, state)

    def _metrics(self, out, target: Tensor, state: _SAEState) -> dict[str, float]:
        """Loss, L0, FVU and dead fraction over the global batch (summed over ranks)."""
        n = target.shape[0]
        sums = torch.cat([
            torch.stack([out.loss.detach() * n, (out.acts > 0).sum().to(target), (out.recons - target).pow(2).sum(),
                         target.pow(2).sum(), torch.tensor(float(n), dtype=target.dtype, device=target.device)]),
            target.sum(0),
        ]).double()  # fmt: skip
        if ddp.is_distributed():
            ddp.all_reduce_mean_(sums)
        loss_sum, active, sq_err, sq_norm, count = sums[:5].tolist()
        variance = sq_norm - float(sums[5:].pow(2).sum()) / count
        return {
            "loss": loss_sum / count,
            "l0": active / count,
            "fvu": sq_err / max(variance, 1e-12),
            "dead": float((state.steps_since_fired >= self.cfg.dead_window).float().mean()),
        }

    @torch.no_grad()
    def _resample(self, state: _SAEState, x: Tensor, target: Tensor | None) -> None:
        """Re-initialise dead latents towards inputs the SAE reconstructs badly (chosen ∝ loss²)."""
        sae = state.sae
        dead = (state.steps_since_fired >= self.cfg.dead_window).nonzero().squeeze(-1)
        if dead.numel() == 0:
            return
        x_all = ddp.all_gather_cat(x)
        target_all = x_all if target is None else ddp.all_gather_cat(target)
        recons = sae.decode(sae.encode(x_all), x_all if sae.W_skip is not None else None)
        loss = (recons - target_all).pow(2).sum(-1)
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)
        picks = torch.multinomial(loss.pow(2).cpu() + 1e-12, dead.numel(), replacement=True, generator=gen)
        picks = picks.to(sae.device)
        directions = target_all[picks] - (sae.b_dec if sae.cfg.d_out == sae.cfg.d_in else 0)
        directions = directions / directions.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        alive = state.steps_since_fired < self.cfg.dead_window
        enc_norm = float(sae.W_enc[:, alive].norm(dim=0).mean()) if alive.any() else 1.0
        sae.W_dec[dead] = directions
        if sae.cfg.d_out == sae.cfg.d_in:
            sae.W_enc[:, dead] = directions.T * enc_norm * 0.2
        else:
            inputs = x_all[picks] / x_all[picks].norm(dim=-1, keepdim=True).clamp_min(1e-8)
            sae.W_enc[:, dead] = inputs.T * enc_norm * 0.2
        sae.b_enc[dead] = 0.0
        for param in (sae.W_enc, sae.W_dec, sae.b_enc):
            opt_state = state.optimizer.state.get(param, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in opt_state:
                    buf = opt_state[key]
                    if param is sae.W_enc:
                        buf[:, dead] = 0.0
                    else:
                        buf[dead] = 0.0
        state.steps_since_fired[dead] = 0

    def train(self, stop_after: int | None = None) -> list[SAE]:
        """Run until ``cfg.steps`` (resuming from the checkpoint when there is one) and return the
        trained SAEs with the normalisation folded into their weights.

        ``stop_after`` pauses at that step (the schedule still spans ``cfg.steps``); call again to go on.
        """
        cfg = self.cfg
        end = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
        if self.step == 0 and self.checkpoint_path is not None:
            self.load_checkpoint()
        started = time.perf_counter()
        progress = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            progress = tqdm(total=cfg.steps, initial=self.step, desc="training SAE", dynamic_ncols=True)
        try:
            while self.step < end:
                batch = self.source.next_batch()
                self.segment_rows += next(iter(batch.values())).shape[0]
                records = []
                for state in self.states:
                    x, target = self._batch_for(state.sae, batch)
                    if self.step == 0:
                        self._initialise(state, x, target)
                    records.append(self._train_step(state, x, target))
                self.step += 1
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    self._log(records, progress)
                if progress is not None:
                    progress.update(1)
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            self.segment_seconds += time.perf_counter() - started
            if progress is not None:
                progress.close()
        return self.trained_saes()

    def _log(self, records: list[dict[str, float]], progress) -> None:
        entry: dict[str, float] = {"step": self.step}
        for i, record in enumerate(records):
            prefix = "" if len(records) == 1 else f"{i}/"
            entry.update({prefix + k: v for k, v in record.items()})
        self.history.append(entry)
        if progress is not None:
            first = records[0]
            progress.set_postfix(L0=f"{first['l0']:.1f}", FVU=f"{first['fvu']:.3f}", dead=f"{first['dead']:.1%}")

    def trained_saes(self) -> list[SAE]:
        """Copies of the SAEs as used on raw activations: normalisation folded in, each as
        `SAE.for_inference` (BatchTopK as JumpReLU)."""
        out = []
        for state in self.states:
            sae = copy.deepcopy(state.sae)
            sae.fold_activation_scale(state.scale_in, state.scale_out)
            out.append(sae.for_inference().eval())
        return out


class TensorSource:
    """Batches drawn from in-memory tensors (all keys share dim 0), reshuffled each epoch.

    Under ``torch.distributed`` each rank takes its slice of every global batch of
    ``batch_size`` rows, so N ranks see exactly the rows one process would.

    Example:
        >>> src = TensorSource({"x": torch.arange(10.0)[:, None]}, batch_size=4, seed=0)
        >>> src.next_batch()["x"].shape
        torch.Size([4, 1])
    """

    def __init__(self, tensors: dict[str, Tensor], batch_size: int, seed: int = 0) -> None:
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) != 1:
            raise ConfigError(f"every tensor of a TensorSource needs the same first dimension, got {sorted(sizes)}")
        self.n = sizes.pop()
        self.rank, self.world_size = ddp.rank_and_world()
        if batch_size % self.world_size or batch_size > self.n:
            raise ConfigError(
                f"batch_size={batch_size} must divide by {self.world_size} ranks and be at most {self.n} rows"
            )
        self.tensors = tensors
        self.batch_size = batch_size
        self.seed = seed
        self.batches_served = 0

    def _order(self, epoch: int) -> Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_batch(self) -> dict[str, Tensor]:
        """The next batch ``{key: rows}`` (this rank's share of ``batch_size`` rows); an epoch's rows
        follow a permutation seeded by ``seed + epoch``, and the rows short of a full batch at an
        epoch's end are skipped."""
        per_epoch = self.n // self.batch_size
        epoch, index = divmod(self.batches_served, per_epoch)
        rows = self._order(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        share = self.batch_size // self.world_size
        rows = rows[self.rank * share : (self.rank + 1) * share]
        self.batches_served += 1
        return {name: t[rows] for name, t in self.tensors.items()}

    def state_dict(self) -> dict:
        """The resume state: the number of batches served."""
        return {"batches_served": self.batches_served}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a `state_dict`: the next batch is the one after the last batch served.

        Example:
            >>> src = TensorSource({"x": torch.arange(10.0)[:, None]}, batch_size=4, seed=0)
            >>> _ = src.next_batch(); state = src.state_dict(); expected = src.next_batch()["x"]
            >>> resumed = TensorSource({"x": torch.arange(10.0)[:, None]}, batch_size=4, seed=0)
            >>> resumed.load_state_dict(state)
            >>> resumed.next_batch()["x"].equal(expected)
            True
        """
        self.batches_served = int(state["batches_served"])


def train_sae(
    sae_cfg: SAEConfig | dict, source: BatchSource, train_cfg: TrainConfig | dict | None = None, seed: int = 0
) -> SAE:
    """Build an SAE from ``sae_cfg``, train it on ``source`` and return it, ready to use on raw activations.

    Example:
        >>> from mechscope.sae import TensorSource
        >>> sae = train_sae({"d_in": 8, "d_sae": 16, "hook_name": "x"},
        ...                 TensorSource({"x": torch.randn(256, 8)}, 64), {"steps": 5, "progress": False})
        >>> sae.cfg.architecture
        'standard'
    """
    if isinstance(sae_cfg, dict):
        sae_cfg = SAEConfig.from_dict(sae_cfg)
    if train_cfg is None or isinstance(train_cfg, dict):
        train_cfg = TrainConfig.from_dict(train_cfg or {})
    return SAETrainer([make_sae(sae_cfg, seed)], source, train_cfg).train()[0]
