"""`ActivationStore`: activations from one or several hooks over a token stream, shuffled in buffers.

The token stream is cut into sequences of ``context_size`` (a BOS token first when
``prepend_bos``; its position is dropped from the activations when ``exclude_bos``). The kept
positions of a rank's sequences form one activation stream; buffer ``f`` holds exactly stream
tokens ``[f * N, (f + 1) * N)`` with ``N = batch_size * buffer_batches``, is shuffled with a seed
derived from ``(seed, rank, f)``, and is served as ``buffer_batches`` batches. The state is the
number of batches served, so a resume continues with the very next token: none is skipped or
served twice. Under ``torch.distributed`` rank ``r`` of ``W`` takes sequences ``r, r + W, ...``.

With ``cache_dir`` each buffer's activations (before shuffling) are written as a safetensors
shard and reused by later runs with the same settings (a manifest guards against mixing).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from jaxtyping import Int
from torch import Tensor

from mechscope.errors import ConfigError, InputError, LoadError
from mechscope.names import layer_of
from mechscope.sae import distributed as ddp


def _stop_layer(model, hook_names: Sequence[str]) -> int | None:
    """The first block that no requested hook needs (``None``: run the whole model)."""
    layers = [layer_of(name) for name in hook_names]
    if None in layers:
        return None
    stop = max(layers) + 1
    return None if stop >= model.cfg.n_layers else stop


class ActivationStore:
    """Shuffled training batches ``{hook_name: [batch_size, ...]}`` harvested from ``model``.

    Args:
        model: a `HookedTransformer`.
        hook_names: one or more hook names, all harvested in the same forward passes.
        tokens: the token stream ``[n_tokens]`` (see `mechscope.data.corpus.cached_token_stream`).
        context_size: tokens per sequence, BOS included.
        batch_size: activation vectors per training batch.
        buffer_batches: batches per shuffling buffer.
        model_batch_size: sequences per model forward.
        prepend_bos: put the BOS token first in every sequence (default: the model's convention,
            and no BOS for a model without a tokenizer).
        exclude_bos: drop the BOS position from the activations.
        seed, cache_dir, device, dtype: shuffling seed, shard folder, where/how batches are returned.
        rank, world_size: this process's shard of the sequences (default: from ``torch.distributed``).

    Example:
        >>> store = ActivationStore(model, ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"],
        ...                         torch.randint(0, 50, (400,)), context_size=8, batch_size=16, buffer_batches=2)
        >>> batch = store.next_batch()
        >>> batch["blocks.0.hook_resid_post"].shape, store.tokens_served
        (torch.Size([16, 32]), 16)
    """

    def __init__(
        self,
        model,
        hook_names: str | Sequence[str],
        tokens: Int[Tensor, "..."],
        *,
        context_size: int = 128,
        batch_size: int = 4096,
        buffer_batches: int = 16,
        model_batch_size: int = 8,
        prepend_bos: bool | None = None,
        exclude_bos: bool = True,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.model = model
        self.hook_names = [hook_names] if isinstance(hook_names, str) else list(hook_names)
        model.hook_names(self.hook_names)  # validates, naming the nearest valid hook
        tokens = torch.as_tensor(tokens).reshape(-1).long()
        tok = getattr(model, "tokenizer", None)
        self.bos = getattr(tok, "bos_token_id", None) if tok is not None else None
        if prepend_bos is None:  # the model's convention; no BOS for a model without a tokenizer
            prepend_bos = bool(model.cfg.default_prepend_bos) and self.bos is not None
        if prepend_bos and self.bos is None:
            raise ConfigError("prepend_bos=True needs a tokenizer with a BOS token; pass prepend_bos=False")
        self.prepend_bos = prepend_bos
        self.context_size = context_size
        self.body = context_size - (1 if self.prepend_bos else 0)
        if self.body <= 0:
            raise ConfigError(f"context_size={context_size} leaves no room for text after BOS")
        self.kept = context_size - (1 if self.prepend_bos and exclude_bos else 0)
        self.skip = context_size - self.kept
        self.exclude_bos = exclude_bos
        self.rank, self.world_size = ddp.rank_and_world()
        if rank is not None or world_size is not None:
            self.rank, self.world_size = rank or 0, world_size or 1
            if not 0 <= self.rank < self.world_size:
                raise ConfigError(f"rank={self.rank} must lie in [0, world_size={self.world_size})")
        n_sequences = tokens.numel() // self.body
        self.sequence_ids = torch.arange(self.rank, n_sequences, self.world_size)
        self.tokens = tokens
        self.batch_size = batch_size
        self.buffer_batches = buffer_batches
        self.buffer_tokens = batch_size * buffer_batches
        self.model_batch_size = model_batch_size
        self.seed = seed
        self.device = torch.device(device) if device is not None else model.device
        self.dtype = dtype
        self.stop_at_layer = _stop_layer(model, self.hook_names)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.batches_served = 0
        self._buffer_index: int | None = None
        self._buffer: dict[str, Tensor] = {}
        self._order: Tensor | None = None
        if self.cache_dir is not None:
            self._check_manifest()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def tokens_served(self) -> int:
        """Activation vectors (token positions) handed out so far on this rank."""
        return self.batches_served * self.batch_size

    @property
    def total_buffers(self) -> int:
        """Full buffers available on this rank."""
        return self.sequence_ids.numel() * self.kept // self.buffer_tokens

    def state_dict(self) -> dict:
        """The resume state: the number of batches served and the store's `fingerprint`."""
        return {"batches_served": self.batches_served, "fingerprint": self.fingerprint()}

    def load_state_dict(self, state: dict) -> None:
        """Resume from a `state_dict`: the next batch is the one after the last batch served.

        Raises:
            ConfigError: the state was saved by a store with other settings (its fingerprint differs).
        """
        if state.get("fingerprint") != self.fingerprint():
            raise ConfigError(
                "the saved activation-store state belongs to other settings (hooks, tokens, sizes or ranks)"
            )
        self.batches_served = int(state["batches_served"])

    def fingerprint(self) -> str:
        """A hash of everything that decides the activations and their order."""
        info = {
            "model": self.model.cfg.model_name, "hooks": self.hook_names, "context_size": self.context_size,
            "prepend_bos": self.prepend_bos, "exclude_bos": self.exclude_bos, "buffer_tokens": self.buffer_tokens,
            "batch_size": self.batch_size, "world_size": self.world_size, "rank": self.rank,
            "tokens": hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest(),
        }  # fmt: skip
        return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:32]

    def _check_manifest(self) -> None:
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.cache_dir / f"manifest-rank{self.rank}.json"
        fingerprint = self.fingerprint()
        if manifest.is_file():
            saved = json.loads(manifest.read_text()).get("fingerprint")
            if saved != fingerprint:
                raise ConfigError(f"{self.cache_dir} holds activations for other settings; use another cache_dir")
        else:
            tmp = manifest.with_name(manifest.name + f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "hooks": self.hook_names}))
            os.replace(tmp, manifest)

    # ------------------------------------------------------------------ harvesting
    def sequences(self, ids: Int[Tensor, " batch"]) -> Int[Tensor, "batch pos"]:
        """Token ids ``[len(ids), context_size]`` of the given sequence numbers."""
        offsets = ids[:, None] * self.body + torch.arange(self.body)
        seqs = self.tokens[offsets]
        if self.prepend_bos:
            seqs = torch.cat([torch.full((len(ids), 1), self.bos, dtype=torch.long), seqs], dim=1)
        return seqs

    @torch.no_grad()
    def harvest(self, tokens: Int[Tensor, "batch pos"]) -> dict[str, Tensor]:
        """Activations of every hook for ``tokens [batch, pos]``: ``{hook: [batch * kept_pos, ...]}``."""
        store: dict[str, Tensor] = {}

        def save(act: Tensor, *, hook) -> None:
            # [batch, pos, ...] -> [batch * kept_pos, ...]
            store[hook.name] = act[:, self.skip :].reshape(-1, *act.shape[2:]).to(self.dtype)

        with self.model.hooks(fwd_hooks=[(name, save) for name in self.hook_names]):
            self.model(tokens.to(self.model.device), stop_at_layer=self.stop_at_layer)
        missing = [n for n in self.hook_names if n not in store]
        if missing:
            raise InputError(f"hooks {missing} did not run in the forward pass")
        return store

    def _compute_buffer(self, index: int) -> dict[str, Tensor]:
        start, end = index * self.buffer_tokens, (index + 1) * self.buffer_tokens
        first_seq, last_seq = start // self.kept, (end - 1) // self.kept
        if last_seq >= self.sequence_ids.numel():
            available = self.sequence_ids.numel() * self.kept
            raise InputError(
                f"the token stream is exhausted: buffer {index} needs activation tokens up to {end}, "
                f"this rank has {available}; use fewer steps or more text"
            )
        parts: dict[str, list[Tensor]] = {n: [] for n in self.hook_names}
        for chunk in range(first_seq, last_seq + 1, self.model_batch_size):
            ids = self.sequence_ids[chunk : min(chunk + self.model_batch_size, last_seq + 1)]
            for name, act in self.harvest(self.sequences(ids)).items():
                parts[name].append(act)
        offset = start - first_seq * self.kept
        return {n: torch.cat(p)[offset : offset + self.buffer_tokens] for n, p in parts.items()}

    def _load_buffer(self, index: int) -> dict[str, Tensor]:
        if self.cache_dir is None:
            return self._compute_buffer(index)
        from safetensors.torch import load_file, save_file

        shard = self.cache_dir / f"rank{self.rank}-buffer{index:06d}.safetensors"
        if shard.is_file():
            try:
                acts = load_file(str(shard))
            except Exception as exc:
                raise LoadError(f"{shard}: unreadable activation shard ({exc}); delete it to recompute") from None
            if sorted(acts) != sorted(self.hook_names):
                raise LoadError(f"{shard}: holds hooks {sorted(acts)}, expected {sorted(self.hook_names)}")
            return acts
        acts = self._compute_buffer(index)
        tmp = shard.with_name(shard.name + f".tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in acts.items()}, str(tmp))
        os.replace(tmp, shard)
        return acts

    def next_batch(self) -> dict[str, Tensor]:
        """The next shuffled batch ``{hook_name: [batch_size, ...]}``."""
        index, position = divmod(self.batches_served, self.buffer_batches)
        if self._buffer_index != index:
            self._buffer = self._load_buffer(index)
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + index)
            self._order = torch.randperm(self.buffer_tokens, generator=gen)
            self._buffer_index = index
        rows = self._order[position * self.batch_size : (position + 1) * self.batch_size]
        self.batches_served += 1
        return {name: act[rows].to(self.device) for name, act in self._buffer.items()}
