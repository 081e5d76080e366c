"""Standard SAE: ReLU latents with a decoder-norm-weighted Lp penalty (L1, or sqrt with p = 0.5)."""

from __future__ import annotations

import torch
from torch import Tensor

from mechscope.sae.base import SAE, register_sae


@register_sae("standard")
class StandardSAE(SAE):
    """``f = relu((x - b_dec) @ W_enc + b_enc)``; penalty ``coef * sum_i |f_i|^p * ||W_dec[i]||``.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, lp_norm=0.5))
        >>> out = sae.training_loss(torch.randn(4, 8))
        >>> sorted(out.losses)
        ['mse', 'sparsity']
    """

    def encode_pre_and_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.hook_sae_acts_pre(self.encoder_pre(x))
        return pre, self.hook_sae_acts_post(torch.relu(pre))

    def sparsity_losses(self, x, target, pre, acts, recons, coefficient_scale, dead_mask):
        norms = self.decoder_norms()
        # acts >= 0, so the L1 penalty is a matrix-vector product (no [batch, d_sae] temporaries)
        per_token = acts @ norms if self.cfg.lp_norm == 1 else (acts.pow(self.cfg.lp_norm) * norms).sum(-1)
        coef = self.cfg.sparsity_coefficient * coefficient_scale
        return {"sparsity": coef * per_token.mean()}
