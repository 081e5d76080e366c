"""The conversion cache of `mechscope.load`: one directory per converted GGUF file.

An entry ``gguf-<sha256 of the source>-v<format>`` holds ``model.safetensors``,
``mechscope_config.json``, the ``tokenizer/`` folder and, written last, the manifest ``COMPLETE``:
the source file's name, size and SHA-256, and each file's SHA-256 with its stat fingerprint (size,
modification and change times, inode). A load checks every file against its fingerprint and
hashes only a file whose fingerprint changed, so an untouched entry costs a few ``stat`` calls.
Entries are written into a ``.tmp-<host>-<pid>-<random>`` directory and renamed into place;
temporary directories of writers that died are removed by the next load.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from mechscope.errors import LoadError
from mechscope.model.config import ModelConfig

CACHE_FORMAT_VERSION = 2


def cache_dir() -> Path:
    """Where converted weights are cached: ``$MECHSCOPE_CACHE`` or ``~/.cache/mechscope``.

    Example:
        >>> cache_dir().is_absolute()
        True
    """
    return Path(os.environ.get("MECHSCOPE_CACHE", Path.home() / ".cache" / "mechscope")).expanduser().absolute()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file, hex.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "x"; _ = f.write_bytes(b"abc")
        >>> file_sha256(f)[:16]
        'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


class CacheEntryError(LoadError):
    """A conversion-cache entry that cannot be used as it is (it is rebuilt)."""


# ---------------------------------------------------------------------- cache entries
def _umask() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc: read it the portable way
    os.umask(mask)
    return mask


def temporary_dir(parent: Path) -> Path:
    """A new ``.tmp-<host>-<pid>-<random>`` directory (mode from the umask) that names its writer."""
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = parent / f".tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def remove_stale_temporaries(root: Path, max_age_s: float = 24 * 3600) -> list[Path]:
    """Remove the ``.tmp-*`` directories of writers that died: on this host, those whose process
    has ended; any left untouched for ``max_age_s`` seconds. Returns what was removed.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> (root / f".tmp-{socket.gethostname()}-999999999-dead").mkdir()
        >>> [p.name[-4:] for p in remove_stale_temporaries(root)]
        ['dead']
    """
    removed = []
    host = socket.gethostname()
    try:
        candidates = [p for p in root.iterdir() if p.name.startswith(".tmp-")]
    except OSError:
        return removed
    for tmp in candidates:
        owner_host, _, rest = tmp.name[len(".tmp-") :].rpartition("-")[0].rpartition("-")
        try:
            pid = int(rest)
        except ValueError:
            pid = None
        try:
            age = time.time() - tmp.lstat().st_mtime
        except OSError:
            continue
        dead = pid is not None and owner_host == host and not _pid_alive(pid)
        if dead or age > max_age_s:
            if tmp.is_dir() and not tmp.is_symlink():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def discard_entry(entry: Path) -> None:
    """Remove a bad entry; a directory is first renamed aside, so no reader sees it half deleted."""
    if entry.is_dir() and not entry.is_symlink():
        trash = temporary_dir(entry.parent)
        try:
            os.replace(entry, trash / entry.name)
        except OSError:
            pass  # another process moved it first
        shutil.rmtree(trash, ignore_errors=True)
    else:
        try:
            entry.unlink()
        except FileNotFoundError:
            pass


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def write_cache_entry(
    entry: Path, cfg: ModelConfig, weights: dict[str, Tensor], hf_tokenizer: Any, source: dict
) -> None:
    """Write into a temporary directory beside ``entry``, then rename it into place.

    The manifest (``COMPLETE``, written last) records the source file's SHA-256, each file's
    SHA-256 and its stat fingerprint; files get the modes the umask allows (e.g. 0644/0755).
    """
    tmp = temporary_dir(entry.parent)
    try:
        unique = {k: v.contiguous() for k, v in weights.items() if not (cfg.tie_word_embeddings and k == "unembed.w_u")}
        save_file(unique, str(tmp / "model.safetensors"))
        (tmp / "mechscope_config.json").write_text(cfg.to_json())
        hf_tokenizer.save_pretrained(tmp / "tokenizer")
        mask = _umask()
        files = {}
        for file in sorted(tmp.rglob("*")):
            file.chmod((0o777 if file.is_dir() else 0o666) & ~mask)
        tmp.chmod(0o777 & ~mask)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            files[file.relative_to(tmp).as_posix()] = {"sha256": file_sha256(file), "stat": _fingerprint(file)}
        manifest = {"format": CACHE_FORMAT_VERSION, "source": source, "files": files}
        (tmp / "COMPLETE").write_text(json.dumps(manifest, indent=1))
        (tmp / "COMPLETE").chmod(0o666 & ~mask)
        os.replace(tmp, entry)
    except OSError as exc:
        if not entry.is_dir():  # else another process finished first
            warnings.warn(f"could not write the conversion cache {entry}: {exc}", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_cache_entry(entry: Path, source_sha256: str | None = None) -> None:
    """Check a conversion-cache entry: complete, built by this format from ``source_sha256``, and
    every file as written (size and timestamps as recorded, else the same SHA-256).

    Raises `CacheEntryError` naming what is wrong.

    Example:
        >>> verify_cache_entry(cache_dir() / "gguf-0-v2")
        Traceback (most recent call last):
        ...
        mechscope.loading.cache_entries.CacheEntryError: ...gguf-0-v2 is not a directory
    """
    if not entry.is_dir() or entry.is_symlink():
        raise CacheEntryError(f"{entry} is not a directory")
    try:
        manifest = json.loads((entry / "COMPLETE").read_text())
        files, fmt, source = manifest["files"], manifest["format"], manifest["source"]["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheEntryError(f"{entry} is incomplete (no readable manifest: {exc})") from None
    if fmt != CACHE_FORMAT_VERSION:
        raise CacheEntryError(f"{entry} has cache format {fmt}, not {CACHE_FORMAT_VERSION}")
    if source_sha256 is not None and source != source_sha256:
        raise CacheEntryError(f"{entry} was built from a source with SHA-256 {source}, not {source_sha256}")
    for required in ("model.safetensors", "mechscope_config.json"):
        if required not in files:
            raise CacheEntryError(f"{entry}: the manifest lists no {required}")
    for name, record in files.items():
        file = entry / name
        try:
            if _fingerprint(file) == record["stat"]:
                continue
            digest = file_sha256(file)
        except OSError as exc:
            raise CacheEntryError(f"{file} is unreadable ({exc})") from None
        if digest != record["sha256"]:
            raise CacheEntryError(f"{file} does not match its checksum (changed after it was written)")


def read_cache_entry(entry: Path, source_sha256: str | None = None) -> tuple[ModelConfig, dict[str, Tensor], Any]:
    """The config, weights and tokenizer of a verified conversion-cache entry (`verify_cache_entry`).

    Example:
        >>> read_cache_entry(cache_dir() / "gguf-0-v2")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mechscope.loading.cache_entries.CacheEntryError: ...gguf-0-v2 is not a directory
    """
    from transformers import AutoTokenizer

    verify_cache_entry(entry, source_sha256)
    cfg = ModelConfig.from_dict(json.loads((entry / "mechscope_config.json").read_text()))
    weights = load_file(entry / "model.safetensors")
    hf_tokenizer = AutoTokenizer.from_pretrained(entry / "tokenizer")
    return cfg, weights, hf_tokenizer
