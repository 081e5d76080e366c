"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token, with the aux-K loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechscope.errors import ConfigError, LoadError
from mechscope.sae.architectures.sparse_ops import dense_from_sparse, gather_pre, select_per_row, sparse_decode
from mechscope.sae.base import SAE, TrainStepOutput, register_sae
from mechscope.sae.config import SAEConfig


@dataclass
class TopKConfig(SAEConfig):
    """`SAEConfig` of a TopK SAE (and, with more, of BatchTopK).

    Example:
        >>> SAEConfig(d_in=32, d_sae=64, architecture="topk", k=4).aux_k
        16
    """

    k: int = 32
    """Active latents per token (BatchTopK: on average over the batch)."""
    aux_k: int | None = None
    """Latents of the aux-K loss that model the residual from dead latents (default ``d_in // 2``)."""
    aux_k_coefficient: float = 1 / 32
    """Weight of the aux-K loss (0 disables it)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise ConfigError(f"k must lie in [1, d_sae={self.d_sae}], got {self.k}")
        if self.aux_k is None:
            self.aux_k = max(1, min(self.d_sae, self.d_in // 2))
        if self.aux_k <= 0:
            raise ConfigError(f"aux_k must be positive, got {self.aux_k}")


def aux_k_loss(
    sae: SAE,
    pre: Float[Tensor, "batch d_sae"],
    target: Float[Tensor, "batch d_out"],
    recons: Float[Tensor, "batch d_out"],
    dead_mask: Bool[Tensor, " d_sae"] | None,
) -> dict[str, Tensor]:
    """Aux-K: the top ``aux_k`` dead latents reconstruct the residual ``target - recons``.

    Scaled by ``min(n_dead / aux_k, 1) * aux_k_coefficient``; zero when no latent is dead.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
        >>> x = torch.randn(4, 8); pre, acts = sae.encode_pre_and_acts(x)
        >>> sorted(aux_k_loss(sae, pre, x, sae.decode(acts), torch.ones(16, dtype=torch.bool)))
        ['aux_k']
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

    SAELens files record ``k``; a file with ``rescale_acts_by_decoder_norm`` (latents ranked by
    ``pre * ||W_dec[i]||``) loads with the decoder norms folded into the weights.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
        >>> (sae.encode(torch.randn(5, 8)) != 0).sum(-1).le(2).all().item()
        True
    """

    config_class = TopKConfig
    saelens_architectures = {"topk": (False, False)}

    def to_saelens(self) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``k`` (and no decoder-norm rescaling) in ``cfg.json``.

        Example:
            >>> from mechscope.sae import SAEConfig, make_sae
            >>> make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2)).to_saelens()[0]
            {'k': 2, 'rescale_acts_by_decoder_norm': False}
        """
        _, weights = super().to_saelens()
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}, weights

    @classmethod
    def from_saelens(
        cls, saelens_cfg: dict[str, Any], weights: dict[str, Tensor]
    ) -> tuple[dict[str, Any], dict[str, Tensor]]:
        """``k`` (SAELens' default 100 when absent), folding ``rescale_acts_by_decoder_norm`` into the weights."""
        weights = dict(weights)
        if saelens_cfg.get("rescale_acts_by_decoder_norm"):
            missing = sorted({"W_enc", "b_enc", "W_dec"} - set(weights))
            if missing:
                raise LoadError(f"rescale_acts_by_decoder_norm needs {missing}; found {sorted(weights)}")
            # acts = topk(pre * ||d_i||), decoded as acts / ||d_i|| @ W_dec: fold the norms into the weights
            norms = weights["W_dec"].norm(dim=-1)
            weights["W_enc"] = weights["W_enc"] * norms
            weights["b_enc"] = weights["b_enc"] * norms
            weights["W_dec"] = weights["W_dec"] / norms[:, None]
        return {"k": int(saelens_cfg.get("k", 100))}, weights

    def encode_pre_and_acts(
        self, x: Float[Tensor, "*batch d_in"]
    ) -> tuple[Float[Tensor, "*batch d_sae"], Float[Tensor, "*batch d_sae"]]:
        pre = self.hook_sae_acts_pre(self.encoder_pre(x))
        values, indices = pre.topk(self.cfg.k, dim=-1)
        acts = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
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
        return aux_k_loss(self, pre, target, recons, dead_mask)

    def training_loss(
        self,
        x: Float[Tensor, "batch ..."],
        target: Float[Tensor, "batch d_out"] | None = None,
        *,
        coefficient_scale: float = 1.0,
        dead_mask: Bool[Tensor, " d_sae"] | None = None,
    ) -> TrainStepOutput:
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
        return sparse_training_loss(
            self, x, target, lambda pre: select_per_row(pre.topk(self.cfg.k, dim=-1).indices), dead_mask
        )


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
    return not any(point.has_hooks() for point in (sae.hook_sae_input, sae.hook_sae_acts_pre, sae.hook_sae_acts_post))


def sparse_training_loss(
    sae: SAE,
    x: Float[Tensor, "batch ..."],
    target: Float[Tensor, "batch d_out"] | None,
    select: Callable[[Tensor], tuple[Int[Tensor, " active"], Int[Tensor, " active"]]],
    dead_mask: Bool[Tensor, " d_sae"] | None,
) -> TrainStepOutput:
    """MSE (plus aux-K) of a rank-selected SAE through the sparse kernels of `sparse_ops`.

    ``select(pre) -> (rows, cols)`` picks the active latents from the pre-activations.

    Example:
        >>> from mechscope.sae import SAEConfig, make_sae
        >>> from mechscope.sae.architectures.sparse_ops import select_per_row
        >>> sae = make_sae(SAEConfig(d_in=8, d_sae=16, architecture="topk", k=2))
        >>> top_2 = lambda pre: select_per_row(pre.topk(2).indices)
        >>> out = sparse_training_loss(sae, torch.randn(4, 8), None, top_2, None)
        >>> sorted(out.losses), int((out.acts != 0).sum(-1).max()) <= 2
        (['mse'], True)
    """
    x = sae.flatten_input(x)
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
