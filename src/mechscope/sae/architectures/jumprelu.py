"""JumpReLU SAE (Rajamanoharan et al. 2024): per-latent thresholds trained with straight-through
estimators and an L0 penalty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from mechscope.errors import ConfigError, LoadError
from mechscope.sae.base import SAE, register_sae
from mechscope.sae.config import SAEConfig


def _rectangle(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x < 0.5)).to(x)


class _JumpReLU(torch.autograd.Function):
    """``pre * 1[pre > threshold]``; the threshold's gradient uses a rectangle kernel of width ``bandwidth``."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_pre = (pre > threshold).to(pre) * grad
        grad_threshold = -(threshold / bandwidth) * _rectangle((pre - threshold) / bandwidth) * grad
        return grad_pre, grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


class _Step(torch.autograd.Function):
    """``1[pre > threshold]`` with the straight-through threshold gradient (for the L0 penalty)."""

    @staticmethod
    def forward(ctx, pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx, grad: Tensor):
        pre, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_threshold = -(1.0 / bandwidth) * _rectangle((pre - threshold) / bandwidth) * grad
        return torch.zeros_like(pre), grad_threshold.reshape(-1, threshold.shape[-1]).sum(0), None


@dataclass
class JumpReLUConfig(SAEConfig):
    """`SAEConfig` of a JumpReLU SAE."""

    sparsity_coefficient: float = 1.0
    """Weight of the L0 penalty ``sum_i 1[pre_i > threshold_i]``."""
    jumprelu_bandwidth: float = 0.001
    """Width of the rectangle kernel of the straight-through threshold gradient."""
    jumprelu_init_threshold: float = 0.001
    """Initial threshold of every latent."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("jumprelu_bandwidth", "jumprelu_init_threshold"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")


@register_sae("jumprelu")
class JumpReLUSAE(SAE):
    """``f = pre * 1[pre > threshold]`` with ``threshold = exp(log_threshold)``; L0 penalty
    ``coef * sum_i 1[pre_i > threshold_i]``, differentiated straight-through.

    SAELens files hold ``threshold`` itself; SAELens names: ``jumprelu``, ``jumprelu_transcoder``
    and ``jumprelu_skip_transcoder``.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="jumprelu"))
        >>> out = sae.training_loss(torch.randn(4, 8)); out.loss.backward()
        >>> sae.log_threshold.grad.shape
        torch.Size([16])
    """

    config_class = JumpReLUConfig
    saelens_architectures = {
        "jumprelu": (False, False), "jumprelu_transcoder": (True, False), "jumprelu_skip_transcoder": (True, True),
    }  # fmt: skip

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))

    def init_weights(self, seed: int | None = 0) -> JumpReLUSAE:
        super().init_weights(seed)
        with torch.no_grad():
            self.log_threshold.fill_(torch.tensor(self.cfg.jumprelu_init_threshold).log().item())
        return self

    @property
    def threshold(self) -> Float[Tensor, " d_sae"]:
        """Each latent's threshold, ``exp(log_threshold)`` (differentiable)."""
        return self.log_threshold.exp()

    def to_saelens(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``threshold`` in place of ``log_threshold``.

        Example:
            >>> from mechscope.sae import SAEConfig, make_sae
            >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="jumprelu", jumprelu_init_threshold=0.5))
            >>> sae.to_saelens()[1]["threshold"][:2]
            tensor([0.5000, 0.5000])
        """
        keys, weights = super().to_saelens()
        weights["threshold"] = weights.pop("log_threshold").exp()
        return keys, weights

    @classmethod
    def from_saelens(
        cls, saelens_cfg: dict[str, Any], weights: dict[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``log_threshold`` from ``threshold``, which must be non-negative."""
        weights = dict(weights)
        if "threshold" not in weights:
            raise LoadError(f"a JumpReLU SAE needs 'threshold'; found {sorted(weights)}")
        threshold = weights.pop("threshold")
        if (threshold < 0).any():
            raise LoadError(f"JumpReLU thresholds must be non-negative, found {float(threshold.min())}")
        weights["log_threshold"] = threshold.float().log()
        return {}, weights

    def encode_pre_and_acts(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
        pre = self.hook_sae_acts_pre(self.encoder_pre(x))
        acts = _JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        return pre, self.hook_sae_acts_post(acts)

    def sparsity_losses(
        self,
        x: Float[Tensor, "batch d_in"],
        target: Float[Tensor, "batch d_out"],
        pre: Float[Tensor, "batch d_sae"],
        acts: Float[Tensor, "batch d_sae"],
        recons: Float[Tensor, "batch d_out"],
        coefficient_scale: float,
        dead_mask: Bool[Tensor, " d_sae"] | None,
    ) -> dict[str, Tensor]:
        l0 = _Step.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return {"l0": self.cfg.sparsity_coefficient * coefficient_scale * l0}
