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
# # Circuit discovery
#
# A *circuit* is a small set of edges of the model's computational graph (a head or MLP writing
# into the residual stream, read by a later head, MLP or the logits) that carries a behaviour on
# its own. This page finds one for indirect object identification (IOI) in the bundled
# SmolLM2-135M:
#
# 1. the **graph** of the model and its size;
# 2. **EAP** and **EAP-IG**: gradient estimates of every edge's patching effect;
# 3. a **circuit** of the best-scored edges, and its **faithfulness curve**;
# 4. **saving** the circuit as JSON and running the model restricted to it;
# 5. **ACDC**, the greedy pruning search, on one receiver of the graph.
#
# Two prompt pairs and a few sizes keep this page fast. The full-size runs (8 prompt pairs,
# curves at 50 to 500 edges, the graph written as HTML, SVG, DOT and PNG):
#
# ```bash
# mechscope circuit --task ioi --method eap-ig --edges 200 --out ioi-eap-ig
# mechscope circuit --task ioi --method acdc --threshold 0.05 --out ioi-acdc
# ```

# %%
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import mechscope as ms
from mechscope.circuits import Circuit, Graph, acdc, attribute, faithfulness_curve
from mechscope.data import ioi_dataset

torch.set_grad_enabled(False)
model = ms.load("smollm2-135m", device="cpu")

# %% [markdown]
# ## The task
#
# `ioi_dataset` pairs each clean prompt with a corrupted one in which the second mention of the
# subject is a third name, so the corrupted prompt no longer says who the indirect object is.
# The metric is the logit difference, indirect object minus subject, at the final position.

# %%
data = ioi_dataset(model, n=2, seed=0)
clean, corrupted = data.clean_tokens, data.corrupted_tokens
metric = data.metric("logit_diff")  # logits -> [batch]
print(f"clean:     {data.clean_prompts[0]!r}\ncorrupted: {data.corrupted_prompts[0]!r}")
print(f"logit difference: clean {metric(model(clean)).mean():.2f}, corrupted {metric(model(corrupted)).mean():.2f}")

# %% [markdown]
# ## The graph
#
# `Graph.of(model)` reads the layout from the config. Senders write into the residual stream
# (the embedding `input`, every head `a{l}.h{h}`, every MLP `m{l}`); receivers read from it (each
# head's query `a{l}.h{h}<q>`, each key-value head's keys and values `a{l}.kv{g}<k>`/`<v>` on
# this grouped-query model, each MLP's input and the `logits`). An edge joins a sender to every
# receiver that reads after it writes.

# %%
graph = Graph.of(model)
print(graph.counts())
print(graph.senders[:4], graph.receivers[:4], graph.edge_names[:3])

# %% [markdown]
# ## Edge attribution: EAP and EAP-IG
#
# EAP scores all 70,651 edges at once with one forward of the corrupted run and one forward and
# backward of the clean run: the corrupted-minus-clean output of the sender times the gradient
# of the metric at the receiver's input. EAP-IG averages that gradient along the straight path
# between the two runs' input embeddings (three steps here); it is the more reliable of the
# two when the metric is far from linear. Each returns a `Circuit` holding every edge's score.

# %%
eap = attribute(model, clean, corrupted, metric, method="eap")
eap_ig = attribute(model, clean, corrupted, metric, method="eap-ig-inputs", steps=3)
ranked = eap_ig.ranking()[:8]  # edge indices, largest |score| first
for edge in ranked.tolist():
    print(f"{graph.edge_names[edge]:>22}  EAP-IG {eap_ig.scores[edge]:+.2f}  EAP {eap.scores[edge]:+.2f}")

# %% [markdown]
# A score estimates the change of the logit difference when that edge alone carries the
# corrupted run. The two methods agree on the heads of layers 23, 24 and 29 that write into the
# logits, but EAP-IG ranks the path from the tokens through the first MLP (`input->m0`, then
# `m0` into later heads) far higher than EAP, whose gradient is taken at the clean run only.

# %% [markdown]
# ## A circuit and its faithfulness
#
# `top(k)` keeps the `k` edges with the largest absolute score. `faithfulness_curve` runs the
# model restricted to each size of circuit (every other edge patched from the corrupted run) and
# the model with only those edges removed, normalised so that the full model is 1 and the model
# with every edge patched is 0. All sizes run as the batch rows of one sweep.

# %%
sizes = [100, 1000, 5000]
curve = faithfulness_curve(model, eap_ig, clean, corrupted, metric, sizes=sizes)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(curve.sizes, curve.faithfulness, "o-", label="circuit only")
ax.plot(curve.sizes, curve.completeness, "o-", label="circuit removed")
ax.set(xscale="log", xlabel="edges kept (of 70,651)", ylabel="normalised logit difference")
ax.axhline(1, color="grey", lw=0.5)
ax.axhline(0, color="grey", lw=0.5)
ax.legend()
plt.show()
for size, alone, removed in zip(curve.sizes, curve.faithfulness, curve.completeness, strict=True):
    print(f"{size:>5} edges: circuit only {alone:.2f}, circuit removed {removed:.2f}")

# %% [markdown]
# Removing the best 100 edges already takes the model to the corrupted level, but the
# behaviour is spread over many heads: the circuit alone recovers most of the logit difference
# only with thousands of edges.
#
# A circuit's nodes are the heads and MLPs its edges touch; `node_scores` sums the scores of
# their outgoing edges.

# %%
circuit = eap_ig.top(200)
node_scores = circuit.node_scores()
strongest = sorted(node_scores, key=lambda node: -abs(node_scores[node]))[:8]
print(f"{circuit.n_edges} edges, {len(circuit.nodes())} nodes; strongest: {strongest}")

# %% [markdown]
# ## Saving and running a circuit
#
# A circuit saves to JSON (schema `mechscope.circuit/1`: the graph layout, the kept edges, every
# score and the method's settings) and loads back. `run(model, clean, corrupted)` gives the
# logits of the model restricted to it, which is what the curve above measured at each size.

# %%
path = circuit.save(Path(tempfile.mkdtemp()) / "ioi-eap-ig-200.json")
loaded = Circuit.load(path)
print(path.name, f"{path.stat().st_size / 1e6:.1f} MB", loaded.n_edges, loaded.method)

# %% [markdown]
# `mechscope circuit` also writes the circuit's graph as a self-contained HTML page, SVG, DOT
# and PNG (`mechscope.circuits.render`).
#
# ## ACDC on one receiver
#
# ACDC prunes greedily: receivers in reverse topological order, each incoming edge (latest
# sender first) removed when the damage, here the increase of the KL divergence to the clean
# run, stays below a threshold. A sweep over the whole graph needs a batched forward per live
# receiver and per kept edge; `receivers=[...]` prunes only the named receivers, here the 301
# edges into the logits.

# %%
pruned = acdc(model, clean, corrupted, threshold=0.05, receivers=["logits"])
kept = [name for name in pruned.edge_names if name.endswith("->logits")]
print(f"edges into the logits kept by ACDC: {len(kept)} of {graph.n_senders}")
print(kept)
