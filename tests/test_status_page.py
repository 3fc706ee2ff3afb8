"""The status page in a real headless browser (Debian's chromium, driven by Selenium through
chromedriver) against a real `pacs-embed run` that embedded instances sent with DCMTK: it shows
nothing before the token, logs in with it, shows the same numbers as /status, never puts the
token in a URL, and needs nothing beyond loopback."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.admin import page
from tests import factory
from tests.daemon import Daemon, storescu, successes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("storescu") is None, reason="DCMTK not installed"),
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason="chromium and chromium-driver not installed",
    ),
]

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.chrome.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

N = 4
#: Numbers that move by themselves between two reads (time, disk, a sliding window).
MOVING = {"uptime_seconds", "spool.free_bytes", "endpoint.images_per_second"}
#: Every number of SECTIONS must be on the page.
SHOWN = {
    f"{prefix}.{field}" if prefix else field
    for _title, prefix, fields in page.SECTIONS
    for field in fields
}
#: Chromium as a test needs it: headless, no sandbox (root in a container), nothing of its own
#: over the network.
ARGUMENTS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # No name resolves but loopback's: the page must work without any other network.
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = Options()
    options.binary_location = CHROMIUM
    for argument in ARGUMENTS:
        options.add_argument(argument)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium'}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request's URL
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def pick(doc: Any, path: str) -> Any:
    """The value at a page's ``data-metric`` path in /status (``length`` of a list too)."""
    for part in path.split("."):
        if doc is None:
            return None
        doc = len(doc) if part == "length" and isinstance(doc, list) else doc.get(part)
    return doc


def shown(driver: WebDriver) -> dict[str, tuple[Any, str]]:
    """Each number on the page: path -> (its value, as JSON in data-value; its text)."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('[data-metric]')]"
        ".map(e => [e.dataset.metric, e.dataset.value, e.textContent]);"
    )
    return {  # no data-value: never filled in
        path: (json.loads(value) if value is not None else None, text) for path, value, text in rows
    }


def differences(driver: WebDriver, status: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Numbers the page shows differently from ``status`` (path -> (page, /status)), bars of
    the throughput chart included."""
    found = {
        path: (value, pick(status, path))
        for path, (value, _text) in shown(driver).items()
        if path not in MOVING and value != pick(status, path)
    }
    bars = driver.execute_script(
        "return [...document.querySelectorAll('#chart rect')].map(r => Number(r.dataset.value));"
    )
    if bars != status["throughput"]["images"]:
        found["throughput.images"] = (bars, status["throughput"]["images"])
    return found


def wait(driver: WebDriver, script: str, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not driver.execute_script(script):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_the_page_shows_what_status_says(
    daemon: Daemon, browser: WebDriver, tmp_path: Path
) -> None:
    """Before the token the page holds no number; after it, every number equals /status's
    (read right after, until they agree: they move while the daemon works), the study is
    listed, the chart has the hour's minutes, and the token is in no URL requested."""
    daemon.start()
    series = factory.ct_series(N, rows=64, columns=64, identical=None)
    paths = [factory.write(ds, tmp_path / f"{n}.dcm") for n, ds in enumerate(series)]
    assert successes(storescu(daemon.dicom_port, paths)) == N
    daemon.wait_embedded(N)
    base = f"http://127.0.0.1:{daemon.admin_port}"
    token = daemon.token()

    browser.get(f"{base}/")
    assert browser.find_element(By.TAG_NAME, "body").get_attribute("data-state") == "login"
    assert set(shown(browser).values()) == {(None, "")}  # the shell holds no number
    assert not browser.find_element(By.ID, "data").is_displayed()

    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait(browser, "return document.body.dataset.state === 'ready';", 30, "the page's numbers")
    assert browser.find_element(By.ID, "data").is_displayed()

    deadline = time.monotonic() + 60
    while True:
        status = daemon.status()
        diff = differences(browser, status)
        if not diff:
            break
        assert time.monotonic() < deadline, f"page and /status differ: {diff}"
        before = browser.execute_script("return document.body.dataset.refreshes;")
        wait(
            browser,
            f"return document.body.dataset.refreshes !== {json.dumps(before)};",
            15,
            "a refresh",
        )
    numbers = shown(browser)
    assert SHOWN <= set(numbers), SHOWN - set(numbers)
    assert {"counters.received", "counters.embedded"} <= set(numbers)
    assert numbers["instances.embedded"] == (N, str(N))
    for path, (value, text) in numbers.items():
        if isinstance(value, int) and not isinstance(value, bool):
            assert text == str(value), path  # what a person reads is the number itself
    assert numbers["workers.length"][0] >= 1
    studies = browser.find_element(By.ID, "studies").text
    assert str(series[0].StudyInstanceUID) in studies
    assert sum(status["throughput"]["images"]) >= N and len(status["throughput"]["images"]) == 60

    # The token: in the tab's sessionStorage only, in no URL, no cookie.
    assert token not in browser.current_url
    assert browser.get_cookies() == []
    urls = [
        event["params"]["request"]["url"]
        for entry in browser.get_log("performance")
        for event in [json.loads(entry["message"])["message"]]
        if event["method"] == "Network.requestWillBeSent"
    ]
    assert any(url.startswith(f"{base}/status") for url in urls)
    assert not [url for url in urls if token in url]
    # Everything the page loaded came from the admin endpoint: no other host, no asset.
    loaded = browser.execute_script(
        "return performance.getEntries().map(e => e.name).filter(n => n.includes('://'));"
    )
    assert loaded and all(name.startswith(f"{base}/") for name in loaded), loaded
    assert not [name for name in loaded if token in name]


def test_a_wrong_token_shows_nothing(daemon: Daemon, browser: WebDriver) -> None:
    """A refused token is dropped and asked again; no number appears."""
    daemon.start()
    browser.get(f"http://127.0.0.1:{daemon.admin_port}/")
    browser.find_element(By.ID, "token").send_keys("not-the-token")
    browser.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
    wait(
        browser,
        "return document.getElementById('refused').textContent !== '';",
        15,
        "the refusal",
    )
    assert browser.execute_script("return sessionStorage.length;") == 0
    assert not browser.find_element(By.ID, "data").is_displayed()
    assert set(shown(browser).values()) == {(None, "")}
