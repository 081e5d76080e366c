"""Tiny local checkpoints for the differential tests: random Hugging Face models of two
families (GPT-2; a Llama-style grouped-query model) with a small byte-level BPE tokenizer
trained here, saved with ``save_pretrained``.

Folder names avoid the substring "llama": TransformerLens' config code branches on it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import randomize_

CORPUS = [
    "When Mary and John went to the store, John gave a drink to Mary.",
    "When Tom and Anna went to the park, Anna gave a ball to Tom.",
    "The cat sat on the mat and the dog sat on the log.",
    "Once upon a time there was a little model that learned to count: one two three four five.",
    "The Eiffel Tower is in Paris. The Colosseum is in Rome.",
] * 4
SPECIAL = "<|endoftext|>"
VOCAB = 320


def make_tokenizer(path: Path):
    """A byte-level BPE tokenizer (BOS = EOS = ``<|endoftext|>``, GPT-2 style), saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=[SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL)
    hf.save_pretrained(path)
    return hf


def hf_configs(vocab: int, n_ctx: int = 48) -> dict:
    """The Hugging Face configs of the tiny checkpoints (``n_ctx`` positions)."""
    from transformers import GPT2Config, LlamaConfig

    return {
        "gpt2": GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=n_ctx,
            n_ctx=n_ctx,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "gqa": LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=max(64, n_ctx),
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            rms_norm_eps=1e-5,
        ),
    }


def build_checkpoints(root: Path, n_ctx: int = 48) -> dict[str, Path]:
    """Save every tiny checkpoint under ``root`` (one folder each) and return their paths."""
    from transformers import AutoModelForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(root / "tokenizer")
    vocab = len(tokenizer)
    paths = {}
    for seed, (name, cfg) in enumerate(sorted(hf_configs(vocab, n_ctx).items())):
        path = root / f"tiny-{name}"
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        randomize_(model, seed)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths[name] = path
    return paths
