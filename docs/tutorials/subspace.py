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
# # Subspaces: patching a direction, DAS and the illusion check
#
# Activation patching swaps a whole activation between two runs. Often a variable lives in a
# small *subspace* of it, and the finer question is which direction carries it. This page, on
# the bundled SmolLM2-135M and an IOI variant:
#
# 1. patches **one direction** of the residual stream instead of all of it;
# 2. **learns** the direction with distributed alignment search (DAS);
# 3. runs the **interpretability-illusion check** (Makelov, Lange and Nanda, 2023), which asks
#    whether the learned direction acts through weights that read it or only looks causal;
# 4. shows the illusion itself on a hand-built toy model where the answer is known.
#
# A short DAS run on 16 prompt pairs keeps this page fast. The full-size run (192 training and
# 64 held-out pairs, 200 DAS steps, three sites, the check written as HTML):
#
# ```bash
# mechscope subspace ioi --n-train 192 --n-test 64 --steps 200 --out-dir runs/subspace-ioi
# ```

# %%
import torch

import mechscope as ms
from mechscope.subspace import (
    DASConfig,
    head_readers,
    illusion_check,
    interchange_scores,
    mean_difference,
    subspace_patch,
    train_das,
)
from mechscope.subspace.tasks import ioi_position_pairs
from mechscope.subspace.toy import ILLUSORY_DIRECTION, TOY_HOOK, illusion_toy, toy_pairs

torch.manual_seed(0)
model = ms.load("smollm2-135m", device="cpu")

# %% [markdown]
# ## The task: where is the subject?
#
# `ioi_position_pairs` pairs an IOI prompt with the same prompt with its first two names
# swapped: every token is kept, only the subject moves from the second name to the first. If the
# final position's *position signal* ("the subject was the second name") is patched in from the
# swapped prompt, the model should answer with the subject instead of the indirect object. The
# metric is the logit difference, counterfactual answer minus the base answer: negative before
# any intervention.

# %%
pairs = ioi_position_pairs(model, n=24)
train, test = pairs.split(16)
first = pairs.attention_mask[0].bool()  # the prompts are left-padded to one length
print(f"base:   {model.to_string(pairs.base_tokens[0][first])!r}")
print(f"source: {model.to_string(pairs.source_tokens[0][first])!r}")
hook = "blocks.23.hook_resid_pre"  # where the name movers read it (the subspace guide finds this layer)

# %% [markdown]
# ## Patching one direction
#
# `subspace_patch` replaces only the component of an activation along each given direction
# (`x + B Bᵀ (x_source - x)` for an orthonormal basis `B`), by layer and position, with many
# directions as the batch rows of few forwards, and returns the metric of each patched run.
# Here the base prompts run with the swapped prompts' component patched in
# (`direction="noising"`) along the difference of the two runs' mean residual streams at the
# final token (a natural guess for the variable's direction) and along three random directions,
# at layers 21 and 23.

# %%
mask = test.attention_mask
guess = mean_difference(model, test.source_tokens, test.base_tokens, hook, positive_mask=mask, negative_mask=mask)
directions = torch.cat([guess[None], torch.randn(3, model.cfg.d_model)])
effect = subspace_patch(
    model,
    test.base_tokens,
    test.source_tokens,
    directions,
    test.metric(),
    "resid_pre",
    direction="noising",
    layers=[21, 23],
    positions=[-1],
    attention_mask=mask,
)  # [layer, position, direction]: the metric after each patch
before = test.metric()(model(test.base_tokens, attention_mask=mask)).mean()
print(f"logit difference without a patch: {before:.2f}")
for row, layer in zip(effect[:, 0], [21, 23], strict=True):
    randoms = [round(value, 2) for value in row[1:].tolist()]
    print(f"layer {layer}: mean-difference direction {row[0]:+.2f}, random directions {randoms}")

# %% [markdown]
# The mean-difference direction does not reverse the preference: the difference of the mean
# activations mixes everything else that differs between the two prompts, and a random
# direction does nothing.
#
# ## DAS: learning the direction
#
# DAS learns an orthonormal basis (here one direction) so that the interchange along it makes
# each base prompt give its counterfactual answer. Training caches the base run up to the
# intervened block once and differentiates only the rotation. `interchange_scores` evaluates it
# on held-out pairs: IIA (the top token becomes the counterfactual answer), the logit difference
# after and before, and the fraction of the way to the mirrored preference.

# %%
das = train_das(model, train, hook, config=DASConfig(d_sub=1, steps=10, batch_size=8, lr=5e-3, seed=0))
scores = interchange_scores(model, das, test)
print(scores)
random_scores = interchange_scores(model, torch.randn(model.cfg.d_model), test, hook, -1)
print(random_scores)

# %% [markdown]
# ## The interpretability-illusion check
#
# A patched direction can change the output through a path the model never uses: if it mixes
# a part that varies with the variable but lies in the kernel of the weights that read the
# activation with a *dormant* part those weights read but which never varies, patching moves the
# dormant part. `illusion_check` splits each direction into its component in the row space of
# the readers' weights (here the query weights of the name movers 23.7, 23.0 and 23.2, through
# the norm before attention) and in their kernel, and reports the variance and the patching
# effect along each part. It flags a direction as *illusory* when its effect is large but neither
# part alone gives half of it.

# %%
readers = head_readers(model, [(23, 7), (23, 0), (23, 2)], "q")
report = illusion_check(
    model,
    test.source_tokens,
    test.base_tokens,
    [das, torch.randn(model.cfg.d_model)],
    test.metric(),
    hook,
    readers=readers,
    names=["DAS direction", "random direction"],
    attention_mask=test.attention_mask,
)
print(report.table())

# %% [markdown]
# ## The illusion, where the answer is known
#
# `mechscope.subspace.toy.illusion_toy` is the paper's construction, built by hand: the
# unembedding reads the feature straight from the residual stream, and the MLP's hidden layer
# holds a *disconnected* pair of neurons that vary with the feature but are never read, and a
# *dormant* neuron that is read but always zero. DAS on the hidden layer still finds a direction
# that flips the answer, by mixing the two; the check sees that neither part works alone.

# %%
toy = illusion_toy()
toy_train, toy_test = toy_pairs(96, seed=1).split(64)
toy_das = train_das(toy, toy_train, TOY_HOOK, config=DASConfig(steps=60, lr=5e-2, batch_size=32))
print(f"IIA of the toy's DAS direction: {interchange_scores(toy, toy_das, toy_test).iia:.2f}")
toy_report = illusion_check(
    toy,
    toy_test.source_tokens,
    toy_test.base_tokens,
    [toy_das, ILLUSORY_DIRECTION],
    toy_test.metric(),
    TOY_HOOK,
    names=["DAS direction", "planted illusory direction"],
)
print(toy_report.table())
print("illusory:", [row.illusory for row in toy_report.rows])
