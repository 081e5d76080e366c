"""File formats: hand-built files in each layout, with expected encodings computed from the formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mechscope.errors import LoadError
from mechscope.sae import SAEConfig, make_sae, registered_architectures
from mechscope.sae.formats import (
    load_dictionary_learning,
    load_gemma_scope,
    load_sae,
    saelens_architectures,
    save_sae,
    sparsify_hook_name,
)
from tests.conftest import tiny_model

from .conftest import knobs_for

D_IN, D_SAE = 6, 10


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def weights():
    return {
        "W_enc": _rand(D_IN, D_SAE, seed=1),
        "b_enc": 0.3 * _rand(D_SAE, seed=2),
        "W_dec": _rand(D_SAE, D_IN, seed=3),
        "b_dec": 0.3 * _rand(D_IN, seed=4),
    }


@pytest.fixture
def x():
    return _rand(7, D_IN, seed=5)


def _write_saelens(path, cfg, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    return path


def _check(sae, x, acts, recons):
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), acts)
        torch.testing.assert_close(sae(x), recons)


def test_saelens_v6_standard(tmp_path, weights, x):
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "model_name": "gpt2",
            "hook_name": "blocks.3.hook_resid_pre",
            "context_size": 128,
            "sae_lens_version": "6.5.0",
        },
    }
    sae = load_sae(_write_saelens(tmp_path / "sae", cfg, weights))
    acts = torch.relu((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"])
    _check(sae, x, acts, acts @ weights["W_dec"] + weights["b_dec"])
    assert sae.cfg.hook_name == "blocks.3.hook_resid_pre" and sae.cfg.metadata["context_size"] == 128


def test_saelens_v6_jumprelu_and_gated(tmp_path, weights, x):
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(6))
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "apply_b_dec_to_input": False,
        "metadata": {"hook_name": "blocks.1.hook_resid_post"},
    }
    sae = load_sae(_write_saelens(tmp_path / "jump", cfg, {**weights, "threshold": threshold}))
    pre = x @ weights["W_enc"] + weights["b_enc"]
    acts = pre * (pre > threshold)
    _check(sae, x, acts, acts @ weights["W_dec"] + weights["b_dec"])

    gated = {k: v for k, v in weights.items() if k != "b_enc"}
    gated.update(b_gate=0.2 * _rand(D_SAE, seed=7), r_mag=0.2 * _rand(D_SAE, seed=8), b_mag=0.2 * _rand(D_SAE, seed=9))
    cfg = {"architecture": "gated", "d_in": D_IN, "d_sae": D_SAE, "metadata": {"hook_name": "h"}}
    sae = load_sae(_write_saelens(tmp_path / "gated", cfg, gated))
    centred = x - gated["b_dec"]
    gate = centred @ gated["W_enc"] + gated["b_gate"]
    mag = centred @ (gated["W_enc"] * gated["r_mag"].exp()) + gated["b_mag"]
    acts = (gate > 0) * torch.relu(mag)
    _check(sae, x, acts, acts @ gated["W_dec"] + gated["b_dec"])


def test_saelens_flat_pre_v6_topk_config(tmp_path, weights, x):
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_point": "blocks.0.hook_resid_post",
        "hook_point_layer": 0,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "normalize_activations": False,
        "apply_b_dec_to_input": True,
        "model_name": "gpt2",
        "context_size": 64,
        "dtype": "torch.float32",
    }
    sae = load_sae(_write_saelens(tmp_path / "old", cfg, weights))
    assert sae.architecture == "topk" and sae.cfg.k == 3 and sae.cfg.hook_name == "blocks.0.hook_resid_post"
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    acts = torch.zeros_like(pre)
    for row in range(pre.shape[0]):  # naive per-token top-3
        for idx in sorted(range(D_SAE), key=lambda j: -pre[row, j])[:3]:
            acts[row, idx] = max(float(pre[row, idx]), 0.0)
    _check(sae, x, acts, acts @ weights["W_dec"] + weights["b_dec"])


def test_saelens_topk_with_decoder_norm_rescaling(tmp_path, weights, x):
    cfg = {
        "architecture": "topk",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "k": 3,
        "rescale_acts_by_decoder_norm": True,
        "metadata": {"hook_name": "h"},
    }
    sae = load_sae(_write_saelens(tmp_path / "rescaled", cfg, weights))
    norms = weights["W_dec"].norm(dim=-1)
    pre = ((x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]) * norms
    top = pre.topk(3, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    _check(sae, x, acts, (acts / norms) @ weights["W_dec"] + weights["b_dec"])


def test_saelens_skip_transcoder(tmp_path, weights, x):
    d_out = 4
    tensors = {
        **weights,
        "W_dec": _rand(D_SAE, d_out, seed=10),
        "b_dec": _rand(d_out, seed=11),
        "W_skip": _rand(d_out, D_IN, seed=12),
    }
    cfg = {
        "architecture": "skip_transcoder",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "d_out": d_out,
        "apply_b_dec_to_input": False,
        "metadata": {"hook_name": "blocks.2.ln2.hook_normalized", "hook_name_out": "blocks.2.hook_mlp_out"},
    }
    sae = load_sae(_write_saelens(tmp_path / "tc", cfg, tensors))
    assert sae.cfg.is_transcoder and sae.cfg.output_hook == "blocks.2.hook_mlp_out"
    acts = torch.relu(x @ tensors["W_enc"] + tensors["b_enc"])
    _check(sae, x, acts, acts @ tensors["W_dec"] + tensors["b_dec"] + x @ tensors["W_skip"].T)


def test_sparsify_sublayer_inputs_are_what_the_module_reads():
    """A sparsify transcoder on ``layers.1.mlp`` reads the MLP module's input: ``ln2``'s output with
    its weights (``hook_out``); ``hook_normalized`` comes before them, as in TransformerLens."""
    assert sparsify_hook_name("layers.1.mlp") == ("blocks.1.ln2.hook_out", "blocks.1.hook_mlp_out")
    assert sparsify_hook_name("layers.1.self_attn") == ("blocks.1.ln1.hook_out", "blocks.1.hook_attn_out")
    model = tiny_model()
    names = ["blocks.1.ln2.hook_out", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out"]
    _, cache = model.run_with_cache(torch.tensor([[3, 14, 15, 9, 26]]), names_filter=names)
    with torch.no_grad():
        mlp_out = model.blocks[1].mlp(cache["blocks.1.ln2.hook_out"])
        assert not torch.allclose(model.blocks[1].mlp(cache["blocks.1.ln2.hook_normalized"]), mlp_out)
    torch.testing.assert_close(mlp_out, cache["blocks.1.hook_mlp_out"])


def test_sparsify_folder(tmp_path, weights, x):
    folder = tmp_path / "sae-run" / "layers.4"
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(
        json.dumps(
            {
                "activation": "topk",
                "expansion_factor": 32,
                "normalize_decoder": True,
                "num_latents": D_SAE,
                "k": 2,
                "multi_topk": False,
                "skip_connection": False,
                "transcode": False,
                "d_in": D_IN,
            }
        )
    )
    enc_w = weights["W_enc"].T.contiguous()
    save_file(
        {
            "encoder.weight": enc_w,
            "encoder.bias": weights["b_enc"],
            "W_dec": weights["W_dec"],
            "b_dec": weights["b_dec"],
        },
        str(folder / "sae.safetensors"),
    )
    sae = load_sae(folder)
    assert sae.cfg.hook_name == "blocks.4.hook_resid_post"
    pre = torch.relu(torch.nn.functional.linear(x - weights["b_dec"], enc_w, weights["b_enc"]))
    top = pre.topk(2, dim=-1)
    acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    recons = (top.values[..., None] * weights["W_dec"][top.indices]).sum(-2) + weights["b_dec"]
    _check(sae, x, acts, recons)


@pytest.mark.parametrize(("transcode", "hook_in", "hook_out"), [
    (False, "blocks.2.hook_mlp_out", None),
    (True, "blocks.2.ln2.hook_out", "blocks.2.hook_mlp_out"),
])  # fmt: skip
def test_sparsify_sublayer_sae_reads_the_module_output_and_a_transcoder_its_input(
    tmp_path, weights, transcode, hook_in, hook_out
):
    """sparsify trains a plain SAE on a module's output, a transcoder from its input to its output."""
    folder = tmp_path / "layers.2.mlp"
    folder.mkdir()
    cfg = {"activation": "topk", "num_latents": D_SAE, "k": 2, "transcode": transcode, "d_in": D_IN}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    tensors = {"encoder.weight": weights["W_enc"].T.contiguous(), "encoder.bias": weights["b_enc"],
               "W_dec": weights["W_dec"], "b_dec": weights["b_dec"]}  # fmt: skip
    save_file(tensors, str(folder / "sae.safetensors"))
    sae = load_sae(folder)
    assert (sae.cfg.hook_name, sae.cfg.hook_name_out) == (hook_in, hook_out)


def test_gemma_scope_npz(tmp_path, weights, x):
    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(13))
    path = tmp_path / "params.npz"
    np.savez(path, **{k: v.numpy() for k, v in weights.items()}, threshold=threshold.numpy())
    sae = load_sae(tmp_path, hook_name="blocks.12.hook_resid_post")
    pre = x @ weights["W_enc"] + weights["b_enc"]
    acts = pre * (pre > threshold)
    _check(sae, x, acts, acts @ weights["W_dec"] + weights["b_dec"])
    assert sae.cfg.hook_name == "blocks.12.hook_resid_post"


def test_dictionary_learning_variants(tmp_path, weights, x):
    W_enc, b_enc, W_dec, b_dec = (weights[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    relu = {"encoder.weight": W_enc.T, "encoder.bias": b_enc, "decoder.weight": W_dec.T, "bias": b_dec}
    torch.save(relu, tmp_path / "ae.pt")
    acts = torch.relu(torch.nn.functional.linear(x - b_dec, W_enc.T, b_enc))
    _check(load_sae(tmp_path), x, acts, torch.nn.functional.linear(acts, W_dec.T) + b_dec)

    topk = {
        "encoder.weight": W_enc.T,
        "encoder.bias": b_enc,
        "decoder.weight": W_dec.T,
        "b_dec": b_dec,
        "k": torch.tensor(3),
        "threshold": torch.tensor(-1.0),
    }
    torch.save(topk, tmp_path / "topk.pt")
    sae = load_dictionary_learning(tmp_path / "topk.pt")
    post = torch.relu(torch.nn.functional.linear(x - b_dec, W_enc.T, b_enc))
    top = post.topk(3, dim=-1)
    acts = torch.zeros_like(post).scatter(-1, top.indices, top.values)
    _check(sae, x, acts, acts @ W_dec + b_dec)

    batch = {**topk, "threshold": torch.tensor(0.4)}
    torch.save(batch, tmp_path / "batchtopk.pt")
    acts = post * (post > 0.4)
    _check(load_dictionary_learning(tmp_path / "batchtopk.pt"), x, acts, acts @ W_dec + b_dec)

    threshold = torch.rand(D_SAE, generator=torch.Generator().manual_seed(14))
    torch.save({**weights, "threshold": threshold}, tmp_path / "jump.pt")
    pre = x @ W_enc + b_enc
    acts = pre * (pre > threshold)
    _check(load_dictionary_learning(tmp_path / "jump.pt"), x, acts, acts @ W_dec + b_dec)

    gate_bias, mag_bias, r_mag = (0.2 * _rand(D_SAE, seed=s) for s in (15, 16, 17))
    torch.save(
        {
            "encoder.weight": W_enc.T,
            "decoder.weight": W_dec.T,
            "decoder_bias": b_dec,
            "r_mag": r_mag,
            "gate_bias": gate_bias,
            "mag_bias": mag_bias,
        },
        tmp_path / "gated.pt",
    )
    x_enc = torch.nn.functional.linear(x - b_dec, W_enc.T)
    acts = ((x_enc + gate_bias) > 0) * torch.relu(x_enc * r_mag.exp() + mag_bias)
    _check(load_dictionary_learning(tmp_path / "gated.pt"), x, acts, acts @ W_dec + b_dec)


VARIANTS = {
    "sae": dict(),
    "transcoder": dict(d_out=4, hook_name_out="blocks.1.hook_mlp_out"),
    "skip_transcoder": dict(d_out=4, hook_name_out="blocks.1.hook_mlp_out", skip_connection=True),
    "hook_z": dict(hook_name="blocks.0.attn.hook_z", n_heads=2),
}


def _perturbed_sae(architecture: str, variant: str):
    kwargs = {
        "hook_name": "blocks.1.ln2.hook_normalized",
        **VARIANTS[variant],
        **knobs_for(architecture, k=3, lp_norm=0.5),
    }
    sae = make_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture=architecture,
                             metadata={"model_name": "tiny", "context_size": 16}, **kwargs), seed=3)  # fmt: skip
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        for name, buffer in sae.named_buffers():
            if "threshold" in name:
                buffer.fill_(0.3)  # BatchTopK's learned inference threshold
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.fill_(-1.0)
    return sae


def _same_function(loaded, reference, x, variant):
    inputs = x.reshape(7, 2, 3) if variant == "hook_z" else x
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(inputs), reference.encode(inputs))
        torch.testing.assert_close(loaded(inputs), reference(inputs))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("architecture", registered_architectures())
def test_save_load_round_trip(architecture, variant, tmp_path, x):
    sae = _perturbed_sae(architecture, variant)
    save_sae(sae, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == sae.cfg.hook_name and cfg["metadata"]["context_size"] == 16
    reference = sae.for_inference()
    assert cfg["architecture"] == reference.saelens_architecture()
    loaded = load_sae(tmp_path)
    assert loaded.architecture == reference.architecture and loaded.cfg == reference.cfg
    _same_function(loaded, reference, x, variant)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("architecture", registered_architectures())
def test_the_saelens_layout_alone_loads(architecture, variant, tmp_path, x):
    """Without mechscope's own copy of the config, the SAELens keys and weights say everything."""
    sae = _perturbed_sae(architecture, variant)
    save_sae(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    del cfg["metadata"]["mechscope_config"]
    if variant == "hook_z":
        cfg["metadata"]["n_heads"] = 2
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    if cfg["architecture"] not in saelens_architectures():
        with pytest.raises(LoadError, match=f"SAELens architecture '{cfg['architecture']}' is not supported"):
            load_sae(tmp_path)
        return
    reference = sae.for_inference()
    loaded = load_sae(tmp_path)
    assert loaded.architecture == reference.architecture and loaded.cfg.hook_name == reference.cfg.hook_name
    assert loaded.cfg.output_hook == reference.cfg.output_hook
    _same_function(loaded, reference, x, variant)


def test_malformed_files_name_file_and_problem(tmp_path, weights):
    cfg = {"architecture": "standard", "d_in": D_IN, "d_sae": D_SAE, "metadata": {"hook_name": "h"}}
    folder = _write_saelens(tmp_path / "sae", cfg, weights)
    blob = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(LoadError, match=r"sae_weights.safetensors: unreadable or truncated"):
        load_sae(folder)

    folder = _write_saelens(tmp_path / "shape", cfg, {**weights, "W_dec": torch.zeros(D_SAE, D_IN + 1)})
    with pytest.raises(LoadError, match=r"W_dec has shape \(10, 7\), expected \(10, 6\)"):
        load_sae(folder)

    folder = _write_saelens(tmp_path / "missing", cfg, {k: v for k, v in weights.items() if k != "b_enc"})
    with pytest.raises(LoadError, match=r"missing \['b_enc'\]"):
        load_sae(folder)

    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "cfg.json").write_text("{not json")
    save_file(weights, str(tmp_path / "json" / "sae_weights.safetensors"))
    with pytest.raises(LoadError, match=r"cfg.json: not valid JSON"):
        load_sae(tmp_path / "json")

    folder = _write_saelens(tmp_path / "arch", {**cfg, "architecture": "matryoshka"}, weights)
    with pytest.raises(LoadError, match="'matryoshka' is not supported"):
        load_sae(folder)

    np.savez(
        tmp_path / "params.npz", **{k: v.numpy() for k, v in weights.items()}, threshold=np.ones(D_SAE, np.float32)
    )
    data = (tmp_path / "params.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"cut.npz: unreadable or truncated"):
        load_gemma_scope(tmp_path / "cut.npz")

    torch.save({"encoder.weight": weights["W_enc"].T}, tmp_path / "ae.pt")
    data = (tmp_path / "ae.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadError, match=r"cut.pt: unreadable or truncated"):
        load_dictionary_learning(tmp_path / "cut.pt")
    with pytest.raises(LoadError, match=r"ae.pt: keys \['encoder.weight'\] match no dictionary_learning"):
        load_dictionary_learning(tmp_path / "ae.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="empty: no SAE files found"):
        load_sae(tmp_path / "empty")
