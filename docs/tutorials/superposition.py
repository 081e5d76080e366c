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
# # Superposition
#
# Elhage et al., *Toy Models of Superposition* (2022): a ReLU-output model
# `x' = ReLU(WᵀW x + b)` squeezes `n_features` sparse features through `n_hidden < n_features`
# dimensions. When features are dense it keeps the most important ones, one per dimension;
# as they become sparse it packs more features than dimensions, at angles that interfere only
# when two features are active at once. With five features in two dimensions the sparse
# solution is a pentagon.
#
# This page trains eight such models at once (one per feature density) with reduced settings.
# The full-size run, with the phase diagram of the paper and an HTML report:
#
# ```bash
# mechscope toys superposition --out runs/superposition   # 5,000 steps per sweep, ~5 minutes on 2 cores
# ```

# %%
import matplotlib.pyplot as plt
import torch

from mechscope import toys

torch.manual_seed(0)
torch.set_num_threads(1)  # these models are tiny: one thread is the fastest

# %% [markdown]
# ## Eight instances, from dense to sparse
#
# Feature `i` has importance `0.9^i` (the weight of its squared error), and instance `t` sees
# each feature with probability `20^-t` (from 1, dense, to 0.05). `ToyModel` holds all eight
# as one batched model, and `train_toy_model` trains them together: each instance's gradient is
# exactly its own.

# %%
n_features, n_hidden, n_instances = 5, 2, 8
density = (20.0 ** -torch.linspace(0, 1, n_instances))[:, None]  # [instance, 1]
importance = 0.9 ** torch.arange(n_features, dtype=torch.float32)  # [feature]
toy = toys.ToyModel(n_features, n_hidden, n_instances, feature_probability=density, importance=importance, seed=0)
history = toys.train_toy_model(toy, toys.SuperpositionTraining(steps=2000, batch_size=1024, lr=1e-2), progress=False)
print("final loss per instance:", [round(loss, 4) for loss in history[-1]])

# %% [markdown]
# ## The geometry: where each feature's column of `W` points
#
# Each panel draws the five columns `W_i` (one arrow per feature, darker = more important).
# Dense features: two orthogonal arrows, the others at zero. Sparse features: all five, as a
# pentagon.

# %%
W = toy.W.detach()  # [instance, hidden, feature]
fig, axes = plt.subplots(1, n_instances, figsize=(2 * n_instances, 2.2))
colors = plt.cm.viridis(torch.linspace(0, 0.9, n_features).numpy())
for t, ax in enumerate(axes):
    for i in range(n_features):
        ax.plot([0, W[t, 0, i]], [0, W[t, 1, i]], color=colors[i], lw=2)
        ax.scatter(W[t, 0, i], W[t, 1, i], color=colors[i], s=12)
    ax.set_xlim(-1.5, 1.5)
    ax.set_ylim(-1.5, 1.5)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"1-S = {density[t, 0]:.3f}", fontsize=9)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Measures: norms, interference and dimensionality
#
# `‖W_i‖` says whether a feature is represented; `feature_dimensionality` is
# `D_i = ‖W_i‖² / Σ_j(Ŵ_i·W_j)²`, the fraction of a dimension the feature gets: 1 for a
# dedicated dimension, 1/2 for an antipodal pair, 2/5 for a feature of the pentagon; and
# `n_hidden / ‖W‖_F²` is the number of dimensions per embedded feature.
# (`mechscope.toys.superposition` also has the interference `Σ_{j≠i}(Ŵ_i·W_j)²` and these
# measures as functions.)

# %%
norms = W.norm(dim=1)  # [instance, feature]
dims = toys.feature_dimensionality(W)  # [instance, feature]
per_feature = n_hidden / W.pow(2).sum((1, 2))  # [instance]
print("1-S     ‖W_i‖ per feature              D_i per feature                dims/feature")
for t in range(n_instances):
    print(
        f"{density[t, 0]:.3f}  ",
        " ".join(f"{v:4.2f}" for v in norms[t].tolist()),
        "   ",
        " ".join(f"{v:4.2f}" for v in dims[t].tolist()),
        f"   {per_feature[t]:.2f}",
    )

# %%
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(1 / density[:, 0], per_feature, "o-")
ax.set_xscale("log")
ax.set_xlabel("1 / (1 - S)")
ax.set_ylabel("dimensions per feature")
ax.set_title("Sparser features share dimensions")
fig.tight_layout()
plt.show()

# %% [markdown]
# As in the paper: dense features get the two dimensions for the two most important features
# (`D ≈ 1`, the rest unrepresented); as sparsity grows the model first packs four features as
# two antipodal pairs (`D = 1/2`), then all five in a pentagon (`D ≈ 2/5`). Dimensions per
# feature fall below 2/5 because the sparse solutions' columns are a little longer than 1.
# Short training can leave an instance in a local minimum; the full run in
# [Toy models](../toys.md) records which ones do at 5,000 steps.
#
# ## The phase change with two features in one dimension
#
# `phase_diagram` trains one instance per (density, relative importance of the second feature)
# cell, each from several initialisations, and classifies what the single dimension does with
# the second feature: *not represented*, a *dedicated dimension* (the first feature is dropped),
# or *superposition* (both, antipodal). A 4 × 4 diagram with short training:

# %%
diagram = toys.phase_diagram(
    densities=[1.0, 0.3, 0.1, 0.03],
    importances=[0.3, 0.8, 1.3, 3.0],
    training=toys.SuperpositionTraining(steps=1500, batch_size=256, lr=2e-2),
    n_restarts=3,
    progress=False,
)
print("rows: density 1-S; columns: relative importance", diagram.importances)
for d, row in zip(diagram.densities, diagram.phases, strict=True):
    print(f"{d:>5}  " + " | ".join(f"{phase:<19}" for phase in row))

# %% [markdown]
# Dense features (top row) are dropped or given the dimension by importance alone; once they
# are sparse, the second feature shares the dimension with the first (superposition) over a
# widening band of importances. With this little training a few cells still land in another
# phase; `mechscope toys superposition` draws the 8 × 8 diagram with the paper's training
# length (its table is in [Toy models](../toys.md)).
