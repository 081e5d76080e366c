"""Distributed alignment search (DAS): learn a subspace whose interchange gives the counterfactual answer.

DAS (Geiger et al., 2023) learns an orthonormal basis ``B [d_act, d_sub]`` at one activation so
that the interchange intervention ``x + B Bᵀ (x_source - x)`` makes each base prompt give its
counterfactual answer (cross-entropy on that answer). The basis is an orthogonal
parametrisation (`torch.nn.utils.parametrizations.orthogonal`), so every step's basis is exactly
orthonormal. Boundless DAS (Wu et al., 2023) rotates the whole space and learns a soft mask over
the rotated coordinates, ``x + R diag(m) Rᵀ (x_source - x)`` with ``m_i = sigmoid((w - i - ½) / T)``:
the width ``w`` is learned (penalised by ``boundary_penalty · w / d_act``) while the temperature
``T`` falls; the learned subspace is the first ``round(w)`` rotated coordinates.

Training and held-out scores (`interchange_scores`) run on `InterchangeRun`: each step computes
only the intervened position onward, from the site's block, and differentiates the rotation
alone (the model's weights get no gradient).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.subspace.basis import as_bases, interchange
from mechscope.subspace.intervention import InterchangeData, InterchangeRun

OrthogonalMap = Literal["matrix_exp", "cayley", "householder"]
CONFIG_FILE, WEIGHTS_FILE = "subspace.json", "subspace.safetensors"


@dataclass(frozen=True)
class DASConfig:
    """How DAS trains; every coefficient lives here.

    Example:
        >>> DASConfig(d_sub=2, steps=10).d_sub
        2
        >>> DASConfig(batch_size=0)
        Traceback (most recent call last):
        mechscope.errors.ConfigError: batch_size must be a positive integer, got 0
    """

    d_sub: int = 1
    """Dimension of the learned subspace (plain DAS; Boundless DAS learns its width)."""
    steps: int = 200
    """Optimiser steps."""
    batch_size: int = 32
    """Prompt pairs per step (drawn without replacement, reshuffled each epoch)."""
    lr: float = 1e-3
    """Adam learning rate of the rotation."""
    seed: int = 0
    """Seeds the initial rotation and the order of the pairs: equal seeds give equal subspaces."""
    boundless: bool = False
    """Boundless DAS: a full rotation and a learned soft mask over its coordinates."""
    boundary_init: float = 0.5
    """Boundless DAS: initial mask width, as a fraction of ``d_act``."""
    boundary_lr: float = 1e-2
    """Boundless DAS: Adam learning rate of the mask width."""
    boundary_penalty: float = 1.0
    """Boundless DAS: loss weight of the mask width (a fraction of ``d_act``)."""
    temperature: tuple[float, float] = (50.0, 0.1)
    """Boundless DAS: the mask temperature, from the first to the last step (linearly)."""
    orthogonal_map: OrthogonalMap | None = None
    """The orthogonal parametrisation's map (``None``: PyTorch's default for the shape)."""

    def __post_init__(self) -> None:
        for name in ("d_sub", "steps", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.lr <= 0 or self.boundary_lr <= 0:
            raise ConfigError(f"learning rates must be positive, got lr={self.lr}, boundary_lr={self.boundary_lr}")
        if not 0 < self.boundary_init <= 1:
            raise ConfigError(f"boundary_init is a fraction of d_act in (0, 1], got {self.boundary_init}")
        if len(self.temperature) != 2 or min(self.temperature) <= 0:
            raise ConfigError(f"temperature must be (start, end), both positive, got {self.temperature}")
        if self.orthogonal_map not in (None, "matrix_exp", "cayley", "householder"):
            raise ConfigError(
                f"orthogonal_map must be None, 'matrix_exp', 'cayley' or 'householder', got {self.orthogonal_map!r}"
            )


class Rotation(nn.Module):
    """Orthonormal columns ``[d_act, n_cols]`` (an orthogonal parametrisation) and, for Boundless
    DAS, the learned mask width.

    Example:
        >>> rot = Rotation(8, DASConfig(d_sub=3), torch.Generator().manual_seed(0))
        >>> b = rot.basis()
        >>> b.shape, torch.allclose(b.T @ b, torch.eye(3), atol=1e-5)
        (torch.Size([8, 3]), True)
    """

    def __init__(self, d_act: int, config: DASConfig, generator: torch.Generator) -> None:
        super().__init__()
        if not config.boundless and config.d_sub > d_act:
            raise ConfigError(f"d_sub={config.d_sub} exceeds the activation width d_act={d_act}")
        n_cols = d_act if config.boundless else config.d_sub
        self.linear = nn.Linear(d_act, n_cols, bias=False)
        with torch.no_grad():
            nn.init.orthogonal_(self.linear.weight, generator=generator)
        # Registering completes a non-square basis with random columns: draw them from the seed too.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
            nn.utils.parametrizations.orthogonal(self.linear, orthogonal_map=config.orthogonal_map)
        self.d_act, self.boundless = d_act, config.boundless
        if config.boundless:
            frac = torch.tensor(min(config.boundary_init, 1 - 1e-4))
            self.width_logit = nn.Parameter(torch.log(frac / (1 - frac)))

    def basis(self) -> Float[Tensor, "d_act d_sub"]:
        return self.linear.weight.T

    def width(self) -> Tensor:
        """Boundless DAS: the mask width in coordinates."""
        return torch.sigmoid(self.width_logit) * self.d_act

    def mask(self, temperature: float) -> Float[Tensor, " d_sub"] | None:
        if not self.boundless:
            return None
        index = torch.arange(self.d_act, device=self.width_logit.device, dtype=torch.float32)
        return torch.sigmoid((self.width() - index - 0.5) / temperature)


@dataclass
class LearnedSubspace:
    """A subspace learned by DAS at ``hook_name``/``position``: its orthonormal ``basis``, the
    config it was trained with, the loss at every step and the training time in seconds.

    Example:
        >>> sub = LearnedSubspace(torch.eye(4)[:, :1], "blocks.0.hook_resid_pre", -1, DASConfig())
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     torch.equal(LearnedSubspace.load(sub.save(d)).basis, sub.basis)
        True
    """

    basis: Float[Tensor, "d_act d_sub"]
    hook_name: str
    position: int
    config: DASConfig
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def d_sub(self) -> int:
        """Dimensions of the subspace (columns of the basis)."""
        return self.basis.shape[1]

    def save(self, path: str | Path) -> Path:
        """Write ``subspace.safetensors`` (the basis) and ``subspace.json`` (the rest) into the folder ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({"basis": self.basis.detach().cpu().contiguous()}, str(path / WEIGHTS_FILE))
        meta = {"hook_name": self.hook_name, "position": self.position, "config": asdict(self.config),
                "losses": self.losses, "seconds": self.seconds}  # fmt: skip
        (path / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> LearnedSubspace:
        """Read a folder written by `save`."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
            raise LoadError(f"{path} is not a saved subspace: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        meta = json.loads((path / CONFIG_FILE).read_text())
        config = meta["config"]
        config["temperature"] = tuple(config["temperature"])
        return cls(
            load_file(str(path / WEIGHTS_FILE))["basis"], meta["hook_name"], meta["position"], DASConfig(**config),
            meta["losses"], meta["seconds"],
        )  # fmt: skip


def train_das(
    model,
    data: InterchangeData,
    hook_name: str,
    position: int = -1,
    config: DASConfig | None = None,
    *,
    progress: bool = False,
) -> LearnedSubspace:
    """Learn a subspace at ``hook_name`` (an activation ``[batch, pos, d_act]`` in a block) and
    ``position`` whose interchange from the source prompts makes the base prompts of ``data``
    give their counterfactual ``labels``. ``progress`` shows a bar over the steps.

    Example:
        >>> data = InterchangeData(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[1, 9, 3], [4, 8, 6]]),
        ...                        labels=torch.tensor([7, 8]), base_labels=torch.tensor([2, 3]))
        >>> sub = train_das(model, data, "blocks.1.hook_resid_pre", position=1, config=DASConfig(d_sub=2, steps=3))
        >>> sub.basis.shape, len(sub.losses)
        (torch.Size([32, 2]), 3)
    """
    config = config or DASConfig()
    run = InterchangeRun(model, data, hook_name, position)
    generator = torch.Generator().manual_seed(config.seed)
    rotation = Rotation(run.d_act, config, generator).to(model.device)
    groups = [{"params": list(rotation.linear.parameters()), "lr": config.lr}]
    if config.boundless:
        groups.append({"params": [rotation.width_logit], "lr": config.boundary_lr})
    optimizer = torch.optim.Adam(groups)
    params = [p for group in groups for p in group["params"]]
    labels = data.labels.to(model.device)
    t_start, t_end = config.temperature
    losses, batches = [], batch_order(len(data), config.batch_size, config.steps, generator)
    start = time.perf_counter()
    for step, index in enumerate(tqdm(batches, desc=f"DAS {hook_name}", disable=not progress)):
        temperature = t_start + (t_end - t_start) * step / max(1, config.steps - 1)
        basis, mask = rotation.basis(), rotation.mask(temperature)
        logits = run.logits(index, lambda base, source: interchange(base, source, basis, mask))  # noqa: B023
        loss = F.cross_entropy(logits.float(), labels[index.to(labels.device)])
        if config.boundless:
            loss = loss + config.boundary_penalty * rotation.width() / run.d_act
        for p, grad in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.grad = grad
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        basis = rotation.basis().detach()
        if config.boundless:
            basis = basis[:, : max(1, int(torch.round(rotation.width())))]
    return LearnedSubspace(basis.cpu(), hook_name, position, config, torch.stack(losses).tolist(), seconds)


def batch_order(n: int, batch_size: int, steps: int, generator: torch.Generator) -> list[Tensor]:
    """``steps`` batches of indices into ``n`` pairs: epochs of a seeded permutation, in order.

    Example:
        >>> batches = batch_order(3, 2, 4, torch.Generator().manual_seed(0))
        >>> [len(b) for b in batches], sorted(torch.cat(batches[:2]).tolist())
        ([2, 1, 2, 1], [0, 1, 2])
    """
    batches: list[Tensor] = []
    while len(batches) < steps:
        order = torch.randperm(n, generator=generator)
        batches.extend(order[i : i + batch_size] for i in range(0, n, batch_size))
    return batches[:steps]


@dataclass(frozen=True)
class InterchangeScores:
    """Held-out scores of interchange interventions along a subspace.

    ``iia``: interchange-intervention accuracy, the fraction of pairs whose top token after the
    intervention is the counterfactual answer. ``logit_diff``: mean logit of the counterfactual
    answer minus that of the base answer, after the intervention; ``logit_diff_unpatched``: the
    same without it. ``recovered``: the fraction of the way from the unpatched logit difference to
    its mirror image (the base preference fully reversed): 0 unchanged, 1 reversed.

    Example:
        >>> from mechscope.subspace.toy import ILLUSORY_DIRECTION, TOY_HOOK, illusion_toy, toy_pairs
        >>> toy, pairs = illusion_toy(), toy_pairs(32)
        >>> scores = interchange_scores(toy, ILLUSORY_DIRECTION, pairs, TOY_HOOK, -1)
        >>> scores.iia, scores.logit_diff_unpatched, scores.n, scores.recovered > 1  # it overshoots
        (1.0, -2.0, 32, True)
    """

    iia: float
    logit_diff: float
    logit_diff_unpatched: float
    recovered: float
    n: int


@torch.no_grad()
def interchange_scores(
    model,
    subspace: LearnedSubspace | Tensor,
    data: InterchangeData,
    hook_name: str | None = None,
    position: int | None = None,
    *,
    run: InterchangeRun | None = None,
    batch_size: int = 64,
) -> InterchangeScores:
    """Score interchange interventions along ``subspace`` (a `LearnedSubspace`, or a basis
    ``[d_act, d_sub]`` / direction ``[d_act]`` with ``hook_name`` and ``position``) on ``data``.

    The patched runs start at the site's block and intervened position (`InterchangeRun`; pass
    ``run`` to reuse one across subspaces), ``batch_size`` pairs at a time; one set of logits gives
    every score. `subspace_patch` on the batched engine gives the same numbers (tests).

    Example:
        >>> data = InterchangeData(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 9, 3]]), torch.tensor([7]),
        ...                        torch.tensor([2]))
        >>> s = interchange_scores(model, torch.eye(32), data, "blocks.1.hook_resid_pre", position=1)
        >>> _, cache = model.run_with_cache(torch.tensor([[1, 9, 3]]))
        >>> def swap(x, *, hook):
        ...     x = x.clone(); x[:, 1] = cache[hook.name][:, 1]; return x
        >>> logits = model.run_with_hooks(torch.tensor([[1, 2, 3]]), fwd_hooks=[("blocks.1.hook_resid_pre", swap)])
        >>> s.iia == float(logits[0, -1].argmax() == 7)
        True
    """
    if isinstance(subspace, LearnedSubspace):
        hook_name = subspace.hook_name if hook_name is None else hook_name
        position = subspace.position if position is None else position
        basis = subspace.basis
    else:
        basis = subspace if subspace.dim() == 2 else subspace[:, None]
        if run is None and (hook_name is None or position is None):
            raise InputError("a plain basis needs hook_name and position (or run); a LearnedSubspace carries both")
    if run is None:
        run = InterchangeRun(model, data, hook_name, -1 if position is None else position)
    elif run.data is not data or (hook_name is not None and hook_name != run.hook_name):
        raise InputError(f"run was built for {run.hook_name!r} and other pairs; build one for these")
    basis = as_bases(basis[None])[0].to(model.device)
    logits = torch.cat([
        run.logits(index, lambda base, source: interchange(base, source, basis))
        for index in torch.arange(len(data)).split(batch_size)
    ]).float()  # fmt: skip
    labels, base_labels = data.labels.to(logits.device), data.base_labels.to(logits.device)

    def logit_diff(values: Tensor) -> Tensor:
        values = values.float()
        return values.gather(1, labels[:, None])[:, 0] - values.gather(1, base_labels[:, None])[:, 0]

    patched, base = float(logit_diff(logits).mean()), float(logit_diff(run.base_logits.to(logits.device)).mean())
    recovered = (patched - base) / (-2 * base) if base < 0 else float("nan")
    iia = float((logits.argmax(-1) == labels).float().mean())
    return InterchangeScores(iia, patched, base, recovered, len(data))
