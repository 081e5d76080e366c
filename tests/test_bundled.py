"""The bundled SmolLM2: equal to transformers' own GGUF load; conversion cache; tokenisation helpers."""

from __future__ import annotations

import time

import pytest
import torch

import mechscope as ms
from mechscope.loading import pretrained

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The capital of France is",
    "def fibonacci(n):\n    return",
]


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("mechscope-cache")


@pytest.fixture(scope="module")
def model(cache_root):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MECHSCOPE_CACHE", str(cache_root))
        return ms.load("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = pretrained.bundled_path("smollm2-135m")
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers_gguf_load(model, hf_model, prompt):
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        actual = model(tokens)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(actual, expected, atol=1e-3, rtol=1e-4)
    assert len(cache) == model.cfg.n_layers


@pytest.mark.slow
def test_batched_prompts_match(model, hf_model):
    tokens = model.to_tokens(PROMPTS, padding_side="left")
    mask = tokens != model.tokenizer.pad_token_id
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
    for i, prompt in enumerate(PROMPTS):
        alone = model.to_tokens(prompt)
        with torch.no_grad():
            expected = hf_model(alone).logits[0, -1]
        torch.testing.assert_close(ours[i, -1], expected, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_second_load_reads_the_cache(model, cache_root, monkeypatch):
    entries = [p for p in cache_root.iterdir() if p.name.startswith("gguf-")]
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    assert not any(p.name.startswith(".tmp") for p in cache_root.iterdir())
    monkeypatch.setenv("MECHSCOPE_CACHE", str(cache_root))

    def no_conversion(path):
        raise AssertionError("the cached conversion was not used")

    monkeypatch.setattr(pretrained, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    again = ms.load("smollm2-135m", device="cpu")
    elapsed = time.perf_counter() - start
    tokens = model.to_tokens(PROMPTS[0])
    torch.testing.assert_close(again(tokens), model(tokens))
    assert again.cfg == model.cfg
    print(f"cached load took {elapsed:.2f}s")


@pytest.mark.slow
def test_corrupt_cache_is_rebuilt(model, cache_root, monkeypatch, tmp_path):
    import shutil

    entry = next(p for p in cache_root.iterdir() if p.name.startswith("gguf-"))
    copy_root = tmp_path / "cache"
    shutil.copytree(entry, copy_root / entry.name)
    (copy_root / entry.name / "model.safetensors").write_bytes(b"not a safetensors file")
    monkeypatch.setenv("MECHSCOPE_CACHE", str(copy_root))
    rebuilt = []
    real = pretrained._convert_gguf
    monkeypatch.setattr(pretrained, "_convert_gguf", lambda path: rebuilt.append(path) or real(path))
    with pytest.warns(UserWarning, match="unreadable"):
        again = ms.load("smollm2-135m", device="cpu")
    assert rebuilt
    tokens = model.to_tokens(PROMPTS[1])
    torch.testing.assert_close(again(tokens), model(tokens))


@pytest.mark.slow
def test_tokenisation_helpers(model):
    # SmolLM2 was trained without a BOS token, and its tokenizer adds none.
    assert model.cfg.default_prepend_bos is False
    tokens = model.to_tokens("Hello world")
    assert model.to_str_tokens("Hello world") == ["Hello", " world"]
    assert model.to_string(tokens[0]) == "Hello world"
    with_bos = model.to_tokens("Hello world", prepend_bos=True)
    assert with_bos[0, 0].item() == model.tokenizer.bos_token_id
    torch.testing.assert_close(with_bos[:, 1:], tokens)
    assert model.to_str_tokens(with_bos)[1:] == ["Hello", " world"]
    assert model.to_single_token(" Mary") == model.to_tokens(" Mary")[0, 0].item()
    with pytest.raises(ms.InputError, match="not one"):
        model.to_single_token(" Mary and John")
    batch = model.to_tokens(["a b c d", "a"], padding_side="left")
    assert batch.shape[0] == 2 and batch[1, 0].item() == model.tokenizer.pad_token_id
    assert model.to_str_tokens(["Hi", "Hello world"]) == [["Hi"], ["Hello", " world"]]
    logits = model(["The cat", "A much longer prompt here"])  # strings build their own mask
    assert logits.shape[0] == 2


@pytest.mark.slow
def test_run_with_cache_of_every_hook(model):
    tokens = model.to_tokens(PROMPTS[0])
    logits, cache = model.run_with_cache(tokens)
    n = model.cfg.n_layers
    # Per block (20): resid_pre/mid/post, attn_out, mlp_out, 2 norms x 2, q, k, v, rot_q, rot_k,
    # scores, pattern, z, pre, pre_linear, post; plus hook_embed, the final norm's 2 and the
    # unembedding's hook_in and hook_out.
    assert len(cache) == n * 20 + 5
    torch.testing.assert_close(logits, model(tokens), atol=1e-4, rtol=1e-4)
