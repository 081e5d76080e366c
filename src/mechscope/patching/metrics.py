"""Patching metrics: callables ``metric(logits) -> [batch]`` that stay on the logits' device.

Every patching function runs many patched copies of a batch of ``n_prompts`` prompts as one
batch, *patch-major*: row ``r`` of the logits belongs to prompt ``r % n_prompts``. The metrics
here hold per-prompt data (answer tokens, clean distributions) and tile it to the batch they
are given, so the same metric object works on a plain run (``batch = n_prompts``) and on a
batch of patches (``batch = k * n_prompts``). Any callable with that contract works.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from mechscope.errors import InputError

Metric = Callable[[Tensor], Tensor]
Answers = Int[Tensor, " n_prompts"] | Int[Tensor, "n_prompts k"] | Sequence[int] | Sequence[Sequence[int]]


def _tile(x: Tensor, rows: int) -> Tensor:
    """Repeat per-prompt data ``[n_prompts, ...]`` to ``[rows, ...]`` (patch-major rows)."""
    n = x.shape[0]
    if rows % n:
        raise InputError(
            f"the logits have {rows} rows, not a multiple of the metric's {n} prompts; "
            "build the metric from the same prompts as the patched batch"
        )
    return x.repeat(rows // n, *([1] * (x.dim() - 1)))


def _answer_sets(tokens: Tensor | list, what: str) -> Tensor:
    """Answer ids as ``[n_prompts, k]``; ``-1`` pads sets of unequal size."""
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if tokens.dim() == 1:
        tokens = tokens[:, None]
    if tokens.dim() != 2 or tokens.shape[1] == 0:
        raise InputError(f"{what} must be [n_prompts] or [n_prompts, k] token ids, got shape {tuple(tokens.shape)}")
    if bool((tokens < 0).all(-1).any()):
        raise InputError(f"every prompt needs at least one {what} token (-1 only pads a set)")
    return tokens


def check_answer_ids(metric: Metric, d_vocab: int) -> None:
    """Raise `InputError` when ``metric`` holds answer ids outside a ``d_vocab``-token vocabulary.

    Metrics of this module check themselves on their first call (before reading any logit);
    calling this first reports the mistake before any forward runs.

    Example:
        >>> check_answer_ids(LogitDiff(correct=[3], wrong=[50]), d_vocab=50)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.InputError: wrong answer id 50 is not a token of a 50-token vocabulary (valid ids: 0..49); ...
    """
    check = getattr(metric, "check_vocab", None)
    if check is not None:
        check(d_vocab)


def _check_ids(sets: Tensor, d_vocab: int, what: str) -> None:
    top = int(sets.max())
    if top >= d_vocab:
        raise InputError(
            f"{what} answer id {top} is not a token of a {d_vocab}-token vocabulary (valid ids: 0..{d_vocab - 1}); "
            "build answers with model.to_single_token or the model's tokenizer"
        )


def metric_positions(metric: Metric, seq: int) -> tuple[list[int], Metric] | None:
    """The logit positions ``metric`` declares it reads in a ``seq``-token run, and the metric
    to call on logits holding only those positions; ``None`` when it declares none.

    A metric declares them with a method ``read_positions(seq) -> (positions, metric)``, as
    every metric of this module does, so the patching engine unembeds only those positions.

    Example:
        >>> metric_positions(LogitDiff([3], [5], pos=-1), seq=6)[0]
        [5]
        >>> metric_positions(lambda logits: logits[:, -1, 0], seq=6) is None
        True
    """
    read = getattr(metric, "read_positions", None)
    return None if read is None else read(seq)


class _PositionMetric:
    """Shared parts: the position read (last by default, or one per prompt) and tiling."""

    def __init__(self, pos: int | Tensor = -1) -> None:
        self.pos = pos if isinstance(pos, int) else torch.as_tensor(pos, dtype=torch.long)

    def read_positions(self, seq: int) -> tuple[list[int], _PositionMetric]:
        """The positions this metric reads in a ``seq``-token run, and a copy reading logits
        that hold only those positions (see `metric_positions`)."""
        restricted = copy.copy(self)
        if isinstance(self.pos, int):
            if not -seq <= self.pos < seq:
                raise InputError(f"the metric reads position {self.pos}, outside a run of {seq} positions")
            restricted.pos = 0
            return [self.pos % seq], restricted
        if bool(((self.pos < -seq) | (self.pos >= seq)).any()):
            raise InputError(f"the metric reads positions {self.pos.tolist()}, outside a run of {seq} positions")
        absolute = self.pos % seq
        keep = sorted(set(absolute.tolist()))
        restricted.pos = torch.searchsorted(torch.tensor(keep), absolute)
        return keep, restricted

    def _final(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, "batch d_vocab"]:
        if logits.dim() != 3:
            raise InputError(f"metrics take logits [batch, pos, d_vocab], got shape {tuple(logits.shape)}")
        if isinstance(self.pos, int):
            return logits[:, self.pos]
        pos = _tile(self.pos.to(logits.device), logits.shape[0])
        return logits[torch.arange(logits.shape[0], device=logits.device), pos]


def _gather_sets(values: Tensor, sets: Tensor) -> tuple[Tensor, Tensor]:
    """``values [batch, d_vocab]`` at ``sets [batch, k]``; returns (values, valid mask)."""
    valid = sets >= 0
    return values.gather(-1, sets.clamp(min=0)), valid


class LogitDiff(_PositionMetric):
    """Logit of the correct answer minus logit of the wrong one, at the final position.

    ``correct``/``wrong``: ``[n_prompts]`` ids, or ``[n_prompts, k]`` sets (mean logit over the
    set; ``-1`` pads). ``pos``: the position read, an int or one per prompt ``[n_prompts]``.

    Example:
        >>> metric = LogitDiff(correct=[3], wrong=[5])
        >>> logits = torch.zeros(2, 4, 10); logits[:, -1, 3] = 2.0
        >>> metric(logits)
        tensor([2., 2.])
    """

    def __init__(self, correct: Answers, wrong: Answers, pos: int | Tensor = -1) -> None:
        super().__init__(pos)
        self.correct, self.wrong = _answer_sets(correct, "correct"), _answer_sets(wrong, "wrong")
        if self.correct.shape[0] != self.wrong.shape[0]:
            raise InputError(f"correct has {self.correct.shape[0]} prompts but wrong has {self.wrong.shape[0]}")
        self.checked_vocab: int | None = None

    def check_vocab(self, d_vocab: int) -> None:
        """Raise `InputError` if an answer id is not below ``d_vocab`` (see `check_answer_ids`)."""
        if d_vocab != self.checked_vocab:
            _check_ids(self.correct, d_vocab, "correct")
            _check_ids(self.wrong, d_vocab, "wrong")
            self.checked_vocab = d_vocab

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        self.check_vocab(logits.shape[-1])
        final = self._final(logits).float()
        out = []
        for sets in (self.correct, self.wrong):
            values, valid = _gather_sets(final, _tile(sets.to(final.device), final.shape[0]))
            out.append((values * valid).sum(-1) / valid.sum(-1))
        return out[0] - out[1]


class ProbDiff(_PositionMetric):
    """Probability of the correct answer(s) minus probability of the wrong one(s).

    Sets ``[n_prompts, k]`` sum their probabilities (``-1`` pads), as in the greater-than task.

    Example:
        >>> metric = ProbDiff(correct=[0], wrong=[1])
        >>> metric(torch.tensor([[[2.0, 0.0, 0.0]]])).round(decimals=4)
        tensor([0.6805])
    """

    def __init__(self, correct: Answers, wrong: Answers, pos: int | Tensor = -1) -> None:
        super().__init__(pos)
        self.correct, self.wrong = _answer_sets(correct, "correct"), _answer_sets(wrong, "wrong")
        if self.correct.shape[0] != self.wrong.shape[0]:
            raise InputError(f"correct has {self.correct.shape[0]} prompts but wrong has {self.wrong.shape[0]}")
        self.checked_vocab: int | None = None

    def check_vocab(self, d_vocab: int) -> None:
        """Raise `InputError` if an answer id is not below ``d_vocab`` (see `check_answer_ids`)."""
        if d_vocab != self.checked_vocab:
            _check_ids(self.correct, d_vocab, "correct")
            _check_ids(self.wrong, d_vocab, "wrong")
            self.checked_vocab = d_vocab

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        self.check_vocab(logits.shape[-1])
        probs = self._final(logits).float().softmax(-1)
        out = []
        for sets in (self.correct, self.wrong):
            values, valid = _gather_sets(probs, _tile(sets.to(probs.device), probs.shape[0]))
            out.append((values * valid).sum(-1))
        return out[0] - out[1]


class KLDivergence(_PositionMetric):
    """``KL(clean || patched)`` of the next-token distribution at the final position.

    Example:
        >>> clean = torch.randn(1, 3, 10)
        >>> KLDivergence(clean)(clean).abs().max().item() < 1e-6
        True
    """

    def __init__(self, clean_logits: Float[Tensor, "n_prompts pos d_vocab"], pos: int | Tensor = -1) -> None:
        super().__init__(pos)
        self.clean_log_probs = F.log_softmax(self._final(clean_logits.detach()).float(), dim=-1)

    def __call__(self, logits: Float[Tensor, "batch pos d_vocab"]) -> Float[Tensor, " batch"]:
        log_probs = F.log_softmax(self._final(logits).float(), dim=-1)
        clean = _tile(self.clean_log_probs.to(log_probs.device), log_probs.shape[0])
        return (clean.exp() * (clean - log_probs)).sum(-1)


class Normalized:
    """``(metric - corrupted) / (clean - corrupted)``: 0 at the corrupted baseline, 1 at the clean one.

    The baselines are the metric's means over the prompts of the clean and corrupted runs, so
    the normalisation is linear and averaging over prompts commutes with it.

    Example:
        >>> base = LogitDiff(correct=[3], wrong=[5])
        >>> clean = torch.zeros(1, 2, 10); clean[0, -1, 3] = 4.0
        >>> metric = Normalized(base, clean_logits=clean, corrupted_logits=torch.zeros(1, 2, 10))
        >>> metric(clean / 2)
        tensor([0.5000])
    """

    def __init__(self, metric: Metric, clean_logits: Tensor, corrupted_logits: Tensor) -> None:
        self.metric = metric
        with torch.no_grad():
            self.clean_value = metric(clean_logits).float().mean()
            self.corrupted_value = metric(corrupted_logits).float().mean()
        gap = float(self.clean_value - self.corrupted_value)
        if abs(gap) < 1e-12:
            raise InputError(
                "the clean and corrupted runs give the same metric value, so it cannot be normalised; "
                "check that the corruption changes the answer"
            )

    def check_vocab(self, d_vocab: int) -> None:
        """The wrapped metric's answer-id check (see `check_answer_ids`)."""
        check_answer_ids(self.metric, d_vocab)

    def read_positions(self, seq: int) -> tuple[list[int], Normalized] | None:
        """The wrapped metric's positions (see `metric_positions`), with the same baselines."""
        declared = metric_positions(self.metric, seq)
        if declared is None:
            return None
        keep, inner = declared
        restricted = copy.copy(self)
        restricted.metric = inner
        return keep, restricted

    def __call__(self, logits: Tensor) -> Tensor:
        value = self.metric(logits).float()
        corrupted = self.corrupted_value.to(value.device)
        return (value - corrupted) / (self.clean_value.to(value.device) - corrupted)
