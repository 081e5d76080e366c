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
# # Probing
#
# A probe is a small classifier trained on a model's activations to read a property out of
# them. If a *linear* probe reads it well, the model represents the property along a direction
# of its residual stream; if a *k-sparse* probe (one that may read only k neurons) does, a few
# neurons carry it. This page:
#
# 1. builds a labelled token dataset (is this word capitalised?) and collects SmolLM2-135M's
#    activations at several layers in one pass;
# 2. fits a **linear probe per layer** and compares their held-out accuracy;
# 3. fits **k-sparse probes** on the MLP neurons of one layer, for growing k;
# 4. trains a tiny **Othello** model on synthetic games and probes its residual stream for the
#    board, as *mine/theirs/empty* and as *black/white/empty*.
#
# Sizes are small so the page runs quickly. The full-size runs:
#
# ```bash
# mechscope probe --dataset capitalized --sequences 128 --seq-len 64 --per-sequence 16 --layer-step 5 \
#     --ks 1 2 4 8 16 32 --exact-k 1 2 --out probe-capitalized.json
# mechscope othello train --size 6 --n-layers 2 --d-model 64 --n-heads 2 --n-games 50000 --steps 1500 --out othello-6x6
# mechscope othello probe --run othello-6x6 --games 2000
# ```

# %%
import matplotlib.pyplot as plt
import torch

import mechscope as ms
from mechscope import probing
from mechscope.probing.datasets import build_dataset
from mechscope.toys.othello.train import OthelloConfig, train_othello
from mechscope.toys.othello.world import board_probes

torch.manual_seed(0)
model = ms.load("smollm2-135m", device="cpu")

# %% [markdown]
# ## A labelled dataset and its activations
#
# `build_dataset("capitalized", ...)` cuts windows of the project's own corpus (Shakespeare and
# the Django documentation) and selects the tokens that start a word, labelled 1 when the word
# starts with a capital letter. Labels come from the tokenizer's character offsets, so they do
# not depend on how words are split into tokens.
#
# `collect_activations` reads every requested hook in one forward pass (stopping after the last
# block needed), keeping only the selected positions. The train/test split is by *sequence*,
# never by token, so neighbouring tokens of one window never sit on both sides.

# %%
dataset = build_dataset("capitalized", model.tokenizer, n_sequences=48, seq_len=64)
layers = [0, 4, 8, 12]
resid_hooks = [f"blocks.{layer}.hook_resid_post" for layer in layers]
neuron_hook = "blocks.8.mlp.hook_post"
data = probing.collect_activations(model, dataset.tokens, resid_hooks + [neuron_hook], dataset.selected)
labels = data.labels_for(dataset.labels)  # one label per collected row
train, test = probing.split_by_sequence(data.sequence, 0.25)
print(f"{len(labels)} word-start tokens, {labels.float().mean():.1%} capitalised; {len(train)} train, {len(test)} test")

# %% [markdown]
# ## A linear probe per layer
#
# `probe_layers` fits one logistic-regression probe per hook (L-BFGS on standardised features;
# the same optimum as scikit-learn's `LogisticRegression`) and evaluates it on the held-out
# sequences. About 85% of the word starts are lower case, so the accuracy to beat is that of
# always answering "lower case"; F1 on the capitalised class tells more.

# %%
results = probing.probe_layers({hook: data[hook] for hook in resid_hooks}, labels, train, test)
accuracy = [float(results[hook]["test"]["accuracy"]) for hook in resid_hooks]
f1 = [float(results[hook]["test"]["f1"]) for hook in resid_hooks]
for hook, acc, f in zip(resid_hooks, accuracy, f1, strict=True):
    print(f"{hook:>26}: accuracy {acc:.3f}, F1 {f:.3f}")

fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(layers, accuracy, "o-", label="accuracy")
ax.plot(layers, f1, "o-", label="F1")
ax.axhline(1 - labels[test].float().mean().item(), color="grey", ls="--", label="always 'lower case'")
ax.set(xlabel="layer (residual stream after the block)", ylabel="held-out score", ylim=(0, 1.02))
ax.legend()
plt.show()

# %% [markdown]
# A probe is a direction in the model's space: `direction()` gives it as a unit vector of the
# residual stream (the standardisation folded in), ready for steering or for comparison with
# other directions.

# %%
probe = results["blocks.8.hook_resid_post"]["probe"]
direction = probe.direction()
print(direction.shape, f"norm {direction.norm():.3f}")

# %% [markdown]
# ## k-sparse probes on neurons
#
# `sparse_probe_curve` ranks the 1,536 MLP neurons of layer 8 (here by their ANOVA F
# statistic on the training rows) and fits a probe on the best k, for each k. A single neuron
# that already scores well is a candidate "capital letter" neuron.

# %%
x = data[neuron_hook]
curve = probing.sparse_probe_curve(
    x[train], labels[train], x[test], labels[test], ks=(1, 2, 4, 8, 16, 32), method="f_statistic"
)
for sparse in curve:
    scores = {name: float(value) for name, value in sparse.test.items()}
    print(f"k = {len(sparse.features):>2}: accuracy {scores['accuracy']:.3f}, F1 {scores['f1']:.3f}")
print("the best single neuron:", curve[0].features)

# %% [markdown]
# ## A world model: Othello
#
# Othello-GPT (Li et al. 2023; Nanda et al. 2023) is a transformer trained only on sequences of
# legal moves, which nevertheless represents the board in its residual stream, linearly, and
# relative to the player to move (*mine/theirs*) rather than by colour. `mechscope.toys.othello`
# generates random legal games on a 6x6 board and trains such a model. This one is tiny and
# trained for only 100 steps on 200 games, so its legal-move accuracy is far from the full run's; the first
# moves of a game, which need little board state, are the ones it gets right.

# %%
cfg = OthelloConfig(
    size=6, n_layers=2, d_model=32, n_heads=2, n_games=200, steps=100, batch_size=32, lr=3e-3, eval_games=50
)
run = train_othello(cfg, progress=False)
per_move = run.eval["per_position"]
print(f"legal next move ranked first: {run.eval['accuracy']:.1%} of positions of held-out games")
print("by move:", [round(value, 2) for value in per_move[:10]], "...")

# %% [markdown]
# `board_probes` plays fresh games, collects the residual stream after the embedding and after
# each block at every move, and fits two probes of every square's state there (36 squares x 3
# classes as one batched fit): one with the classes *mine/theirs/empty* and one with
# *black/white/empty*. The table gives the held-out accuracy averaged over the squares. The
# Othello guide reports these tables for larger runs, and edits of the residual stream along
# a probe's direction that change the moves the model predicts (`intervene`).

# %%
board = board_probes(
    run.model, size=6, n_games=100, cfg=probing.ProbeConfig(l2=1e-3, batch_size=4096, epochs=10, lr=1e-2)
)
for row in board.table():
    print(f"{row['hook']:>24}: mine/theirs {row['mine_theirs']:.3f}, black/white {row['black_white']:.3f}")
