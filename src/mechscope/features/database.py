"""The feature database: harvested results in one SQLite file.

Tables: ``meta`` (model, settings, token count), ``sources``, ``vocab`` (token id to text),
``features`` (one row per feature: statistics, histogram, quantile edges, logit effects,
neighbours and head shares as JSON), ``examples`` (top and quantile examples; token ids,
activations and source attributions of the context window as little-endian ``int32`` /
``float32`` blobs) and ``logits`` (the boosted and suppressed tokens, for search). Indices:
features by density and by maximum per source, examples by feature and by the example's token,
logits by token.

The file is in WAL mode and `write_harvest` commits every ``commit_every`` features, so
another process can open it read-only (`FeatureDB`, the default) and read while it is written.

Sizes: a feature row takes about 1.5 KB and an example about ``12 * width + 60`` bytes
(``width`` context tokens; 456 bytes at the default 33, with source attribution 588). With the
defaults (20 top examples and up to 50 quantile examples) a feature takes at most about 33 KB;
16,384 features take at most about 0.54 GB whatever the number of tokens (docs/features.md has
measured sizes).
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from mechscope.errors import InputError, LoadError
from mechscope.features.harvest import Harvest
from mechscope.features.records import Example, FeatureRecord, feature_records

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (name TEXT PRIMARY KEY, hook_name TEXT, kind TEXT, n_features INTEGER,
    info TEXT);
CREATE TABLE IF NOT EXISTS vocab (id INTEGER PRIMARY KEY, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS vocab_text ON vocab (text);
CREATE TABLE IF NOT EXISTS features (source TEXT NOT NULL, feature INTEGER NOT NULL, n_tokens INTEGER,
    fire_count INTEGER, density REAL, max REAL, mean_all REAL, mean_active REAL, data TEXT,
    PRIMARY KEY (source, feature)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS features_density ON features (source, density);
CREATE INDEX IF NOT EXISTS features_max ON features (source, max);
CREATE TABLE IF NOT EXISTS examples (source TEXT NOT NULL, feature INTEGER NOT NULL, section INTEGER NOT NULL,
    rank INTEGER NOT NULL, value REAL, token_index INTEGER, token INTEGER, center INTEGER,
    tokens BLOB, acts BLOB, dfa BLOB);
CREATE INDEX IF NOT EXISTS examples_feature ON examples (source, feature, section, rank);
CREATE INDEX IF NOT EXISTS examples_token ON examples (token, source, feature) WHERE section = -1;
CREATE TABLE IF NOT EXISTS logits (source TEXT NOT NULL, feature INTEGER NOT NULL, token INTEGER NOT NULL,
    value REAL, rank INTEGER);
CREATE INDEX IF NOT EXISTS logits_token ON logits (token, value);
"""

TOP = -1
"""``examples.section`` of the top examples; quantile bins are ``0, 1, ...``."""


def _blob(values, dtype) -> bytes:
    return np.asarray(values, dtype=dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes()


def _unblob(data: bytes | None, dtype) -> list | None:
    if data is None:
        return None
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).tolist()


def vocab_strings(model) -> list[str] | None:
    """The text of every token id of ``model`` (``None`` without a tokenizer).

    Example:
        >>> vocab_strings(model) is None
        True
    """
    tok = getattr(model, "codec", None)
    if tok is None:
        return None
    import torch

    return tok.decode_each(torch.arange(model.cfg.d_vocab))


def write_harvest(
    harvest: Harvest,
    model,
    path: str | os.PathLike,
    *,
    commit_every: int = 256,
    meta: dict | None = None,
    source_info: dict[str, dict] | None = None,
    **record_options,
) -> Path:
    """Write every feature of ``harvest`` into the SQLite database ``path`` (created or extended;
    a source already in it is replaced). ``meta`` adds entries to the ``meta`` table (e.g. how to
    load the model), ``source_info`` to a source's info (e.g. its SAE's path); ``record_options``
    go to `feature_records`.

    Example:
        >>> import tempfile, pathlib
        >>> from mechscope.features import harvest, NeuronSource
        >>> result = harvest(model, NeuronSource(model, 0), torch.randint(0, 50, (4, 8)), progress=False)
        >>> db = FeatureDB(write_harvest(result, model, pathlib.Path(tempfile.mkdtemp()) / "f.db"))
        >>> db.feature(3).feature, db.sources()[0]["n_features"]
        (3, 64)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)
        meta = {
            "model_name": harvest.model_name, "n_tokens": harvest.n_tokens, "rows": harvest.rows_done,
            "context_size": harvest.config.context_size, "config": vars(harvest.config), "format": 1,
            **(meta or {}),
        }  # fmt: skip
        con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", [(k, json.dumps(v)) for k, v in meta.items()])
        strings = vocab_strings(model)
        if strings is not None and not con.execute("SELECT 1 FROM vocab LIMIT 1").fetchone():
            con.executemany("INSERT INTO vocab VALUES (?, ?)", enumerate(strings))
        con.commit()
        for name, src in harvest.sources.items():
            for table in ("features", "examples", "logits"):
                con.execute(f"DELETE FROM {table} WHERE source = ?", (name,))
            info = src.describe()
            if hasattr(src, "sae"):
                info["sae_config"] = src.sae.cfg.to_dict()
            info.update((source_info or {}).get(name, {}))
            con.execute(
                "INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?)",
                (name, src.hook_name, src.kind, src.n_features, json.dumps(info, default=str)),
            )
            batch: list[FeatureRecord] = []
            for rec in feature_records(harvest, model, name, **record_options):
                batch.append(rec)
                if len(batch) >= commit_every:
                    _insert(con, batch)
                    batch = []
            _insert(con, batch)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # everything in the main file: one file to copy
    finally:
        con.close()
    return path


def _insert(con: sqlite3.Connection, records: list[FeatureRecord]) -> None:
    features, examples, logits = [], [], []
    for r in records:
        data = {
            "hist_edges": r.hist_edges, "hist_counts": r.hist_counts, "quantile_edges": r.quantile_edges,
            "logits_up": r.logits_up, "logits_down": r.logits_down, "neighbours": r.neighbours,
            "head_shares": r.head_shares,
        }  # fmt: skip
        features.append(
            (
                r.source,
                r.feature,
                r.n_tokens,
                r.fire_count,
                r.density,
                r.max,
                r.mean_all,
                r.mean_active,
                json.dumps(data),
            )
        )
        sections = [(TOP, r.top)] + list(enumerate(r.quantiles))
        for section, items in sections:
            for rank, ex in enumerate(items):
                dfa = None if ex.dfa is None else _blob(ex.dfa, np.float32)
                examples.append(
                    (r.source, r.feature, section, rank, ex.value, ex.token_index, ex.token, ex.center,
                     _blob(ex.tokens, np.int32), _blob(ex.acts, np.float32), dfa)
                )  # fmt: skip
        for sign, items in ((1, r.logits_up), (-1, r.logits_down)):
            logits.extend(
                (r.source, r.feature, tok, value, sign * (rank + 1)) for rank, (tok, value) in enumerate(items)
            )
    con.executemany("INSERT INTO features VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", features)
    con.executemany("INSERT INTO examples VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", examples)
    con.executemany("INSERT INTO logits VALUES (?, ?, ?, ?, ?)", logits)
    con.commit()


class FeatureDB:
    """Read a feature database (read-only by default, safe while another process writes).

    Example:
        >>> db = FeatureDB("features.db")  # doctest: +SKIP
        >>> db.feature(12).density, [r["feature"] for r in db.search(token=" Paris")][:3]  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, readonly: bool = True) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise LoadError(f"{self.path}: no such feature database (make one with `mechscope features harvest`)")
        uri = f"{self.path.resolve().as_uri()}?mode={'ro' if readonly else 'rw'}"
        self.con = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self.con.row_factory = sqlite3.Row
        self._vocab: dict[int, str] | None = None

    def close(self) -> None:
        """Close the connection to the database file."""
        self.con.close()

    def meta(self) -> dict:
        """The ``meta`` table as a dict: model name, token and row counts, context size, harvest
        config, and the entries added by `write_harvest`'s ``meta``."""
        return {row["key"]: json.loads(row["value"]) for row in self.con.execute("SELECT * FROM meta")}

    def sources(self) -> list[dict]:
        """The harvested sources: name, hook, kind, number of features, and settings."""
        rows = self.con.execute("SELECT * FROM sources ORDER BY name").fetchall()
        return [{**dict(r), "info": json.loads(r["info"] or "{}")} for r in rows]

    def source_name(self, source: str | None) -> str:
        """``source`` checked against the harvested sources; ``None`` stands for the only one.

        Raises:
            InputError: ``source`` is not in the database, or is ``None`` while it holds several.
        """
        names = [s["name"] for s in self.sources()]
        if source is None:
            if len(names) != 1:
                raise InputError(f"the database holds several sources; pass source= one of {names}")
            return names[0]
        if source not in names:
            raise InputError(f"no source {source!r} in {self.path}; sources: {names}")
        return source

    # ------------------------------------------------------------------ tokens
    def vocab(self) -> dict[int, str]:
        """Token id to text for the model's vocabulary (read once, then kept; empty when the
        database has no vocabulary)."""
        if self._vocab is None:
            self._vocab = dict(self.con.execute("SELECT id, text FROM vocab").fetchall())
        return self._vocab

    def token_text(self, token: int) -> str:
        """The text of a token id (``⟨id⟩`` when the database has no vocabulary; empty for padding)."""
        if token < 0:
            return ""
        return self.vocab().get(token, f"⟨{token}⟩")

    def token_ids(self, text: str) -> list[int]:
        """Ids whose text is exactly ``text`` (or ``⟨id⟩``)."""
        ids = [r[0] for r in self.con.execute("SELECT id FROM vocab WHERE text = ?", (text,))]
        if not ids and text.startswith("⟨") and text.endswith("⟩") and text[1:-1].isdigit():
            ids = [int(text[1:-1])]
        return ids

    # ------------------------------------------------------------------ features
    def feature(self, feature: int, source: str | None = None) -> FeatureRecord:
        """The full record of one feature."""
        source = self.source_name(source)
        row = self.con.execute(
            "SELECT * FROM features WHERE source = ? AND feature = ?", (source, int(feature))
        ).fetchone()
        if row is None:
            n = self.con.execute("SELECT COUNT(*) FROM features WHERE source = ?", (source,)).fetchone()[0]
            raise InputError(f"feature {feature} is not in source {source!r} (features 0..{n - 1})")
        data = json.loads(row["data"])
        rec = FeatureRecord(
            source=source, feature=row["feature"], n_tokens=row["n_tokens"], fire_count=row["fire_count"],
            max=row["max"], mean_all=row["mean_all"], mean_active=row["mean_active"],
            hist_edges=data["hist_edges"], hist_counts=data["hist_counts"], quantile_edges=data["quantile_edges"],
            logits_up=[tuple(x) for x in data["logits_up"]], logits_down=[tuple(x) for x in data["logits_down"]],
            neighbours=[tuple(x) for x in data["neighbours"]], head_shares=data["head_shares"],
        )  # fmt: skip
        rec.quantiles = [[] for _ in range(max(len(rec.quantile_edges) - 1, 0))]
        rows = self.con.execute(
            "SELECT * FROM examples WHERE source = ? AND feature = ? ORDER BY section, rank", (source, int(feature))
        )
        for ex in rows:
            example = Example(
                value=ex["value"], token_index=ex["token_index"], tokens=_unblob(ex["tokens"], np.int32),
                acts=_unblob(ex["acts"], np.float32), center=ex["center"], dfa=_unblob(ex["dfa"], np.float32),
            )  # fmt: skip
            (rec.top if ex["section"] == TOP else rec.quantiles[ex["section"]]).append(example)
        return rec

    def search(
        self,
        token: str | None = None,
        *,
        boosts: str | None = None,
        feature: int | None = None,
        min_density: float | None = None,
        max_density: float | None = None,
        source: str | None = None,
        order: str = "density",
        limit: int = 100,
        offset: int = 0,
    ) -> list[dict]:
        """Features matching every given condition, as dicts of their statistics.

        ``token``: features whose top examples fire on this token (exact text, e.g. ``" Paris"``),
        most such examples first; ``boosts``: features among whose top logit effects the token is,
        strongest first; ``feature``: that id; ``min_density``/``max_density``: bounds on the
        density. Otherwise ordered by ``order`` (``density``, ``-density``, ``max``, ``-max``,
        ``feature``; ``-`` for descending). ``source=None`` searches every source.
        """
        orders = {"density": "f.density", "-density": "f.density DESC", "max": "f.max", "-max": "f.max DESC",
                  "feature": "f.feature"}  # fmt: skip
        if order not in orders:
            raise InputError(f"order must be one of {sorted(orders)}, got {order!r}")
        where, args, joins, rank = [], [], "", orders[order]
        if source is not None:
            where.append("f.source = ?")
            args.append(self.source_name(source))
        if feature is not None:
            where.append("f.feature = ?")
            args.append(int(feature))
        if min_density is not None:
            where.append("f.density >= ?")
            args.append(float(min_density))
        if max_density is not None:
            where.append("f.density <= ?")
            args.append(float(max_density))
        if token is not None:
            ids = self.token_ids(token)
            joins = (
                "JOIN (SELECT source, feature, COUNT(*) AS hits FROM examples WHERE section = -1 AND token IN "
                f"({','.join('?' * len(ids)) or 'NULL'}) GROUP BY source, feature) t "
                "ON t.source = f.source AND t.feature = f.feature"
            )
            args = list(ids) + args
            rank = f"t.hits DESC, {rank}"
        elif boosts is not None:
            ids = self.token_ids(boosts)
            joins = (
                "JOIN (SELECT source, feature, MAX(value) AS hits FROM logits WHERE rank > 0 AND token IN "
                f"({','.join('?' * len(ids)) or 'NULL'}) GROUP BY source, feature) t "
                "ON t.source = f.source AND t.feature = f.feature"
            )
            args = list(ids) + args
            rank = f"t.hits DESC, {rank}"
        sql = (
            "SELECT f.source, f.feature, f.density, f.max, f.mean_active, f.fire_count FROM features f "
            f"{joins} {'WHERE ' + ' AND '.join(where) if where else ''} ORDER BY {rank}, f.source, f.feature "
            "LIMIT ? OFFSET ?"
        )
        return [dict(r) for r in self.con.execute(sql, [*args, int(limit), int(offset)])]

    def count(self, source: str | None = None) -> int:
        """Number of features (of one source, or all)."""
        if source is None:
            return self.con.execute("SELECT COUNT(*) FROM features").fetchone()[0]
        return self.con.execute("SELECT COUNT(*) FROM features WHERE source = ?", (source,)).fetchone()[0]

    def top_tokens(self, feature: int, source: str | None = None, n: int = 5) -> list[str]:
        """The texts of a feature's strongest example tokens (for index pages)."""
        rows = self.con.execute(
            "SELECT token FROM examples WHERE source = ? AND feature = ? AND section = -1 ORDER BY rank LIMIT ?",
            (self.source_name(source), int(feature), n),
        )
        return [self.token_text(r[0]) for r in rows]

    def all_features(self, source: str | None = None) -> Iterable[int]:
        """The ids of every feature of ``source`` (``None``: the only one), in increasing order, lazily."""
        for r in self.con.execute(
            "SELECT feature FROM features WHERE source = ? ORDER BY feature", (self.source_name(source),)
        ):
            yield r[0]
