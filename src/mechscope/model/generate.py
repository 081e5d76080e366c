"""Text generation with a key/value cache, running under whatever hooks are attached.

Prompts of different lengths are left-padded; positions count only real tokens, so every row
generates exactly what it would alone. With the cache each step runs the model on the new token
only, so hooks see one new position per step (``[batch, 1, ...]``); without it each step reruns
the whole sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.model.context import KVCache
from mechscope.model.tokenize import input_tokens, max_length, require_tokenizer

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer

GenerateReturn = Literal["input", "str", "tokens"]


def sample_next(
    logits: Float[Tensor, "batch d_vocab"],
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """Choose the next token of each row: greedy, or sampled with temperature, top-k and top-p.

    Example:
        >>> sample_next(torch.tensor([[0.1, 2.0, 0.3]])).tolist()
        [1]
        >>> sample_next(torch.tensor([[0.1, 2.0, 0.3]]), do_sample=True, top_k=1).tolist()
        [1]
    """
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"top_k must be a positive integer or None, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _prompt(
    model: HookedTransformer, input: str | list[str] | Tensor, attention_mask: Tensor | None, prepend_bos: bool | None
) -> tuple[Tensor, Tensor]:
    """Left-padded token ids ``[batch, pos]`` and their mask (``True`` = real token)."""
    if isinstance(input, (str, list, tuple)):
        if attention_mask is not None:
            raise InputError("attention_mask is built from string input; pass token ids to give your own")
        tokens, mask = require_tokenizer(model).encode(input, prepend_bos, "left", max_length(model.cfg))
    elif isinstance(input, Tensor):
        tokens, mask = input_tokens(model, input, attention_mask, None, "left")
    else:
        raise InputError(f"expected a string, a list of strings or a token tensor, got {type(input).__name__}")
    tokens = tokens.to(model.device)
    if mask is None:
        return tokens, torch.ones_like(tokens, dtype=torch.bool)
    mask = mask.to(device=model.device, dtype=torch.bool)
    if bool((mask[:, :-1] & ~mask[:, 1:]).any()):
        raise InputError("generate needs left padding: each row's attention_mask must be 0s then 1s")
    return tokens, mask


@torch.no_grad()
def generate(
    model: HookedTransformer,
    input: str | list[str] | Tensor,
    max_new_tokens: int = 10,
    *,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    use_kv_cache: bool = True,
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    seed: int | None = None,
    return_type: GenerateReturn = "input",
    verbose: bool = False,
) -> str | list[str] | Int[Tensor, "batch pos"]:
    """Continue a prompt (or a batch of prompts) by up to ``max_new_tokens`` tokens.

    Runs under every attached hook (``with model.hooks(...)``). Lists of strings are
    left-padded; token input may bring a left-padded ``attention_mask``. Greedy unless
    ``do_sample`` (then ``temperature``, ``top_k``, ``top_p`` and ``seed`` apply). Rows stop
    at ``eos_token_id`` (the tokenizer's EOS by default) and are then filled with it.
    ``use_kv_cache`` reuses past keys and values (same tokens, much faster). Returns the
    prompt plus continuation: strings for string input (the prompt text as given, then the
    new tokens up to any EOS), else token ids ``[batch, pos]`` (``return_type="str"``/``"tokens"``
    forces one).

    Example:
        >>> out = model.generate(tokens, max_new_tokens=3)
        >>> out.shape, torch.equal(out, model.generate(tokens, max_new_tokens=3, use_kv_cache=False))
        (torch.Size([1, 7]), True)
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if return_type not in ("input", "str", "tokens"):
        raise InputError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    tokens, mask = _prompt(model, input, attention_mask, prepend_bos)
    limit = max_length(model.cfg)
    if limit is not None and tokens.shape[1] + max_new_tokens > limit:
        raise InputError(
            f"{tokens.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's n_ctx={limit}"
        )
    if eos_token_id is None and stop_at_eos and model.tokenizer is not None:
        eos_token_id = model.tokenizer.hf.eos_token_id
    pad = eos_token_id if eos_token_id is not None else 0
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.unembed.w_u.device).manual_seed(seed)
    batch, width = tokens.shape
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    cache = KVCache(model.cfg.n_layers) if use_kv_cache else None
    step_input, step_mask = tokens, mask
    for _ in tqdm(range(max_new_tokens), desc="generate", disable=not verbose):
        logits = model(step_input, attention_mask=step_mask, past_kv_cache=cache)
        next_token = sample_next(
            logits[:, -1], do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator
        ).to(tokens.device)
        next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_token[:, None], dtype=torch.bool)), dim=1)
        if stop_at_eos and eos_token_id is not None:
            finished |= next_token == eos_token_id
            if bool(finished.all()):
                break
        step_input, step_mask = (next_token[:, None], None) if use_kv_cache else (tokens, mask)
    if return_type == "tokens" or (return_type == "input" and isinstance(input, Tensor)):
        return tokens
    prompts = [input] if isinstance(input, str) else input
    if not isinstance(prompts, (list, tuple)):  # token input, text requested
        prompts = [model.to_string(row[row_mask]) for row, row_mask in zip(tokens[:, :width], mask[:, :width])]
    texts = []
    for prompt, new in zip(prompts, tokens[:, width:]):
        if stop_at_eos and eos_token_id is not None and bool((new == eos_token_id).any()):
            new = new[: int((new == eos_token_id).nonzero()[0])]
        texts.append(prompt + model.to_string(new))
    return texts[0] if isinstance(input, str) else texts
