"""Random initialisation of a model's weights, for training from scratch."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

Module = TypeVar("Module", bound=nn.Module)


def init_weights(model: Module, seed: int | None = None, std: float = 0.02) -> Module:
    """Normal weights (standard deviation ``std``), zero biases, unit norm weights; returns ``model``.

    Also `HookedTransformer.init_weights`. Every parameter whose name starts with ``b`` is a
    bias; a one-dimensional ``w`` is a norm weight.

    Example:
        >>> cfg = ms.ModelConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=16, d_vocab=10, n_ctx=4, mlp_bias=True)
        >>> toy = ms.HookedTransformer(cfg).init_weights(seed=0)
        >>> toy.blocks[0].ln1.w.detach().unique().tolist(), toy.b_in.detach().abs().sum().item()
        ([1.0], 0.0)
    """
    generator = torch.Generator(device="cpu")
    if seed is not None:
        generator.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("b"):
                param.zero_()
            elif leaf == "w" and param.dim() == 1:
                param.fill_(1.0)
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    return model
