"""Caching to disk: activations written as safetensors shards while the forward runs, read back lazily.

``run_with_cache``'s ``device`` keeps TransformerLens' meaning (the device cached tensors are moved
to), so the disk target is a function of its own, `run_with_disk_cache`, taking a directory. It
uses the same caching hooks (``names_filter``, ``pos_slice``, ``cache_dtype``, ``remove_batch_dim``)
and hands each activation to a `ShardWriter`, which keeps at most ``shard_bytes`` in memory before
writing a shard. `DiskCacheDict` reads tensors on demand from the memory-mapped shards, so the
returned `ActivationCache` holds only what is indexed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from mechscope.cache import ActivationCache
from mechscope.errors import InputError
from mechscope.hooks import NamesFilter, Slice, SliceInput

INDEX = "index.json"


class ShardWriter(dict):
    """A dict the caching hooks write into: each activation goes to CPU and, once ``shard_bytes``
    are held, the held ones are written to ``{path}/shard-{i:05d}.safetensors``."""

    def __init__(self, path: Path, shard_bytes: int) -> None:
        super().__init__()
        self.path, self.shard_bytes = path, shard_bytes
        self.index: dict[str, str] = {}
        self.held = 0
        self._storages: set[int] = set()

    def __setitem__(self, name: str, tensor: Tensor) -> None:
        if name in self.index:
            raise InputError(f"{name!r} was cached twice in one run; cache it once per disk cache")
        tensor = tensor.detach().to("cpu").contiguous()
        storage = tensor.untyped_storage().data_ptr()
        if storage in self._storages:  # the same activation under two names (resid_post is the next resid_pre)
            tensor = tensor.clone()
        self._storages.add(tensor.untyped_storage().data_ptr())
        super().__setitem__(name, tensor)
        self.held += tensor.numel() * tensor.element_size()
        if self.held >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the held activations as one shard and forget them."""
        if not len(self):
            return
        file = f"shard-{len(set(self.index.values())):05d}.safetensors"
        save_file(dict(self), self.path / file)
        self.index.update(dict.fromkeys(self, file))
        self.clear()
        self._storages.clear()
        self.held = 0


class DiskCacheDict(Mapping):
    """A read-only mapping from hook names to tensors in a directory of safetensors shards (memory-mapped).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> _, cache = run_with_disk_cache(model, tokens, path=folder, names_filter="blocks.0.hook_resid_pre")
        >>> list(DiskCacheDict(folder)), cache["resid_pre", 0].shape
        (['blocks.0.hook_resid_pre'], torch.Size([1, 4, 32]))
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        index_file = self.path / INDEX
        if not index_file.is_file():
            raise InputError(
                f"{self.path} holds no disk cache ({INDEX} is missing); write one with run_with_disk_cache"
            )
        self.index: dict[str, str] = json.loads(index_file.read_text())
        self._files: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Tensor:
        file = self.index[name]
        if file not in self._files:
            self._files[file] = safe_open(self.path / file, framework="pt")
        return self._files[file].get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)


def run_with_disk_cache(
    model: Any,
    *model_args: Any,
    path: str | os.PathLike,
    names_filter: NamesFilter = None,
    cache_dtype: torch.dtype | None = None,
    pos_slice: Slice | SliceInput = None,
    remove_batch_dim: bool = False,
    shard_bytes: int = 2**30,
    **model_kwargs: Any,
) -> tuple[Any, ActivationCache]:
    """``model.run_with_cache`` with the activations written to ``path`` (a new or empty directory)
    in safetensors shards of about ``shard_bytes``; returns ``(output, cache)`` reading them lazily.

    Example:
        >>> import tempfile
        >>> logits, cache = run_with_disk_cache(model, tokens, path=tempfile.mkdtemp(), cache_dtype=torch.bfloat16)
        >>> cache["blocks.1.attn.hook_z"].dtype, torch.equal(logits, model(tokens))
        (torch.bfloat16, True)
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise InputError(f"{path} must be a new or empty directory for a disk cache")
    if shard_bytes <= 0:
        raise InputError(f"shard_bytes must be positive, got {shard_bytes}")
    path.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(path, shard_bytes)
    _, fwd, _ = model.get_caching_hooks(
        names_filter, remove_batch_dim=remove_batch_dim, cache=writer, pos_slice=pos_slice, cache_dtype=cache_dtype
    )
    with model.hooks(fwd):
        out = model(*model_args, **model_kwargs)
    writer.flush()
    (path / INDEX).write_text(json.dumps(writer.index))
    return out, ActivationCache(DiskCacheDict(path), model, has_batch_dim=not remove_batch_dim)
