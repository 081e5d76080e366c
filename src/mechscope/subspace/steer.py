"""Steering: add a direction, times a coefficient, to an activation during forwards and generation.

A direction may come from anywhere on the activation's last axis: a probe's weight, an SAE
feature's decoder row, a DAS basis vector, or the difference of mean activations between two
sets of prompts (`mean_difference`). `steer` is a ``with`` block under which every forward,
including ``model.generate``, runs with the direction added; `steering_hooks` gives the hooks
themselves, to combine with others.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from jaxtyping import Float
from torch import Tensor

from mechscope.errors import InputError
from mechscope.model.tokenize import input_tokens
from mechscope.names import unknown_name_error


def steering_hooks(
    model,
    hook_name: str,
    direction: Float[Tensor, " d_act"],
    coefficient: float = 1.0,
    *,
    positions: Sequence[int] | None = None,
    normalize: bool = False,
) -> list:
    """``[(hook_name, hook)]`` adding ``coefficient * direction`` to the activation's last axis.

    ``positions`` (of each forward's input) limit where it is added; ``None`` adds it at every
    position, which is what generation with a key/value cache needs (each later step runs one
    new token). ``normalize`` scales ``direction`` to unit norm first.

    Example:
        >>> hooks = steering_hooks(model, "blocks.1.hook_resid_post", torch.ones(32), 0.5, positions=[-1])
        >>> _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
        >>> with model.hooks(fwd_hooks=hooks):
        ...     _, steered = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
        >>> (steered["blocks.1.hook_resid_post"] - cache["blocks.1.hook_resid_post"])[0, :, 0]
        tensor([0.0000, 0.0000, 0.0000, 0.5000])
    """
    if hook_name not in model.hook_dict:
        raise unknown_name_error(hook_name, model.hook_dict)
    direction = torch.as_tensor(direction).detach()
    if direction.dim() != 1:
        raise InputError(f"a steering direction is one vector [d_act], got shape {tuple(direction.shape)}")
    if normalize:
        norm = direction.norm()
        if float(norm) == 0.0:
            raise InputError("cannot normalise a zero direction; pass a non-zero vector")
        direction = direction / norm
    shift = coefficient * direction
    where = None if positions is None else list(positions)

    def hook(activation: Tensor, *, hook) -> Tensor:
        if activation.shape[-1] != shift.shape[0]:
            raise InputError(
                f"the direction has width {shift.shape[0]} but {hook.name} has last axis {activation.shape[-1]}"
            )
        add = shift.to(activation.device, activation.dtype)
        if where is None:
            return activation + add
        out = activation.clone()
        out[:, where] = out[:, where] + add
        return out

    return [(hook_name, hook)]


@contextmanager
def steer(
    model,
    hook_name: str,
    direction: Float[Tensor, " d_act"],
    coefficient: float = 1.0,
    *,
    positions: Sequence[int] | None = None,
    normalize: bool = False,
) -> Iterator[None]:
    """Run every forward of the ``with`` block (``model.generate`` included) with ``coefficient *
    direction`` added at ``hook_name`` (see `steering_hooks`).

    Example:
        >>> direction = model.W_U[:, 7]  # the unembedding of token 7
        >>> with steer(model, "blocks.2.hook_resid_post", direction, 50.0):
        ...     out = model.generate(tokens, max_new_tokens=2, do_sample=False, verbose=False)
        >>> out[0, -2:].tolist()
        [7, 7]
    """
    hooks = steering_hooks(model, hook_name, direction, coefficient, positions=positions, normalize=normalize)
    with model.hooks(fwd_hooks=hooks):
        yield


@torch.no_grad()
def mean_difference(
    model,
    positive,
    negative,
    hook_name: str,
    position: int = -1,
    *,
    positive_mask: Tensor | None = None,
    negative_mask: Tensor | None = None,
) -> Float[Tensor, " d_act"]:
    """Mean activation at ``hook_name``/``position`` over the ``positive`` prompts minus that over
    the ``negative`` ones (strings or token ids; masks for padded prompts, left-padded so that
    ``position=-1`` is every prompt's last token).

    Example:
        >>> positive, negative = torch.tensor([[1, 2], [1, 3]]), torch.tensor([[4, 5]])
        >>> mean_difference(model, positive, negative, "blocks.0.hook_resid_post").shape
        torch.Size([32])
    """
    if hook_name not in model.hook_dict:
        raise unknown_name_error(hook_name, model.hook_dict)
    means = []
    for prompts, mask in ((positive, positive_mask), (negative, negative_mask)):
        tokens, mask = input_tokens(model, prompts, mask, padding_side="left")
        _, cache = model.run_with_cache(tokens, names_filter=[hook_name], attention_mask=mask)
        means.append(cache[hook_name][:, position].float().mean(0))
    return means[0] - means[1]
