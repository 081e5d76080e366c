"""mechscope.tl against TransformerLens 3.9: the same calls (`cases.py`) on the same tiny local
checkpoints, outputs compared (shapes, values at float32 tolerances, raised errors)."""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

import mechscope.tl
from tests.tl import cases

ATOL = RTOL = 1e-4

TOLERANCES = {"bf16_logits": (1e-1, 5e-2)}
"""Keys compared at a looser ``(atol, rtol)``: bfloat16 runs round differently in each library."""

KNOWN = {
    "tokens-gpt2/n_params_total": "TransformerLens stores a separate W_U for tied embeddings and a zero b_U "
    "parameter; mechscope shares the tied tensor, and its b_U without a bias is zeros but not a parameter",
    "tokens-gqa/n_params_total": "TransformerLens creates zero b_Q/b_K/b_V/b_O/b_in/b_out/b_U parameters for "
    "models without biases; mechscope reads them as zeros without storing them",
    "utils-none/get_act_name_unknown": "an unknown short name raises HookNameError (a KeyError) naming the valid "
    "ones; TransformerLens returns a hook name no model has ('hook_resid_mid10')",
}
"""``case_id/key`` -> why mechscope differs from TransformerLens there (the test then expects the
difference, and fails when it disappears, so this table stays true)."""


def _same(expected, actual, atol: float = ATOL, rtol: float = RTOL) -> str | None:
    """``None`` when equal (tensors and floats at float32 tolerance), else what differs."""
    if isinstance(expected, torch.Tensor):
        actual = torch.as_tensor(actual)
        if tuple(actual.shape) != tuple(expected.shape):
            return f"shape {tuple(actual.shape)} != TransformerLens {tuple(expected.shape)}"
        try:
            torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)
        except AssertionError as exc:
            return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        return None
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        ok = math.isclose(actual, expected, rel_tol=rtol, abs_tol=atol) or (math.isnan(actual) and math.isnan(expected))
        return None if ok else f"{actual!r} != TransformerLens {expected!r}"
    if isinstance(actual, torch.Tensor) and actual.dim() == 0:
        actual = actual.item()
        return _same(expected, actual, atol, rtol)
    if isinstance(actual, tuple):
        actual = list(actual)
    return None if actual == expected else f"{actual!r} != TransformerLens {expected!r}"


@pytest.mark.parametrize("case_id", cases.case_ids())
def test_same_as_transformer_lens(case_id, tl_results, ms_context):
    expected = tl_results[case_id]
    with contextlib.redirect_stdout(io.StringIO()):
        actual = cases.run_case(case_id, mechscope.tl, ms_context)
    if "error" in expected or "error" in actual:
        assert ("error" in expected) == ("error" in actual), (
            f"mechscope: {actual.get('error', 'no error')}; TransformerLens: {expected.get('error', 'no error')}"
        )
        return
    assert sorted(actual) == sorted(expected)
    problems, expected_differences = [], []
    for key in sorted(expected):
        diff = _same(expected[key], actual[key], *TOLERANCES.get(key, (ATOL, RTOL)))
        known = KNOWN.get(f"{case_id}/{key}")
        if known is not None:
            expected_differences.append(key)
            assert diff is not None, f"{case_id}/{key} now matches TransformerLens: remove it from KNOWN ({known})"
        elif diff is not None:
            problems.append(f"{key}: {diff}")
    assert not problems, f"{case_id} differs from TransformerLens:\n" + "\n".join(problems)
