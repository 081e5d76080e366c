"""The GGUF conversion cache: entries are checked against their manifest and rebuilt (with a
warning naming the entry) when damaged, stale, misfitting or not a directory; dead writers'
temporary directories are removed; files get the modes the umask allows."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mechscope as ms
from mechscope.loading import cache_entries, pretrained
from tests.conftest import tiny_model


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(60)} | {"[UNK]": 60}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="t0")


@pytest.fixture
def gguf(tmp_path, monkeypatch):
    """A stand-in GGUF file whose conversion yields a tiny rotary model; returns (path, conversions)."""
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"GGUF stand-in")
    source = tiny_model(seed=3, positional_embedding_type="rotary", normalization_type="RMS")
    tokenizer = tiny_tokenizer()
    conversions = []

    def convert(p):
        conversions.append(p)
        weights = {k: v.clone() for k, v in source.state_dict().items()}
        return ms.ModelConfig.from_dict(json.loads(source.cfg.to_json())), weights, tokenizer

    monkeypatch.setattr(pretrained, "_convert_gguf", convert)
    return path, conversions, source


def entry_of(tmp_path):
    (entry,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("gguf-")]
    return entry


def logits(model):
    return model(torch.tensor([[1, 2, 3, 4]]))


def test_second_load_reads_the_cache(gguf, tmp_path, monkeypatch):
    path, conversions, source = gguf
    older = tmp_path / "cache" / f"gguf-{cache_entries.file_sha256(path)[:32]}-v1"
    (older / "tokenizer").mkdir(parents=True)  # the same source in an older cache format: replaced
    first = ms.load(path, device="cpu")
    assert not older.exists()
    hashed = []
    real = cache_entries.file_sha256
    monkeypatch.setattr(cache_entries, "file_sha256", lambda f: hashed.append(f) or real(f))
    second = ms.load(path, device="cpu")
    assert len(conversions) == 1
    assert hashed == []  # untouched files are checked by their stat fingerprint, not rehashed
    torch.testing.assert_close(logits(second), logits(source), atol=0, rtol=0)
    torch.testing.assert_close(logits(first), logits(second), atol=0, rtol=0)
    manifest = json.loads((entry_of(tmp_path) / "COMPLETE").read_text())
    assert manifest["source"]["sha256"] == cache_entries.file_sha256(path)
    assert {"model.safetensors", "mechscope_config.json"} <= set(manifest["files"])


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_entries_honour_the_umask(gguf, tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        ms.load(gguf[0], device="cpu")
    finally:
        os.umask(previous)
    entry = entry_of(tmp_path)
    assert entry.stat().st_mode & 0o777 == dir_mode
    for item in entry.rglob("*"):
        assert item.stat().st_mode & 0o777 == (dir_mode if item.is_dir() else file_mode), item


def rebuilt_after(damage, gguf, tmp_path):
    path, conversions, source = gguf
    ms.load(path, device="cpu")
    entry = entry_of(tmp_path)
    damage(entry)
    with pytest.warns(UserWarning, match=rf"{entry.name} is unreadable or stale") as record:
        again = ms.load(path, device="cpu")
    assert len(conversions) == 2
    torch.testing.assert_close(logits(again), logits(source), atol=0, rtol=0)
    ms.load(path, device="cpu")  # the rebuilt entry is used as it is
    assert len(conversions) == 2 and entry.is_dir()
    return str(record[0].message)


def flip_a_weight_byte(entry):
    weights = entry / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor; the file still parses
    weights.write_bytes(bytes(data))


def test_a_flipped_weight_byte_is_detected(gguf, tmp_path):
    assert "model.safetensors does not match its checksum" in rebuilt_after(flip_a_weight_byte, gguf, tmp_path)


def test_a_changed_rope_base_is_detected(gguf, tmp_path):
    def change_base(entry):
        config = entry / "mechscope_config.json"
        data = json.loads(config.read_text())
        data["rotary_base"] = 500000.0
        config.write_text(json.dumps(data))

    assert "mechscope_config.json does not match its checksum" in rebuilt_after(change_base, gguf, tmp_path)


def test_an_entry_replaced_by_a_file_is_rebuilt(gguf, tmp_path):
    import shutil

    def replace_by_file(entry):
        shutil.rmtree(entry)
        entry.write_text("not a directory")

    assert "is not a directory" in rebuilt_after(replace_by_file, gguf, tmp_path)


def test_an_entry_whose_config_does_not_fit_is_rebuilt(gguf, tmp_path):
    def misfit(entry):
        config = ms.ModelConfig.from_dict(json.loads((entry / "mechscope_config.json").read_text()))
        config.d_mlp += 1
        weights = load_file(entry / "model.safetensors")
        manifest = json.loads((entry / "COMPLETE").read_text())
        cache_entries.discard_entry(entry)
        cache_entries.write_cache_entry(entry, config, weights, tiny_tokenizer(), manifest["source"])

    message = rebuilt_after(misfit, gguf, tmp_path)
    assert "size mismatch" in message or "do not fit" in message


def test_an_incomplete_entry_is_rebuilt(gguf, tmp_path):
    assert "incomplete" in rebuilt_after(lambda entry: (entry / "COMPLETE").unlink(), gguf, tmp_path)


def test_dead_writers_temporary_directories_are_removed(gguf, tmp_path):
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    exited.wait()
    root = tmp_path / "cache"
    root.mkdir()
    host = socket.gethostname()
    dead = root / f".tmp-{host}-{exited.pid}-0a1b2c3d"
    (dead / "tokenizer").mkdir(parents=True)
    (dead / "model.safetensors").write_bytes(b"\0" * 1000)
    live = root / f".tmp-{host}-{os.getpid()}-0a1b2c3d"
    live.mkdir()
    elsewhere = root / ".tmp-another-host-1-0a1b2c3d"  # another machine's writer: kept until it is a day old
    elsewhere.mkdir()
    ms.load(gguf[0], device="cpu")
    assert not dead.exists() and live.is_dir() and elsewhere.is_dir()
    old = 2 * 24 * 3600
    os.utime(elsewhere, (elsewhere.stat().st_atime - old, elsewhere.stat().st_mtime - old))
    assert cache_entries.remove_stale_temporaries(root) == [elsewhere]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-")) == [live.name]


def test_an_invalid_hf_config_is_a_load_error(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ms.LoadError, match=r"config\.json is not a valid Hugging Face model config"):
        ms.load(tmp_path, device="cpu")
    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))  # no model_type
    with pytest.raises(ms.LoadError, match=r"config\.json is not a valid Hugging Face model config"):
        ms.load(tmp_path, device="cpu")


def test_an_entry_with_a_version_1_config_loads_to_the_same_logits(gguf, tmp_path):
    """Entries written before ``config_version`` hold ``"rmsnorm"`` and ``attn_scale`` as the factor
    on the scores; they are read as the model they describe, without converting again."""
    path, conversions, source = gguf
    ms.load(path, device="cpu")
    entry = entry_of(tmp_path)
    legacy = {k: v for k, v in source.cfg.to_dict().items() if k != "config_version"}
    legacy.update(normalization_type="rmsnorm", attn_scale=0.3)  # a non-default scale: 1 / 0.3 as a divisor

    class VersionOne:
        tie_word_embeddings = source.cfg.tie_word_embeddings

        def to_json(self):
            return json.dumps(legacy)

    weights = load_file(entry / "model.safetensors")
    manifest = json.loads((entry / "COMPLETE").read_text())
    cache_entries.discard_entry(entry)
    cache_entries.write_cache_entry(entry, VersionOne(), weights, tiny_tokenizer(), manifest["source"])
    loaded = ms.load(path, device="cpu")
    assert len(conversions) == 1 and loaded.cfg.normalization_type == "RMS"
    assert loaded.cfg.attn_scale == pytest.approx(1 / 0.3) and loaded.cfg.attn_score_factor == pytest.approx(0.3)
    expected = ms.HookedTransformer(ms.ModelConfig.from_dict({**source.cfg.to_dict(), "attn_scale": 1 / 0.3}))
    expected.load_state_dict(source.state_dict())
    torch.testing.assert_close(logits(loaded), logits(expected.eval()), atol=1e-6, rtol=1e-6)
