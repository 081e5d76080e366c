"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, with the aux-K loss."""

from __future__ import annotations

import torch
from torch import Tensor

from mechscope.sae.base import SAE, register_sae


def aux_k_loss(sae: SAE, pre: Tensor, target: Tensor, recons: Tensor, dead_mask: Tensor | None) -> dict[str, Tensor]:
    """Aux-K: the top ``aux_k`` dead latents reconstruct the residual ``target - recons``.

    Scaled by ``min(n_dead / aux_k, 1) * aux_k_coefficient``; zero when no latent is dead.
    """
    cfg = sae.cfg
    if dead_mask is None or cfg.aux_k_coefficient == 0:
        return {}
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return {"aux_k": pre.new_zeros(())}
    k_aux = min(cfg.aux_k, n_dead)
    residual = (target - recons).detach()
    dead_pre = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
    values, indices = dead_pre.topk(k_aux, dim=-1)
    aux_acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
    aux_recons = aux_acts @ sae.W_dec
    scale = min(n_dead / cfg.aux_k, 1.0) * cfg.aux_k_coefficient
    return {"aux_k": scale * (aux_recons - residual).pow(2).sum(-1).mean()}


@register_sae("topk")
class TopKSAE(SAE):
    """``f = relu(topk_k((x - b_dec) @ W_enc + b_enc))``: at most ``k`` active latents per token.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
        >>> (sae.encode(torch.randn(5, 8)) != 0).sum(-1).le(2).all().item()
        True
    """

    def encode_pre_and_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self.hook_sae_acts_pre(self.sae_input(x) @ self.W_enc + self.b_enc)
        values, indices = pre.topk(self.cfg.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        return pre, self.hook_sae_acts_post(acts)

    def sparsity_losses(self, x, target, pre, acts, recons, coefficient_scale, dead_mask):
        return aux_k_loss(self, pre, target, recons, dead_mask)
