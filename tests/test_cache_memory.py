"""Memory-planned caching: lower precision, chosen positions, and the size estimate before running."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from mechscope.cache_disk import DiskCacheDict, run_with_disk_cache
from mechscope.cache_plan import cache_size, check_cache_fits
from mechscope.errors import InputError
from mechscope.hooks import position_axis
from tests.conftest import tiny_model


def nbytes(cache) -> int:
    return sum(t.numel() * t.element_size() for t in cache.values())


@pytest.fixture
def setup():
    model = tiny_model()
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0))
    return model, tokens


def test_cache_dtype_and_positions_store_what_was_asked(setup):
    model, tokens = setup
    _, full = model.run_with_cache(tokens)
    _, low = model.run_with_cache(tokens, cache_dtype=torch.bfloat16)
    assert set(low) == set(full)
    for name in full:
        assert low[name].dtype == torch.bfloat16
        assert_close(low[name], full[name].to(torch.bfloat16), atol=0, rtol=0)
    assert nbytes(low) * 2 == nbytes(full)
    for positions in ([-1], [0, 4, 8], slice(2, 6)):
        _, part = model.run_with_cache(tokens, pos_slice=positions)
        for name, value in full.items():
            axis = -3 if name.endswith(("hook_q", "hook_k", "hook_v", "hook_z")) else -2
            index = [slice(None)] * value.dim()
            index[axis] = positions
            expected = value[tuple(index)]
            assert_close(part[name], expected, atol=0, rtol=0)
            assert part[name].untyped_storage().nbytes() == expected.numel() * expected.element_size()


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"cache_dtype": torch.bfloat16},
        {"pos_slice": [-1]},
        {"pos_slice": slice(1, 4), "cache_dtype": torch.float16},
    ],
)
def test_cache_size_equals_the_cache(setup, options):
    model, tokens = setup
    for names in (None, lambda n: n.endswith(("hook_pattern", "hook_z", "hook_resid_post"))):
        _, cache = model.run_with_cache(tokens, names_filter=names, **options)
        assert cache_size(model, tokens, names, **options) == nbytes(cache)


def test_check_cache_fits_names_the_options(setup):
    model, tokens = setup
    full = cache_size(model, tokens)
    assert check_cache_fits(model, tokens, free_bytes=full) == full
    small = cache_size(model, tokens, cache_dtype=torch.bfloat16)
    assert model.cache_size(tokens, cache_dtype=torch.bfloat16) == small
    with pytest.raises(InputError, match=r"cache_dtype=torch.bfloat16 \(.*pos_slice=\[-1\]"):
        check_cache_fits(model, tokens, free_bytes=small)
    with pytest.raises(InputError, match="none: narrow names_filter"):
        check_cache_fits(model, tokens, free_bytes=1)


def test_disk_cache_equals_the_memory_cache(setup, tmp_path):
    model, tokens = setup
    logits, cache = model.run_with_cache(tokens, pos_slice=[0, -1], cache_dtype=torch.bfloat16)
    out, disk = run_with_disk_cache(
        model, tokens, path=tmp_path / "c", pos_slice=[0, -1], cache_dtype=torch.bfloat16, shard_bytes=2000
    )
    assert_close(out, logits, atol=0, rtol=0)
    assert list(disk) == list(cache)
    assert len({p.name for p in (tmp_path / "c").glob("shard-*.safetensors")}) > 1
    for name in cache:
        assert_close(disk[name], cache[name], atol=0, rtol=0)
    reopened = DiskCacheDict(tmp_path / "c")
    assert_close(reopened["blocks.2.hook_resid_post"], cache["blocks.2.hook_resid_post"], atol=0, rtol=0)
    resid = disk.accumulated_resid()
    assert_close(resid, cache.accumulated_resid(), atol=0, rtol=0)
    with pytest.raises(InputError, match="new or empty directory"):
        run_with_disk_cache(model, tokens, path=tmp_path / "c")
    with pytest.raises(InputError, match="index.json"):
        DiskCacheDict(tmp_path)


def test_run_with_cache_refuses_before_running(setup, monkeypatch):
    import mechscope.cache_plan as plan

    model, tokens = setup
    full = cache_size(model, tokens)
    monkeypatch.setattr(plan, "free_memory", lambda device: full - 1)
    ran = []
    handle = model.blocks[0].register_forward_hook(lambda module, args, out: ran.append(out.shape[0]))
    with pytest.raises(InputError, match=r"would need .* options that fit: cache_dtype=torch.bfloat16"):
        model.run_with_cache(tokens, check_fits=True)
    assert set(ran) == {1}  # only the one-row forwards measuring shapes ran, not the batch of 2
    _, cache = model.run_with_cache(tokens, check_fits=True, cache_dtype=torch.bfloat16)
    assert nbytes(cache) == full // 2
    with pytest.raises(InputError, match="would need"):  # gradients double the cache
        plan.check_before_caching(model, (tokens,), {"incl_bwd": True, "cache_dtype": torch.bfloat16}, True)
    ran.clear()
    plan.check_before_caching(model, (torch.zeros(2, 9, 32),), {}, True)  # float input: not measured
    model.run_with_cache(tokens, check_fits=False)  # off: no measuring forwards
    model.run_with_cache(tokens)  # the default checks only caches bound for a CUDA device
    handle.remove()
    assert ran == [2, 2]


def test_offloading_to_the_cpu_keeps_every_value(setup):
    model, tokens = setup
    _, full = model.run_with_cache(tokens)
    _, moved = model.run_with_cache(tokens, device="cpu", cache_dtype=torch.bfloat16, pos_slice=[0, -1])
    assert set(moved) == set(full)
    for name, value in moved.items():
        assert value.device.type == "cpu"
        axis = position_axis(name)
        assert_close(value, full[name].index_select(axis, torch.tensor([0, 8])).to(torch.bfloat16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned asynchronous offload needs a CUDA device")
def test_offloading_from_cuda_is_pinned_and_complete():
    model = tiny_model().to("cuda")
    tokens = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(0)).cuda()
    _, on_gpu = model.run_with_cache(tokens)
    _, moved = model.run_with_cache(tokens, device="cpu")
    for name, value in moved.items():
        assert value.device.type == "cpu" and value.is_pinned()
        assert_close(value, on_gpu[name].cpu(), rtol=0, atol=0)


def test_disk_cache_of_every_hook_at_full_precision(setup, tmp_path):
    # the default options keep activations that are one tensor under two names (resid_post, next resid_pre)
    model, tokens = setup
    _, cache = model.run_with_cache(tokens)
    _, disk = run_with_disk_cache(model, tokens, path=tmp_path / "c")
    assert list(disk) == list(cache)
    for name in cache:
        assert_close(disk[name], cache[name], atol=0, rtol=0)
