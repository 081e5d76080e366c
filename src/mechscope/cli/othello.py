"""``mechscope othello train|probe|intervene``: train an Othello-GPT, probe its board, edit it.

``train`` writes a resumable run directory (``state.pt``; at the end ``model.safetensors`` and
``config.json``); ``probe`` and ``intervene`` read that directory and write a JSON of numbers
and board pictures (HTML and PNG) next to it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

TRAIN_FLAGS: dict[str, tuple[str, type, object, str]] = {
    # flag: (OthelloConfig field, type, default, help)
    "--size": ("size", int, 6, "board size (6 or 8)"),
    "--n-layers": ("n_layers", int, 4, "transformer blocks"),
    "--d-model": ("d_model", int, 128, "residual stream width"),
    "--n-heads": ("n_heads", int, 4, "attention heads per layer"),
    "--n-games": ("n_games", int, 100_000, "training games (random legal games, generated once)"),
    "--steps": ("steps", int, 4000, "optimiser steps"),
    "--batch-size": ("batch_size", int, 128, "games per step"),
    "--lr": ("lr", float, 1e-3, "AdamW peak learning rate"),
    "--eval-games": ("eval_games", int, 2000, "held-out games for the legal-move accuracy"),
    "--save-every": ("save_every", int, 500, "steps between saves of the resumable state"),
}  # fmt: skip


def _threads(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _train(args: argparse.Namespace) -> int:
    from mechscope.toys.othello.train import OthelloConfig, train_othello

    _threads(args)
    cfg = OthelloConfig(seed=args.seed, **{field: getattr(args, field) for field, *_ in TRAIN_FLAGS.values()})
    start = time.perf_counter()
    run = train_othello(cfg, args.out, progress=not args.quiet, device=args.device)
    params = sum(p.numel() for p in run.model.parameters())
    print(f"Othello-GPT {cfg.size}x{cfg.size}: {cfg.n_layers} layers, d_model {cfg.d_model}, {params:,} parameters")
    print(f"trained {cfg.steps} steps on {cfg.n_games:,} games in {time.perf_counter() - start:.0f} s "
          f"(this call); final loss {run.history[-1]['loss']:.4f}")  # fmt: skip
    print(f"legal-move top-1 accuracy on {cfg.eval_games} held-out games: {100 * run.eval['accuracy']:.2f}%")
    print(f"weights and settings: {Path(args.out) / 'model.safetensors'}, {Path(args.out) / 'config.json'}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from mechscope.probing import ProbeConfig
    from mechscope.toys.othello.train import load_othello
    from mechscope.toys.othello.world import board_probes

    _threads(args)
    model, cfg, _ = load_othello(args.run)
    probes = board_probes(model, cfg.size, args.games, args.seed, cfg=ProbeConfig(l2=args.l2, batch_size=4096,
                          epochs=args.epochs, lr=1e-2), progress=not args.quiet)  # fmt: skip
    out = Path(args.out or Path(args.run) / "probes")
    out.mkdir(parents=True, exist_ok=True)
    table = probes.table()
    print(f"{'hook':<28} {'mine/theirs':>12} {'black/white':>12}   (test accuracy, mean over squares)")
    for row in table:
        print(f"{row['hook']:<28} {100 * row['mine_theirs']:>11.2f}% {100 * row['black_white']:>11.2f}%")
    for hook in probes.hooks:
        probes.relative[hook].save(out / f"mine_theirs.{hook}")
        probes.absolute[hook].save(out / f"black_white.{hook}")
    per_square = {kind: {h: v.tolist() for h, v in acc.items()} for kind, acc in probes.accuracy.items()}
    (out / "probes.json").write_text(json.dumps({"table": table, "per_square": per_square}, indent=2))
    _pictures(model, cfg.size, probes.relative[probes.hooks[len(probes.hooks) // 2]], out, args.seed)
    print(f"probes, probes.json and board pictures in {out}")
    return 0


def _pictures(model, size: int, probe, out: Path, seed: int) -> None:
    """Boards of one held-out game: discs, the probe's reading, the model's move probabilities."""
    import torch

    from mechscope.probing import collect_activations
    from mechscope.toys.othello.games import game_states, playable_squares, random_games, to_tokens
    from mechscope.viz.board import board_html, board_png, save_boards_html

    moves = random_games(1, size, seed=seed + 7)
    states = game_states(moves, size)
    tokens = to_tokens(moves, size)
    data = collect_activations(model, tokens, probe.hook, states.valid)
    with torch.no_grad():
        reading = probe.predict_proba(data[probe.hook])  # [pos, square, class]
        probs = model(tokens)[0].softmax(-1)  # [pos, d_vocab]
    squares = playable_squares(size)
    fragments = []
    for t in range(0, int(states.valid.sum()), max(1, int(states.valid.sum()) // 6)):
        move_probs = torch.zeros(size * size)
        move_probs[squares] = probs[t, 1:]
        title = f"after move {t + 1} ({'black' if int(states.mover[0, t]) == 1 else 'white'})"
        kwargs = dict(probe=reading[t], moves=move_probs, legal=states.legal[0, t], title=title)
        fragments.append(board_html(states.boards[0, t], **kwargs))
        board_png(states.boards[0, t], out / f"board_{t + 1:02d}.png", **kwargs)
    save_boards_html(fragments, out / "boards.html", "Othello-GPT: board, probe reading and move probabilities",
                     f"Probe {probe.hook} (letters: Empty/Mine/Theirs and probability); shading: the model's "
                     "move probabilities; outlined: legal moves.")  # fmt: skip


def _intervene(args: argparse.Namespace) -> int:
    from mechscope.errors import InputError
    from mechscope.probing import LinearProbe
    from mechscope.toys.othello.train import load_othello
    from mechscope.toys.othello.world import intervene, layer_hooks

    _threads(args)
    model, cfg, _ = load_othello(args.run)
    hooks = layer_hooks(cfg.n_layers)
    layers = args.layers if args.layers else list(range(cfg.n_layers))
    bad = [layer for layer in layers if not 0 <= layer < cfg.n_layers]
    if bad:
        raise InputError(f"layers {bad} are not blocks of this {cfg.n_layers}-layer model; "
                         f"choose among 0..{cfg.n_layers - 1}")  # fmt: skip
    probes_dir = Path(args.probes or Path(args.run) / "probes")
    rows = []
    for layer in layers:
        hook = hooks[layer + 1]
        probe = LinearProbe.load(probes_dir / f"mine_theirs.{hook}")
        result = intervene(model, probe, cfg.size, args.positions, args.seed, args.scale).summary()
        rows.append({"layer": layer, "hook": hook, **result})
        print(f"layer {layer}: top-N errors vs the edited board: probe edit {result['probe_mean_errors']:.3f} "
              f"(exact {100 * result['probe_exact']:.1f}%), random direction {result['random_mean_errors']:.3f} "
              f"(exact {100 * result['random_exact']:.1f}%), no edit {result['none_mean_errors']:.3f}; "
              f"probe flipped {100 * result['flipped_probe']:.0f}%")  # fmt: skip
    out = Path(args.out or Path(args.run) / "interventions.json")
    out.write_text(json.dumps(rows, indent=2))
    print(f"numbers in {out}")
    return 0


def add_othello_parser(
    sub, formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter
) -> None:
    """Register ``mechscope othello train|probe|intervene`` on the top-level subcommands.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_othello_parser(parser.add_subparsers())
        >>> parser.parse_args(["othello", "train", "--d-model", "64"]).d_model
        64
    """
    othello = sub.add_parser("othello", help="train an Othello-GPT, probe its board, intervene on it",
                             description="Othello-GPT: a transformer trained on random legal games.",
                             formatter_class=formatter_class)  # fmt: skip
    kinds = othello.add_subparsers(dest="othello_command", required=True, metavar="{train,probe,intervene}")

    def add(name: str, text: str, func) -> argparse.ArgumentParser:
        p = kinds.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".",
                             formatter_class=formatter_class)  # fmt: skip
        p.add_argument("--seed", type=int, default=0, help="seed of the initialisation, games and edits")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
        p.set_defaults(func=func)
        return p

    t = add("train", "train an Othello-GPT on random legal games (resumable)", _train)
    t.add_argument("--out", default="othello-run", help="run directory (resumable state, final weights)")
    t.add_argument("--device", default="cpu", help="device to train on (cpu or cuda)")
    for flag, (field, kind, default, text) in TRAIN_FLAGS.items():
        t.add_argument(flag, dest=field, type=kind, default=default, help=text,
                       metavar=flag[2:].upper().replace("-", "_"))  # fmt: skip
    p = add("probe", "fit mine/theirs and black/white board probes at every layer", _probe)
    p.add_argument("--run", default="othello-run", help="run directory written by 'othello train'")
    p.add_argument("--games", type=int, default=3000, help="fresh games for the probes (a fifth held out)")
    p.add_argument("--l2", type=float, default=1e-3, help="L2 penalty of the probes")
    p.add_argument("--epochs", type=int, default=15, help="Adam epochs of the probes")
    p.add_argument("--out", default=None, help="output folder (default: RUN/probes)")
    i = add("intervene", "flip a square along the mine/theirs probe and score the model's moves", _intervene)
    i.add_argument("--run", default="othello-run", help="run directory written by 'othello train'")
    i.add_argument("--probes", default=None, help="folder of probes written by 'othello probe' (default: RUN/probes)")
    i.add_argument("--layers", type=int, nargs="*", default=None, help="layers to edit, one at a time (default: all)")
    i.add_argument("--positions", type=int, default=500, help="edited positions per layer")
    i.add_argument("--scale", type=float, default=1.0, help="the probe's logit difference becomes -SCALE times itself")
    i.add_argument("--out", default=None, help="JSON of the results (default: RUN/interventions.json)")
