"""pyvene side of benchmarks/subspace.py (runs in benchmarks/.venv-pyvene; mechscope is not imported).

Trains a ``LowRankRotatedSpaceIntervention`` (rank 1) on ``block_input`` of one layer at the final
token with the pairs written by the parent, reports the training time, the held-out IIA and
writes the learned direction for the parent to score with mechscope.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--hf-dir", "--pairs", "--out", "--basis"):
        parser.add_argument(flag, required=True)
    for flag in ("--layer", "--steps", "--batch", "--threads"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)  # pyvene draws its initial rotation from the global generator

    import pyvene as pv
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    config = pv.IntervenableConfig(
        representations=[{"layer": args.layer, "component": "block_input", "low_rank_dimension": 1}],
        intervention_types=pv.LowRankRotatedSpaceIntervention,
    )
    intervenable = pv.IntervenableModel(config, model)
    intervenable.disable_model_gradients()
    params = intervenable.get_trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=args.lr)
    pairs = torch.load(args.pairs, weights_only=True)
    train, test = pairs["train"], pairs["test"]
    position = train["base_tokens"].shape[1] - 1

    def logits(data, index):
        _, out = intervenable(
            {"input_ids": data["base_tokens"][index]},
            [{"input_ids": data["source_tokens"][index]}],
            {"sources->base": position},
        )
        return out.logits[:, -1]

    gen = torch.Generator().manual_seed(0)
    n = len(train["labels"])
    batches = []
    while len(batches) < args.steps:
        order = torch.randperm(n, generator=gen)
        batches.extend(order[i : i + args.batch] for i in range(0, n, args.batch))
    losses = []
    start = time.perf_counter()
    for index in batches[: args.steps]:
        loss = F.cross_entropy(logits(train, index).float(), train["labels"][index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        with open(args.out + ".progress", "w") as f:  # what a run cut short still reports
            json.dump({"steps": len(losses), "seconds": time.perf_counter() - start}, f)
    seconds = time.perf_counter() - start
    hits = []
    with torch.no_grad():
        for i in range(0, len(test["labels"]), args.batch):
            index = torch.arange(i, min(i + args.batch, len(test["labels"])))
            hits.append(logits(test, index).argmax(-1) == test["labels"][index])
    iia = float(torch.cat(hits).float().mean())
    (intervention,) = intervenable.interventions.values()
    torch.save(intervention.rotate_layer.weight.detach().clone(), args.basis)
    result = {"steps_per_s": args.steps / seconds, "train_seconds": seconds, "iia": iia,
              "loss_first": losses[0], "loss_last": losses[-1]}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
