"""`bench report` end to end: a small real `bench run`, its HTML report opened in offline headless Chromium.

The suite's name is an HTML/script injection attempt; the page must show it as text. Every chart must render
(Vega-Lite via the inlined vega-embed) without console errors and without the page reaching the network.
A full-page screenshot is left at reports/report-e2e.png for people to look at.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.integration

BENCH = [sys.executable, "-m", "bench"]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO / "reports" / "report-e2e.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

SUITE_NAME = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>&amp; tiny'
SUITE = r"""
name: "<img src=x onerror=\"window.__pwned=1\"><script>window.__pwned=2</script>&amp; tiny"
description: "report end-to-end test <b>bold?</b>"
backends: [jax, "opacus:ghost"]
seeds: [0, 1]
timeout: 300
workloads:
  - name: synthetic-mlp
    dataset: {name: synthetic, train_size: 1024, test_size: 512, shape: [8, 8, 1], num_classes: 4}
    model: mlp
    train:
      epochs: 2
      batch_size: 128
      optimizer: {name: sgd, learning_rate: 0.5, momentum: 0.5}
    dp: {max_grad_norm: 1.0, delta: 1.0e-5}
    privacy:
      - dp: false
      - noise_multiplier: 1.0
      - target_epsilon: 8.0
"""
RUNS = 2 * 3 * 2  # backends x privacy levels x seeds

LOCAL_SCHEMES = {"file", "data", "blob", "about"}


def bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*BENCH, *args], cwd=cwd, capture_output=True, text=True, timeout=900)


def output(proc: subprocess.CompletedProcess) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working folder of one real 12-run `bench run` (results in ./results)."""
    root = tmp_path_factory.mktemp("report-e2e")
    (root / "tiny.yaml").write_text(SUITE)
    proc = bench("run", "tiny.yaml", "--results", "results", cwd=root)
    assert proc.returncode == 0, output(proc)
    assert f"{RUNS} runs: {RUNS} ok" in proc.stdout, output(proc)
    return root


@pytest.fixture(scope="module")
def report_html(results: Path) -> Path:
    proc = bench("report", "results", "--out", "report.html", cwd=results)
    assert proc.returncode == 0, output(proc)
    path = results / "report.html"
    assert path.is_file() and path.stat().st_size > 0, output(proc)
    return path


def test_markdown_report_escapes_the_suite_name(results: Path) -> None:
    proc = bench("report", "results", "--format", "md", cwd=results)
    assert proc.returncode == 0, output(proc)
    md = proc.stdout
    assert "&lt;img src=x onerror=" in md, md
    assert "&lt;script&gt;" in md, md
    for raw in ("<script", "<img", "</script>", "<b>"):
        assert raw not in md, f"raw {raw!r} in the Markdown report:\n{md}"


def test_html_report_is_one_file_with_its_javascript_inlined(report_html: Path) -> None:
    text = report_html.read_text()
    script_tags = re.findall(r"<script\b[^>]*>", text, re.IGNORECASE)
    assert script_tags and not [t for t in script_tags if re.search(r"\ssrc\s*=", t, re.IGNORECASE)], script_tags
    markup = re.sub(r"<script\b[^>]*>.*?</script>", "", text, flags=re.IGNORECASE | re.DOTALL)
    links = re.findall(r"<[a-z]+\b[^>]*\s(?:src|href)\s*=\s*[\"']?([^\"'\s>]*)", markup, re.IGNORECASE)
    assert not [u for u in links if not u.startswith(("#", "data:"))], links
    assert 'data-chart-count="' in text and 'class="chart"' in text


def require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if not missing:
        return
    why = f"{' and '.join(missing)} missing: install Chromium and its WebDriver with `make browser`"
    if os.environ.get("BENCH_REQUIRE_BROWSER") == "1":
        pytest.fail(why + " (BENCH_REQUIRE_BROWSER=1 is set)")
    pytest.skip(why)


@dataclass
class Page:
    """What the browser saw: the live driver, and the logs drained once the page had settled."""

    driver: Any
    console: list[dict[str, Any]]
    requests: list[str]


def request_urls(performance_log: list[dict[str, Any]]) -> list[str]:
    """Every URL the page asked for (HTTP-ish requests and WebSockets) in a Chrome performance log."""
    urls = []
    for entry in performance_log:
        message = json.loads(entry["message"])["message"]
        params = message.get("params", {})
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(params["request"]["url"])
        elif message.get("method") == "Network.webSocketCreated":
            urls.append(params["url"])
    return urls


def save_full_page_screenshot(driver: Any, path: Path) -> None:
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip}
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))


CHART_STATE = """
return {
  done: document.body.getAttribute('data-render-done'),
  count: document.body.getAttribute('data-chart-count'),
  charts: Array.from(document.querySelectorAll('.chart'), (c) => ({
    id: c.id,
    rendered: c.getAttribute('data-rendered'),
    error: c.getAttribute('data-render-error'),
    graphics: c.querySelectorAll('svg, canvas').length,
  })),
};
"""


@pytest.fixture(scope="module")
def page(report_html: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Page]:
    require_browser()
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
        # No network: an unreachable proxy, no name resolution, and (below) DevTools' offline mode.
        "--proxy-server=http://127.0.0.1:9",
        "--host-resolver-rules=MAP * ~NOTFOUND",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    # The driver named explicitly: Selenium Manager must not try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    try:
        driver.set_page_load_timeout(60)
        driver.get("about:blank")  # leave the new-tab page, and drop what it logged
        driver.get_log("browser")
        driver.get_log("performance")
        driver.execute_cdp_cmd("Network.enable", {})
        offline = {"offline": True, "latency": 0, "downloadThroughput": -1, "uploadThroughput": -1}
        driver.execute_cdp_cmd("Network.emulateNetworkConditions", offline)
        driver.get(report_html.as_uri())
        try:
            WebDriverWait(driver, 60).until(
                expected_conditions.presence_of_element_located((By.CSS_SELECTOR, 'body[data-render-done="true"]'))
            )
            settled = None
        except TimeoutException:
            settled = "the charts did not settle (no body[data-render-done]) within 60 s"
        console = driver.get_log("browser")
        requests = request_urls(driver.get_log("performance"))
        save_full_page_screenshot(driver, SCREENSHOT)
        if settled:
            state = driver.execute_script(CHART_STATE)
            pytest.fail(f"{settled}\nchart state: {state}\nconsole: {json.dumps(console, indent=1)}")
        yield Page(driver, console, requests)
    finally:
        driver.quit()


def test_every_chart_rendered_as_svg_or_canvas(page: Page) -> None:
    state = page.driver.execute_script(CHART_STATE)
    charts = state["charts"]
    assert state["done"] == "true"
    assert int(state["count"]) == len(charts) > 0, state
    failed = [c for c in charts if c["rendered"] != "true" or c["error"] is not None or c["graphics"] == 0]
    assert not failed, f"charts that did not render: {failed}\nconsole: {json.dumps(page.console, indent=1)}"


def test_no_console_errors_or_warnings(page: Page) -> None:
    """Vega reports a spec it only half understands (an ignored property, say) as a console warning."""
    errors = [e for e in page.console if e["level"] in ("SEVERE", "WARNING")]
    assert not errors, "console errors or warnings:\n" + "\n".join(json.dumps(e) for e in page.console)


def test_page_made_no_network_request(page: Page) -> None:
    assert page.requests, "the performance log recorded no request at all (not even the report's file: URL)"
    remote = [u for u in page.requests if urlsplit(u).scheme not in LOCAL_SCHEMES]
    assert not remote, f"requests beyond file:, data:, blob:, about: {remote}"


def test_malicious_suite_name_is_plain_text(page: Page) -> None:
    driver = page.driver
    assert driver.execute_script("return typeof window.__pwned") == "undefined"
    images = driver.execute_script("return Array.from(document.images, (i) => i.src)")
    assert not [src for src in images if src.endswith("/x")], images
    assert driver.execute_script("return document.querySelector('[onerror]')") is None
    injected = "return Array.from(document.scripts).filter((s) => s.textContent.trim() === 'window.__pwned=2').length"
    assert driver.execute_script(injected) == 0
    bold = driver.execute_script("return Array.from(document.querySelectorAll('b'), (b) => b.textContent)")
    assert "bold?" not in bold, bold  # the suite's description, if shown, is text too
    text = driver.execute_script("return document.body.innerText")
    assert SUITE_NAME in text, text[:2000]


def test_runs_table_has_a_row_per_run(page: Page) -> None:
    rows = page.driver.execute_script("return document.querySelectorAll('table.runs tbody tr').length")
    assert rows == RUNS
