"""Gated SAE (Rajamanoharan et al. 2024): a gate path decides which latents fire, a magnitude path how much."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from mechscope.errors import LoadError
from mechscope.sae.base import SAE, register_sae
from mechscope.sae.config import SAEConfig


@dataclass
class GatedConfig(SAEConfig):
    """`SAEConfig` of a gated SAE."""

    sparsity_coefficient: float = 1.0
    """Weight of the gate penalty ``sum_i relu(pi_gate_i) * ||W_dec[i]||``."""


@register_sae("gated")
class GatedSAE(SAE):
    """Gate ``pi_gate = x' @ W_enc + b_gate``, magnitude ``pi_mag = x' @ (W_enc * exp(r_mag)) + b_mag``
    (``x' = x - b_dec``), latents ``f = 1[pi_gate > 0] * relu(pi_mag)``.

    Training adds ``coef * sum relu(pi_gate) * ||W_dec||`` and an auxiliary reconstruction of
    the target from ``relu(pi_gate)`` through the frozen decoder. ``b_enc`` is unused (kept
    zero) and absent from SAELens files.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="gated"))
        >>> sorted(sae.training_loss(torch.randn(4, 8)).losses)
        ['auxiliary', 'mse', 'sparsity']
    """

    config_class = GatedConfig
    saelens_architectures = {"gated": (False, False)}

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

    def to_saelens(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """SAELens gated SAEs have no ``b_enc``.

        Example:
            >>> from mechscope.sae import SAEConfig, make_sae
            >>> "b_enc" in make_sae(SAEConfig(d_in=8, d_sae=16, architecture="gated")).to_saelens()[1]
            False
        """
        keys, weights = super().to_saelens()
        weights.pop("b_enc")
        return keys, weights

    @classmethod
    def from_saelens(
        cls, saelens_cfg: dict[str, Any], weights: dict[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """Adds the unused ``b_enc`` (zeros) that SAELens files leave out."""
        weights = dict(weights)
        if "b_gate" not in weights:
            raise LoadError(f"a gated SAE needs 'b_gate'; found {sorted(weights)}")
        weights.setdefault("b_enc", torch.zeros_like(weights["b_gate"]))
        return {}, weights

    def _gate_and_magnitude(self, x: Tensor) -> tuple[Tensor, Tensor]:
        sae_in = self.sae_input(x)
        gate = sae_in @ self.W_enc + self.b_gate
        magnitude = sae_in @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return gate, magnitude

    def encode_pre_and_acts(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
        gate, magnitude = self._gate_and_magnitude(x)
        pre = self.hook_sae_acts_pre(magnitude)
        return gate, self.hook_sae_acts_post((gate > 0).to(pre) * torch.relu(pre))

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
        gate_acts = torch.relu(pre)
        coef = self.cfg.sparsity_coefficient * coefficient_scale
        sparsity = coef * (gate_acts * self.decoder_norms()).sum(-1).mean()
        aux_recons = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        auxiliary = (aux_recons - target).pow(2).sum(-1).mean()
        return {"sparsity": sparsity, "auxiliary": auxiliary}
