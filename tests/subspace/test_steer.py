"""Steering against explicit references: the residual stream edited by hand, generation with and
without the key/value cache, and means computed prompt by prompt."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.errors import HookNameError, InputError
from mechscope.subspace import mean_difference, steer, steering_hooks
from tests.conftest import tiny_model


def test_steered_forward_equals_the_edited_residual_stream():
    model = tiny_model()
    tokens = torch.tensor([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3]])
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    with steer(model, "blocks.1.hook_resid_post", direction, 2.5):
        steered = model(tokens)
    resid = model(tokens, stop_at_layer=2)
    assert_close(steered, model(resid + 2.5 * direction, start_at_layer=2), atol=1e-5, rtol=1e-5)
    with steer(model, "blocks.1.hook_resid_post", direction, 2.5, positions=[1], normalize=True):
        one = model(tokens)
    resid[:, 1] += 2.5 * direction / direction.norm()
    assert_close(one, model(resid, start_at_layer=2), atol=1e-5, rtol=1e-5)


def test_steering_reaches_generation_with_and_without_the_cache():
    model = tiny_model()
    tokens = torch.tensor([[3, 1, 4, 1]])
    direction = model.W_U[:, 11].detach()
    plain = model.generate(tokens, max_new_tokens=4, do_sample=False)
    with steer(model, "blocks.2.hook_resid_post", direction, 30.0):
        cached = model.generate(tokens, max_new_tokens=4, do_sample=False)
        uncached = model.generate(tokens, max_new_tokens=4, do_sample=False, use_past_kv_cache=False)
        first = int(model(tokens)[0, -1].argmax())
    assert torch.equal(cached, uncached)
    assert int(cached[0, 4]) == first and not torch.equal(cached, plain)
    # The hooks are gone afterwards.
    assert torch.equal(model.generate(tokens, max_new_tokens=4, do_sample=False), plain)


def test_mean_difference_counts_each_prompt_at_its_last_token():
    model = tiny_model()
    name = "blocks.0.hook_resid_post"
    a, b, c = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]]), torch.tensor([[1, 2, 3]])
    padded = torch.tensor([[5, 6, 7], [0, 8, 9]])
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    got = mean_difference(model, padded, c, name, positive_mask=mask)
    last = [model.run_with_cache(t, names_filter=[name])[1][name][0, -1] for t in (a, b, c)]
    assert_close(got, (last[0] + last[1]) / 2 - last[2], atol=1e-5, rtol=1e-5)


def test_errors_name_the_fix():
    model = tiny_model()
    with pytest.raises(HookNameError, match="resid_post"):
        steering_hooks(model, "blocks.1.hook_resid_pots", torch.ones(32))
    with pytest.raises(InputError, match="one vector"):
        steering_hooks(model, "blocks.1.hook_resid_post", torch.ones(2, 32))
    with pytest.raises(InputError, match="last axis 48"), steer(model, "blocks.1.mlp.hook_post", torch.ones(32)):
        model(torch.tensor([[1, 2]]))
