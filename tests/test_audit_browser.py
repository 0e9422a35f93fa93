"""The audit report as a person sees it: opened from ``file://`` in headless Debian chromium (selenium +
chromedriver): no console errors, every index table has its rows, a header click sorts, the filter filters, a sample
link opens its page and every image on both pages has loaded; screenshots are written.

``make test`` / ``.ci/run`` install ``chromium`` and ``chromium-driver``; with ``FUSIONLENS_REQUIRE_BROWSER=1`` (set
there) a missing browser fails the test instead of skipping it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from fusionlens.audit import audit
from test_audit import Scenes, labels_of, make_spec, partner_spec, trained_models

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("FUSIONLENS_REQUIRE_BROWSER"):
            pytest.fail("chromium / chromedriver not installed (apt-get install chromium chromium-driver)")
        pytest.skip("chromium / chromedriver not installed")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,2200"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)  # the given driver: nothing downloaded
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    net, solo = trained_models()
    out = tmp_path_factory.mktemp("browser") / "report"
    return audit(make_spec(net), Scenes(9, seed=1), out=out, labels=labels_of,
                 partners={"lidar-only": partner_spec(solo)}, reference=Scenes(8, seed=2), select=[0, 4],
                 error_iou=0.9, progress=False)


def _errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _images_loaded(driver) -> list[tuple[str, int]]:
    return driver.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete ? i.naturalWidth : 0]);")


def _column(driver, table: str, col: int) -> list[str]:
    return driver.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0] + ' tbody tr'))"
        ".filter(r => r.style.display !== 'none').map(r => r.cells[arguments[1]].getAttribute('data-v'));",
        f"table#{table}", col)


def _shown(driver, element):
    """``element`` scrolled to the middle of the window, where a person would click it."""
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)
    return element


def test_report_in_a_real_browser(browser, report, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    saved = json.loads((report.out / "audit.json").read_text())
    browser.get(report.index.as_uri())
    assert browser.title.startswith("Sensor-reliance audit")
    images = _images_loaded(browser)
    assert len(images) >= 4 and all(w > 0 for _, w in images), images
    for name, rows in saved["tables"].items():
        if rows:
            assert len(browser.find_elements(By.CSS_SELECTOR, f"table#{name} tbody tr")) == len(rows), name
    # sorting the samples table by its monitor score, both directions
    headers = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "table#samples thead th")]
    col = headers.index("monitor")
    before = _column(browser, "samples", col)
    header = _shown(browser, browser.find_elements(By.CSS_SELECTOR, "table#samples thead th")[col])
    header.click()
    up = [float(v) for v in _column(browser, "samples", col)]
    assert up == sorted(float(v) for v in before) and up != [float(v) for v in before]
    header.click()
    assert [float(v) for v in _column(browser, "samples", col)] == sorted(up, reverse=True)
    # the filter keeps the rows that mention the text
    box = _shown(browser, browser.find_element(By.CSS_SELECTOR, "input[data-table='samples']"))
    box.send_keys("rain")
    assert len(_column(browser, "samples", col)) == sum("rain" in r["tags"] for r in saved["samples"])
    box.send_keys(Keys.BACKSPACE * 4)  # as a person deletes it: every row is back
    assert len(_column(browser, "samples", col)) == len(saved["samples"])
    browser.save_screenshot(str(tmp_path / "index.png"))
    assert _errors(browser) == []
    # a sample link opens that sample's page with its LMD panel loaded
    link = _shown(browser, browser.find_element(By.CSS_SELECTOR, "table#samples tbody a"))
    name = link.text
    link.click()
    assert browser.current_url.endswith(f"samples/{name}.html")
    assert browser.find_element(By.TAG_NAME, "h1").text == name
    images = _images_loaded(browser)
    assert images and all(w > 0 for _, w in images), images
    assert browser.execute_script("return document.getElementById('panel').naturalWidth") > 500
    browser.save_screenshot(str(tmp_path / "sample.png"))
    assert _errors(browser) == []
    _shown(browser, browser.find_element(By.ID, "back")).click()
    assert browser.current_url == report.index.as_uri()
    for shot in ("index.png", "sample.png"):
        assert (tmp_path / shot).stat().st_size > 20_000
    target = os.environ.get("FUSIONLENS_SCREENSHOTS")
    if target:  # keep the screenshots for a person to look at
        Path(target).mkdir(parents=True, exist_ok=True)
        for shot in ("index.png", "sample.png"):
            shutil.copy(tmp_path / shot, Path(target) / shot)
