# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sparse autoencoders
#
# A sparse autoencoder (SAE) rewrites an activation `x` as a sparse combination of learned
# directions: `x ≈ W_dec f(x) + b_dec` with few latents of `f(x)` active. This page trains a
# TopK SAE on the residual stream of the bundled SmolLM2-135M, evaluates it (sparsity,
# reconstruction, downstream loss and the error pathology), splices it into the model, patches
# its features on an IOI prompt, and loads an SAELens file.
#
# The text here is small and ships with the project (its own documentation), so the page runs
# offline in about a minute; the SAE is correspondingly rough. A real run trains on the default
# corpus (prose and documentation, 3 M tokens) from a JSON or TOML file:
#
# ```bash
# mechscope sae train sae.toml    # e.g. [[saes]] architecture="topk" hook_name="blocks.6.hook_resid_post" k=32
# mechscope sae eval sae.toml     # the evaluation below, on held-out text
# ```

# %%
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import mechscope as ms
from mechscope.data import ioi_dataset
from mechscope.sae import (
    SAEConfig,
    TensorSource,
    TrainConfig,
    evaluate_sae,
    feature_patch,
    load_sae,
    run_with_saes,
    save_sae,
    train_sae,
)

torch.manual_seed(0)
model = ms.load("smollm2-135m", device="cpu")
hook = "blocks.6.hook_resid_post"

# %% [markdown]
# ## Text and activations
#
# The Markdown pages of the project, tokenised as one stream and cut into sequences of 128
# tokens; the last eight sequences are held out for the evaluation. Activations of the residual
# stream after block 6 are harvested once from the first 20,000 training tokens (the forward
# stops after that block).

# %%
root = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "README.md").exists() and (p / "docs").is_dir())
pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
stream = torch.cat([model.to_tokens(page.read_text(), truncate=False)[0] for page in pages])  # [token]
context = 128
sequences = stream[: len(stream) // context * context].view(-1, context)  # [n_seq, pos]
train_tokens, eval_tokens = sequences[:-8], sequences[-8:]  # [n_seq, pos] each
print(f"{len(stream):,} tokens: {len(train_tokens)} training and {len(eval_tokens)} held-out sequences of {context}")

with torch.no_grad():
    acts = torch.cat(
        [
            model.run_with_cache(batch, names_filter=hook, stop_at_layer=7)[1][hook].flatten(0, 1)
            for batch in train_tokens[:160].split(16)
        ]
    )  # [token, d_model]
print("activations", tuple(acts.shape))

# %% [markdown]
# ## Train a TopK SAE
#
# TopK keeps the `k` largest pre-activations of every token and zeroes the rest, so the L0 is
# `k` by construction; only the selected latents enter the decoder and its gradients. Sixteen
# latents per token, a dictionary four times the residual width:

# %%
sae_config = SAEConfig(d_in=model.cfg.d_model, d_sae=4 * model.cfg.d_model, architecture="topk", k=16, hook_name=hook)
train_config = TrainConfig(steps=200, lr=1e-3, lr_warmup_steps=20, dead_window=100, log_every=20, progress=False)
sae = train_sae(sae_config, TensorSource({hook: acts}, batch_size=512, seed=0), train_config)
print(sae.cfg.architecture, sae.cfg.d_in, "->", sae.cfg.d_sae)

# %% [markdown]
# ## Evaluate
#
# `evaluate_sae` runs the held-out sequences with the SAE spliced in. It reports sparsity (L0,
# dead and dense latents), reconstruction (FVU, the fraction of variance unexplained; cosine;
# shrinkage), and downstream next-token loss: clean, with the reconstruction spliced in, and
# with the activation zero- or mean-ablated; **CE recovered** is
# `(ce_zero - ce_spliced) / (ce_zero - ce_clean)`.
#
# The **noise baseline** (Gurnee, 2024): replace the SAE's error with a random direction of the
# same norm at every token. If the SAE's error were "just noise" the two losses would match; a
# `pathology_ratio` well above 1 means the SAE's error hurts more than a random one of its size.

# %%
evaluation = evaluate_sae(model, sae, eval_tokens[:4], batch_size=4)
print(evaluation.summary())

# %%
density = (sae.encode(acts) > 0).float().mean(0)  # firing frequency of each latent
fig, ax = plt.subplots(figsize=(6, 3))
ax.hist(torch.log10(density[density > 0]), bins=40)
ax.set_xlabel("log10 firing frequency")
ax.set_ylabel("latents")
ax.set_title(f"{int((density == 0).sum())} of {len(density)} latents never fired on these tokens")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Splice the SAE into the model
#
# `run_with_saes` replaces the hooked activation by the SAE's reconstruction. With
# `use_error_term=True` the error `x - x̂` is added back, so the output is exactly the model's
# while the SAE's latents (and their gradients) are in the graph; without it, the model runs on
# the reconstruction.

# %%
text = eval_tokens[:1]
with torch.no_grad():
    clean_loss = model(text, return_type="loss")
    exact = run_with_saes(model, text, saes=[sae], use_error_term=True, return_type="loss")
    spliced = run_with_saes(model, text, saes=[sae], return_type="loss")
print(f"loss: clean {clean_loss:.3f}, spliced with the error term {exact:.3f}, spliced without {spliced:.3f}")

# %% [markdown]
# ## Feature patching on an IOI prompt
#
# `feature_patch` runs the batched patching engine over the SAE's latents: each patch replaces
# one latent of the corrupted run by its clean value (with the error term kept, so only that
# latent changes). The result, keyed by the latents' hook name, is the metric for every latent.

# %%
data = ioi_dataset(model, n=2)
metric = data.metric()  # logit difference, indirect object minus subject
with torch.no_grad():
    effects = feature_patch(model, sae, data.clean_tokens, data.corrupted_tokens, metric, error=True)
    baseline = float(metric(model(data.corrupted_tokens)).mean())  # the corrupted run's logit difference
for name, values in effects.items():
    change = values - baseline
    if change.dim() == 0:  # the error node: everything the SAE does not reconstruct
        print(f"{name}: patching the error term moves the logit difference by {float(change):+.3f}")
        continue
    order = change.abs().argsort(descending=True)[:5]
    print(f"{name} {tuple(values.shape)}: the latents that move the logit difference most")
    print([(int(i), round(float(change[i]), 3)) for i in order])

# %% [markdown]
# ## Save and load: the SAELens layout
#
# `save_sae` writes the SAELens v6 layout (`cfg.json` + `sae_weights.safetensors`), which SAELens
# itself loads; `load_sae` reads SAELens, sparsify, Gemma Scope and dictionary_learning files,
# detecting the format from the files. Below, the saved config loses the extra metadata mechscope
# keeps, so it is loaded exactly as a file written by SAELens would be.

# %%
with tempfile.TemporaryDirectory() as folder:
    path = save_sae(sae, folder)
    print(sorted(p.name for p in path.iterdir()))
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"].pop("mechscope_config", None)
    (path / "cfg.json").write_text(json.dumps(cfg))
    print({key: cfg[key] for key in ("architecture", "d_in", "d_sae", "k") if key in cfg}, cfg["metadata"]["hook_name"])
    loaded = load_sae(path)
x = acts[:1000]
print("same reconstructions:", torch.allclose(loaded(x), sae(x), atol=1e-5))
