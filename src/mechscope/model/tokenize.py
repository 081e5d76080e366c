"""Tokenisation with an explicit BOS convention, TransformerLens' padding rules and context checks.

Strings are encoded without the tokenizer's own special tokens; the BOS token is then
prepended when ``prepend_bos`` is true (default: the model's ``cfg.default_prepend_bos``), so
the same call behaves the same for every tokenizer. ``padding_side=None`` means the Hugging Face
tokenizer's ``padding_side`` (``model.tokenizer.padding_side = "left"`` changes the default of
every call, as in TransformerLens).

Context length: `to_tokens` cuts its output to ``n_ctx`` (``truncate=True``, TransformerLens'
meaning) and warns when it does; a forward on more positions than ``n_ctx`` raises `InputError`
for learned position embeddings and warns for rotary ones (`check_positions`). `to_str_tokens`
encodes exactly as the forward does.

`to_tokens`, `to_str_tokens`, `to_string` and `to_single_token` take the model first; they are
also `HookedTransformer` methods (``model.to_tokens(text)``).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from mechscope.errors import InputError

PaddingSide = Literal["left", "right"]


class Tokenizer:
    """Wraps a Hugging Face tokenizer with mechscope's BOS and padding rules: ``model.codec``
    (``model.tokenizer`` is the Hugging Face tokenizer itself).

    Example:
        >>> tok = Tokenizer(hf_tokenizer, default_prepend_bos=False)  # doctest: +SKIP
        >>> tokens, mask = tok.encode(["Hello world", "Hi"], padding_side="left")  # doctest: +SKIP
    """

    def __init__(self, hf_tokenizer: Any, default_prepend_bos: bool) -> None:
        self.hf = hf_tokenizer
        self.default_prepend_bos = default_prepend_bos

    @classmethod
    def wrap(cls, tokenizer: Any, default_prepend_bos: bool) -> Tokenizer | None:
        """``tokenizer`` (a Hugging Face tokenizer, or a `Tokenizer`) as a `Tokenizer`; ``None`` stays ``None``.

        Example:
            >>> Tokenizer.wrap(None, True) is None
            True
        """
        if tokenizer is None or isinstance(tokenizer, Tokenizer):
            return tokenizer
        return cls(tokenizer, default_prepend_bos)

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

    @property
    def padding_side(self) -> PaddingSide:
        """The Hugging Face tokenizer's ``padding_side`` (``"right"`` when it has none)."""
        return getattr(self.hf, "padding_side", None) or "right"

    def encode(
        self,
        text: str | list[str],
        prepend_bos: bool | None = None,
        padding_side: PaddingSide | None = None,
        max_length: int | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Token ids ``[batch, pos]`` and the attention mask (``None`` when nothing is padded),
        each row cut to ``max_length`` tokens when given."""
        if isinstance(text, str):
            text = [text]
        if not isinstance(text, (list, tuple)) or not text or not all(isinstance(t, str) for t in text):
            raise InputError("expected a string or a non-empty list of strings")
        padding_side = padding_side or self.padding_side
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


def set_tokenizer(model: Any, tokenizer: Any, default_padding_side: PaddingSide | None = None) -> None:
    """Give ``model`` a Hugging Face tokenizer (or a `Tokenizer`), as TransformerLens does: its
    ``padding_side`` becomes ``default_padding_side`` when given (``"right"`` if it has none), and
    a missing EOS, pad or BOS token is filled in (EOS ``<|endoftext|>``; pad and BOS = EOS).
    Also ``model.set_tokenizer``.

    Example:
        >>> from transformers import AutoTokenizer   # doctest: +SKIP
        >>> model.set_tokenizer(AutoTokenizer.from_pretrained("gpt2"), default_padding_side="left")  # doctest: +SKIP
    """
    if default_padding_side not in ("left", "right", None):
        raise InputError(f"padding_side must be 'right', 'left' or None, got {default_padding_side!r}")
    codec = Tokenizer.wrap(tokenizer, model.cfg.default_prepend_bos)
    hf = codec.hf
    if default_padding_side is not None:
        hf.padding_side = default_padding_side
    if getattr(hf, "padding_side", None) is None:
        hf.padding_side = "right"
    if getattr(hf, "eos_token", "") is None:
        hf.eos_token = "<|endoftext|>"
    if getattr(hf, "pad_token", "") is None:
        hf.pad_token = hf.eos_token
    if getattr(hf, "bos_token", "") is None:
        hf.bos_token = hf.eos_token
    model.codec = codec


def tokenizer_adds_bos(hf_tokenizer: Any) -> bool:
    """Whether ``hf_tokenizer`` itself prepends BOS (the convention its model was trained with)."""
    bos = hf_tokenizer.bos_token_id
    if bos is None:
        return False
    ids = hf_tokenizer("a")["input_ids"]
    return bool(ids) and ids[0] == bos


def max_length(cfg: Any) -> int | None:
    """The most positions a model with config ``cfg`` can take: ``n_ctx`` with learned position
    embeddings, ``None`` (no hard limit; past ``n_ctx`` a forward warns) otherwise.

    Example:
        >>> max_length(model.cfg)
        16
    """
    return cfg.n_ctx if cfg.positional_embedding_type == "standard" else None


def check_positions(cfg: Any, n_positions: int) -> None:
    """Refuse (learned position embeddings) or warn about (other schemes) a forward over more
    than ``cfg.n_ctx`` positions.

    Example:
        >>> check_positions(model.cfg, 16)  # fits
        >>> check_positions(model.cfg, 17)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        mechscope.errors.InputError: 17 positions exceed this model's n_ctx=16 learned ...
    """
    if n_positions <= cfg.n_ctx:
        return
    if max_length(cfg) is not None:
        raise InputError(
            f"{n_positions} positions exceed this model's n_ctx={cfg.n_ctx} learned position embeddings; shorten "
            "the input, or cut it with model.to_tokens(text, truncate=True) (which warns)"
        )
    warnings.warn(
        f"{n_positions} positions exceed the context length the model was trained on (n_ctx={cfg.n_ctx}); "
        "outputs past it may be unreliable",
        stacklevel=3,
    )


def require_tokenizer(model: Any) -> Tokenizer:
    """The model's `Tokenizer` (``model.codec``), or an error saying how to work without one.

    Example:
        >>> require_tokenizer(model)
        Traceback (most recent call last):
        mechscope.errors.InputError: this model has no tokenizer: pass token ids, or set one: model.set_tokenizer(...)
    """
    if model.codec is None:
        raise InputError("this model has no tokenizer: pass token ids, or set one: model.set_tokenizer(...)")
    # cfg.default_prepend_bos is the setting (TransformerLens code assigns it after loading)
    model.codec.default_prepend_bos = getattr(model.cfg, "default_prepend_bos", model.codec.default_prepend_bos)
    return model.codec


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


def get_attention_mask(tokenizer: Any, tokens: Tensor, prepend_bos: bool, padding_side: str | None = None) -> Tensor:
    """TransformerLens' mask of padded token ids: 1 for real tokens, 0 for the trailing (right
    padding) or leading (left padding) pad tokens; ``padding_side=None`` is the tokenizer's.

    Only pads at the padded end count; with left padding a BOS equal to the pad token stays attended.

    Example:
        >>> class Tok: pad_token_id, bos_token_id, padding_side = 0, 0, "right"
        >>> get_attention_mask(Tok(), torch.tensor([[0, 5, 6, 0, 0]]), prepend_bos=True)
        tensor([[1, 1, 1, 0, 0]])
    """
    mask = torch.ones_like(tokens)
    if tokenizer is None:
        return mask
    padding_side = padding_side or tokenizer.padding_side
    not_pad = tokens.ne(tokenizer.pad_token_id).long()
    if padding_side == "right":
        mask[not_pad.flip(-1).cumsum(-1).flip(-1) == 0] = 0
    else:
        leading = not_pad.cumsum(-1) == 0
        mask[leading] = 0
        if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
            rows = leading.sum(-1)
            padded = rows > 0
            mask[torch.arange(mask.shape[0], device=mask.device)[padded], rows[padded] - 1] = 1
    return mask


def input_tokens(
    model: Any,
    input: Any,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Token ids ``[batch, pos]`` on the model's device and the attention mask (or ``None``).

    ``input`` is a string, a list of strings (tokenised with the model's tokenizer, padded on
    ``padding_side``, by default the tokenizer's) or token ids ``[batch, pos]`` / ``[pos]``
    (checked against the vocabulary; ``attention_mask`` then goes with them). Token ids padded on
    the left (``padding_side`` or the tokenizer's ``"left"``) and given without a mask get the
    mask of their leading pad tokens, as in TransformerLens.

    Example:
        >>> tokens, mask = input_tokens(model, torch.tensor([3, 4, 5]))
        >>> tokens, mask
        (tensor([[3, 4, 5]]), None)
    """
    if isinstance(input, (str, list, tuple)):
        if attention_mask is not None:
            raise InputError("attention_mask is built from string input; pass token ids to give your own")
        tokens, mask = require_tokenizer(model).encode(input, prepend_bos, padding_side)
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
    tokens = tokens.to(model.device, torch.long)
    codec = model.codec
    if attention_mask is None and codec is not None and (padding_side or codec.padding_side) == "left":
        prepend_bos = model.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        attention_mask = get_attention_mask(codec.hf, tokens, prepend_bos, "left")
        attention_mask = None if bool(attention_mask.all()) else attention_mask
    return tokens, check_mask(attention_mask, tuple(tokens.shape), model.device)


def to_tokens(
    model: Any,
    input: str | list[str],
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
    move_to_device: bool = True,
    truncate: bool = True,
) -> Tensor:
    """Token ids ``[batch, pos]``; lists of strings are padded on ``padding_side`` (default: the
    tokenizer's ``padding_side``).

    ``prepend_bos=None`` follows the model's convention (``cfg.default_prepend_bos``). With
    ``truncate`` (TransformerLens' meaning) each row is cut to the model's ``n_ctx`` tokens, with a
    warning when that drops any.

    Example:
        >>> model.to_tokens("Hello world", prepend_bos=False)   # doctest: +SKIP
        tensor([[19556,   905]])
    """
    codec = require_tokenizer(model)
    tokens, _ = codec.encode(input, prepend_bos, padding_side)
    n_ctx = model.cfg.n_ctx
    if truncate and tokens.shape[1] > n_ctx:
        warnings.warn(f"to_tokens: cut {tokens.shape[1]} tokens to the model's n_ctx={n_ctx}", stacklevel=2)
        tokens, _ = codec.encode(input, prepend_bos, padding_side, max_length=n_ctx)
    return tokens.to(model.device) if move_to_device else tokens


def to_str_tokens(
    model: Any,
    input: str | list | Tensor | np.ndarray,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
) -> list[str] | list[list[str]]:
    """The text of each token of a string (encoded as the forward encodes it), of ``[pos]`` or
    ``[1, pos]`` token ids (a tensor or numpy array; a single id too), or of each element of a list.

    Example:
        >>> model.to_str_tokens("Hello world", prepend_bos=False)  # doctest: +SKIP
        ['Hello', ' world']
    """
    codec = require_tokenizer(model)
    if isinstance(input, list):
        return [to_str_tokens(model, item, prepend_bos, padding_side) for item in input]
    if isinstance(input, str):
        tokens = codec.encode(input, prepend_bos, padding_side)[0][0]
    elif isinstance(input, (Tensor, np.ndarray)):
        tokens = torch.as_tensor(input).squeeze()
        tokens = tokens[None] if tokens.dim() == 0 else tokens
        if tokens.dim() != 1:
            raise InputError(
                f"to_str_tokens takes [pos] or [1, pos] token ids, got shape {tuple(input.shape)}; "
                "pass one row at a time (or a list of rows)"
            )
    else:
        raise InputError(f"to_str_tokens takes a string, a list, a tensor or an array, got {type(input).__name__}")
    return codec.decode_each(tokens.cpu())


def to_string(model: Any, tokens: Any) -> str | list[str]:
    """Decode token ids: a list of strings for ``[batch, pos]``, a string for ``[pos]``, one id
    (an int or a 0-d tensor), a list of ids or a numpy array.

    Example:
        >>> model.to_string(torch.tensor([19556, 905]))  # doctest: +SKIP
        'Hello world'
    """
    hf = require_tokenizer(model).hf
    tokens = tokens if isinstance(tokens, Tensor) else torch.as_tensor(np.asarray(tokens))
    if tokens.dim() == 2:
        return hf.batch_decode(tokens.tolist(), clean_up_tokenization_spaces=False)
    if tokens.dim() <= 1:
        return hf.decode(tokens.tolist(), clean_up_tokenization_spaces=False)
    raise InputError(f"to_string takes [pos] or [batch, pos] token ids, got shape {tuple(tokens.shape)}")


def to_single_token(model: Any, string: str) -> int:
    """The id of ``string``, which must be exactly one token (no BOS added).

    Example:
        >>> model.to_single_token(" Mary")  # doctest: +SKIP
        8346
    """
    codec = require_tokenizer(model)
    tokens, _ = codec.encode(string, prepend_bos=False)
    if tokens.shape[-1] != 1:
        raise InputError(f"{string!r} is {tokens.shape[-1]} tokens {codec.decode_each(tokens[0])}, not one")
    return int(tokens[0, 0])
