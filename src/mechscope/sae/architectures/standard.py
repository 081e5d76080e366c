"""Standard SAE: ReLU latents with a decoder-norm-weighted Lp penalty (L1, or sqrt with p = 0.5)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.sae.base import SAE, register_sae
from mechscope.sae.config import SAEConfig


@dataclass
class StandardConfig(SAEConfig):
    """`SAEConfig` of a standard SAE.

    Example:
        >>> SAEConfig(d_in=8, d_sae=16, lp_norm=0.5).lp_norm
        0.5
    """

    sparsity_coefficient: float = 1.0
    """Weight of the penalty ``sum_i |f_i|^p * ||W_dec[i]||``."""
    lp_norm: float = 1.0
    """Exponent ``p`` of the penalty: 1 is L1, 0.5 the sqrt variant."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lp_norm <= 0:
            raise ConfigError(f"lp_norm must be positive (1 for L1, 0.5 for sqrt), got {self.lp_norm}")


@register_sae("standard")
class StandardSAE(SAE):
    """``f = relu((x - b_dec) @ W_enc + b_enc)``; penalty ``coef * sum_i |f_i|^p * ||W_dec[i]||``.

    SAELens names: ``standard``, and ``transcoder`` / ``skip_transcoder`` for transcoders.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, lp_norm=0.5))
        >>> out = sae.training_loss(torch.randn(4, 8))
        >>> sorted(out.losses)
        ['mse', 'sparsity']
    """

    config_class = StandardConfig
    saelens_architectures = {"standard": (False, False), "transcoder": (True, False), "skip_transcoder": (True, True)}

    def encode_pre_and_acts(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
        pre = self.hook_sae_acts_pre(self.encoder_pre(x))
        return pre, self.hook_sae_acts_post(torch.relu(pre))

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
        norms = self.decoder_norms()
        # acts >= 0, so the L1 penalty is a matrix-vector product (no [batch, d_sae] temporaries)
        per_token = acts @ norms if self.cfg.lp_norm == 1 else (acts.pow(self.cfg.lp_norm) * norms).sum(-1)
        coef = self.cfg.sparsity_coefficient * coefficient_scale
        return {"sparsity": coef * per_token.mean()}
