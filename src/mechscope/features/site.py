"""A static site of a feature database: an index page and one dashboard page per feature.

The pages are self-contained (inline CSS, JavaScript and data), link to each other with
relative addresses, and open from disk with no network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from tqdm.auto import tqdm

from mechscope.features.database import FeatureDB
from mechscope.viz.dashboard import feature_index_html, feature_page_html
from mechscope.viz.html import save_html


def page_name(source: str, feature: int) -> str:
    """The file name of a feature's page.

    Example:
        >>> page_name("blocks.6.hook_resid_post", 12)
        'blocks.6.hook_resid_post-12.html'
    """
    return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', source)}-{int(feature)}.html"


def index_rows(db: FeatureDB, href=page_name) -> list[dict]:
    """One dict per feature of every source for `mechscope.viz.dashboard.feature_index_html`.

    Example:
        >>> index_rows(FeatureDB("features.db"))[0]["href"]  # doctest: +SKIP
        'blocks.6.hook_resid_post-0.html'
    """
    rows = []
    for src in db.sources():
        name = src["name"]
        tops: dict[int, list[str]] = {}
        sql = (
            "SELECT feature, token FROM examples WHERE source = ? AND section = -1 AND rank < 5 ORDER BY feature, rank"
        )
        for feature, token in db.con.execute(sql, (name,)):
            tops.setdefault(feature, []).append(db.token_text(token))
        for r in db.search(source=name, order="feature", limit=1 << 40):
            rows.append(
                {"source": name, "feature": r["feature"], "density": r["density"], "max": r["max"],
                 "tokens": tops.get(r["feature"], []), "href": href(name, r["feature"])}
            )  # fmt: skip
    return rows


def export_site(db: FeatureDB | str | os.PathLike, out_dir: str | os.PathLike, *, progress: bool = True) -> Path:
    """Write ``index.html`` and every feature's page into ``out_dir``; returns the index's path.

    Example:
        >>> export_site("features.db", "site")  # doctest: +SKIP
        PosixPath('site/index.html')
    """
    db = db if isinstance(db, FeatureDB) else FeatureDB(db)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sources = db.sources()
    total = sum(s["n_features"] for s in sources)
    with tqdm(total=total, disable=not progress, desc="pages", unit="page") as bar:
        for src in sources:
            for feature in db.all_features(src["name"]):
                record = db.feature(feature, src["name"])
                doc = feature_page_html(record, db.token_text, link=page_name, index="index.html")
                save_html(doc, out / page_name(src["name"], feature))
                bar.update()
    title = f"Features of {db.meta().get('model_name', 'a model')}"
    return save_html(feature_index_html(index_rows(db), title), out / "index.html")
