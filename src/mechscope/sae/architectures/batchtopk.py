"""BatchTopK SAE (Bussmann et al. 2024): the ``k * batch`` largest activations over the whole batch.

Inference uses the learned global threshold, so the saved SAE is a JumpReLU SAE.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechscope.errors import ConfigError
from mechscope.sae import distributed as ddp
from mechscope.sae.architectures.jumprelu import JumpReLUSAE
from mechscope.sae.architectures.sparse_ops import select_flat
from mechscope.sae.architectures.topk import TopKConfig, aux_k_loss, sparse_training_applies, sparse_training_loss
from mechscope.sae.base import SAE, TrainStepOutput, register_sae


@dataclass
class BatchTopKConfig(TopKConfig):
    """`SAEConfig` of a BatchTopK SAE: TopK's knobs and the threshold's learning rate."""

    topk_threshold_lr: float = 0.01
    """Rate of the moving average that learns the inference threshold."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.topk_threshold_lr <= 1:
            raise ConfigError(f"topk_threshold_lr must lie in (0, 1], got {self.topk_threshold_lr}")


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

    config_class = BatchTopKConfig
    saelens_architectures = {}  # saved as the JumpReLU SAE it is at inference

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=self.dtype))

    def _pre(self, x: Tensor) -> Tensor:
        return self.hook_sae_acts_pre(self.encoder_pre(x))

    def encode_pre_and_acts(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
        pre = self._pre(x)
        return pre, self.hook_sae_acts_post(pre * (pre > self.threshold).to(pre))

    def training_acts(
        self, x: Float[Tensor, "batch d_in"]
    ) -> tuple[Float[Tensor, "batch d_sae"], Float[Tensor, "batch d_sae"]]:
        pre = self._pre(x)
        flat = torch.relu(pre).reshape(-1)
        indices = self._batch_select(pre)
        acts = torch.zeros_like(flat).scatter(-1, indices, flat[indices]).reshape(pre.shape)
        return pre, self.hook_sae_acts_post(acts)

    def _batch_select(self, pre: Float[Tensor, "batch d_sae"]) -> Int[Tensor, " active"]:
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

    def training_loss(
        self,
        x: Float[Tensor, "batch ..."],
        target: Float[Tensor, "batch d_out"] | None = None,
        *,
        coefficient_scale: float = 1.0,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> TrainStepOutput:
        """As `SAE.training_loss` with the sparse kernels of `TopKSAE.training_loss` (dense when
        the input or latent hook points are hooked)."""
        if not sparse_training_applies(self):
            return super().training_loss(x, target, coefficient_scale=coefficient_scale, dead_mask=dead_mask)

        return sparse_training_loss(
            self, x, target, lambda pre: select_flat(self._batch_select(pre), pre.shape[-1]), dead_mask
        )

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
        return aux_k_loss(self, pre, target, recons, dead_mask)

    def for_inference(self) -> SAE:
        """`to_jumprelu`: BatchTopK is trained as such and used as a JumpReLU SAE."""
        return self.to_jumprelu()

    def to_jumprelu(self) -> JumpReLUSAE:
        """The inference SAE: a `JumpReLUSAE` with every threshold equal to the learned one."""
        jump = JumpReLUSAE(self.cfg.with_architecture("jumprelu")).to(self.device)
        state = {k: v for k, v in self.state_dict().items() if k != "threshold"}
        state["log_threshold"] = torch.full_like(self.b_enc, float(self.threshold.clamp_min(1e-12))).log()
        jump.load_state_dict(state)
        return jump
