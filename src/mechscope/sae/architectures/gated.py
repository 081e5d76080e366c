"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire, a magnitude path how much."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mechscope.sae.base import SAE, register_sae


@register_sae("gated")
class GatedSAE(SAE):
    """Gate ``pi_gate = x' @ W_enc + b_gate``, magnitude ``pi_mag = x' @ (W_enc * exp(r_mag)) + b_mag``
    (``x' = x - b_dec``), latents ``f = 1[pi_gate > 0] * relu(pi_mag)``.

    Training adds ``coef * sum relu(pi_gate) * ||W_dec||`` and an auxiliary reconstruction of
    the target from ``relu(pi_gate)`` through the frozen decoder. ``b_enc`` is unused (kept zero).

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="gated"))
        >>> sorted(sae.training_loss(torch.randn(4, 8)).losses)
        ['auxiliary', 'mse', 'sparsity']
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae, dtype=self.dtype))

    def init_weights(self, seed: int | None = 0) -> GatedSAE:
        super().init_weights(seed)
        with torch.no_grad():
            self.b_gate.zero_()
            self.r_mag.zero_()
            self.b_mag.zero_()
        return self

    def _gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sae_in = self.sae_input(x)
        gate = sae_in @ self.W_enc + self.b_gate
        magnitude = sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return gate, magnitude

    def encode_pre_and_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        gate, magnitude = self._gate_and_magnitude(x)
        pre = self.hook_sae_acts_pre(magnitude)
        return gate, self.hook_sae_acts_post((gate > 0).to(pre) * torch.relu(pre))

    def sparsity_losses(self, x, target, pre, acts, recons, coefficient_scale, dead_mask):
        gate_acts = torch.relu(pre)
        coef = self.cfg.sparsity_coefficient * coefficient_scale
        sparsity = coef * (gate_acts * self.decoder_norms()).sum(-1).mean()
        aux_recons = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        auxiliary = (aux_recons - target).pow(2).sum(-1).mean()
        return {"sparsity": sparsity, "auxiliary": auxiliary}
