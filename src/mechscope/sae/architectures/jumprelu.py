"""JumpReLU SAE (Rajamanoharan et al. 2024): per-latent thresholds trained with straight-through
estimators and an L0 penalty."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechscope.sae.base import SAE, register_sae


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


@register_sae("jumprelu")
class JumpReLUSAE(SAE):
    """``f = pre * 1[pre > threshold]`` with ``threshold = exp(log_threshold)``; L0 penalty
    ``coef * sum_i 1[pre_i > threshold_i]``, differentiated straight-through.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="jumprelu"))
        >>> out = sae.training_loss(torch.randn(4, 8)); out.loss.backward()
        >>> sae.log_threshold.grad.shape
        torch.Size([16])
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.log_threshold = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))

    def init_weights(self, seed: int | None = 0) -> JumpReLUSAE:
        super().init_weights(seed)
        with torch.no_grad():
            self.log_threshold.fill_(torch.tensor(self.cfg.jumprelu_init_threshold).log().item())
        return self

    @property
    def threshold(self) -> Tensor:
        return self.log_threshold.exp()

    def encode_pre_and_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.hook_sae_acts_pre(self.encoder_pre(x))
        acts = _JumpReLU.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth)
        return pre, self.hook_sae_acts_post(acts)

    def sparsity_losses(self, x, target, pre, acts, recons, coefficient_scale, dead_mask):
        l0 = _Step.apply(pre, self.threshold, self.cfg.jumprelu_bandwidth).sum(-1).mean()
        return {"l0": self.cfg.sparsity_coefficient * coefficient_scale * l0}
