"""Task datasets on the bundled model's tokenizer."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.data import (
    factual_recall_dataset,
    greater_than_dataset,
    induction_dataset,
    ioi_dataset,
    tokenize_pairs,
)
from mechscope.data.tasks import IOI_TEMPLATES


@pytest.fixture(scope="module")
def smol():
    return ms.load("smollm2-135m", device="cpu")


@pytest.mark.parametrize("corruption", ["third_name", "flipped"])
def test_ioi_prompts_answers_and_corruptions(smol, corruption):
    data = ioi_dataset(smol, n=6, corruption=corruption, seed=1)
    assert data.clean_tokens.shape == data.corrupted_tokens.shape
    assert data.clean_tokens.shape[0] == 6 and data.attention_mask is None
    for i, (clean, corrupted) in enumerate(zip(data.clean_prompts, data.corrupted_prompts, strict=False)):
        io, s = smol.to_string([int(data.correct[i])]).strip(), smol.to_string([int(data.wrong[i])]).strip()
        first, second = clean.split(",")[1].split(" went")[0].strip().split(" and ")
        # Even prompts are ABBA (indirect object first), odd ones BABA.
        assert (first, second) == ((io, s) if i % 2 == 0 else (s, io))
        assert clean.split(". ")[1].startswith(s)
        third = corrupted.split(". ")[1].split(" gave")[0]
        assert third == io if corruption == "flipped" else third not in (io, s)
        # Only the second subject mention differs, and only in one token.
        diff = (data.clean_tokens[i] != data.corrupted_tokens[i]).sum()
        assert int(diff) == 1


def test_ioi_model_prefers_indirect_object(smol):
    data = ioi_dataset(smol, n=4)
    with torch.no_grad():
        clean = data.metric()(smol(data.clean_tokens)).mean()
        corrupted = data.metric()(smol(data.corrupted_tokens)).mean()
    assert clean > 2.0 and clean > corrupted + 2.0


def test_unequal_lengths_raise_or_align(smol):
    with pytest.raises(ms.InputError, match="align=True"):
        ioi_dataset(smol, n=12, template=None)
    data = ioi_dataset(smol, n=12, template=None, align=True)
    mask = data.attention_mask
    assert mask is not None and len(set(mask.sum(1).tolist())) > 1
    assert bool(mask[:, -1].all())  # left padding: every prompt ends at the last position
    row = int(mask.sum(1).argmin())
    expected = smol.to_tokens(data.clean_prompts[row])[0]
    torch.testing.assert_close(data.clean_tokens[row, -expected.shape[0] :], expected)
    with pytest.raises(ms.InputError, match="equal token length"):
        tokenize_pairs(smol, ["The cat sat"], ["The cat sat down"])
    with pytest.raises(ms.InputError, match="out of range"):
        ioi_dataset(smol, template=len(IOI_TEMPLATES))


def test_induction_dataset_structure():
    data = induction_dataset(n=3, seq_len=6, d_vocab=50, seed=2, bos_token_id=0)
    clean, corrupted = data.clean_tokens, data.corrupted_tokens
    assert clean.shape == (3, 12) and bool((clean[:, 0] == 0).all())
    torch.testing.assert_close(clean[:, 1:6], clean[:, 7:12].roll(0)[:, :5])
    torch.testing.assert_close(clean[:, 1:7], corrupted[:, 1:7])
    torch.testing.assert_close(data.correct, clean[:, 6])
    assert bool((data.correct != data.wrong).all())


def test_greater_than_answer_sets(smol):
    data = greater_than_dataset(smol, n=4, seed=3)
    for i, prompt in enumerate(data.clean_prompts):
        tens = int(prompt.split("year 17")[1][0])
        correct = {smol.to_string([t]) for t in data.correct[i].tolist() if t >= 0}
        wrong = {smol.to_string([t]) for t in data.wrong[i].tolist() if t >= 0}
        assert correct == {str(d) for d in range(tens + 1, 10)}
        assert wrong == {str(d) for d in range(tens)}
    assert all("year 1701" in p for p in data.corrupted_prompts)


def test_factual_recall_pairs(smol):
    data = factual_recall_dataset(smol, n=3, seed=0)
    assert data.clean_tokens.shape == data.corrupted_tokens.shape
    assert bool((data.correct != data.wrong).all())
    with torch.no_grad():
        assert data.metric()(smol(data.clean_tokens)).mean() > 2.0


def test_tokenizer_needed():
    model = ms.HookedTransformer(ms.ModelConfig(d_model=8, n_layers=1, n_heads=2, d_mlp=8, d_vocab=10, n_ctx=8))
    with pytest.raises(ms.InputError, match="tokenizer"):
        ioi_dataset(model)
