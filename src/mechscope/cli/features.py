"""``mechscope features harvest|export|neuronpedia``: build a feature database, a static site, Neuronpedia files.

Harvesting lives in `mechscope.features` and returns data; this module parses arguments,
loads the model, the SAEs and the text, and prints.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def parse_layers(text: str | None) -> list[int]:
    """``"0,3-5"`` as ``[0, 3, 4, 5]``.

    Example:
        >>> parse_layers("0,3-5")
        [0, 3, 4, 5]
    """
    layers: list[int] = []
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            layers.extend(range(int(lo), int(hi) + 1))
        else:
            layers.append(int(part))
    return layers


def harvest_tokens(model, text: str | None, n_tokens: int, config):
    """Token rows holding at least ``n_tokens`` counted tokens, from ``text`` (a file, a folder or
    ``None`` for the default corpus)."""
    from mechscope.data.corpus import cached_token_stream, load_texts, tokenize_texts
    from mechscope.errors import InputError
    from mechscope.features import token_rows

    if model.tokenizer is None:
        raise InputError("harvesting text needs a model with a tokenizer")
    texts = load_texts(text)
    stream = (
        cached_token_stream(texts, model.tokenizer, model.cfg.model_name)
        if text is None
        else tokenize_texts(texts, model.tokenizer)
    )
    rows = token_rows(model, stream, config)
    kept = rows.shape[1] - (1 if config.exclude_bos and model.codec.bos_token_id is not None else 0)
    need = math.ceil(n_tokens / kept)
    if need > rows.shape[0]:
        raise InputError(f"the text holds {rows.shape[0] * kept:,} tokens in rows, fewer than --tokens {n_tokens:,}")
    return rows[:need]


def cli_harvest(args: argparse.Namespace) -> int:
    """``mechscope features harvest --sae PATH|--neurons LAYERS --tokens N --out DB``."""
    import time

    import mechscope as ms
    from mechscope.errors import InputError
    from mechscope.features import HarvestConfig, harvest, harvest_sources, write_harvest
    from mechscope.sae import load_sae

    if not args.sae and not args.neurons:
        raise InputError("nothing to harvest: pass --sae PATH (repeatable) or --neurons LAYERS (e.g. 3,5)")
    model = ms.load(args.model, device=args.device)
    saes = [load_sae(path).to(model.device) for path in args.sae or []]
    sources = harvest_sources(model, saes, parse_layers(args.neurons))
    config = HarvestConfig(context_size=args.context_size, batch_size=args.batch_size, top_k=args.top_k)
    rows = harvest_tokens(model, args.text, args.tokens, config)
    out = Path(args.out)
    checkpoint = Path(args.checkpoint) if args.checkpoint else out.with_name(out.name + ".harvest.ckpt")
    start = time.perf_counter()
    result = harvest(model, sources, rows, config, checkpoint=checkpoint, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    info = {src.name: {"path": str(Path(p).resolve())} for src, p in zip(sources, args.sae or [], strict=False)}
    write_harvest(result, model, out, meta={"model": args.model}, source_info=info)
    checkpoint.unlink(missing_ok=True)
    print(
        f"harvested {result.n_tokens:,} tokens in {seconds:.1f}s ({result.n_tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )
    for src in sources:
        print(f"  {src.name}: {src.n_features:,} features ({src.kind})")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def cli_export(args: argparse.Namespace) -> int:
    """``mechscope features export DB --out SITE``."""
    from mechscope.features import export_site

    index = export_site(args.db, args.out, progress=not args.no_progress)
    print(f"wrote {index} (open it in a browser; no network needed)")
    return 0


def cli_neuronpedia(args: argparse.Namespace) -> int:
    """``mechscope features neuronpedia DB --out DIR``."""
    from mechscope.features.neuronpedia import export_neuronpedia

    paths = export_neuronpedia(args.db, args.out, source=args.source, model_id=args.model_id, sae_set=args.sae_set)
    print(f"wrote {len(paths)} batch file(s) to {args.out}")
    return 0


def load_live(db_path, model_name: str | None, sae_paths, device: str | None, no_model: bool):
    """The model and ``{source name: source}`` that test-a-prompt and steering use: the model and
    SAE paths recorded in the database unless given; ``(None, {})`` with ``no_model``."""
    import mechscope as ms
    from mechscope.features import FeatureDB, NeuronSource, SAESource
    from mechscope.names import layer_of
    from mechscope.sae import load_sae

    if no_model:
        return None, {}
    db = FeatureDB(db_path)
    name = model_name or db.meta().get("model")
    if not name:
        return None, {}
    model = ms.load(name, device=device)
    sources = {}
    recorded = db.sources()
    paths = sae_paths or [s["info"]["path"] for s in recorded if s["info"].get("path")]
    for path in paths:
        src = SAESource(load_sae(path).to(model.device))
        sources[src.name] = src
    for s in recorded:
        if s["kind"] == "neurons":
            sources[s["name"]] = NeuronSource(model, layer_of(s["hook_name"]))
    db.close()
    return model, sources


def add_features_parser(
    sub, formatter_class: type[argparse.HelpFormatter] = argparse.ArgumentDefaultsHelpFormatter
) -> None:
    """Register ``mechscope features harvest|export|neuronpedia`` on the top-level subcommands.

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_features_parser(parser.add_subparsers())
        >>> args = parser.parse_args(["features", "harvest", "--neurons", "3", "--tokens", "1000", "--out", "f.db"])
        >>> args.neurons, args.tokens, args.func.__name__
        ('3', 1000, 'cli_harvest')
    """
    p = sub.add_parser(
        "features",
        help="harvest feature dashboards into a database; export a static site or Neuronpedia files",
        description="Harvest SAE features or MLP neurons over a corpus into a SQLite feature database.",
        formatter_class=formatter_class,
    )
    actions = p.add_subparsers(dest="features_command", required=True, metavar="{harvest,export,neuronpedia}")
    h = actions.add_parser(
        "harvest",
        help="stream a corpus through the model once and store every feature's dashboard data",
        description="One pass over the text for every SAE and neuron layer; resumable from its checkpoint.",
        formatter_class=formatter_class,
    )
    h.add_argument("--model", default="smollm2-135m", help="bundled name, HF directory, .gguf file or hub id")
    h.add_argument("--sae", action="append", default=None, help="SAE folder or file (repeatable)")
    h.add_argument("--neurons", default=None, help="MLP layers whose neurons to harvest, e.g. 3,5 or 2-4")
    h.add_argument("--tokens", type=int, default=100_000, help="tokens to harvest")
    h.add_argument("--text", default=None, help="a .txt/.jsonl/.parquet file or folder (None: the default corpus)")
    h.add_argument("--out", required=True, help="the database file to write")
    h.add_argument("--checkpoint", default=None, help="checkpoint file (None: OUT.harvest.ckpt; removed when done)")
    h.add_argument("--context-size", type=int, default=128, help="tokens per row, BOS included")
    h.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    h.add_argument("--top-k", type=int, default=20, help="top examples per feature")
    h.add_argument("--device", default=None, help="e.g. cpu or cuda (None: cuda when available)")
    h.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    h.set_defaults(func=cli_harvest)
    e = actions.add_parser(
        "export",
        help="write a static site (index and one page per feature)",
        description="Write a static site that opens from disk.",
        formatter_class=formatter_class,
    )
    e.add_argument("db", help="the feature database")
    e.add_argument("--out", required=True, help="the folder to write")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(func=cli_export)
    n = actions.add_parser(
        "neuronpedia",
        help="write the JSON batches of SAEDashboard's Neuronpedia runner",
        description="Export in the Neuronpedia upload layout.",
        formatter_class=formatter_class,
    )
    n.add_argument("db", help="the feature database")
    n.add_argument("--out", required=True, help="the folder to write")
    n.add_argument("--source", default=None, help="the source to export (None: the only one)")
    n.add_argument("--model-id", default=None, help="Neuronpedia model id (None: the model's name)")
    n.add_argument("--sae-set", default=None, help="Neuronpedia SAE set name (None: the source's name)")
    n.set_defaults(func=cli_neuronpedia)
