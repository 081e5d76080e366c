"""BatchTopK SAE (Bussmann et al. 2024): the ``k * batch`` largest activations over the whole batch.

Inference uses the learned global threshold, so the saved SAE is a JumpReLU SAE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mechscope.sae import distributed as ddp
from mechscope.sae.architectures.sparse_ops import select_flat
from mechscope.sae.architectures.topk import aux_k_loss, sparse_training_applies, sparse_training_loss
from mechscope.sae.base import SAE, register_sae


@register_sae("batchtopk")
class BatchTopKSAE(SAE):
    """Training keeps the top ``k * n_tokens`` of ``relu(pre)`` over the flattened batch and tracks a
    moving average of the smallest kept value; inference is ``pre * 1[pre > threshold]``.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="batchtopk", k=2))
        >>> out = sae.training_loss(torch.randn(6, 8))
        >>> int((out.acts != 0).sum()) <= 12
        True
        >>> sae.to_jumprelu().architecture
        'jumprelu'
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=self.dtype))

    def _pre(self, x: Tensor) -> Tensor:
        return self.hook_sae_acts_pre(self.encoder_pre(x))

    def encode_pre_and_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self._pre(x)
        return pre, self.hook_sae_acts_post(pre * (pre > self.threshold).to(pre))

    def training_acts(self, x: Tensor) -> tuple[Tensor, Tensor]:
        pre = self._pre(x)
        flat = torch.relu(pre).reshape(-1)
        indices = self._batch_select(pre)
        acts = torch.zeros_like(flat).scatter(-1, indices, flat[indices]).reshape(pre.shape)
        return pre, self.hook_sae_acts_post(acts)

    def _batch_select(self, pre: Tensor) -> Tensor:
        """Flat indices of the kept latents: the ``k * tokens`` largest of ``relu(pre)`` over the
        batch, or over the global batch of all ranks under data parallelism (so that DDP
        selects what one process holding the whole batch would). Updates the threshold."""
        flat = torch.relu(pre.detach()).reshape(-1)
        if ddp.is_distributed():
            tokens = int(ddp.all_gather_cat(torch.tensor([pre.shape[0]], device=pre.device)).sum())
            threshold = ddp.global_topk_threshold(flat, self.cfg.k * tokens)
            indices = ((flat >= threshold) & (flat > 0)).nonzero().squeeze(-1)
        else:
            indices = flat.topk(min(self.cfg.k * pre.shape[0], flat.numel())).indices
        self._update_threshold(flat[indices])
        return indices

    def training_loss(self, x, target=None, *, coefficient_scale=1.0, dead_mask=None):
        """As `SAE.training_loss` with the sparse kernels of `TopKSAE.training_loss` (dense when
        the input or latent hook points are hooked)."""
        if not sparse_training_applies(self):
            return super().training_loss(x, target, coefficient_scale=coefficient_scale, dead_mask=dead_mask)

        return sparse_training_loss(self, x, target, lambda pre: select_flat(self._batch_select(pre), pre.shape[-1]), dead_mask)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        positive = kept[kept > 0]
        lowest = positive.min() if positive.numel() else kept.new_tensor(torch.inf)
        if ddp.is_distributed():
            lowest = -ddp.all_reduce_max_(-lowest)
        if torch.isfinite(lowest):
            lowest = lowest.to(self.threshold.dtype)
            if self.threshold == 0:
                self.threshold.copy_(lowest)
            else:
                lr = self.cfg.topk_threshold_lr
                self.threshold.mul_(1 - lr).add_(lr * lowest)

    def sparsity_losses(self, x, target, pre, acts, recons, coefficient_scale, dead_mask):
        return aux_k_loss(self, pre, target, recons, dead_mask)

    def to_jumprelu(self) -> SAE:
        """The inference SAE: a `JumpReLUSAE` with every threshold equal to the learned one."""
        from dataclasses import replace

        from mechscope.sae.architectures.jumprelu import JumpReLUSAE

        jump = JumpReLUSAE(replace(self.cfg, architecture="jumprelu")).to(self.device)
        state = {k: v for k, v in self.state_dict().items() if k != "threshold"}
        state["log_threshold"] = torch.full_like(self.b_enc, float(self.threshold.clamp_min(1e-12))).log()
        jump.load_state_dict(state)
        return jump
