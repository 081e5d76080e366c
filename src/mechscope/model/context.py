"""Per-forward attention state: positions, padding, masks, rotary tables and the key/value cache.

`AttentionContext` is built once per forward and shared by every attention layer, so masks and
rotary tables are computed once. `KVCache` keeps each layer's keys and values (after RoPE) for
incremental decoding; a forward given a cache attends to the cached positions as well as its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechscope.errors import InputError


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    A forward called with ``past_kv_cache=cache`` appends its keys and values (and its attention
    mask and positions) to the cache, so the next call only needs the new tokens. A frozen cache
    (`freeze`) is read but not extended: many continuations can share one cached prefix.
    TransformerLens' names: ``init_cache``, ``freeze``/``unfreeze``, ``frozen``,
    ``append_attention_mask`` and ``previous_attention_mask`` (``mechscope.tl`` exports this class
    as ``TransformerLensKeyValueCache`` and ``HookedTransformerKeyValueCache``).

    Example:
        >>> cache = KVCache(model.cfg.n_layers)
        >>> first = model(tokens[:, :3], past_kv_cache=cache)
        >>> step = model(tokens[:, 3:], past_kv_cache=cache)
        >>> torch.allclose(step[:, -1], model(tokens)[:, -1], atol=1e-5), len(cache)
        (True, 4)
    """

    def __init__(self, n_layers: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers
        self.values: list[Tensor | None] = [None] * n_layers
        self.attention_mask: Bool[Tensor, "batch past_pos"] | None = None
        self.positions: Int[Tensor, "batch past_pos"] | None = None
        self.frozen = False

    @classmethod
    def init_cache(cls, cfg: Any, device: torch.device | str | None = None, batch_size: int = 1) -> KVCache:
        """An empty cache for a model with config ``cfg`` (TransformerLens' constructor; the
        device and batch size follow the first forward).

        Example:
            >>> len(KVCache.init_cache(model.cfg, "cpu"))
            0
        """
        return cls(cfg.n_layers)

    def __len__(self) -> int:
        return 0 if self.attention_mask is None else self.attention_mask.shape[1]

    def freeze(self) -> None:
        """Stop storing new keys, values and mask entries (forwards still read the cache)."""
        self.frozen = True

    def unfreeze(self) -> None:
        self.frozen = False

    @property
    def previous_attention_mask(self) -> Tensor:
        """The attention mask of the cached positions ``[batch, past_pos]`` (1 = real token)."""
        return torch.zeros(1, 0, dtype=torch.int) if self.attention_mask is None else self.attention_mask.int()

    def append(
        self, layer: int, k: Float[Tensor, "batch kv_head pos d_head"], v: Float[Tensor, "batch kv_head pos d_head"]
    ) -> tuple[Tensor, Tensor]:
        """This forward's keys and values for ``layer`` after the cached ones (stored unless frozen)."""
        past_k, past_v = self.keys[layer], self.values[layer]
        if past_k is not None:
            k = torch.cat((past_k.to(k.device), k), dim=2)
            v = torch.cat((past_v.to(v.device), v), dim=2)
        if not self.frozen:
            self.keys[layer], self.values[layer] = k, v
        return k, v

    def extend(self, mask: Bool[Tensor, "batch pos"]) -> tuple[Tensor, Tensor, Tensor]:
        """``(positions, full_mask, full_positions)`` of new tokens with ``mask``: positions continue
        each row's real tokens; the mask and positions are stored unless frozen."""
        if self.attention_mask is not None and mask.shape[0] != self.attention_mask.shape[0]:
            raise InputError(
                f"the key/value cache holds a batch of {self.attention_mask.shape[0]}, got {mask.shape[0]} new rows"
            )
        start = self.next_positions().to(mask.device)[:, None] if len(self) else 0
        positions = start + (mask.long().cumsum(-1) - 1).clamp(min=0)
        if self.attention_mask is None:
            full_mask, full_positions = mask, positions
        else:
            full_mask = torch.cat((self.attention_mask.to(mask.device), mask), dim=1)
            full_positions = torch.cat((self.positions.to(mask.device), positions), dim=1)
        if not self.frozen:
            self.attention_mask, self.positions = full_mask, full_positions
        return positions, full_mask, full_positions

    def append_attention_mask(self, attention_mask: Int[Tensor, "batch new_pos"]) -> Int[Tensor, "batch pos"]:
        """The mask of cached and new positions (stored unless frozen), as TransformerLens'.

        Example:
            >>> KVCache(2).append_attention_mask(torch.tensor([[0, 1, 1]])).tolist()
            [[0, 1, 1]]
        """
        return self.extend(attention_mask.bool())[1].to(attention_mask.dtype)

    def next_positions(self) -> Int[Tensor, " batch"]:
        """The position the next real token of each row will have (real tokens seen so far)."""
        return self.attention_mask.sum(-1)


@dataclass
class AttentionContext:
    """Per-forward state shared by every attention layer: positions, padding and masks.

    ``key_padding`` (over cached and new keys) is ``None`` when no key is padding; masks and
    rotary tables are built lazily, once per forward, and reused by every layer.
    """

    positions: Int[Tensor, "batch pos"]
    key_padding: Bool[Tensor, "batch key_pos"] | None = None
    kv_cache: KVCache | None = None
    key_positions: Int[Tensor, "batch key_pos"] | None = None
    _masks: dict = field(default_factory=dict)
    _rotary: dict = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        attention_mask: Tensor | None,
        batch: int,
        seq: int,
        device: torch.device,
        kv_cache: KVCache | None = None,
    ) -> AttentionContext:
        """Positions count only real tokens, so a left-padded prompt sees positions 0, 1, ...

        With a non-empty ``kv_cache`` the new tokens continue each row's positions, and the
        cache's mask and positions are extended by this forward's.
        """
        if kv_cache is None:
            if attention_mask is None or bool(attention_mask.all()):
                return cls(torch.arange(seq, device=device).expand(batch, seq))
            mask = attention_mask.to(device=device, dtype=torch.bool)
            return cls((mask.long().cumsum(-1) - 1).clamp(min=0), mask)
        if attention_mask is None:
            mask = torch.ones(batch, seq, dtype=torch.bool, device=device)
        else:
            mask = attention_mask.to(device=device, dtype=torch.bool)
        positions, full_mask, full_positions = kv_cache.extend(mask)
        padding = None if bool(full_mask.all()) else full_mask
        return cls(positions, padding, kv_cache, full_positions)

    def to(self, device: torch.device) -> AttentionContext:
        """The same context with its tensors on ``device`` (for models placed over several devices)."""
        if self.positions.device == device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return AttentionContext(move(self.positions), move(self.key_padding), self.kv_cache, move(self.key_positions))

    def mask(self, sliding_window: int | None) -> Bool[Tensor, "batch 1 query_pos key_pos"] | None:
        """The boolean attention mask (``True`` = may attend), or ``None`` for plain causal attention.

        Causal attention is aligned at the end: query ``i`` of ``pos`` new tokens is key ``past + i``.
        The sliding window counts positions, so padding never eats into it.
        """
        seq = self.positions.shape[1]
        past = 0 if self.key_positions is None else self.key_positions.shape[1] - seq
        n_keys = past + seq
        window = sliding_window if sliding_window is not None and sliding_window < n_keys else None
        if self.key_padding is None and window is None and (past == 0 or seq == 1):
            return None
        if window not in self._masks:
            device = self.positions.device
            q = torch.arange(past, n_keys, device=device)[:, None]
            k = torch.arange(n_keys, device=device)[None, :]
            allowed = (k <= q)[None, None]  # [1, 1, query_pos, key_pos]
            if window is not None:
                key_pos = self.positions if self.key_positions is None else self.key_positions
                allowed = allowed & (key_pos[:, None, None, :] > self.positions[:, None, :, None] - window)
            if self.key_padding is not None:
                allowed = allowed & self.key_padding[:, None, None, :]
            # A padding query may see no key at all; let it see itself so softmax stays finite.
            itself = (k == q)[None, None]
            allowed = allowed | (itself & ~allowed.any(-1, keepdim=True))
            self._masks[window] = allowed
        return self._masks[window]

    def rotary(
        self, dim: int, base: float, scaling: dict | None, interleaved: bool, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """RoPE ``cos, sin`` of shape ``[batch, pos, 1, dim]`` for these positions."""
        key = (dim, base, str(scaling), interleaved, dtype)
        if key not in self._rotary:
            inv_freq = rotary_inv_freq(dim, base, scaling).to(self.positions.device)
            freqs = self.positions[..., None].float() * inv_freq  # [batch, pos, dim / 2]
            if interleaved:
                emb = freqs.repeat_interleave(2, dim=-1)
            else:
                emb = torch.cat((freqs, freqs), dim=-1)
            emb = emb[:, :, None, :]
            self._rotary[key] = (emb.cos().to(dtype), emb.sin().to(dtype))
        return self._rotary[key]


def rotary_inv_freq(dim: int, base: float, scaling: dict | None) -> Float[Tensor, " half_rotary_dim"]:
    """RoPE inverse frequencies, with ``linear`` or ``llama3`` scaling when configured.

    Example:
        >>> rotary_inv_freq(4, 10000.0, None).tolist()
        [1.0, 0.009999999776482582]
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    return inv_freq  # "default"


def apply_rotary(
    x: Float[Tensor, "batch pos head d_head"], cos: Tensor, sin: Tensor, interleaved: bool = False
) -> Tensor:
    """Rotate the first ``rotary_dim`` dimensions of each head.

    Pairs are ``(i, i + rotary_dim / 2)`` (half-split, as in Llama and GPT-NeoX) or, with
    ``interleaved``, ``(2i, 2i + 1)`` (as in GPT-J).
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if interleaved:
        turned = torch.stack((-x_rot[..., 1::2], x_rot[..., ::2]), dim=-1).flatten(-2)
    else:
        x1, x2 = x_rot[..., : rot // 2], x_rot[..., rot // 2 :]
        turned = torch.cat((-x2, x1), dim=-1)
    rotated = x_rot * cos + turned * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)
