"""Toy Models of Superposition (Elhage et al. 2022): the ReLU-output model, trained many at once.

``n_features`` sparse features ``x`` (each zero with probability ``1 - p``, else uniform in
``[0, 1]``) are compressed into ``n_hidden < n_features`` dimensions by ``h = W x`` and read back
as ``x' = ReLU(Wᵀ h + b)``; the loss is the importance-weighted squared error. Each *instance*
has its own weights, feature probabilities and importances, and all instances train together as
one batched model, so a whole sweep (e.g. the phase diagram) is one training run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechscope.errors import ConfigError, InputError
from mechscope.toys import checkpoint


class ToyModel(nn.Module):
    """``n_instances`` independent ReLU-output models ``x' = ReLU(Wᵀ W x + b)``.

    ``feature_probability`` and ``importance`` broadcast to ``[n_instances, n_features]``.

    Example:
        >>> toy = ToyModel(n_features=5, n_hidden=2, n_instances=3, feature_probability=0.1, seed=0)
        >>> toy.W.shape, toy(toy.generate_batch(8)).shape
        (torch.Size([3, 2, 5]), torch.Size([8, 3, 5]))
    """

    def __init__(
        self,
        n_features: int,
        n_hidden: int,
        n_instances: int = 1,
        feature_probability: float | Tensor = 1.0,
        importance: float | Tensor = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("n_features", n_features), ("n_hidden", n_hidden), ("n_instances", n_instances)):
            if value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        shape = (n_instances, n_features)
        prob = torch.as_tensor(feature_probability, dtype=torch.float32)
        imp = torch.as_tensor(importance, dtype=torch.float32)
        try:
            prob, imp = prob.expand(shape).clone(), imp.expand(shape).clone()
        except RuntimeError as exc:
            raise ConfigError(
                f"feature_probability {tuple(prob.shape)} and importance {tuple(imp.shape)} must broadcast "
                f"to [n_instances, n_features] = {list(shape)}"
            ) from exc
        if not bool(((prob > 0) & (prob <= 1)).all()):
            raise ConfigError("feature_probability must be in (0, 1]")
        self.n_features, self.n_hidden, self.n_instances = n_features, n_hidden, n_instances
        self.register_buffer("feature_probability", prob)
        self.register_buffer("importance", imp)
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        std = (2 / (n_hidden + n_features)) ** 0.5  # Xavier normal
        self.W = nn.Parameter(torch.randn(n_instances, n_hidden, n_features, generator=generator) * std)
        self.b_final = nn.Parameter(torch.zeros(n_instances, n_features))

    def forward(self, features: Float[Tensor, "batch inst feat"]) -> Float[Tensor, "batch inst feat"]:
        """The reconstruction ``ReLU(Wᵀ W x + b)`` of every instance.

        Example:
            >>> toy = ToyModel(n_features=3, n_hidden=2, seed=0)
            >>> toy(torch.zeros(4, 1, 3)).shape, bool((toy(torch.rand(4, 1, 3)) >= 0).all())
            (torch.Size([4, 1, 3]), True)
        """
        hidden = torch.einsum("bif,ihf->bih", features, self.W)  # [batch, inst, hidden]
        return torch.relu(torch.einsum("bih,ihf->bif", hidden, self.W) + self.b_final)

    def generate_batch(self, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
        """Sparse features ``[batch, inst, feat]``: uniform in ``[0, 1]`` where present, else 0.

        Example:
            >>> toy = ToyModel(5, 2, n_instances=2, feature_probability=torch.tensor([[1.0], [0.1]]))
            >>> batch = toy.generate_batch(1000, torch.Generator().manual_seed(0))
            >>> present = (batch > 0).float().mean((0, 2))  # fraction of features present, per instance
            >>> batch.shape, present[0].item(), round(present[1].item(), 1)
            (torch.Size([1000, 2, 5]), 1.0, 0.1)
        """
        shape = (batch_size, self.n_instances, self.n_features)
        device = self.W.device
        values = torch.rand(shape, generator=generator, device=device)
        present = torch.rand(shape, generator=generator, device=device) < self.feature_probability
        return values * present

    def loss_per_instance(self, features: Tensor, out: Tensor) -> Float[Tensor, " inst"]:
        """Importance-weighted squared error, summed over features and averaged over the batch.

        Example:
            >>> toy = ToyModel(n_features=2, n_hidden=1, n_instances=2, importance=torch.tensor([1.0, 0.5]))
            >>> toy.loss_per_instance(torch.ones(1, 2, 2), torch.zeros(1, 2, 2))
            tensor([1.5000, 1.5000])
        """
        return (self.importance * (features - out).pow(2)).sum(-1).mean(0)


@dataclass
class SuperpositionTraining:
    """Optimiser settings of `train_toy_model` (Adam at a constant learning rate, as in the paper's code).

    Example:
        >>> SuperpositionTraining(steps=200, lr=1e-2)
        SuperpositionTraining(steps=200, batch_size=1024, lr=0.01, seed=0, save_every=1000)
    """

    steps: int = 5000
    """Number of Adam steps."""
    batch_size: int = 1024
    """Fresh samples per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    seed: int = 0
    """Seed of the data stream."""
    save_every: int = 1000
    """With an output directory, write the resumable training state every this many steps."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "save_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


_RESUMABLE = ("steps", "save_every")
"""Training settings that may change when a run resumes."""


def _run_settings(model: ToyModel, training: SuperpositionTraining) -> dict:
    """What a saved run must share with the one resuming it: the models' shapes, their data and the training."""
    return {
        **dataclasses.asdict(training),
        "n_features": model.n_features,
        "n_hidden": model.n_hidden,
        "n_instances": model.n_instances,
        "feature_probability": model.feature_probability.tolist(),
        "importance": model.importance.tolist(),
    }


def train_toy_model(
    model: ToyModel,
    training: SuperpositionTraining | None = None,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
) -> list[list[float]]:
    """Train every instance at once (the total loss is the sum of the instances' independent losses).

    Returns the per-instance loss every 1% of the steps (the last entry is the final loss).
    With ``out_dir`` the run is resumable: the state (weights, optimiser, the data generator's
    state, the curve) goes to ``out_dir/state.pt`` every ``save_every`` steps and at the end,
    atomically, and training the same model again with the same directory and settings
    (``steps`` may grow) continues from it, ending with the same weights as an uninterrupted run.

    Example:
        >>> toy = ToyModel(5, 2, n_instances=2, feature_probability=0.1, seed=0)
        >>> losses = train_toy_model(toy, SuperpositionTraining(steps=100, batch_size=256), progress=False)
        >>> all(a > b for a, b in zip(losses[0], losses[-1]))
        True
    """
    training = training or SuperpositionTraining()
    optimizer = torch.optim.Adam(model.parameters(), lr=training.lr)
    generator = torch.Generator(device=model.W.device).manual_seed(training.seed)
    settings = _run_settings(model, training)
    history, start = checkpoint.resume(out_dir, settings, _RESUMABLE, training.steps, model, optimizer, generator)
    log_every = max(1, training.steps // 100)
    bar = tqdm(
        range(start, training.steps),
        desc="superposition",
        disable=not progress,
        leave=False,
        initial=start,
        total=training.steps,
    )
    for step in bar:
        features = model.generate_batch(training.batch_size, generator)
        loss = model.loss_per_instance(features, model(features))
        loss.sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == training.steps - 1:
            history.append(loss.detach().tolist())
        done = step + 1
        if out_dir is not None and (done % training.save_every == 0 or done == training.steps):
            checkpoint.save_state(
                out_dir,
                settings,
                done,
                model=model.state_dict(),
                optimizer=optimizer.state_dict(),
                generator=generator.get_state(),
                history=history,
            )
    return history


def feature_norms(W: Float[Tensor, "inst hidden feat"]) -> Float[Tensor, "inst feat"]:
    """``‖W_i‖``: how strongly each feature is represented.

    Example:
        >>> feature_norms(torch.tensor([[[3.0, 0.0], [4.0, 1.0]]]))
        tensor([[5., 1.]])
    """
    return W.norm(dim=1)


def feature_superposition(W: Float[Tensor, "inst hidden feat"], eps: float = 1e-8) -> Float[Tensor, "inst feat"]:
    """``Σ_{j≠i} (Ŵ_i · W_j)²``: how much other features interfere with feature ``i``'s direction.

    Zero for a feature with a dedicated (orthogonal) dimension.

    Example:
        >>> feature_superposition(torch.tensor([[[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]]]))
        tensor([[1., 1., 0.]])
    """
    unit = W / (W.norm(dim=1, keepdim=True) + eps)
    overlaps = torch.einsum("ihf,ihg->ifg", unit, W).pow(2)  # [inst, feat, feat]
    return overlaps.sum(-1) - torch.diagonal(overlaps, dim1=-2, dim2=-1)


def feature_dimensionality(W: Float[Tensor, "inst hidden feat"], eps: float = 1e-8) -> Float[Tensor, "inst feat"]:
    """``D_i = ‖W_i‖² / Σ_j (Ŵ_i · W_j)²``: the fraction of a dimension each feature gets.

    1 for a feature with a dedicated dimension, 1/2 for an antipodal pair, 0 for an unlearned one.

    Example:
        >>> feature_dimensionality(torch.tensor([[[1.0, -1.0, 0.0], [0.0, 0.0, 2.0]]]))
        tensor([[0.5000, 0.5000, 1.0000]])
    """
    unit = W / (W.norm(dim=1, keepdim=True) + eps)
    overlaps = torch.einsum("ihf,ihg->ifg", unit, W).pow(2).sum(-1)
    return W.pow(2).sum(1) / (overlaps + eps)


def dimensions_per_feature(W: Float[Tensor, "inst hidden feat"]) -> Float[Tensor, " inst"]:
    """``n_hidden / ‖W‖_F²``: hidden dimensions per (embedded) feature, per instance.

    Example:
        >>> dimensions_per_feature(torch.tensor([[[1.0, -1.0]]]))
        tensor([0.5000])
    """
    return W.shape[1] / W.pow(2).sum((1, 2))


PHASES = ("not represented", "dedicated dimension", "superposition")


def classify_two_feature_phase(W: Float[Tensor, "inst 1 2"], threshold: float = 0.5) -> list[str]:
    """The phase of each instance of a 2-feature, 1-dimension model, for the second (extra) feature.

    ``not represented`` (``|w_2| <= threshold``), ``dedicated dimension`` (``w_2`` has the
    dimension to itself: ``|w_1| <= threshold``) or ``superposition`` (both represented,
    necessarily antipodal).

    Example:
        >>> classify_two_feature_phase(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, -1.0]]]))
        ['not represented', 'dedicated dimension', 'superposition']
    """
    if W.dim() != 3 or W.shape[1:] != (1, 2):
        raise InputError(f"the phase diagram needs W of shape [inst, 1, 2], got {tuple(W.shape)}")
    w1, w2 = W[:, 0, 0].abs().tolist(), W[:, 0, 1].abs().tolist()
    return [
        PHASES[0] if b <= threshold else PHASES[1] if a <= threshold else PHASES[2]
        for a, b in zip(w1, w2, strict=False)
    ]


@dataclass
class PhaseDiagram:
    """The trained grid of `phase_diagram`: phases ``[density, importance]`` and the weights."""

    densities: list[float]
    """Feature probabilities ``1 - S`` (rows)."""
    importances: list[float]
    """Relative importance of the extra feature (columns); the first feature's is 1."""
    phases: list[list[str]]
    """Phase of each cell (one of `PHASES`)."""
    W: Tensor
    """Weights ``[density, importance, 1, 2]``."""
    b: Tensor
    """Biases ``[density, importance, 2]``."""


def phase_diagram(
    densities: list[float] | None = None,
    importances: list[float] | None = None,
    training: SuperpositionTraining | None = None,
    n_restarts: int = 3,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | os.PathLike | None = None,
) -> PhaseDiagram:
    """The 2-feature, 1-dimension phase diagram over density ``1 - S`` and relative importance.

    Every cell is an instance of one batched model; each cell trains ``n_restarts`` times from
    different initialisations and keeps the lowest-loss solution (plain gradient descent can
    stall in a local minimum). Defaults: 8 densities from 1 to 0.01 and 8 importances from
    0.1 to 10, log-spaced. ``out_dir`` makes the training resumable (see `train_toy_model`).

    Example:
        >>> diagram = phase_diagram([1.0], [0.1, 10.0], SuperpositionTraining(steps=150, batch_size=256, lr=3e-2),
        ...                         progress=False)
        >>> diagram.phases[0]
        ['not represented', 'dedicated dimension']
    """
    densities = densities or torch.logspace(0, -2, 8).tolist()
    importances = importances or torch.logspace(-1, 1, 8).tolist()
    training = training or SuperpositionTraining()
    nd, ni = len(densities), len(importances)
    density = torch.tensor(densities).repeat_interleave(ni).repeat(n_restarts)  # [restart * nd * ni]
    importance = torch.stack([torch.ones(nd * ni), torch.tensor(importances).repeat(nd)], -1).repeat(n_restarts, 1)
    model = ToyModel(2, 1, n_restarts * nd * ni, density[:, None], importance, seed=seed)
    train_toy_model(model, training, progress=progress, out_dir=out_dir)
    with torch.no_grad():
        features = model.generate_batch(8192, torch.Generator().manual_seed(training.seed + 1))
        loss = model.loss_per_instance(features, model(features)).view(n_restarts, nd * ni)
    best = loss.argmin(0)  # [nd * ni]
    cells = torch.arange(nd * ni)
    W = model.W.detach().view(n_restarts, nd * ni, 1, 2)[best, cells]
    b = model.b_final.detach().view(n_restarts, nd * ni, 2)[best, cells]
    phases = classify_two_feature_phase(W)
    return PhaseDiagram(
        densities,
        importances,
        [phases[i * ni : (i + 1) * ni] for i in range(nd)],
        W.view(nd, ni, 1, 2),
        b.view(nd, ni, 2),
    )
