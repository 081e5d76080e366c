"""The SQLite feature database and the static site: round trip, search, WAL, sizes, escaping."""

from __future__ import annotations

import re
import sqlite3
import subprocess
import sys

import pytest

from mechscope.errors import InputError, LoadError
from mechscope.features import FeatureDB, HarvestConfig, export_site, feature_records, harvest, write_harvest
from tests.features.conftest import HOSTILE, topk_sae

CFG = HarvestConfig(context_size=16, batch_size=4, top_k=5, pool=16, left=4, right=2, hist_bins=64)


@pytest.fixture(scope="module")
def built(text_model, corpus_tokens, tmp_path_factory):
    sae = topk_sae()
    result = harvest(text_model, sae, corpus_tokens, CFG, progress=False)
    path = write_harvest(result, text_model, tmp_path_factory.mktemp("db") / "features.db", commit_every=7)
    return result, path, sae


def test_records_round_trip_through_the_database(built, text_model):
    result, path, sae = built
    db = FeatureDB(path)
    records = list(feature_records(result, text_model, sae.cfg.hook_name))
    assert db.count() == sae.cfg.d_sae == len(records)
    for rec in records[:: max(1, len(records) // 12)]:
        got = db.feature(rec.feature)
        assert got.fire_count == rec.fire_count and got.density == pytest.approx(rec.density, rel=1e-12)
        assert got.max == pytest.approx(rec.max, rel=1e-7) and got.hist_counts == rec.hist_counts
        assert [(e.value, e.token_index, e.tokens) for e in got.top] == [
            (pytest.approx(e.value, rel=1e-7), e.token_index, e.tokens) for e in rec.top
        ]
        assert [len(q) for q in got.quantiles] == [len(q) for q in rec.quantiles]
        assert [t for t, _ in got.logits_up] == [t for t, _ in rec.logits_up]
        assert len(got.neighbours) == 10
    assert sum(sum(r.hist_counts) for r in records) == sum(r.fire_count for r in records)
    with pytest.raises(InputError, match="features 0..47"):
        db.feature(48)
    with pytest.raises(LoadError, match="no such feature database"):
        FeatureDB(path.with_name("missing.db"))


def test_search_by_token_feature_and_density(built):
    _, path, _ = built
    db = FeatureDB(path)
    rec = max((db.feature(i) for i in range(db.count())), key=lambda r: len(r.top))
    token = db.token_text(rec.top[0].token)
    hits = db.search(token=token)
    assert hits and any(h["feature"] == rec.feature for h in hits)
    for h in hits:  # every hit has a top example on that token
        assert any(db.token_text(e.token) == token for e in db.feature(h["feature"]).top)
    assert [h["feature"] for h in db.search(feature=rec.feature)] == [rec.feature]
    dens = sorted(db.feature(i).density for i in range(db.count()))
    lo, hi = dens[10], dens[30]
    got = db.search(min_density=lo, max_density=hi, limit=1000)
    assert len(got) == sum(lo <= d <= hi for d in dens) and all(lo <= g["density"] <= hi for g in got)
    by_max = db.search(order="-max", limit=1000)
    assert [g["max"] for g in by_max] == sorted((g["max"] for g in by_max), reverse=True)
    up = db.feature(3).logits_up[0][0]
    assert any(h["feature"] == 3 for h in db.search(boosts=db.token_text(up), limit=1000))
    plan = " ".join(
        str(tuple(r))
        for r in db.con.execute("EXPLAIN QUERY PLAN SELECT * FROM features WHERE source = 'x' AND density > 0.1")
    )
    assert "features_density" in plan


def test_wal_and_read_only_while_another_process_writes(built, tmp_path):
    _, path, _ = built
    db = FeatureDB(path)
    assert db.con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(sqlite3.OperationalError):
        db.con.execute("DELETE FROM features")
    writer = (
        "import sqlite3, sys, time\n"
        "con = sqlite3.connect(sys.argv[1]); con.execute('BEGIN IMMEDIATE')\n"
        "con.execute(\"UPDATE meta SET value = '1' WHERE key = 'format'\")\n"
        "print('locked', flush=True); time.sleep(3); con.commit()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        reader = FeatureDB(path)  # reads while the other process holds the write lock
        assert reader.feature(0).feature == 0 and reader.count() == 48
    finally:
        proc.wait(timeout=30)


def test_static_site_opens_from_disk_and_escapes_tokens(built, tmp_path):
    _, path, _ = built
    index = export_site(path, tmp_path / "site", progress=False)
    pages = sorted((tmp_path / "site").glob("*.html"))
    assert len(pages) == 49 and index.name == "index.html"
    for page in pages:
        text = page.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), page
        assert "<script src" not in text and "<link" not in text
        for bad in HOSTILE[:3]:
            assert bad not in text, (page, bad)
    db = FeatureDB(path)
    hostile_ids = {i for h in HOSTILE for i in db.token_ids(h)}
    assert hostile_ids, "the tokenizer holds the hostile tokens"
    shown = [p for p in pages if "&lt;script&gt;alert(1)&lt;/script&gt;" in p.read_text()]
    assert shown, "some page shows the <script> token as text"
