"""On the bundled SmolLM2 (RMSNorm, grouped-query attention, tied embeddings): exact DLA and lens,
and its induction head."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.analysis import direct_logit_attribution, induction_scores, logit_lens, repeated_random_tokens, top_heads

PROMPT = "When Mary and John went to the store, John gave a drink to"


@pytest.fixture(scope="module")
def model():
    return ms.load("smollm2-135m", device="cpu")


@pytest.mark.slow
def test_dla_and_logit_lens_are_exact_on_the_bundled_model(model):
    with torch.no_grad():
        logits, cache = model.run_with_cache(PROMPT)
    mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
    expected = logits[0, -1, mary] - logits[0, -1, john]
    for by in ("layer", "head"):
        dla = direct_logit_attribution(cache, " Mary", against=" John", by=by)
        assert_close(dla.total()[0], expected, rtol=1e-4, atol=1e-4)
    lens = logit_lens(cache, pos=-1)
    assert_close(lens.logits[-1, :, 0], logits[:, -1], rtol=1e-4, atol=1e-4)
    assert int(lens.ranks(mary)[-1, 0, 0]) == 0


@pytest.mark.slow
def test_bundled_model_has_a_strong_induction_head(model):
    tokens = repeated_random_tokens(model, seq_len=20, batch=2, seed=1)
    label, score = top_heads(induction_scores(model, tokens), k=1)[0]
    assert label in {"L18H6", "L17H3", "L17H4"} and score > 0.7
