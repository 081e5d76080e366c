"""The static site and the live browser in headless Chromium (Debian ``chromium`` and
``chromium-driver``, driven by selenium): no console errors, search finds the feature,
test-a-prompt shows ``sae.encode`` of the same text, hostile token text stays text.

Without Chromium these tests skip, saying how to enable them; with ``MECHSCOPE_REQUIRE_BROWSER=1``
(set in CI) a missing browser is a failure. ``MECHSCOPE_SCREENSHOTS=DIR`` saves PNG screenshots
of a feature page and of test-a-prompt there.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from mechscope.cli.browse import Server, make_app
from mechscope.features import FeatureDB, HarvestConfig, export_site, harvest, page_name, write_harvest
from tests.features.conftest import HOSTILE, topk_sae

HOW_TO = (
    "browser tests need Chromium, its driver and selenium: apt-get install -y chromium chromium-driver; "
    "pip install selenium (set MECHSCOPE_REQUIRE_BROWSER=1 to make a missing browser fail instead of skip)"
)
SOURCE = "blocks.0.hook_resid_post"
PROMPT = "The cat sat on the mat in Paris " + HOSTILE[0]


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def driver():
    found = _chromium()
    if found is None:
        if os.environ.get("MECHSCOPE_REQUIRE_BROWSER", "") not in ("", "0"):
            pytest.fail("MECHSCOPE_REQUIRE_BROWSER is set but " + HOW_TO)
        pytest.skip(HOW_TO)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(found[1]), options=options)
    drv.set_page_load_timeout(30)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def built(text_model, corpus_tokens, tmp_path_factory):
    sae = topk_sae()
    cfg = HarvestConfig(context_size=16, batch_size=4, top_k=5, pool=16, left=6, right=3, hist_bins=64)
    result = harvest(text_model, sae, corpus_tokens, cfg, progress=False)
    root = tmp_path_factory.mktemp("browser")
    db_path = write_harvest(result, text_model, root / "features.db")
    db = FeatureDB(db_path)
    script_ids = set(db.token_ids(HOSTILE[0]))
    hostile_feature = next(
        f for f in db.all_features() if any(set(e.tokens) & script_ids for e in db.feature(f).top)
    )  # a feature whose top examples show the <script> token
    return sae, db_path, db, hostile_feature


def console_errors(drv) -> list[dict]:
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def wait_for(drv, css: str, timeout: float = 20):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(ec.presence_of_element_located((By.CSS_SELECTOR, css)))


def assert_hostile_text_is_inert(drv, expected_scripts: int):
    """Hostile token texts show as text: no element they spell exists, and the page's scripts are ours."""
    n_scripts = drv.execute_script("return document.scripts.length")
    assert n_scripts == expected_scripts
    spelled = "return document.querySelectorAll('textarea:not(#text)').length + "
    spelled += "[...document.querySelectorAll('b')].filter(b => b.textContent === 'bold').length"
    assert drv.execute_script(spelled) == 0
    assert drv.execute_script("return typeof window.alerted") == "undefined"
    text = drv.execute_script("return document.body.textContent")
    assert "<script>alert(1)</script>" in text


def screenshot(drv, name: str) -> None:
    folder = os.environ.get("MECHSCOPE_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(Path(folder) / name))


def test_static_site_renders_searches_and_escapes(driver, built, tmp_path):
    from selenium.webdriver.common.by import By

    sae, db_path, db, hostile_feature = built
    index = export_site(db_path, tmp_path / "site", progress=False)
    driver.get(index.as_uri())
    rows = driver.find_elements(By.CSS_SELECTOR, "tr.feature-row")
    assert len(rows) == sae.cfg.d_sae
    box = driver.find_element(By.ID, "q")
    box.send_keys("17")
    assert [r.get_attribute("data-feature") for r in driver.find_elements(By.CSS_SELECTOR, "tr.feature-row")] == ["17"]
    box.clear()
    token = db.token_text(db.feature(hostile_feature).top[0].token)
    box.send_keys(token)
    shown = {int(r.get_attribute("data-feature")) for r in driver.find_elements(By.CSS_SELECTOR, "tr.feature-row")}
    assert hostile_feature in shown or token.strip() == ""
    assert console_errors(driver) == []
    driver.get((tmp_path / "site" / page_name(SOURCE, hostile_feature)).as_uri())
    assert driver.find_elements(By.CSS_SELECTOR, "#top-examples .example")
    assert_hostile_text_is_inert(driver, expected_scripts=0)
    assert console_errors(driver) == []
    screenshot(driver, "features-page.png")


def test_live_browser_prompt_equals_sae_encode(driver, built, text_model):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    sae, db_path, db, hostile_feature = built
    app = make_app(db_path, text_model, {SOURCE: sae})
    with Server(app) as url:
        assert url.startswith("http://127.0.0.1:")
        driver.get(url + "/")
        assert len(driver.find_elements(By.CSS_SELECTOR, "tr.feature-row")) == sae.cfg.d_sae
        assert console_errors(driver) == []
        # server-side search by token finds the feature whose examples fire on it
        token = db.token_text(db.feature(hostile_feature).top[0].token)
        driver.get(url + "/search")
        driver.find_element(By.NAME, "token").send_keys(token)
        empty = driver.find_element(By.ID, "results")  # the form page has an empty table too
        driver.find_element(By.TAG_NAME, "button").click()
        WebDriverWait(driver, 20).until(ec.staleness_of(empty))
        wait_for(driver, "#results")
        found = [a.text for a in driver.find_elements(By.CSS_SELECTOR, "tr.result a")]
        assert f"{SOURCE} #{hostile_feature}" in found
        driver.get(f"{url}/feature/{SOURCE}/{hostile_feature}")
        assert_hostile_text_is_inert(driver, expected_scripts=0)
        assert console_errors(driver) == []
        # test a prompt
        driver.get(url + "/prompt")
        Select(driver.find_element(By.ID, "source")).select_by_value(SOURCE)
        driver.find_element(By.ID, "text").send_keys(PROMPT)
        driver.find_element(By.ID, "run").click()
        wait_for(driver, "#prompt-table")
        tokens = text_model.to_tokens(PROMPT)
        _, cache = text_model.run_with_cache(tokens, names_filter=SOURCE)
        expected = sae.encode(cache[SOURCE])[0].detach()
        rows = driver.find_elements(By.CSS_SELECTOR, "tr.prompt-token")
        assert len(rows) == tokens.shape[1]
        checked = 0
        for pos, row in enumerate(rows):
            shown = [(int(a.get_attribute("data-feature")), float(a.get_attribute("data-value")))
                     for a in row.find_elements(By.CSS_SELECTOR, "a.fire")]  # fmt: skip
            want = [(int(i), float(v)) for v, i in zip(*expected[pos].topk(8), strict=True) if v > 0]
            assert [f for f, _ in shown] == [f for f, _ in want]
            np.testing.assert_allclose([v for _, v in shown], [v for _, v in want], rtol=1e-6, atol=1e-6)
            checked += len(shown)
        assert checked > 10
        shown_tokens = driver.execute_script(
            "return [...document.querySelectorAll('tr.prompt-token td.tok')].map(td => JSON.parse(td.textContent))"
        )
        assert shown_tokens == text_model.to_str_tokens(tokens[0])
        assert_hostile_text_is_inert(driver, expected_scripts=1)
        assert console_errors(driver) == []
        screenshot(driver, "features-prompt.png")
        # steer: add the feature and see the distribution change
        driver.get(url + "/steer")
        driver.find_element(By.ID, "text").send_keys(PROMPT)
        feature = driver.find_element(By.ID, "feature")
        feature.clear()
        feature.send_keys(str(hostile_feature))
        coefficient = driver.find_element(By.ID, "coefficient")
        coefficient.clear()
        coefficient.send_keys("20")
        driver.find_element(By.ID, "run").click()
        kl = wait_for(driver, "p.kl").text
        assert float(kl.rsplit("=", 1)[1]) > 0
        assert len(driver.find_elements(By.CSS_SELECTOR, "#result table")) == 2
        assert console_errors(driver) == []
