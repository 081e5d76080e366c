"""Weights stacked over layers, with TransformerLens' names and shapes.

`StackedWeights` gives `HookedTransformer` the properties ``W_Q, W_K, W_V [layer, head, d_model,
d_head]``, ``W_O [layer, head, d_head, d_model]``, their biases, the MLP weights, ``W_E``,
``W_pos``, ``W_U``, ``b_U`` and the per-head circuits ``QK`` and ``OV``. Key/value weights of
grouped-query models are repeated per query head (head ``h`` reads key/value head
``h // n_kv_groups``), as in TransformerLens. A bias the model does not have reads as zeros.

Each property stacks the blocks' weights afresh (a copy that keeps the gradient graph); to
edit the weights, edit the blocks' parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.errors import ConfigError, InputError
from mechscope.model.config import ModelConfig

if TYPE_CHECKING:
    from mechscope.analysis.factored import FactoredMatrix


class StackedWeights:
    """Layer-stacked weight properties for a model with ``cfg``, ``embed``, ``blocks`` and ``unembed``.

    Example:
        >>> model.W_Q.shape, model.W_O.shape, model.b_O.shape, model.W_in.shape
        (torch.Size([3, 4, 32, 8]), torch.Size([3, 4, 8, 32]), torch.Size([3, 32]), torch.Size([3, 32, 64]))
        >>> torch.equal(model.W_K[1], model.blocks[1].attn.W_K)
        True
    """

    cfg: ModelConfig
    embed: nn.Module
    pos_embed: nn.Module
    blocks: nn.ModuleList
    unembed: nn.Module

    # ------------------------------------------------------------------ embeddings
    @property
    def W_E(self) -> Float[Tensor, "d_vocab d_model"]:
        return self.embed.W_E

    @property
    def W_pos(self) -> Float[Tensor, "n_ctx d_model"]:
        """Learned position embeddings; models with other position schemes have none."""
        if self.cfg.positional_embedding_type != "standard":
            raise ConfigError(
                f"this model has {self.cfg.positional_embedding_type!r} position embeddings, "
                "not learned ones, so there is no W_pos"
            )
        return self.pos_embed.W_pos

    @property
    def W_U(self) -> Float[Tensor, "d_model d_vocab"]:
        return self.unembed.W_U

    @property
    def b_U(self) -> Float[Tensor, " d_vocab"]:
        b_u = self.unembed.b_U
        return self.W_U.new_zeros(self.cfg.d_vocab_out) if b_u is None else b_u

    @property
    def device(self) -> torch.device:
        return self.embed.W_E.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.W_E.dtype

    # ------------------------------------------------------------------ attention
    @property
    def W_Q(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._stack(lambda block: block.attn.W_Q)

    @property
    def W_K(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._per_head(self._stack(lambda block: block.attn.W_K))

    @property
    def W_V(self) -> Float[Tensor, "layer head d_model d_head"]:
        return self._per_head(self._stack(lambda block: block.attn.W_V))

    @property
    def W_O(self) -> Float[Tensor, "layer head d_head d_model"]:
        return self._stack(lambda block: block.attn.W_O)

    @property
    def b_Q(self) -> Float[Tensor, "layer head d_head"]:
        return self._head_bias("b_q", self.cfg.n_heads)

    @property
    def b_K(self) -> Float[Tensor, "layer head d_head"]:
        return self._per_head(self._head_bias("b_k", self.cfg.n_key_value_heads))

    @property
    def b_V(self) -> Float[Tensor, "layer head d_head"]:
        return self._per_head(self._head_bias("b_v", self.cfg.n_key_value_heads))

    @property
    def b_O(self) -> Float[Tensor, "layer d_model"]:
        return self._stack(lambda block: _or_zeros(block.attn.b_o, self.cfg.d_model, block.attn.w_o))

    @property
    def QK(self) -> FactoredMatrix:
        """``W_Q W_K^T [layer, head, d_model, d_model]``: ``query_resid @ QK @ key_resid`` is a head's
        attention score before scaling (without RoPE and the norms in front of the head)."""
        from mechscope.analysis.factored import FactoredMatrix

        return FactoredMatrix(self.W_Q, self.W_K.transpose(-1, -2))

    @property
    def OV(self) -> FactoredMatrix:
        """``W_V W_O [layer, head, d_model, d_model]``: ``source_resid @ OV`` is what a head writes."""
        from mechscope.analysis.factored import FactoredMatrix

        return FactoredMatrix(self.W_V, self.W_O)

    # ------------------------------------------------------------------ MLP
    @property
    def W_in(self) -> Float[Tensor, "layer d_model d_mlp"]:
        """The input weights (of the linear branch, in gated MLPs)."""
        return self._stack(lambda block: self._mlp(block).W_in)

    @property
    def W_gate(self) -> Float[Tensor, "layer d_model d_mlp"]:
        """The gate weights of gated MLPs (``act(x W_gate) * (x W_in)``)."""
        if not self.cfg.gated_mlp:
            raise ConfigError("this model's MLPs are not gated, so there is no W_gate; use W_in")
        return self._stack(lambda block: self._mlp(block).W_gate)

    @property
    def W_out(self) -> Float[Tensor, "layer d_mlp d_model"]:
        return self._stack(lambda block: self._mlp(block).W_out)

    @property
    def b_in(self) -> Float[Tensor, "layer d_mlp"]:
        return self._stack(lambda block: _or_zeros(self._mlp(block).b_in, self.cfg.d_mlp, self._mlp(block).w_in))

    @property
    def b_out(self) -> Float[Tensor, "layer d_model"]:
        return self._stack(lambda block: _or_zeros(self._mlp(block).b_out, self.cfg.d_model, self._mlp(block).w_out))

    # ------------------------------------------------------------------ directions
    def tokens_to_residual_directions(
        self, tokens: str | int | Int[Tensor, ""] | Int[Tensor, " pos"] | Int[Tensor, "batch pos"]
    ) -> Tensor:
        """The unembedding column of each token: ``[d_model]`` for one token (a string, an int or a
        one-element tensor), ``[..., d_model]`` for a tensor of several.

        Example:
            >>> model.tokens_to_residual_directions(torch.tensor([1, 2])).shape
            torch.Size([2, 32])
            >>> model.tokens_to_residual_directions(4).shape
            torch.Size([32])
        """
        if isinstance(tokens, Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens].movedim(0, -1)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, int):
            token = tokens
        elif isinstance(tokens, Tensor) and tokens.numel() == 1:
            token = int(tokens.item())
        else:
            raise InputError(f"invalid token type {type(tokens).__name__}: use a string, an int or a tensor")
        return self.W_U[:, token]

    def accumulated_bias(
        self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True
    ) -> Float[Tensor, " d_model"]:
        """The sum of the output biases written before ``layer`` (``b_O`` and, with
        ``include_mlp_biases``, ``b_out``), plus ``b_O`` of ``layer`` itself with ``mlp_input``.

        Example:
            >>> model.accumulated_bias(2).shape
            torch.Size([32])
        """
        if mlp_input and layer >= self.cfg.n_layers:
            raise InputError(f"mlp_input needs a layer below n_layers={self.cfg.n_layers}, got {layer}")
        b_O = self.b_O
        total = b_O[: layer + (1 if mlp_input else 0)].sum(0)
        if include_mlp_biases and not self.cfg.attn_only:
            total = total + self.b_out[:layer].sum(0)
        return total

    # ------------------------------------------------------------------ helpers
    def _stack(self, get) -> Tensor:
        """``get(block)`` of every block, stacked on the first block's device."""
        device = self.blocks[0].attn.w_o.device
        return torch.stack([get(block).to(device) for block in self.blocks])

    def _per_head(self, kv: Float[Tensor, "layer kv_head ..."]) -> Float[Tensor, "layer head ..."]:
        groups = self.cfg.n_kv_groups
        return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)

    def _head_bias(self, name: str, heads: int) -> Float[Tensor, "layer heads d_head"]:
        def get(block: nn.Module) -> Tensor:
            bias = getattr(block.attn, name)
            if bias is None:
                return block.attn.w_o.new_zeros(heads, self.cfg.d_head)
            return bias.view(heads, self.cfg.d_head)

        return self._stack(get)

    def _mlp(self, block: nn.Module) -> nn.Module:
        if self.cfg.attn_only:
            raise ConfigError("this model is attention-only: it has no MLP weights")
        return block.mlp


def _or_zeros(bias: Tensor | None, size: int, like: Tensor) -> Tensor:
    return like.new_zeros(size) if bias is None else bias
