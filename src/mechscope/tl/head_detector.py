"""TransformerLens' ``head_detector``: score every head against a detection pattern."""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from mechscope.errors import InputError
from mechscope.tl.utils import is_lower_triangular, is_square

HeadName = Literal["previous_token_head", "duplicate_token_head", "induction_head"]
HEAD_NAMES = ["previous_token_head", "duplicate_token_head", "induction_head"]
ErrorMeasure = Literal["abs", "mul"]
SEQ_LEN_ERR = "The sequence must be non-empty and must fit within the model's context window."
DET_PAT_NOT_SQUARE_ERR = (
    "The detection pattern must be a lower triangular matrix of shape (sequence_length, sequence_length); "
    "sequence_length=%d; got detection pattern of shape %s"
)
"""TransformerLens' messages for a sequence of the wrong length and an unusable pattern."""


class DetectionError(InputError, AssertionError):
    """`detect_head` input TransformerLens rejects with an assertion: an `InputError` that is also
    the `AssertionError` (with the same message) TransformerLens raises."""


def get_previous_token_head_detection_pattern(tokens: Tensor) -> Tensor:
    """``[pos, pos]``: each query attends to the token before it.

    Example:
        >>> get_previous_token_head_detection_pattern(torch.tensor([[5, 6, 7]]))
        tensor([[0., 0., 0.],
                [1., 0., 0.],
                [0., 1., 0.]])
    """
    n = tokens.shape[-1]
    pattern = torch.zeros(n, n)
    pattern[1:, :-1] = torch.eye(n - 1)
    return torch.tril(pattern)


def get_duplicate_token_head_detection_pattern(tokens: Tensor) -> Tensor:
    """``[pos, pos]``: each query attends to earlier copies of its own token."""
    row = tokens.reshape(-1).cpu().numpy()
    equal = np.equal(row[None, :], row[:, None]).astype(int)
    np.fill_diagonal(equal, 0)
    return torch.tril(torch.as_tensor(equal).float())


def get_induction_head_detection_pattern(tokens: Tensor) -> Tensor:
    """``[pos, pos]``: each query attends to the token after an earlier copy of its own token."""
    duplicate = get_duplicate_token_head_detection_pattern(tokens)
    shifted = torch.roll(duplicate, shifts=1, dims=1)
    return torch.tril(torch.cat((torch.zeros(duplicate.shape[0], 1), shifted[:, 1:]), dim=1))


_PATTERNS = {
    "previous_token_head": get_previous_token_head_detection_pattern,
    "duplicate_token_head": get_duplicate_token_head_detection_pattern,
    "induction_head": get_induction_head_detection_pattern,
}


def get_supported_heads() -> list[str]:
    """The head names `detect_head` takes as ``detection_pattern`` (TransformerLens prints them)."""
    return list(HEAD_NAMES)


def compute_head_attention_similarity_score(
    attention_pattern: Tensor,
    detection_pattern: Tensor,
    *,
    exclude_bos: bool,
    exclude_current_token: bool,
    error_measure: ErrorMeasure,
) -> float:
    """``"mul"``: attention mass on the pattern over total mass; ``"abs"``: ``1 - mean |difference| * pos``
    (rounded to 3 decimals), as in TransformerLens.

    Example:
        >>> eye = torch.eye(3)
        >>> compute_head_attention_similarity_score(
        ...     eye, eye, exclude_bos=False, exclude_current_token=False, error_measure="abs")
        1.0
    """
    if not is_square(attention_pattern):
        raise InputError(f"attention pattern is not square; got shape {tuple(attention_pattern.shape)}")
    if error_measure == "mul":
        if exclude_bos or exclude_current_token:
            attention_pattern = attention_pattern.clone()
        if exclude_bos:
            attention_pattern[:, 0] = 0
        if exclude_current_token:
            attention_pattern.fill_diagonal_(0)
        return ((attention_pattern * detection_pattern).sum() / attention_pattern.sum()).item()
    abs_diff = (attention_pattern - detection_pattern).abs()
    size = len(abs_diff)
    if exclude_bos:
        abs_diff[:, 0] = 0
    if exclude_current_token:
        abs_diff.fill_diagonal_(0)
    return 1 - round((abs_diff.mean() * size).item(), 3)


def detect_head(
    model,
    seq: str | list[str],
    detection_pattern: Tensor | HeadName,
    heads: list[tuple[int, int]] | dict[int, list[int]] | None = None,
    cache=None,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = "mul",
) -> Tensor:
    """``[n_layers, n_heads]`` similarity of each head's attention on ``seq`` to ``detection_pattern``
    (a lower-triangular ``[pos, pos]`` tensor or one of `HEAD_NAMES`); heads not in ``heads`` get -1.

    A list of prompts averages the scores of each prompt (named patterns only, without ``cache``).
    """
    if error_measure not in ("abs", "mul"):
        raise InputError(f"invalid error_measure={error_measure!r}; valid values are ('abs', 'mul')")
    cfg = model.cfg
    if isinstance(detection_pattern, str):
        if detection_pattern not in _PATTERNS:
            raise InputError(f"detection_pattern must be a Tensor or one of {HEAD_NAMES}; got {detection_pattern!r}")
        if isinstance(seq, list):
            if cache is not None:
                raise InputError("a single cache cannot serve several prompts: pass one prompt, or omit cache")
            scores = [
                detect_head(
                    model,
                    s,
                    detection_pattern,
                    heads=heads,
                    exclude_bos=exclude_bos,
                    exclude_current_token=exclude_current_token,
                    error_measure=error_measure,
                )
                for s in seq
            ]
            return torch.stack(scores).mean(0)
    tokens = model.to_tokens(seq)
    seq_len = tokens.shape[-1]
    if isinstance(detection_pattern, str):
        detection_pattern = _PATTERNS[detection_pattern](tokens.cpu())
    detection_pattern = detection_pattern.to(model.device)
    if error_measure == "mul" and not set(detection_pattern.unique().tolist()).issubset({0, 1}):
        warnings.warn("Using detection pattern with values other than 0 or 1 with error_measure 'mul'", stacklevel=2)
    if not 1 < seq_len < cfg.n_ctx:
        raise DetectionError(SEQ_LEN_ERR)
    if not (is_lower_triangular(detection_pattern) and seq_len == detection_pattern.shape[0]):
        raise DetectionError(DET_PAT_NOT_SQUARE_ERR % (seq_len, detection_pattern.shape))
    if cache is None:
        _, cache = model.run_with_cache(tokens, names_filter=lambda name: name.endswith("hook_pattern"))
    if heads is None:
        layer_heads = {layer: list(range(cfg.n_heads)) for layer in range(cfg.n_layers)}
    elif isinstance(heads, list):
        layer_heads = defaultdict(list)
        for layer, head in heads:
            layer_heads[layer].append(head)
    else:
        layer_heads = heads
    matches = -torch.ones(cfg.n_layers, cfg.n_heads, dtype=model.dtype)
    for layer, chosen in layer_heads.items():
        patterns = cache["pattern", layer]
        if patterns.dim() == 4:
            patterns = patterns[0]
        for head in chosen:
            matches[layer, head] = compute_head_attention_similarity_score(
                patterns[head],
                detection_pattern,
                exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token,
                error_measure=error_measure,
            )
    return matches
