"""pyvene side of benchmarks/subspace.py (runs in benchmarks/.venv-pyvene; mechscope is not imported).

Loads the model once, then serves requests (the protocol of ``benchmarks/common.py:serve``): each
``{"op": "train", "basis": path}`` trains a fresh ``LowRankRotatedSpaceIntervention`` (rank 1,
seed 0) on ``block_input`` of one layer at the final token with the pairs written by the parent,
answers with the training time and the held-out IIA, and writes the learned direction for the
parent to score with mechscope. Without ``--serve`` it trains once and writes ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--hf-dir", "--pairs"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--out")
    parser.add_argument("--basis")
    parser.add_argument("--serve", action="store_true", help="answer train requests on stdin")
    for flag in ("--layer", "--steps", "--batch", "--threads"):
        parser.add_argument(flag, type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32).eval()
    pairs = torch.load(args.pairs, weights_only=True)
    if args.serve:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import common

        common.serve({"train": lambda request: train(model, pairs, args, request["basis"])})
        return
    result = train(model, pairs, args, args.basis)
    with open(args.out, "w") as f:
        json.dump(result, f)


def train(model, pairs: dict, args, basis_path: str) -> dict:
    """One training run from a fresh intervention (seed 0); the learned direction goes to ``basis_path``."""
    import pyvene as pv

    torch.manual_seed(0)  # pyvene draws its initial rotation from the global generator
    config = pv.IntervenableConfig(
        representations=[{"layer": args.layer, "component": "block_input", "low_rank_dimension": 1}],
        intervention_types=pv.LowRankRotatedSpaceIntervention,
    )
    intervenable = pv.IntervenableModel(config, model)
    intervenable.disable_model_gradients()
    params = intervenable.get_trainable_parameters()
    optimizer = torch.optim.Adam(params, lr=args.lr)
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
        if args.out:
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
    torch.save(intervention.rotate_layer.weight.detach().clone(), basis_path)
    return {"seconds": seconds, "steps_per_s": args.steps / seconds, "train_seconds": seconds, "iia": iia,
            "loss_first": losses[0], "loss_last": losses[-1]}  # fmt: skip


if __name__ == "__main__":
    main()
