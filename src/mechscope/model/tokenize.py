"""Tokenisation with an explicit BOS convention.

Strings are encoded without the tokenizer's own special tokens; the BOS token is then
prepended when ``prepend_bos`` is true (default: the model's ``cfg.default_prepend_bos``), so
the same call behaves the same for every tokenizer.

`to_tokens`, `to_str_tokens`, `to_string` and `to_single_token` take the model first; they are
also `HookedTransformer` methods (``model.to_tokens(text)``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from mechscope.errors import InputError

PaddingSide = Literal["left", "right"]


class Tokenizer:
    """Wraps a Hugging Face tokenizer with mechscope's BOS and padding rules.

    Example:
        >>> tok = Tokenizer(hf_tokenizer, default_prepend_bos=False)  # doctest: +SKIP
        >>> tokens, mask = tok.encode(["Hello world", "Hi"], padding_side="left")  # doctest: +SKIP
    """

    def __init__(self, hf_tokenizer: Any, default_prepend_bos: bool) -> None:
        self.hf = hf_tokenizer
        self.default_prepend_bos = default_prepend_bos

    @property
    def bos_token_id(self) -> int | None:
        tok = self.hf
        return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id

    @property
    def pad_token_id(self) -> int:
        tok = self.hf
        for candidate in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if candidate is not None:
                return candidate
        return 0

    def encode(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide = "right",
        max_length: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Token ids ``[batch, pos]`` and the attention mask (``None`` when nothing is padded)."""
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
            raise InputError("expected a string or a non-empty list of strings")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        prepend_bos = self.default_prepend_bos if prepend_bos is None else prepend_bos
        ids = self.hf(list(text), add_special_tokens=False)["input_ids"]
        if prepend_bos:
            bos = self.bos_token_id
            if bos is None:
                raise InputError("this tokenizer has no BOS or EOS token; call with prepend_bos=False")
            ids = [[bos, *row] for row in ids]
        if max_length is not None:
            ids = [row[:max_length] for row in ids]
        if any(len(row) == 0 for row in ids):
            raise InputError("an input string encodes to zero tokens; pass non-empty text or prepend_bos=True")
        width = max(len(row) for row in ids)
        tokens = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.bool)
        for i, row in enumerate(ids):
            span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
            tokens[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
        return tokens, (None if bool(mask.all()) else mask)

    def decode_each(self, tokens: Tensor) -> list[str]:
        """One string per token id of a 1-D tensor."""
        return self.hf.batch_decode(tokens.reshape(-1, 1).tolist(), clean_up_tokenization_spaces=False)

    def decode(self, tokens: Tensor) -> str:
        return self.hf.decode(tokens.tolist(), clean_up_tokenization_spaces=False)


def tokenizer_adds_bos(hf_tokenizer: Any) -> bool:
    """Whether ``hf_tokenizer`` itself prepends BOS (the convention its model was trained with)."""
    bos = hf_tokenizer.bos_token_id
    if bos is None:
        return False
    ids = hf_tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def max_length(cfg: Any) -> int | None:
    """The most positions a model with config ``cfg`` can take: ``n_ctx`` with learned position
    embeddings, ``None`` (no hard limit) otherwise.

    Example:
        >>> max_length(model.cfg)
        16
    """
    return cfg.n_ctx if cfg.positional_embedding_type == "learned" else None


def require_tokenizer(model: Any) -> Tokenizer:
    """The model's `Tokenizer`, or an error saying how to work without one.

    Example:
        >>> require_tokenizer(model)
        Traceback (most recent call last):
        mechscope.errors.InputError: this model has no tokenizer: pass token ids, or load it with mechscope.load
    """
    if model.tokenizer is None:
        raise InputError("this model has no tokenizer: pass token ids, or load it with mechscope.load")
    return model.tokenizer


def check_mask(attention_mask: Tensor | None, shape: tuple[int, ...], device: torch.device | str) -> Tensor | None:
    """``attention_mask`` as booleans on ``device``, checked against the tokens' ``shape``.

    Example:
        >>> check_mask(torch.tensor([[1, 0]]), (1, 2), "cpu")
        tensor([[ True, False]])
    """
    if attention_mask is None:
        return None
    if tuple(attention_mask.shape) != tuple(shape):
        raise InputError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {tuple(shape)}")
    return attention_mask.to(device=device, dtype=torch.bool)


def input_tokens(
    model: Any,
    input: Any,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide = "right",
) -> tuple[Tensor, Tensor | None]:
    """Token ids ``[batch, pos]`` on the model's device and the attention mask (or ``None``).

    ``input`` is a string, a list of strings (tokenised with the model's tokenizer, padded on
    ``padding_side``) or token ids ``[batch, pos]`` / ``[pos]`` (checked against the vocabulary;
    ``attention_mask`` then goes with them).

    Example:
        >>> tokens, mask = input_tokens(model, torch.tensor([3, 4, 5]))
        >>> tokens, mask
        (tensor([[3, 4, 5]]), None)
    """
    if isinstance(input, (str, list, tuple)):
        if attention_mask is not None:
            raise InputError("attention_mask is built from string input; pass token ids to give your own")
        tokens, mask = require_tokenizer(model).encode(input, prepend_bos, padding_side, max_length(model.cfg))
        return tokens.to(model.device), None if mask is None else mask.to(model.device)
    if not isinstance(input, Tensor):
        raise InputError(f"expected a string, a list of strings or a token tensor, got {type(input).__name__}")
    if input.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise InputError(
            f"token ids must be an integer tensor, got {input.dtype}; to feed the residual stream, pass start_at_layer"
        )
    tokens = input[None] if input.dim() == 1 else input
    if tokens.dim() != 2:
        raise InputError(f"token ids must be [batch, pos] or [pos], got shape {tuple(input.shape)}")
    d_vocab = model.cfg.d_vocab
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= d_vocab):
        raise InputError(f"token ids must lie in [0, {d_vocab}), got [{int(tokens.min())}, {int(tokens.max())}]")
    return tokens.to(model.device, torch.long), check_mask(attention_mask, tuple(tokens.shape), model.device)


def to_tokens(
    model: Any,
    input: str | list[str],
    prepend_bos: bool | None = None,
    padding_side: PaddingSide = "right",
    move_to_device: bool = True,
    truncate: bool = True,
) -> Tensor:
    """Token ids ``[batch, pos]``; lists of strings are padded on ``padding_side``.

    ``prepend_bos=None`` follows the model's convention (``cfg.default_prepend_bos``); with
    ``truncate`` the ids are cut to what the model can take (`max_length`).

    Example:
        >>> model.to_tokens("Hello world", prepend_bos=False)   # doctest: +SKIP
        tensor([[19556,   905]])
    """
    limit = max_length(model.cfg) if truncate else None
    tokens, _ = require_tokenizer(model).encode(input, prepend_bos, padding_side, limit)
    return tokens.to(model.device) if move_to_device else tokens


def to_str_tokens(
    model: Any, input: str | list[str] | Tensor, prepend_bos: bool | None = None
) -> list[str] | list[list[str]]:
    """The text of each token: a list for one string or a 1-D / single-row tensor, else a list of lists.

    Example:
        >>> model.to_str_tokens("Hello world", prepend_bos=False)  # doctest: +SKIP
        ['Hello', ' world']
    """
    tok = require_tokenizer(model)
    if isinstance(input, list):
        return [to_str_tokens(model, text, prepend_bos) for text in input]
    if isinstance(input, str):
        tokens, _ = tok.encode(input, prepend_bos)
        return tok.decode_each(tokens[0])
    if isinstance(input, Tensor):
        if input.dim() == 2 and input.shape[0] == 1:
            input = input[0]
        if input.dim() == 1:
            return tok.decode_each(input)
        if input.dim() == 2:
            return [tok.decode_each(row) for row in input]
    raise InputError(f"expected a string, a list of strings or a 1-D/2-D token tensor, got {type(input).__name__}")


def to_string(model: Any, tokens: Tensor | list[int]) -> str | list[str]:
    """Decode token ids: a string for ``[pos]``, a list of strings for ``[batch, pos]``.

    Example:
        >>> model.to_string(torch.tensor([19556, 905]))  # doctest: +SKIP
        'Hello world'
    """
    tokens = torch.as_tensor(tokens)
    tok = require_tokenizer(model)
    if tokens.dim() == 1:
        return tok.decode(tokens)
    if tokens.dim() == 2:
        return [tok.decode(row) for row in tokens]
    raise InputError(f"expected [pos] or [batch, pos] token ids, got shape {tuple(tokens.shape)}")


def to_single_token(model: Any, string: str) -> int:
    """The id of ``string``, which must be exactly one token (no BOS added).

    Example:
        >>> model.to_single_token(" Mary")  # doctest: +SKIP
        8346
    """
    tok = require_tokenizer(model)
    tokens, _ = tok.encode(string, prepend_bos=False)
    if tokens.shape[-1] != 1:
        raise InputError(f"{string!r} is {tokens.shape[-1]} tokens {tok.decode_each(tokens[0])}, not one")
    return int(tokens[0, 0])
