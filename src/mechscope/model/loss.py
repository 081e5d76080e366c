"""The language-modelling loss of a forward pass."""

from __future__ import annotations

import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError


def next_token_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None = None,
    per_token: bool = False,
) -> Tensor:
    """Cross-entropy of predicting ``tokens[:, 1:]`` from ``logits[:, :-1]``, skipping padding.

    The mean over real next-token pairs, or with ``per_token`` the loss at every position
    ``[batch, pos - 1]`` (padding included).

    Example:
        >>> loss = next_token_loss(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]))
        >>> loss.item() == torch.log(torch.tensor(4.0)).item()
        True
    """
    if tokens.shape != logits.shape[:2]:
        raise InputError(f"tokens {tuple(tokens.shape)} do not match logits {tuple(logits.shape[:2])}")
    if tokens.shape[1] < 2:
        raise InputError("the loss needs at least two tokens per sequence")
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    per_pos = -log_probs.gather(-1, tokens[:, 1:, None].to(logits.device))[..., 0]
    if per_token:
        return per_pos
    if attention_mask is None:
        return per_pos.mean()
    valid = (attention_mask[:, 1:] & attention_mask[:, :-1]).to(per_pos.dtype)
    return (per_pos * valid).sum() / valid.sum().clamp(min=1)


RETURN_TYPES = ("logits", "loss", "both", None)


def check_return_type(return_type: str | None) -> None:
    """Raise `InputError` unless ``return_type`` is one of `RETURN_TYPES`.

    Example:
        >>> check_return_type("logits")
    """
    if return_type not in RETURN_TYPES:
        raise InputError(f"return_type must be 'logits', 'loss', 'both' or None, got {return_type!r}")


def forward_output(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"] | None,
    attention_mask: Tensor | None,
    return_type: str | None,
    per_token: bool = False,
):
    """What a forward returns for ``return_type``: the logits, `next_token_loss`, both, or ``None``.

    Example:
        >>> logits, loss = forward_output(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]), None, "both")
        >>> logits.shape, round(loss.item(), 4)
        (torch.Size([1, 3, 4]), 1.3863)
    """
    if return_type == "logits":
        return logits
    if return_type is None:
        return None
    if tokens is None:
        raise InputError("the loss needs the token ids: pass tokens=... when starting at a layer")
    loss = next_token_loss(logits, tokens, attention_mask, per_token=per_token)
    return loss if return_type == "loss" else (logits, loss)
