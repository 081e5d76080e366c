"""TransformerLens' ``utils``: the same functions with the same signatures and results.

``get_act_name`` keeps TransformerLens' aliases and compact names (``"attn"`` is the pattern,
``"k6"`` is ``blocks.6.attn.hook_k``, ``"scale4ln1"`` is ``blocks.4.ln1.hook_scale``).
`test_prompt` prints, as TransformerLens' does (plain text instead of rich markup).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from mechscope.analysis.factored import FactoredMatrix
from mechscope.errors import InputError
from mechscope.hooks import Slice, SliceInput
from mechscope.model.generate import sample_logits
from mechscope.model.tokenize import get_attention_mask
from mechscope.names import act_name
from mechscope.tl.config import SUPPORTED_ACTIVATIONS

USE_DEFAULT_VALUE = None


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """The full hook name for a short name, with TransformerLens' aliases and compact forms: the
    one grammar of `mechscope.names.act_name` under TransformerLens' argument names.

    Example:
        >>> get_act_name("k", 6, "a"), get_act_name("pre", 2), get_act_name("embed")
        ('blocks.6.attn.hook_k', 'blocks.2.mlp.hook_pre', 'hook_embed')
        >>> get_act_name("normalized", 27, "ln2"), get_act_name("k6"), get_act_name("scale4ln1")
        ('blocks.27.ln2.hook_normalized', 'blocks.6.attn.hook_k', 'blocks.4.ln1.hook_scale')
        >>> get_act_name("attn", 1)
        'blocks.1.attn.hook_pattern'
    """
    return act_name(name, None if layer is None else int(layer), layer_type)


# ---------------------------------------------------------------------- tensors
def to_numpy(tensor: Any) -> np.ndarray:
    """A numpy array from a tensor (detached, on CPU; bfloat16 as float32), list, tuple, array or scalar.

    Example:
        >>> to_numpy(torch.tensor([1.5, 2.0])), to_numpy([1, 2]).tolist()
        (array([1.5, 2. ], dtype=float32), [1, 2])
    """
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise InputError(f"to_numpy takes a tensor, array, list, tuple or scalar, got {type(tensor).__name__}")


def get_device() -> str:
    """``"cuda"`` when available, else ``"cpu"`` (MPS only when ``TRANSFORMERLENS_ALLOW_MPS=1``).

    Example:
        >>> get_device() in ("cuda", "mps", "cpu")
        True
    """
    import os

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available() and os.environ.get("TRANSFORMERLENS_ALLOW_MPS", "") == "1":
        return "mps"
    return "cpu"


def get_corner(tensor: Any, n: int = 3) -> Any:
    """The first ``n`` entries along every axis (a `FactoredMatrix` gives its dense corner).

    Example:
        >>> get_corner(torch.arange(16).reshape(4, 4), 2)
        tensor([[0, 1],
                [4, 5]])
    """
    if isinstance(tensor, FactoredMatrix):
        return tensor[tuple(slice(n) for _ in range(tensor.ndim))].AB
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def get_matrix_corner(matrix: FactoredMatrix, n: int = 3) -> Tensor:
    """The dense ``n``-corner of a `FactoredMatrix` (`get_corner` of it)."""
    return get_corner(matrix, n)


def composition_scores(left: FactoredMatrix, right: FactoredMatrix, broadcast_dims: bool = True) -> Tensor:
    """``||left @ right||_F / (||left||_F ||right||_F)`` over the leading dimensions; with
    ``broadcast_dims`` the leading dimensions of ``left`` come first, then those of ``right``.

    Example:
        >>> a = FactoredMatrix(torch.randn(2, 5, 3), torch.randn(2, 3, 5))
        >>> composition_scores(a, a).shape
        torch.Size([2, 2])
    """
    if broadcast_dims:
        l_lead, r_lead = left.ndim - 2, right.ndim - 2
        for i in range(l_lead):
            right = right.unsqueeze(i)
        for i in range(r_lead):
            left = left.unsqueeze(i + l_lead)
    if left.rdim != right.ldim:
        raise InputError(f"composition scores need left.rdim == right.ldim, got {left.shape} and {right.shape}")
    new_left, new_right = left.collapse_l(), right.collapse_r()
    products = (new_left @ new_right).norm(dim=[-2, -1])
    return products / new_right.norm(dim=[-2, -1]) / new_left.norm(dim=[-2, -1])


def override_or_use_default_value(default_flag: Any, override: Any = None) -> Any:
    """``override`` unless it is ``None``, else ``default_flag``.

    Example:
        >>> override_or_use_default_value(True, False), override_or_use_default_value(True)
        (False, True)
    """
    return override if override is not None else default_flag


def remove_batch_dim(tensor: Float[Tensor, "1 ..."]) -> Float[Tensor, "..."]:
    """``tensor`` without its first axis when that axis has size 1, else unchanged.

    Example:
        >>> remove_batch_dim(torch.zeros(1, 3)).shape, remove_batch_dim(torch.zeros(2, 3)).shape
        (torch.Size([3]), torch.Size([2, 3]))
    """
    return tensor.squeeze(0) if tensor.shape[0] == 1 else tensor


def transpose(tensor: Float[Tensor, "... a b"]) -> Float[Tensor, "... b a"]:
    """Swap the last two axes."""
    return tensor.transpose(-1, -2)


def is_square(x: Tensor) -> bool:
    """Whether ``x`` is a square matrix."""
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: Tensor) -> bool:
    """Whether ``x`` is a square lower-triangular matrix.

    Example:
        >>> is_lower_triangular(torch.ones(3, 3).tril()), is_lower_triangular(torch.ones(3, 3))
        (True, False)
    """
    return is_square(x) and x.equal(x.tril())


def get_cumsum_along_dim(tensor: Tensor, dim: int, reverse: bool = False) -> Tensor:
    """Cumulative sum along ``dim`` (from the end when ``reverse``)."""
    if reverse:
        return tensor.flip(dims=(dim,)).cumsum(dim=dim).flip(dims=(dim,))
    return tensor.cumsum(dim=dim)


def get_offset_position_ids(past_kv_pos_offset: int, attention_mask: Int[Tensor, "batch offset_pos"]) -> Tensor:
    """Positions counted from each row's first attended token (padding gets 0), from ``past_kv_pos_offset`` on."""
    shifted = attention_mask.cumsum(dim=1) - 1
    return shifted.masked_fill(shifted < 0, 0)[:, past_kv_pos_offset:]


def repeat_along_head_dimension(tensor: Float[Tensor, "batch pos d_model"], n_heads: int, clone_tensor: bool = True):
    """``[batch, pos, d_model]`` -> ``[batch, pos, n_heads, d_model]`` (a copy unless ``clone_tensor=False``)."""
    out = tensor[:, :, None, :].expand(-1, -1, n_heads, -1)
    return out.clone() if clone_tensor else out


def filter_dict_by_prefix(dictionary: dict, prefix: str) -> dict:
    """Entries whose key starts with ``prefix`` (a dot is implied), with the prefix removed."""
    search = prefix if prefix.endswith(".") else prefix + "."
    return {k[len(search) :]: v for k, v in dictionary.items() if k.startswith(search)}


# ---------------------------------------------------------------------- losses and activations
def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Tensor | None = None,
    per_token: bool = False,
) -> Tensor:
    """Next-token cross-entropy: the mean, or ``[batch, pos - 1]`` per token (masked positions 0).

    Example:
        >>> loss = lm_cross_entropy_loss(torch.zeros(1, 3, 4), torch.tensor([[0, 1, 2]]))
        >>> round(float(loss), 4) == round(float(torch.log(torch.tensor(4.0))), 4)
        True
    """
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None])[..., 0]
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise InputError(f"attention_mask {tuple(attention_mask.shape)} must match tokens {tuple(tokens.shape)}")
        next_mask = torch.logical_and(attention_mask[:, :-1], attention_mask[:, 1:])
        predicted = predicted.masked_fill(~next_mask, 0.0)
        n_tokens = next_mask.sum().item()
    else:
        n_tokens = predicted.numel()
    return -predicted if per_token else -predicted.sum() / n_tokens


def lm_accuracy(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], per_token: bool = False):
    """Top-1 next-token accuracy: the mean, or ``[batch, pos - 1]`` booleans."""
    correct = logits.argmax(dim=-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else correct.sum() / correct.numel()


def gelu_new(input: Tensor) -> Tensor:
    """GPT-2's tanh approximation of GELU."""
    return 0.5 * input * (1.0 + torch.tanh(np.sqrt(2.0 / np.pi) * (input + 0.044715 * torch.pow(input, 3.0))))


def gelu_fast(input: Tensor) -> Tensor:
    return 0.5 * input * (1.0 + torch.tanh(input * 0.7978845608 * (1.0 + 0.044715 * input * input)))


def gelu_pytorch_tanh(input: Tensor) -> Tensor:
    return F.gelu(input, approximate="tanh")


def solu(input: Tensor) -> Tensor:
    """SoLU: ``x * softmax(x)`` over the last axis."""
    return input * F.softmax(input, dim=-1)


# ---------------------------------------------------------------------- initialisation
def calc_fan_in_and_fan_out(tensor: Tensor) -> tuple[int, int]:
    """Fan-in and fan-out in TransformerLens' weight layouts (``[d_in, d_out]``, ``[head, d_model, d_head]``)."""
    shape = tensor.shape
    if len(shape) == 0:
        raise InputError("fan in and fan out cannot be computed for scalars")
    if len(shape) == 1:
        return 1, shape[0]
    if len(shape) == 2:
        return shape[0], shape[1]
    if len(shape) == 3:
        return shape[1], shape[0] * shape[2]
    raise InputError(f"fan in and fan out cannot be computed for shape {tuple(shape)} tensors")


def init_xavier_uniform_(param: Tensor, gain: float = 1.0) -> Tensor:
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    bound = gain * np.sqrt(6.0 / (fan_in + fan_out))
    return nn.init.uniform_(param, -bound, bound)


def init_xavier_normal_(param: Tensor, gain: float = 1.0) -> Tensor:
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    return nn.init.normal_(param, mean=0.0, std=gain * np.sqrt(2.0 / (fan_in + fan_out)))


def init_kaiming_uniform_(
    param: Tensor, a: float = 0, nonlinearity: str = "relu", gain: float = 1.0, mode: str = "fan_in"
) -> Tensor:
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    gain *= nn.init.calculate_gain(nonlinearity, a)
    bound = gain * np.sqrt(3.0 / (fan_in if mode == "fan_in" else fan_out))
    return nn.init.uniform_(param, -bound, bound)


def init_kaiming_normal_(
    param: Tensor, a: float = 0, nonlinearity: str = "relu", gain: float = 1.0, mode: str = "fan_in"
) -> Tensor:
    fan_in, fan_out = calc_fan_in_and_fan_out(param)
    gain *= nn.init.calculate_gain(nonlinearity, a)
    return nn.init.normal_(param, mean=0.0, std=gain * np.sqrt(1.0 / (fan_in if mode == "fan_in" else fan_out)))


# ---------------------------------------------------------------------- tokens
def keep_single_column(dataset: Any, col_name: str) -> Any:
    """A Hugging Face dataset with every column but ``col_name`` removed."""
    for key in dataset.features:
        if key != col_name:
            dataset = dataset.remove_columns(key)
    return dataset


def tokenize_and_concatenate(
    dataset: Any,
    tokenizer: Any,
    streaming: bool = False,
    max_length: int = 1024,
    column_name: str = "text",
    add_bos_token: bool = True,
    num_proc: int | None = 10,
    set_format: bool = True,
) -> Any:
    """Tokenize each document of a Hugging Face dataset, join them with EOS and cut the stream
    into rows of ``max_length`` tokens (BOS first when ``add_bos_token``), in a ``"tokens"`` column.

    Like TransformerLens (which pads a short stream with the pad token, adding ``<PAD>`` to a
    tokenizer without one). Needs the ``datasets`` package for the dataset itself.
    """
    if not hasattr(dataset, "map"):
        raise InputError(
            f"tokenize_and_concatenate takes a Hugging Face datasets.Dataset, got {type(dataset).__name__}; "
            "build one with datasets.Dataset.from_dict({'text': [...]})"
        )
    dataset = keep_single_column(dataset, column_name)
    has_pad = tokenizer.pad_token is not None
    if not has_pad:
        tokenizer.add_special_tokens({"pad_token": "<PAD>"})
    seq_len = max_length - 1 if add_bos_token else max_length

    def tokenize(examples: Any) -> dict[str, np.ndarray]:
        text = examples[column_name]
        if tokenizer.eos_token is None:
            raise InputError("tokenize_and_concatenate needs a tokenizer with an EOS token")
        if not text:
            return {"tokens": np.array([], dtype=np.int64)}
        encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
        pieces = []
        for i, row in enumerate(encoded):
            pieces.append(np.asarray(row, dtype=np.int64))
            if i < len(encoded) - 1:
                pieces.append(np.array([tokenizer.eos_token_id], dtype=np.int64))
        tokens = np.concatenate(pieces)
        if len(tokens) < seq_len:
            pad = tokenizer.eos_token_id if not has_pad else tokenizer.pad_token_id
            tokens = np.concatenate([tokens, np.full(seq_len - len(tokens), pad)])
            n_rows = 1
        else:
            n_rows = len(tokens) // seq_len
            tokens = tokens[: seq_len * n_rows]
        tokens = tokens.reshape(n_rows, seq_len)
        if add_bos_token:
            tokens = np.concatenate([np.full((n_rows, 1), tokenizer.bos_token_id), tokens], axis=1)
        return {"tokens": tokens}

    extra = {} if streaming else {"num_proc": num_proc}
    out = dataset.map(tokenize, batched=True, remove_columns=[column_name], **extra)
    if set_format:
        out.set_format(type="torch", columns=["tokens"])
    return out


def test_prompt(
    prompt: str,
    answer: str | list[str],
    model: Any,
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: bool | None = None,
    top_k: int = 10,
) -> None:
    """Print how the model ranks ``answer`` after ``prompt`` (rank, logit, probability, top tokens).

    TransformerLens' exploratory helper: it prints its report and returns ``None``.
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    n_answers = len(answers)
    multiple = n_answers > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    answer_tokens = model.to_tokens(answers, prepend_bos=False)
    if multiple:
        answer_tokens = answer_tokens[:, :1]
    tokens = torch.cat((prompt_tokens.repeat(answer_tokens.shape[0], 1), answer_tokens.to(prompt_tokens.device)), dim=1)
    prompt_str = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_strs = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    prompt_length = len(prompt_str)
    answer_length = 1 if multiple else len(answer_strs[0])
    if print_details:
        print("Tokenized prompt:", prompt_str)
        print("Tokenized answers:" if multiple else "Tokenized answer:", answer_strs if multiple else answer_strs[0])
    logits = model(tokens)
    probs = logits.softmax(dim=-1)
    ranks = []
    for index in range(prompt_length, prompt_length + answer_length):
        ids = tokens[:, index]
        strs = [a[index - prompt_length] for a in answer_strs]
        token_probs = probs[:, index - 1]
        sorted_probs, sorted_ids = token_probs.sort(descending=True)
        answer_ranks = sorted_ids.argsort(-1)[range(n_answers), ids.cpu()].tolist()
        ranks.append(list(zip(strs, answer_ranks, strict=False)))
        if print_details:
            print(f"Performance on answer token{'s' if n_answers > 1 else ''}:")
            for i in range(n_answers):
                print(
                    f"Rank: {answer_ranks[i]: <8} Logit: {logits[i, index - 1, ids[i]].item():5.2f} "
                    f"Prob: {token_probs[i, ids[i]].item():6.2%} Token: |{strs[i]}|"
                )
            for i in range(top_k):
                print(
                    f"Top {i}th token. Logit: {logits[0, index - 1, sorted_ids[0, i]].item():5.2f} "
                    f"Prob: {sorted_probs[0, i].item():6.2%} Token: |{model.to_string(sorted_ids[0, i])}|"
                )
    print("Ranks of the answer tokens:", [r[0] for r in ranks] if not multiple else ranks)


test_prompt.__test__ = False  # a library function, not a test (pytest collects test_* names)

__all__ = [
    "SUPPORTED_ACTIVATIONS",
    "USE_DEFAULT_VALUE",
    "Slice",
    "sample_logits",
    "SliceInput",
    "calc_fan_in_and_fan_out",
    "filter_dict_by_prefix",
    "gelu_fast",
    "gelu_new",
    "gelu_pytorch_tanh",
    "get_act_name",
    "get_attention_mask",
    "get_corner",
    "get_cumsum_along_dim",
    "get_device",
    "get_offset_position_ids",
    "init_kaiming_normal_",
    "init_kaiming_uniform_",
    "init_xavier_normal_",
    "init_xavier_uniform_",
    "is_lower_triangular",
    "is_square",
    "keep_single_column",
    "lm_accuracy",
    "lm_cross_entropy_loss",
    "remove_batch_dim",
    "repeat_along_head_dimension",
    "solu",
    "test_prompt",
    "to_numpy",
    "tokenize_and_concatenate",
    "transpose",
]
