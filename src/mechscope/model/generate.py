"""Text generation with a key/value cache, running under whatever hooks are attached.

`generate` has TransformerLens' signature and defaults: it samples (``do_sample=True``), shows a
progress bar (``verbose=True``) and reuses past keys and values (``use_past_kv_cache=True``);
pass ``do_sample=False`` for greedy decoding. Prompts of different lengths are left-padded;
positions count only real tokens, so every row generates exactly what it would alone. With the
cache each step runs the model on the new token only, so hooks see one new position per step
(``[batch, 1, ...]``); without it each step reruns the whole sequence.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechscope.errors import InputError
from mechscope.model.context import KVCache
from mechscope.model.tokenize import PaddingSide, input_tokens, max_length, require_tokenizer

if TYPE_CHECKING:
    from mechscope.model.transformer import HookedTransformer

GenerateReturn = Literal["input", "str", "tokens"]


def sample_logits(
    final_logits: Float[Tensor, "batch d_vocab"],
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    tokens: Int[Tensor, "batch pos"] | None = None,
    *,
    generator: torch.Generator | None = None,
) -> Int[Tensor, " batch"]:
    """TransformerLens' ``sample_logits``: the next token of each row, sampled from the logits
    after the repetition penalty (on ``tokens``), the temperature (``0``: greedy), the frequency
    penalty (on ``tokens``) and top-k (else top-p) filtering. ``generator`` seeds the draw.

    Example:
        >>> sample_logits(torch.tensor([[0.1, 2.0, 0.3]]), temperature=0.0).tolist()
        [1]
        >>> sample_logits(torch.tensor([[0.1, 2.0, 0.3]]), top_k=1).tolist()
        [1]
    """
    if temperature < 0:
        raise InputError(f"temperature must be >= 0, got {temperature}")
    logits = final_logits
    if repetition_penalty != 1.0 and tokens is not None:
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, tokens.to(logits.device), True)
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if freq_penalty > 0:
        if tokens is None or tokens.dim() != 2:
            raise InputError("a frequency penalty needs the tokens so far, [batch, pos]")
        counts = torch.zeros_like(logits).scatter_add_(
            -1, tokens.to(logits.device), torch.ones_like(tokens, dtype=logits.dtype, device=logits.device)
        )
        logits = logits - freq_penalty * counts
    if top_k is not None:
        if top_k < 1:
            raise InputError(f"top_k must be a positive integer or None, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        if not 0 < top_p <= 1:
            raise InputError(f"top_p must lie in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        # Drop a token when the tokens ranked above it already hold more than top_p of the mass.
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) > top_p
        drop_sorted = torch.cat((torch.zeros_like(drop_sorted[..., :1]), drop_sorted[..., :-1]), dim=-1)
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.float().softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _prompt(
    model: HookedTransformer,
    input: str | list[str] | Tensor,
    attention_mask: Tensor | None,
    prepend_bos: bool | None,
    padding_side: PaddingSide | None,
) -> tuple[Tensor, Tensor]:
    """Left-padded token ids ``[batch, pos]`` and their mask (``True`` = real token)."""
    if isinstance(input, (str, list, tuple)):
        if attention_mask is not None:
            raise InputError("attention_mask is built from string input; pass token ids to give your own")
        side = "left" if isinstance(input, (list, tuple)) and len(input) > 1 else padding_side
        tokens, mask = require_tokenizer(model).encode(input, prepend_bos, side)
    elif isinstance(input, Tensor):
        tokens, mask = input_tokens(model, input, attention_mask, prepend_bos, padding_side)
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
    input: str | list[str] | Tensor = "",
    max_new_tokens: int = 10,
    stop_at_eos: bool = True,
    eos_token_id: int | list[int] | None = None,
    do_sample: bool = True,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    freq_penalty: float = 0.0,
    use_past_kv_cache: bool = True,
    prepend_bos: bool | None = None,
    padding_side: PaddingSide | None = None,
    return_type: GenerateReturn = "input",
    verbose: bool = True,
    *,
    attention_mask: Tensor | None = None,
    seed: int | None = None,
) -> str | list[str] | Int[Tensor, "batch pos"]:
    """Continue a prompt (or a batch of prompts) by up to ``max_new_tokens`` tokens.

    TransformerLens' arguments and defaults: samples unless ``do_sample=False`` (greedy), with
    ``temperature``, ``top_k`` (else ``top_p``) and ``freq_penalty`` (see `sample_logits`);
    ``verbose`` shows a progress bar; ``use_past_kv_cache`` reuses past keys and values (same
    tokens, much faster). Rows stop at ``eos_token_id`` (an id or a list; the tokenizer's EOS by
    default; none without a tokenizer) and are then filled with EOS. A list of several prompts
    is left-padded; token input may bring a left-padded ``attention_mask``. Runs under every
    attached hook.

    Returns strings for string input (each row decoded without special tokens; one string when
    there is one row), else token ids ``[batch, pos]`` with the prompt (``return_type="str"`` or
    ``"tokens"`` forces one). mechscope's additions: ``attention_mask`` and ``seed`` (a
    generator for the draws).

    Example:
        >>> out = model.generate(tokens, max_new_tokens=3, do_sample=False, verbose=False)
        >>> slow = model.generate(tokens, 3, do_sample=False, use_past_kv_cache=False, verbose=False)
        >>> out.shape, torch.equal(out, slow)
        (torch.Size([1, 7]), True)
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if return_type not in ("input", "str", "tokens"):
        raise InputError(f"return_type must be 'input', 'str' or 'tokens', got {return_type!r}")
    tokens, mask = _prompt(model, input, attention_mask, prepend_bos, padding_side)
    limit = max_length(model.cfg)
    if limit is not None and tokens.shape[1] + max_new_tokens > limit:
        raise InputError(
            f"{tokens.shape[1]} prompt tokens + max_new_tokens={max_new_tokens} exceed the model's n_ctx={limit}"
        )
    tok_eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    if eos_token_id is None and stop_at_eos:
        eos_token_id = tok_eos  # no tokenizer, no EOS: generation runs to max_new_tokens
    stop = torch.tensor([] if eos_token_id is None else eos_token_id, device=tokens.device).reshape(-1)
    pad = tok_eos if tok_eos is not None else (int(stop[0]) if len(stop) else 0)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.unembed.w_u.device).manual_seed(seed)
    batch, width = tokens.shape
    finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    cache = KVCache(model.cfg.n_layers) if use_past_kv_cache else None
    step_input, step_mask = tokens, mask
    for _ in tqdm(range(max_new_tokens), disable=not verbose):
        logits = model(step_input, attention_mask=step_mask, past_kv_cache=cache)
        if do_sample:
            next_token = sample_logits(
                logits[:, -1], top_k, top_p, temperature, freq_penalty, tokens=tokens, generator=generator
            )
        else:
            next_token = logits[:, -1].argmax(-1)
        next_token = next_token.to(tokens.device)
        if stop_at_eos:
            next_token = torch.where(finished, torch.full_like(next_token, pad), next_token)
            finished |= torch.isin(next_token, stop)
        tokens = torch.cat((tokens, next_token[:, None]), dim=1)
        mask = torch.cat((mask, torch.ones_like(next_token[:, None], dtype=torch.bool)), dim=1)
        if stop_at_eos and bool(finished.all()):
            break
        step_input, step_mask = (next_token[:, None], None) if use_past_kv_cache else (tokens, mask)
    if return_type == "tokens" or (return_type == "input" and isinstance(input, Tensor)):
        return tokens
    hf = require_tokenizer(model).hf
    texts = [hf.decode(row.tolist(), skip_special_tokens=True) for row in tokens]
    return texts[0] if len(texts) == 1 else texts
