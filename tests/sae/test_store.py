"""ActivationStore: every token exactly once, exact resume, BOS handling, rank shards, disk shards."""

from __future__ import annotations

import pytest
import torch

from mechscope.errors import ConfigError, HookNameError, InputError
from mechscope.sae.store import ActivationStore

from ..conftest import tiny_model

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 61, (1000,), generator=torch.Generator().manual_seed(0))


def _rows_sorted(x):
    x = x.reshape(x.shape[0], -1)
    return x[torch.argsort(x[:, 0])]


def _naive(model, tokens, context, n_tokens, hook, skip=0, bos=None, seq_ids=None):
    body = context - (1 if bos is not None else 0)
    seq_ids = list(range(len(tokens) // body)) if seq_ids is None else seq_ids
    rows = []
    for i in seq_ids:
        seq = tokens[i * body : (i + 1) * body]
        if bos is not None:
            seq = torch.cat([torch.tensor([bos]), seq])
        _, cache = model.run_with_cache(seq[None], names_filter=hook)
        rows.append(cache[hook][0, skip:])
        if sum(r.shape[0] for r in rows) >= n_tokens:
            break
    return torch.cat(rows)[:n_tokens]


def test_each_token_served_once_and_hooks_aligned(model, tokens):
    store = ActivationStore(model, HOOKS, tokens, context_size=12, batch_size=20, buffer_batches=3, model_batch_size=5)
    batches = [store.next_batch() for _ in range(6)]  # two full buffers: the first 120 tokens, shuffled
    served = {h: torch.cat([b[h] for b in batches]) for h in HOOKS}
    assert served["blocks.1.attn.hook_z"].shape == (120, 4, 8)
    torch.testing.assert_close(served["blocks.0.hook_resid_post"], served["blocks.1.hook_resid_pre"])
    for hook in ("blocks.0.hook_resid_post", "blocks.1.attn.hook_z"):
        expected = _naive(model, tokens, 12, 120, hook)
        torch.testing.assert_close(_rows_sorted(served[hook]), _rows_sorted(expected))
    assert store.tokens_served == 120


def test_resume_continues_with_the_next_token(model, tokens):
    def make():
        return ActivationStore(model, HOOKS[:1], tokens, context_size=12, batch_size=16, buffer_batches=4, seed=5)

    straight = make()
    expected = [straight.next_batch()[HOOKS[0]] for _ in range(9)]
    first = make()
    for _ in range(6):
        first.next_batch()
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for want in expected[6:]:
        torch.testing.assert_close(resumed.next_batch()[HOOKS[0]], want, rtol=0, atol=0)
    other = ActivationStore(model, HOOKS[:1], tokens, context_size=10, batch_size=16, buffer_batches=4, seed=5)
    with pytest.raises(ConfigError, match="other settings"):
        other.load_state_dict(state)


def test_bos_prepended_and_excluded(model, tokens):
    model.tokenizer = type("Tok", (), {"bos_token_id": 60})()
    try:
        store = ActivationStore(
            model, HOOKS[:1], tokens, context_size=9, batch_size=16, buffer_batches=2, prepend_bos=True
        )
        assert store.sequences(torch.tensor([0, 1]))[:, 0].tolist() == [60, 60]
        assert store.sequences(torch.tensor([1]))[0, 1:].tolist() == tokens[8:16].tolist()
        served = torch.cat([store.next_batch()[HOOKS[0]] for _ in range(2)])
        expected = _naive(model, tokens, 9, 32, HOOKS[0], skip=1, bos=60)
        torch.testing.assert_close(_rows_sorted(served), _rows_sorted(expected))
        kept = ActivationStore(
            model,
            HOOKS[:1],
            tokens,
            context_size=9,
            batch_size=18,
            buffer_batches=1,
            prepend_bos=True,
            exclude_bos=False,
        )
        expected = _naive(model, tokens, 9, 18, HOOKS[0], skip=0, bos=60)
        torch.testing.assert_close(_rows_sorted(kept.next_batch()[HOOKS[0]]), _rows_sorted(expected))
    finally:
        model.tokenizer = None


def test_rank_shards_partition_the_sequences(model, tokens):
    shards = [
        ActivationStore(
            model, HOOKS[:1], tokens, context_size=10, batch_size=10, buffer_batches=1, rank=r, world_size=2
        )
        for r in range(2)
    ]
    ids = [s.sequence_ids.tolist() for s in shards]
    assert sorted(ids[0] + ids[1]) == list(range(100)) and not set(ids[0]) & set(ids[1])
    got = shards[1].next_batch()[HOOKS[0]]
    expected = _naive(model, tokens, 10, 10, HOOKS[0], seq_ids=[1])
    torch.testing.assert_close(_rows_sorted(got), _rows_sorted(expected))


def test_disk_shards_are_reused(model, tokens, tmp_path, monkeypatch):
    def make(**kw):
        return ActivationStore(
            model, HOOKS[:2], tokens, context_size=12, batch_size=16, buffer_batches=2, cache_dir=tmp_path, **kw
        )

    first = [make().next_batch() for _ in range(1)][0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest-rank0.json", "rank0-buffer000000.safetensors"]
    monkeypatch.setattr(ActivationStore, "_compute_buffer", lambda self, i: pytest.fail("recomputed a cached buffer"))
    again = make().next_batch()
    for hook in HOOKS[:2]:
        torch.testing.assert_close(again[hook], first[hook], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="other settings"):
        ActivationStore(model, HOOKS[:1], tokens, context_size=12, batch_size=16, buffer_batches=2, cache_dir=tmp_path)


def test_exhausted_stream_and_bad_hook(model, tokens):
    store = ActivationStore(model, HOOKS[:1], tokens[:100], context_size=10, batch_size=40, buffer_batches=3)
    with pytest.raises(InputError, match="exhausted"):
        store.next_batch()
    with pytest.raises(HookNameError, match="blocks.0.hook_resid_post"):
        ActivationStore(model, ["blocks.0.hook_resid_pots"], tokens)
