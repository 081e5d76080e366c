"""`LinearProbe`: fitted weights of one or many linear probes, their predictions, directions and files.

A probe holds ``weight [target, d_model, out]`` and ``bias [target, out]`` for ``target``
probes read from the same activation (``d_model`` is the width of the probed activation: the
residual stream, or ``d_mlp`` for neurons). ``out`` is 1 for binary probes (one logit, class 1
when positive), the number of classes for multi-class probes, and 1 for linear regression.
Weights act on the raw activation: a probe fitted on standardised features has the
standardisation folded in, so its directions live in model space and can be added to the
residual stream for patching and steering.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError, LoadError
from mechscope.probing import metrics

Kind = Literal["logistic", "linear", "mean_difference"]
KINDS = ("logistic", "linear", "mean_difference")


@dataclass
class LinearProbe:
    """Weights of ``target`` linear probes over one activation, with what they were fitted on.

    Example:
        >>> probe = LinearProbe(torch.tensor([[[1.0], [-1.0]]]), torch.zeros(1, 1), "logistic", n_classes=2)
        >>> probe.predict(torch.tensor([[2.0, 1.0], [0.0, 3.0]]))
        tensor([[1],
                [0]])
    """

    weight: Float[Tensor, "target d_model out"]
    bias: Float[Tensor, "target out"]
    kind: Kind
    """How it was fitted: ``logistic``, ``linear`` (regression) or ``mean_difference``."""
    n_classes: int = 2
    """Classes per target (0 for linear regression)."""
    hook: str | None = None
    """The hook name the probe reads, when known."""
    target_names: list[str] | None = None
    """One name per target (e.g. board squares)."""
    class_names: list[str] | None = None
    """One name per class (e.g. ``["empty", "mine", "theirs"]``)."""
    info: dict = field(default_factory=dict)
    """Anything JSON-serialisable: fit settings, metrics, feature indices of a sparse probe."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise InputError(f"unknown probe kind {self.kind!r}; choose among {list(KINDS)}")
        if self.weight.dim() != 3 or self.bias.shape != (self.weight.shape[0], self.weight.shape[2]):
            raise InputError(
                f"weight must be [target, d_model, out] and bias [target, out]; got {tuple(self.weight.shape)} "
                f"and {tuple(self.bias.shape)}"
            )
        for name, names, n in (("target_names", self.target_names, self.n_targets),
                               ("class_names", self.class_names, self.n_classes)):  # fmt: skip
            if names is not None and len(names) != n:
                raise InputError(f"{name} has {len(names)} entries for {n} {name.split('_')[0]}s")

    @property
    def n_targets(self) -> int:
        """The number of probes (targets) held, the first axis of ``weight``."""
        return self.weight.shape[0]

    @property
    def d_model(self) -> int:
        """The width of the activation the probes read, the second axis of ``weight``."""
        return self.weight.shape[1]

    def to(self, device: torch.device | str) -> LinearProbe:
        """The same probe with its tensors on ``device``."""
        return LinearProbe(self.weight.to(device), self.bias.to(device), self.kind, self.n_classes, self.hook,
                           self.target_names, self.class_names, dict(self.info))  # fmt: skip

    def logits(self, x: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch target out"]:
        """The probe outputs before any link function (``[batch, target, out]``).

        Example:
            >>> probe = LinearProbe(torch.ones(2, 3, 1), torch.zeros(2, 1), "linear", n_classes=0)
            >>> probe.logits(torch.ones(4, 3)).shape
            torch.Size([4, 2, 1])
        """
        if x.shape[-1] != self.d_model:
            raise InputError(f"the probe reads {self.d_model}-dimensional activations, got {tuple(x.shape)}")
        weight, bias = self.weight.to(x.device, x.dtype), self.bias.to(x.device, x.dtype)
        return torch.einsum("bd,tdo->bto", x, weight) + bias

    def predict(self, x: Float[Tensor, "batch d_model"]) -> Tensor:
        """Class indices ``[batch, target]`` (values ``[batch, target]`` for linear regression)."""
        logits = self.logits(x)
        if self.kind == "linear":
            return logits[..., 0]
        if logits.shape[-1] == 1:
            return (logits[..., 0] > 0).long()
        return logits.argmax(-1)

    def predict_proba(self, x: Float[Tensor, "batch d_model"]) -> Float[Tensor, "batch target class"]:
        """Class probabilities ``[batch, target, class]`` of a logistic probe.

        Example:
            >>> probe = LinearProbe(torch.zeros(1, 2, 1), torch.zeros(1, 1), "logistic")
            >>> probe.predict_proba(torch.ones(1, 2))
            tensor([[[0.5000, 0.5000]]])
        """
        if self.kind != "logistic":
            raise InputError(f"predict_proba needs a logistic probe, this one is {self.kind!r}; use logits()")
        logits = self.logits(x)
        if logits.shape[-1] == 1:
            p = torch.sigmoid(logits)
            return torch.cat([1 - p, p], dim=-1)
        return logits.softmax(-1)

    def evaluate(self, x: Float[Tensor, "batch d_model"], labels: Tensor) -> dict[str, Tensor]:
        """Metrics per target: ``accuracy`` and ``f1`` (and ``auroc`` for binary probes) of a
        classifier; ``r2`` and ``mse`` of a regression. Labels of -1 are ignored.

        Example:
            >>> probe = LinearProbe(torch.tensor([[[1.0]]]), torch.zeros(1, 1), "logistic")
            >>> probe.evaluate(torch.tensor([[1.0], [-1.0], [2.0]]), torch.tensor([1, 0, 0]))["accuracy"]
            tensor([0.6667])
        """
        labels = labels[:, None] if labels.dim() == 1 else labels
        if self.kind == "linear":
            pred = self.predict(x)
            mse = ((pred - labels) ** 2).mean(0)
            return {"mse": mse, "r2": 1 - mse / labels.var(0, unbiased=False).clamp_min(1e-12)}
        pred = self.predict(x)
        out = {"accuracy": metrics.accuracy(pred, labels), "f1": metrics.f1_score(pred, labels, self.n_classes)}
        if self.n_classes == 2:
            out["auroc"] = metrics.auroc(self.logits(x)[..., 0], labels)
        return out

    def direction(self, target: int = 0, positive: int = 1, negative: int | None = None,
                  unit: bool = True) -> Float[Tensor, " d_model"]:  # fmt: skip
        """A direction in the probed activation's space: the one that raises class ``positive``
        against class ``negative`` (against the mean of all classes when ``None``) for ``target``.

        For a binary probe or a regression it is the weight vector. ``unit`` normalises it.

        Example:
            >>> probe = LinearProbe(torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]), torch.zeros(1, 3),
            ...                     "logistic", n_classes=3)
            >>> probe.direction(0, positive=1, negative=0, unit=False)
            tensor([-1.,  1.])
        """
        if not 0 <= target < self.n_targets:
            raise InputError(f"target {target} is out of range for {self.n_targets} targets")
        w = self.weight[target]  # [d_model, out]
        if w.shape[-1] == 1:
            d = w[:, 0]
        else:
            for c in (positive, negative):
                if c is not None and not 0 <= c < w.shape[-1]:
                    raise InputError(f"class {c} is out of range for {w.shape[-1]} classes")
            d = w[:, positive] - (w.mean(-1) if negative is None else w[:, negative])
        return d / d.norm().clamp_min(1e-12) if unit else d.clone()

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path.safetensors`` (weights) and ``path.json`` (everything else); returns the JSON path.

        Example:
            >>> import tempfile
            >>> hook = "blocks.0.hook_resid_post"
            >>> probe = LinearProbe(torch.randn(2, 3, 1), torch.randn(2, 1), "logistic", hook=hook)
            >>> loaded = LinearProbe.load(probe.save(Path(tempfile.mkdtemp()) / "probe"))
            >>> torch.equal(loaded.weight, probe.weight), loaded.hook
            (True, 'blocks.0.hook_resid_post')
        """
        from safetensors.torch import save_file

        json_path, weights_path = _probe_files(path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}
        save_file(tensors, str(weights_path))
        meta = {"format": "mechscope-linear-probe", "version": 1, "kind": self.kind, "n_classes": self.n_classes,
                "hook": self.hook, "target_names": self.target_names, "class_names": self.class_names,
                "info": self.info}  # fmt: skip
        json_path.write_text(json.dumps(meta, indent=2))
        return json_path

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearProbe:
        """Read a probe written by `save` (pass either file, or the path without suffix)."""
        from safetensors.torch import load_file

        json_path, weights_path = _probe_files(path)
        if not json_path.is_file() or not weights_path.is_file():
            raise LoadError(f"a saved probe needs both {json_path.name} and {weights_path.name} in {json_path.parent}")
        meta = json.loads(json_path.read_text())
        if meta.get("format") != "mechscope-linear-probe":
            raise LoadError(f"{json_path} is not a mechscope probe (format {meta.get('format')!r})")
        tensors = load_file(str(weights_path))
        return cls(tensors["weight"], tensors["bias"], meta["kind"], meta["n_classes"], meta["hook"],
                   meta["target_names"], meta["class_names"], meta["info"])  # fmt: skip


def _probe_files(path: str | os.PathLike) -> tuple[Path, Path]:
    """The JSON and safetensors files of a probe saved at ``path``: either file, or the path
    without suffix. Other dots stay part of the name (``mine_theirs.blocks.1.hook_resid_post``).

    Example:
        >>> [p.name for p in _probe_files("probes/mine_theirs.blocks.1.hook_resid_post")]
        ['mine_theirs.blocks.1.hook_resid_post.json', 'mine_theirs.blocks.1.hook_resid_post.safetensors']
        >>> [p.name for p in _probe_files("probes/p.json")]
        ['p.json', 'p.safetensors']
    """
    base = Path(path)
    if base.suffix in (".json", ".safetensors"):
        base = base.with_suffix("")
    return base.with_name(base.name + ".json"), base.with_name(base.name + ".safetensors")


def labels_matrix(labels: Int[Tensor, " batch *target"]) -> Int[Tensor, "batch target"]:
    """Labels as ``[batch, target]`` (a vector is one target).

    Example:
        >>> labels_matrix(torch.tensor([0, 1])).shape
        torch.Size([2, 1])
    """
    return labels[:, None] if labels.dim() == 1 else labels
