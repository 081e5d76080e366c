"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, with the aux-K loss."""

from __future__ import annotations

import torch
from torch import Tensor

from mechscope.sae.architectures.sparse_ops import dense_from_sparse, gather_pre, select_per_row, sparse_decode
from mechscope.sae.base import SAE, TrainStepOutput, register_sae


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
        pre = self.hook_sae_acts_pre(self.encoder_pre(x))
        values, indices = pre.topk(self.cfg.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        return pre, self.hook_sae_acts_post(acts)

    def sparsity_losses(self, x, target, pre, acts, recons, coefficient_scale, dead_mask):
        return aux_k_loss(self, pre, target, recons, dead_mask)

    def training_loss(self, x, target=None, *, coefficient_scale=1.0, dead_mask=None) -> TrainStepOutput:
        """As `SAE.training_loss`, computed sparsely: only the ``k`` selected latents (and the
        aux-K latents) enter the decoder and the encoder's backward. Hooks on the latent hook
        points (or the input's) switch back to the dense computation so that they see (and may
        edit) the graph.

        Example:
            >>> from mechscope.sae import SAEConfig, make_sae
            >>> sae = make_sae(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=3))
            >>> x = torch.randn(16, 8)
            >>> sparse = sae.training_loss(x).loss
            >>> torch.allclose(sparse, SAE.training_loss(sae, x).loss, atol=1e-6)
            True
        """
        if not sparse_training_applies(self):
            return super().training_loss(x, target, coefficient_scale=coefficient_scale, dead_mask=dead_mask)
        return sparse_training_loss(self, x, target, lambda pre: select_per_row(pre.topk(self.cfg.k, dim=-1).indices), dead_mask)


def sparse_training_applies(sae: SAE) -> bool:
    """Whether the sparse kernels may run: no hook on the encoder input or the latents, which
    would have to see (and could edit) the dense graph that the kernels' gradients assume.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
        >>> handle = sae.hook_sae_input.add_hook(lambda x, *, hook: 2 * x)
        >>> sparse_training_applies(sae)
        False
        >>> handle.remove(); sparse_training_applies(sae)
        True
    """
    return not any(point.has_hooks for point in (sae.hook_sae_input, sae.hook_sae_acts_pre, sae.hook_sae_acts_post))


def sparse_training_loss(sae: SAE, x: Tensor, target: Tensor | None, select, dead_mask: Tensor | None) -> TrainStepOutput:
    """MSE (plus aux-K) of a rank-selected SAE through the sparse kernels of `sparse_ops`.

    ``select(pre) -> (rows, cols)`` picks the active latents from the pre-activations.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> from mechscope.sae.architectures.sparse_ops import select_per_row
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
        >>> out = sparse_training_loss(sae, torch.randn(4, 8), None, lambda pre: select_per_row(pre.topk(2).indices), None)
        >>> sorted(out.losses), int((out.acts != 0).sum(-1).max()) <= 2
        (['mse'], True)
    """
    x = sae._flatten_input(x)
    target = x if target is None else target.to(sae.dtype)
    b_dec = sae.b_dec if sae.cfg.apply_b_dec_to_input else None
    with torch.no_grad():
        pre = sae.hook_sae_acts_pre(sae.encoder_pre(x))
        rows, cols = select(pre)
    values = torch.relu(gather_pre(x, sae.W_enc, sae.b_enc, b_dec, pre, rows, cols))
    acts = sae.hook_sae_acts_post(dense_from_sparse(values.detach(), rows, cols, pre.shape))
    recons = sparse_decode(values, rows, cols, sae.W_dec, x.shape[0]) + sae.b_dec
    if sae.W_skip is not None:
        recons = recons + x @ sae.W_skip.T
    recons = sae.hook_sae_recons(recons)
    losses = {"mse": (recons - target).pow(2).sum(-1).mean()}
    cfg = sae.cfg
    if dead_mask is not None and cfg.aux_k_coefficient != 0:
        n_dead = int(dead_mask.sum())
        if n_dead == 0:
            losses["aux_k"] = pre.new_zeros(())
        else:
            with torch.no_grad():
                dead_pre = torch.where(dead_mask, pre, torch.full_like(pre, -torch.inf))
                aux_rows, aux_cols = select_per_row(dead_pre.topk(min(cfg.aux_k, n_dead), dim=-1).indices)
            aux_values = torch.relu(gather_pre(x, sae.W_enc, sae.b_enc, b_dec, pre, aux_rows, aux_cols))
            aux_recons = sparse_decode(aux_values, aux_rows, aux_cols, sae.W_dec, x.shape[0])
            scale = min(n_dead / cfg.aux_k, 1.0) * cfg.aux_k_coefficient
            losses["aux_k"] = scale * (aux_recons - (target - recons).detach()).pow(2).sum(-1).mean()
    return TrainStepOutput(loss=sum(losses.values()), losses=losses, acts=acts, recons=recons)
