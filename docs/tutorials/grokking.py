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
# # Grokking
#
# Nanda et al., *Progress measures for grokking via mechanistic interpretability* (2023). A
# one-layer transformer reads `a b =` and predicts `(a + b) mod p`. It first memorises the
# training pairs, then — long after the training loss is near zero — generalises to the held-out
# pairs. Reverse-engineered, the trained model computes with a handful of Fourier frequencies:
# it embeds `a` and `b` as `cos(w_k a)`, `sin(w_k a)`, multiplies them in the MLP and reads out
# `cos(w_k (a + b - c))`.
#
# This page trains the reduced configuration `GrokkingConfig.quick()` (p = 31, about 10 s of
# one core). The paper's configuration (p = 113; about 16 minutes on an idle 2-core machine), and
# a middle-sized one that groks in about 3 minutes, are recorded in [Toy models](../toys.md):
#
# ```bash
# mechscope toys grokking --out runs/grokking    # the paper's settings; resumable, writes an HTML report
# mechscope toys grokking --p 53 --frac-train 0.4 --lr 3e-3 --epochs 6000 --stop-after-grokking 500 --out runs/grok53
# ```

# %%
import matplotlib.pyplot as plt
import torch

from mechscope import toys
from mechscope.toys import fourier

torch.set_num_threads(1)  # the model is tiny: one thread is the fastest

# %% [markdown]
# ## Train until it groks
#
# Full-batch AdamW with strong weight decay, on half of the 31 × 31 pairs; training stops 100
# epochs after test accuracy passes 99%. `out_dir=` would make the run resumable and keep its
# checkpoints on disk; here they stay in memory (`run.checkpoints`).

# %%
config = toys.GrokkingConfig.quick()
run = toys.train_grokking(config, progress=False)
history = run.history  # one dict per logged epoch


def first_epoch(key, level=0.99):
    return next(row["epoch"] for row in history if row[key] >= level)


print(f"p = {config.p}, {config.n_train} training pairs, {history[-1]['epoch']} epochs")
print(
    "train accuracy >= 99% at epoch",
    first_epoch("train_acc"),
    "; test accuracy >= 99% at epoch",
    first_epoch("test_acc"),
)

# %% [markdown]
# ## The Fourier structure
#
# `analyse_model` finds the key frequencies twice: from the embedding (its norm per frequency)
# and from the MLP neurons (how many neurons each frequency explains); by default both cut the
# sorted values at their largest gap.

# %%
analysis = toys.analyse_model(run.model, run.data, config.p)
print("key frequencies from the embedding:", analysis["key_freqs_embed"])
print("key frequencies from the neurons:  ", analysis["key_freqs_neurons"])

freqs = range(1, fourier.n_frequencies(config.p) + 1)
fig, axes = plt.subplots(1, 2, figsize=(10, 3))
axes[0].bar(freqs, analysis["embed_freq_norms"])
axes[0].set_title("embedding: squared norm per frequency")
axes[1].bar(freqs, analysis["neurons_per_frequency"])
axes[1].set_title("neurons per frequency")
for ax in axes:
    ax.set_xlabel("frequency k")
fig.tight_layout()
plt.show()

# %% [markdown]
# A neuron's activation over the `(a, b)` grid is periodic, and in the 2-D Fourier basis it is
# a few terms of one frequency:

# %%
_, cache = run.model.run_with_cache(run.data.tokens, names_filter="blocks.0.mlp.hook_post")
acts = cache["blocks.0.mlp.hook_post"][:, -1].reshape(config.p, config.p, -1)  # [a, b, d_mlp]
neuron = 0
coefficients = fourier.fourier_2d(acts[:, :, neuron])
_, labels = fourier.fourier_basis(config.p)
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
axes[0].imshow(acts[:, :, neuron], cmap="RdBu_r")
axes[0].set_title(f"neuron {neuron}: activation over (a, b)")
axes[0].set_xlabel("b")
axes[0].set_ylabel("a")
axes[1].imshow(coefficients.abs(), cmap="Greys")
axes[1].set_title("|coefficients| in the 2-D Fourier basis")
ticks = range(0, config.p, 4)
axes[1].set_xticks(ticks, [labels[i] for i in ticks], rotation=90)
axes[1].set_yticks(ticks, [labels[i] for i in ticks])
fig.tight_layout()
plt.show()
print(
    f"neuron {neuron}: dominant frequency {analysis['neuron_freq'][neuron]}, "
    f"which explains {analysis['neuron_frac_explained'][neuron]:.0%} of its variance"
)

# %% [markdown]
# ## Progress measures: restricted and excluded loss
#
# At every checkpoint, with the final model's key frequencies:
#
# * the **restricted loss** keeps only the part of the neurons' output that runs through
#   `cos/sin(w_k (a + b))` for the key frequencies: it falls when the Fourier circuit forms;
# * the **excluded loss** removes those directions from the logits and measures the loss on the
#   training pairs: it rises as the training performance moves from memorisation onto the circuit.
#
# Both move long before the test loss does.

# %%
rows = toys.progress_measures(run)
epochs = [row["epoch"] for row in rows]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for key, style in [("train_loss", "-"), ("test_loss", "-"), ("restricted_loss", "--"), ("excluded_loss", "--")]:
    axes[0].plot(epochs, [row[key] for row in rows], style, label=key.replace("_", " "))
axes[0].set_yscale("log")
axes[0].set_xlabel("epoch")
axes[0].legend()
axes[0].set_title("losses")
axes[1].plot(epochs, [row["sum_sq_weights"] for row in rows], label="Σ‖θ‖²")
axes[1].set_xlabel("epoch")
axes[1].set_title("total squared weight norm")
fig.tight_layout()
plt.show()

print("epoch  train loss  test loss  restricted  excluded")
for row in rows[:: max(1, len(rows) // 7)] + rows[-1:]:
    print(
        f"{row['epoch']:>5}  {row['train_loss']:10.2e}  {row['test_loss']:9.2e}  "
        f"{row['restricted_loss']:10.2e}  {row['excluded_loss']:8.2e}"
    )

# %% [markdown]
# The phases of the paper in miniature: memorisation (train loss falls, test loss rises),
# circuit formation (restricted loss falls and excluded loss rises while test loss is still
# high; the weight norm falls), and clean-up (the test loss drops). `mechscope toys grokking`
# writes the same curves, the neuron frequencies and the 2-D Fourier spectra for any
# configuration as an HTML report.
