"""Worked example for docs/reading_mechanisms.md: heads and logit attribution on the bundled model.

Run from the repository root:  .venv/bin/python docs/reading_mechanisms.py
"""

import torch

import mechscope as ms
from mechscope.analysis import (
    composition_scores,
    copy_suppression_scores,
    direct_logit_attribution,
    duplicate_token_scores,
    induction_scores,
    linearise_mlp,
    logit_lens,
    ov_copying_scores,
    previous_token_scores,
    repeated_random_tokens,
    top_heads,
)
from mechscope.viz import attention_heads_html, colored_tokens_html, save_html

torch.set_grad_enabled(False)
model = ms.load("smollm2-135m", device="cpu")

print("== 1. head detectors ==")
tokens = repeated_random_tokens(model, seq_len=40, batch=4, seed=0)  # [4, 80]: 40 random tokens, twice
for name, detector in [
    ("previous token", previous_token_scores),
    ("duplicate token", duplicate_token_scores),
    ("induction", induction_scores),
]:
    print(f"{name:<16}", top_heads(detector(model, tokens), k=5))
print(f"{'copy suppression':<16}", top_heads(copy_suppression_scores(model), k=5))

print("\n== 2. K-composition: which heads feed the induction heads' keys ==")
k_comp = composition_scores(model, "K")  # [layer, head, layer, head]
for layer, head in [(18, 6), (17, 3), (17, 4)]:
    print(f"into L{layer}H{head}:", top_heads(k_comp[:, :, layer, head], k=3))

_, cache = model.run_with_cache(tokens[:1], names_filter=lambda n: n.endswith("hook_pattern"))
view = attention_heads_html(
    cache["pattern", 18][0],
    model.to_str_tokens(tokens[0]),
    [f"L18H{h}" for h in range(9)],
    title="Layer 18 on repeated tokens",
)
print("\nwrote", save_html(view, "mechscope-tour/layer18_attention.html"))

print("\n== 3. direct logit attribution on an IOI prompt ==")
prompt = "When Mary and John went to the store, John gave a drink to"
logits, cache = model.run_with_cache(prompt)
mary, john = model.to_single_token(" Mary"), model.to_single_token(" John")
print("logit difference Mary - John:", round(float(logits[0, -1, mary] - logits[0, -1, john]), 4))
by_layer = direct_logit_attribution(cache, " Mary", against=" John", by="layer")
print("sum of the layer decomposition:", round(float(by_layer.total()[0]), 4))
print(by_layer.table(k=6))
by_head = direct_logit_attribution(cache, " Mary", against=" John", by="head")
print("\ntop heads and MLPs:")
print(by_head.table(k=8))
str_tokens = model.to_str_tokens(prompt)
for label in ("L23H3", "L24H4"):
    layer, head = (int(x) for x in label[1:].split("H"))
    pattern = cache["pattern", layer][0, head, -1]
    print(
        f"{label} at ' to' attends to:", [(str_tokens[k], round(float(pattern[k]), 2)) for k in pattern.topk(3).indices]
    )
single = {name: direct_logit_attribution(cache, name, by="head") for name in (" Mary", " John")}
for label in ("L23H3", "L24H4"):
    print(f"{label} DLA on each name alone:", {name: round(float(d[label][0]), 2) for name, d in single.items()})
copy_scores, ov_scores = copy_suppression_scores(model, prompt), ov_copying_scores(model)
for label in ("L23H3", "L24H4", "L29H0", "L29H1"):
    layer, head = (int(x) for x in label[1:].split("H"))
    print(
        f"{label}: copy suppression on this prompt {float(copy_scores[layer, head]):+.2f}, "
        f"OV copying score (weights, raw embeddings) {float(ov_scores[layer, head]):+.2f}"
    )

print("\n== 4. logit lens at the last position ==")
lens = logit_lens(cache, pos=-1)
print("\n".join(lens.table(model, k=2).split("\n")[-7:]))
print("rank of ' Mary' by layer:", lens.ranks(mary)[:, 0, 0].tolist())

heads_at_each = torch.stack(
    [
        direct_logit_attribution(cache, " Mary", against=" John", by="head", pos=p)["L23H3"]
        for p in range(len(str_tokens))
    ]
)
print(
    "wrote",
    save_html(
        colored_tokens_html(str_tokens, heads_at_each[:, 0], ["L23H3 DLA (Mary - John)"]),
        "mechscope-tour/l23h3_dla.html",
    ),
)

print("\n== 5. neurons of MLP 28, and one neuron linearised ==")
neurons = direct_logit_attribution(cache, " Mary", against=" John", by="neuron", layer=28)
print(neurons.table(k=4))
top_neuron = int(neurons.top(1)[0][0].split("N")[1])
lin = linearise_mlp(model, prompt, layer=28, neuron=top_neuron)
print(f"L28N{top_neuron}: activation {lin.value:.3f}; input direction's top tokens through W_E:")
print(" ", lin.top_tokens(model, k=6))
