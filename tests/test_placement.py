"""Precision and placement: bf16/fp16 against transformers, device maps against one device."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import mechscope as ms
from mechscope.model.placement import layer_devices, place
from tests.conftest import save_hf_model, tiny_model

TOKENS = torch.tensor([[3, 14, 15, 9, 26, 5, 35, 8], [8, 9, 7, 9, 3, 2, 38, 1]])


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-placement")
    config = LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    save_hf_model(config, path)
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("implementation", ["auto", "eager"])
def test_half_precision_matches_transformers_in_the_same_dtype(hf_dir, dtype, implementation):
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype, attn_implementation="eager").eval()
    model = ms.load(hf_dir, device="cpu", dtype=dtype)
    model.cfg.attn_implementation = implementation
    assert model.W_E.dtype == dtype and model.blocks[0].attn.w_q.dtype == dtype
    with torch.no_grad():
        expected = hf_model(TOKENS).logits.float()
        actual = model(TOKENS)
        exact = ms.load(hf_dir, device="cpu")(TOKENS)
    assert actual.dtype == dtype
    scale = exact.abs().max()
    # Two half-precision implementations differ by rounding; both stay near the float32 answer.
    torch.testing.assert_close(actual.float(), expected, atol=0.03 * scale, rtol=0)
    torch.testing.assert_close(actual.float(), exact, atol=0.03 * scale, rtol=0)


def test_half_precision_pattern_is_a_float32_softmax(hf_dir):
    model = ms.load(hf_dir, device="cpu", dtype=torch.bfloat16)
    scores = {}

    def keep(x, *, hook):
        scores[hook.name] = x

    name = "blocks.2.attn.hook_attn_scores"
    _, cache = model.run_with_cache(TOKENS, names_filter=["blocks.2.attn.hook_pattern"])
    model.run_with_hooks(TOKENS, fwd_hooks=[(name, keep)])
    expected = torch.softmax(scores[name].float(), dim=-1).to(torch.bfloat16)
    assert torch.equal(cache["blocks.2.attn.hook_pattern"], expected)


def test_cpu_device_map_equals_single_device(hf_dir):
    single = ms.load(hf_dir, device="cpu")
    mapped = ms.load(hf_dir, device_map={"cpu": range(0, 2), torch.device("cpu"): [2, 3]})
    torch.testing.assert_close(mapped(TOKENS), single(TOKENS), atol=0, rtol=0)
    _, a = mapped.run_with_cache(TOKENS)
    _, b = single.run_with_cache(TOKENS)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=0, rtol=0)
    greedy = dict(max_new_tokens=5, do_sample=False)
    assert torch.equal(mapped.generate(TOKENS, **greedy), single.generate(TOKENS, **greedy))


def test_device_map_validation_names_the_problem():
    with pytest.raises(ms.ConfigError, match=r"no device for layers \[2\]"):
        layer_devices({"cpu": [0, 1]}, 3)
    with pytest.raises(ms.ConfigError, match="layer 1 to both"):
        layer_devices({"cpu": [0, 1], "meta": [1, 2]}, 3)
    with pytest.raises(ms.ConfigError, match=r"layer 3; layers are 0\.\.2"):
        layer_devices({"cpu": range(6)}, 3)
    with pytest.raises(ms.ConfigError, match="invalid device 'gpu0'"):
        layer_devices({"gpu0": range(3)}, 3)
    with pytest.raises(ms.ConfigError, match="'auto' or a mapping"):
        layer_devices([0, 1, 2], 3)
    assert (
        layer_devices("auto", 3) == [torch.device("cuda", i * torch.cuda.device_count() // 3) for i in range(3)]
        if torch.cuda.is_available()
        else [torch.device("cpu")] * 3
    )
    with pytest.raises(ms.LoadError, match="either device or device_map"):
        ms.load("smollm2-135m", device="cpu", device_map="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_blocks_split_between_cpu_and_cuda_match_one_device():
    model = tiny_model(
        seed=1,
        n_key_value_heads=2,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        gated_mlp=True,
        act_fn="silu",
        n_layers=4,
    )
    with torch.no_grad():
        expected = model(TOKENS)
        place(model, {"cuda:0": [0, 1], "cpu": [2, 3]})
        assert model.blocks[0].attn.w_q.is_cuda and not model.blocks[2].attn.w_q.is_cuda
        seen = {}
        with model.hooks(
            fwd_hooks=[
                (lambda n: n.endswith("hook_resid_pre"), lambda x, *, hook: seen.setdefault(hook.name, x.device.type))
            ]
        ):
            actual = model(TOKENS.cuda())
        generated = model.generate(TOKENS.cuda(), max_new_tokens=4, do_sample=False)
    assert seen == {
        "blocks.0.hook_resid_pre": "cuda",
        "blocks.1.hook_resid_pre": "cuda",
        "blocks.2.hook_resid_pre": "cpu",
        "blocks.3.hook_resid_pre": "cpu",
    }
    torch.testing.assert_close(actual.cpu(), expected, atol=1e-4, rtol=1e-4)
    assert generated.shape == (2, 12)
