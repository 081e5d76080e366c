"""The engine's seams: sweep options, the logit positions a metric declares, the hook context."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

import mechscope as ms
from mechscope.names import SITES
from mechscope.patching import (
    KLDivergence,
    LogitDiff,
    Normalized,
    ProbDiff,
    SweepOptions,
    ablate,
    activation_patch,
    base_run,
    path_patch,
    run_patches,
)
from mechscope.patching.engine import patch_grid, schedule
from mechscope.patching.metrics import metric_positions
from tests.conftest import tiny_model
from tests.patching.oracle import naive_patch_grid
from tests.patching.test_activation import _pair, gqa_model


class Recording:
    """Wraps a metric and records the shape of every logits tensor it is called on."""

    def __init__(self, metric):
        self.metric, self.shapes = metric, []

    def read_positions(self, seq):
        declared = metric_positions(self.metric, seq)
        if declared is None:
            return None
        keep, inner = declared
        return keep, Recording(inner).sharing(self)

    def sharing(self, other):
        self.shapes = other.shapes
        return self

    def __call__(self, logits):
        self.shapes.append(tuple(logits.shape))
        return self.metric(logits)


def _metrics(model, clean, corrupted):
    answers = torch.tensor([[3, 5], [7, 11]])
    with torch.no_grad():
        clean_logits, corrupted_logits = model(clean), model(corrupted)
    diff = LogitDiff(answers[:, 0], answers[:, 1])
    return {
        "logit_diff": diff,
        "per_prompt_pos": LogitDiff(answers[:, 0], answers[:, 1], pos=torch.tensor([2, -1])),
        "prob_diff": ProbDiff(answers[:, 0], answers[:, 1], pos=1),
        "kl": KLDivergence(clean_logits),
        "normalized": Normalized(diff, clean_logits, corrupted_logits),
    }


@pytest.mark.parametrize("name", ["logit_diff", "per_prompt_pos", "prob_diff", "kl", "normalized"])
@pytest.mark.parametrize("site,by", [("resid_pre", None), ("z", ("pos", "head")), ("z", "head")])
def test_default_unembeds_only_the_metric_positions(name, site, by):
    model = gqa_model()
    clean, corrupted, _ = _pair(model, seq=5)
    metric = _metrics(model, clean, corrupted)[name]
    recorded = Recording(metric)
    fast = activation_patch(model, clean, corrupted, recorded, site, by, per_prompt=True)
    full = activation_patch(model, clean, corrupted, metric, site, by, per_prompt=True, logit_positions=None)
    assert_close(fast, full, atol=1e-5, rtol=1e-5)
    n_read = {"per_prompt_pos": 2}.get(name, 1)
    assert recorded.shapes and all(shape[1] == n_read for shape in recorded.shapes)


def test_plain_callables_see_every_position():
    model = gqa_model()
    clean, corrupted, _ = _pair(model, seq=5)
    recorded = Recording(lambda logits: logits[:, -1, 3])
    activation_patch(model, clean, corrupted, recorded, "z")
    assert recorded.shapes and all(shape[1] == 5 for shape in recorded.shapes)


def test_path_patch_reads_only_the_metric_positions():
    model = gqa_model()
    clean, corrupted, metric = _pair(model, seq=5)
    recorded = Recording(metric)
    for receivers, which in (("logits", "q"), ([(1, 0), (1, 3)], "q"), ([(1, 1)], "k")):
        fast = path_patch(model, clean, corrupted, recorded, receivers=receivers, receiver_input=which)
        full = path_patch(model, clean, corrupted, metric, receivers=receivers, receiver_input=which,
                          logit_positions=None)  # fmt: skip
        assert_close(fast, full, atol=1e-5, rtol=1e-5)
    assert all(shape[1] == 1 for shape in recorded.shapes)


def test_sweep_options_object_and_keywords_agree():
    model = gqa_model()
    clean, corrupted, metric = _pair(model)
    options = SweepOptions(per_prompt=True, batch_size=3, reuse_prefix=False)
    by_object = activation_patch(model, clean, corrupted, metric, "resid_pre", options=options)
    by_keywords = activation_patch(model, clean, corrupted, metric, "resid_pre", per_prompt=True, batch_size=3,
                                   reuse_prefix=False)  # fmt: skip
    assert by_object.shape == (2, 4, 2)
    assert_close(by_object, by_keywords, atol=0, rtol=0)
    # A keyword overrides the object's field.
    mean = activation_patch(model, clean, corrupted, metric, "resid_pre", options=options, per_prompt=False)
    assert_close(mean, by_object.mean(-1), atol=1e-6, rtol=0)


def test_bad_sweep_options_name_the_fix():
    model = gqa_model()
    clean, corrupted, metric = _pair(model)
    with pytest.raises(ms.InputError, match=r"unknown sweep option 'per_promt'; closest: \['per_prompt'\]"):
        activation_patch(model, clean, corrupted, metric, per_promt=True)
    with pytest.raises(ms.InputError, match="unknown sweep option"):
        ablate(model, clean, metric, "z", batchsize=2)
    with pytest.raises(ms.InputError, match="options must be a SweepOptions"):
        activation_patch(model, clean, corrupted, metric, options={"per_prompt": True})
    with pytest.raises(ms.InputError, match="logit_positions"):
        activation_patch(model, clean, corrupted, metric, logit_positions=[9])
    with pytest.raises(ms.InputError, match="outside a run of 4 positions"):
        activation_patch(model, clean, corrupted, LogitDiff([1, 2], [3, 4], pos=7))


def test_hook_context_runs_every_forward_under_it():
    """A hook context that scales the residual stream after block 0: the engine's patched runs
    equal naive full forwards under the same hooks, base run included."""
    model = tiny_model(n_layers=3, d_mlp=8)
    clean, corrupted, metric = _pair(model)

    def scale(resid, *, hook):
        return resid * 0.5

    extra = [("blocks.0.hook_resid_post", scale)]

    def context(fwd_hooks):
        return model.hooks(fwd_hooks=list(fwd_hooks) + extra)

    names = [f"blocks.{layer}.hook_resid_pre" for layer in range(3)]
    base, cache = base_run(model, corrupted, names=names, hook_context=context)
    with torch.no_grad(), model.hooks(fwd_hooks=extra):
        expected_logits = model(corrupted)
        _, source_cache = model.run_with_cache(clean, names_filter=names)
    assert_close(base.logits, expected_logits, atol=0, rtol=0)
    sources = {layer: source_cache["resid_pre", layer] for layer in range(3)}
    out = run_patches(
        model, {layer: cache["resid_pre", layer] for layer in range(3)}, sources, SITES["resid_pre"], ("pos",),
        patch_grid((4,), [0, 1, 2]), metric, base=base, hook_context=context,
    ).mean(-1).view(3, 4)  # fmt: skip
    with model.hooks(fwd_hooks=extra):
        naive = naive_patch_grid(model, corrupted, sources, metric, "resid_pre", None)
    assert_close(out, naive, atol=1e-5, rtol=1e-5)
    # The default context is the model's own hooks: without the scaling the values differ.
    plain = run_patches(
        model, {layer: cache["resid_pre", layer] for layer in range(3)}, sources, SITES["resid_pre"], ("pos",),
        patch_grid((4,), [0, 1, 2]), metric, base=base,
    ).mean(-1).view(3, 4)  # fmt: skip
    assert (plain - naive).abs().max() > 1e-4


def test_schedule_puts_equal_start_layers_together():
    layers = torch.tensor([2, 0, 1, 0, 2])
    order, chunks = schedule(layers, torch.zeros(5, dtype=torch.long), per_chunk=2, n_prompts=1, seq=4, n_layers=3)
    assert [layers[order[c]].tolist() for c in chunks] == [[0, 0], [1, 2], [2]]
