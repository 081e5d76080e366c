"""Random initialisation of a model's weights, for training from scratch.

`init_weights` is mechscope's (a seeded generator, ``std`` 0.02 by default); `init_gpt2` is
TransformerLens' ``init_mode="gpt2"``, which ``HookedTransformer(cfg)`` runs on construction.
"""

from __future__ import annotations

import math
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


@torch.no_grad()
def init_gpt2(model: Module, initializer_range: float | None = None, seed: int | None = None) -> Module:
    """TransformerLens' ``init_mode="gpt2"``: weights ``N(0, initializer_range)`` (default
    ``0.8 / sqrt(d_model)``) from torch's global generator (seeded with ``seed`` when given),
    biases 0, norm weights 1. Parameters on the meta device are skipped (weights to be loaded).

    Example:
        >>> cfg = ms.ModelConfig(d_model=64, n_layers=1, n_heads=2, d_mlp=16, d_vocab=500, n_ctx=4)
        >>> toy = init_gpt2(ms.HookedTransformer(cfg), seed=0)
        >>> round(toy.W_E.std().item(), 2), toy.blocks[0].ln1.w.unique().tolist()
        (0.1, [1.0])
    """
    if seed is not None:
        torch.manual_seed(seed)
    std = 0.8 / math.sqrt(model.cfg.d_model) if initializer_range is None else initializer_range
    for name, param in model.named_parameters():
        if param.is_meta:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf.startswith("b"):
            param.zero_()
        elif leaf == "w" and param.dim() == 1:
            param.fill_(1.0)
        else:
            param.normal_(0.0, std)
    return model
