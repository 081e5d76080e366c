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
# # Feature and neuron dashboards
#
# A dashboard shows what a feature (an SAE latent, an MLP neuron, any direction) responds to:
# the tokens where it fires hardest, with their context, the distribution of its activations,
# and the tokens it pushes up or down in the logits. This page builds them for the 1,536
# neurons of layer 6's MLP in the bundled SmolLM2-135M, in four steps:
#
# 1. **harvest**: one streaming pass over a corpus collects every feature's statistics;
# 2. **database**: one SQLite file holds them, searchable;
# 3. **one feature**: its top examples, histogram and logit effects;
# 4. **a static site**: one self-contained page per feature plus a searchable index, and the
#    local browser that serves the same pages with test-a-prompt and steering.
#
# 4,096 tokens keep this page fast. A full-size run (an SAE and the neurons of layer 6, over
# 100,000 tokens), its site and the browser:
#
# ```bash
# mechscope features harvest --sae saes/00-blocks.6.hook_resid_post --neurons 6 --tokens 100000 --out features.db
# mechscope features export features.db --out site
# mechscope browse features.db
# ```

# %%
import html
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from IPython.display import HTML, display

import mechscope as ms
from mechscope.data.corpus import cached_token_stream, default_corpus_texts
from mechscope.features import FeatureDB, HarvestConfig, NeuronSource, export_site, harvest, page_name, write_harvest

torch.set_grad_enabled(False)
model = ms.load("smollm2-135m", device="cpu")

# %% [markdown]
# ## Harvest
#
# The corpus is the project's default one (prose and documentation that ship with it),
# tokenised once and cached. `NeuronSource(model, 6)` reads `blocks.6.mlp.hook_post`; an SAE
# (`mechscope.sae.load_sae`) is a source the same way, and one forward serves every source,
# stopping after the deepest hooked block. SmolLM2's gated SiLU neurons are almost never exactly
# zero, so a neuron here *fires* on a token when its activation is above 0.5.

# %%
tokens = cached_token_stream(default_corpus_texts(), model.tokenizer, "smollm2")[:4096]
config = HarvestConfig(context_size=128, top_k=10, threshold=0.5)
result = harvest(model, [NeuronSource(model, 6)], tokens, config, progress=False)
print(f"{result.rows_done} rows of {config.context_size} tokens; sources: {list(result.sources)}")

# %% [markdown]
# ## The feature database
#
# `write_harvest` adds what needs the model's weights (each feature's logit effects through the
# unembedding, its nearest features by write direction) and writes one SQLite file, which
# `FeatureDB` reads. `search` filters and sorts features by density, maximum, the tokens of their
# top examples or the tokens they boost.

# %%
out = Path(tempfile.mkdtemp())
db = FeatureDB(write_harvest(result, model, out / "features.db"))
source = "blocks.6.mlp.hook_post"
print(f"{db.count()} features, {(out / 'features.db').stat().st_size / 1e6:.1f} MB")
for row in db.search(source=source, order="-max", limit=5):
    print(f"neuron {row['feature']:>4}: max {row['max']:.2f}, density {row['density']:.4f}")

# %% [markdown]
# ## One feature
#
# `db.feature` returns a `FeatureRecord`: statistics, the top examples (each with its context
# window and the activation on every context token), examples from each quantile of the
# activations, the histogram and the logit effects.

# %%
top = db.search(source=source, order="-max", limit=1)[0]["feature"]
record = db.feature(top, source=source)
print(f"neuron {top}: fires on {record.density:.2%} of tokens, max {record.max:.2f}")
for example in record.top[:6]:
    left = "".join(db.token_text(t) for t in example.tokens[example.center - 8 : example.center] if t >= 0)
    print(f"{example.value:6.2f}  {left!r:>50} [{db.token_text(example.token)!r}]")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.2))
edges = record.hist_edges
widths = [right - left for left, right in zip(edges[:-1], edges[1:], strict=True)]
axes[0].bar(edges[:-1], record.hist_counts, width=widths, align="edge")
axes[0].set(title=f"neuron {top}: activations where it fires", xlabel="activation", ylabel="tokens")
up = record.logits_up[:8]
axes[1].barh([repr(db.token_text(t)) for t, _ in up][::-1], [v for _, v in up][::-1])
axes[1].set(title="tokens it pushes up (logit effect)")
plt.tight_layout()
plt.show()

# %% [markdown]
# The same record, searched the other way round: which neurons have top examples on a given
# token, and which push a given token up the most.

# %%
print([row["feature"] for row in db.search(token=" time", source=source, limit=5)])
print([row["feature"] for row in db.search(boosts=" time", source=source, limit=5)])

# %% [markdown]
# ## Dashboards: the static site
#
# `export_site` writes one self-contained HTML page per feature (statistics, histogram, logit
# effects, nearest features, top and quantile examples with each token shaded by the
# activation) and an index with search and sorting. The site fetches nothing, so it opens from
# disk. Here is the page of the neuron above:

# %%
index = export_site(db, out / "site", progress=False)
pages = sorted(index.parent.glob("*.html"))
print(f"{index.name} and {len(pages) - 1} feature pages")
page = (index.parent / page_name(source, top)).read_text(encoding="utf-8")
frame = f'<iframe srcdoc="{html.escape(page)}" style="width:100%; height:900px; border:0"></iframe>'
display(HTML(f"<div>{frame}</div>"))  # the page is isolated in its own frame

# %% [markdown]
# ## The local browser
#
# `mechscope browse` serves the same index and pages from the database on
# `http://127.0.0.1:8765`, plus **test a prompt** (the strongest features of each token of any
# text) and **steer** (add a feature's direction, or ablate it, and compare the next-token
# distributions). It loads the model recorded in the database:
#
# ```bash
# mechscope browse features.db             # --no-model serves the pages only
# ```
