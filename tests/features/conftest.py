"""A tiny GPT-2-style model saved as a Hugging Face folder with a small byte-level BPE tokenizer
whose vocabulary holds hostile token texts, loaded with `mechscope.load`; SAEs on it."""

from __future__ import annotations

import pytest
import torch

import mechscope as ms
from mechscope.sae import SAEConfig, make_sae

HOSTILE = ["<script>alert(1)</script>", "\"quoted' & <b>bold</b>", "</textarea>", "nul\x00byte", "\u202eevil\u200f"]
CORPUS = [
    "The Eiffel Tower is in Paris. The Colosseum is in Rome.",
    "When Mary and John went to the store, John gave a drink to Mary.",
    "Once upon a time there was a little model that learned to count: one two three four five.",
    "The cat sat on the mat " + HOSTILE[0] + " and the dog " + HOSTILE[2] + " sat on the log.",
    "Quotes " + HOSTILE[1] + " then " + HOSTILE[3] + " and " + HOSTILE[4] + " end.",
]
SPECIAL = "<|endoftext|>"


def make_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[SPECIAL], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL)
    hf.add_tokens(HOSTILE)
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, GPT2Config

    path = tmp_path_factory.mktemp("tiny-gpt2")
    hf_tok = make_tokenizer(path)
    cfg = GPT2Config(vocab_size=len(hf_tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                     eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.normal_(1 if p.shape == (32,) else 0, 0.1)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_model(model_dir):
    return ms.load(model_dir, device="cpu")


@pytest.fixture(scope="session")
def corpus_tokens(text_model):
    from mechscope.data.corpus import tokenize_texts

    return tokenize_texts(CORPUS * 6, text_model.tokenizer)


def topk_sae(d_in=32, d_sae=48, hook="blocks.0.hook_resid_post", seed=1):
    sae = make_sae(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=6, hook_name=hook), seed=seed)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
    return sae


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from a second thread, and a busy machine loses a lot to it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
