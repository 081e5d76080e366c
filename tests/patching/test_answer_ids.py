"""Answer ids outside the vocabulary are the library's InputError, not an indexing failure."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import InputError
from mechscope.patching import LogitDiff, Normalized, ProbDiff, activation_patch
from mechscope.patching.metrics import check_answer_ids
from tests.conftest import tiny_model


@pytest.mark.parametrize("metric_class", [LogitDiff, ProbDiff])
def test_out_of_range_answers_are_named(metric_class):
    model = tiny_model()  # d_vocab 61
    clean = torch.tensor([[1, 2, 3, 4, 5]])
    corrupted = torch.tensor([[1, 2, 9, 4, 5]])
    metric = metric_class(correct=[3], wrong=[[7, 61]])
    named = r"wrong answer id 61 is not a token of a 61-token vocabulary \(valid ids: 0\.\.60\)"
    with pytest.raises(InputError, match=named):
        activation_patch(model, clean, corrupted, metric, "resid_pre")
    with pytest.raises(InputError, match="correct answer id 100"):
        check_answer_ids(metric_class(correct=[100], wrong=[1]), model.cfg.d_vocab)
    with pytest.raises(InputError, match="correct answer id 100"):
        Normalized(metric_class(correct=[100], wrong=[1]), model(clean), model(corrupted))
    check_answer_ids(metric_class(correct=[60], wrong=[[0, -1]]), model.cfg.d_vocab)  # in range; -1 pads
    effects = activation_patch(model, clean, corrupted, metric_class(correct=[60], wrong=[0]), "resid_pre")
    assert effects.shape == (3, 5) and bool(torch.isfinite(effects).all())
