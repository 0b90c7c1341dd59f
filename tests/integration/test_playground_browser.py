"""The search playground in a real headless Chromium against a real server.

What this catches that the static page checks cannot: the page's script running (collections load,
the form submits, results render), data URIs really decoding into pixels under the page's content
policy, an image read with FileReader reaching the API, and the server's own error message reaching
the banner. Driven with Selenium and Debian's chromedriver (`apt-get install -y chromium
chromium-driver`): the driver comes with the browser at the same version, and nothing is downloaded
(Playwright wants its own browser build, which CI cannot fetch).

A missing browser or driver fails the test with the install command instead of skipping it, so CI
cannot go green without the browser check having run. A screenshot and a transcript land in
`tests/artifacts/` (git-ignored), on failure too.
"""

from __future__ import annotations

import base64
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SCREENSHOT = ARTIFACTS / "playground.png"
TRANSCRIPT = ARTIFACTS / "playground-transcript.txt"
INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"
# The flags keep a headless Chromium quiet on a closed network (no update, sync or background fetches).
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1000",
]
WAIT_SECONDS = 30

TEXTS = {
    "guitar": ("A man is playing a guitar on stage.", {"kind": "music", "year": 2020}),
    "cat": ("A cat sleeps on the windowsill.", {"kind": "animal", "year": 2019}),
    "soup": ("Tomato soup simmers in a pot.", {"kind": "food", "year": 2021}),
}
IMAGES = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255)}


def _find(explicit: str | None, *names: str) -> str | None:
    for name in ((explicit,) if explicit else ()) + names:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    """A headless Chromium with a fresh profile; fails (not skips) with the install command when absent."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is not installed; install the browser test's parts with: {INSTALL}")
    chromium = _find(os.environ.get("DUET_CHROMIUM"), "/usr/bin/chromium", "chromium", "chromium-browser")
    driver_path = _find(os.environ.get("DUET_CHROMEDRIVER"), "/usr/bin/chromedriver", "chromedriver")
    if chromium is None or driver_path is None:
        missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver_path)) if p is None]
        pytest.fail(f"{' and '.join(missing)} not found; install them with: {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # console errors, checked at the end
    # An explicit Service: Selenium Manager would otherwise try to download a driver.
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    driver.set_page_load_timeout(WAIT_SECONDS)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture()
def collection(server) -> Iterator[str]:
    """A text+image collection on minilm-dual (its image tower is untrained: fine for a UI test)."""
    name = f"playground-{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=server.url, timeout=120) as client:
        client.post("/v1/collections", json={"name": name, "model": "minilm-dual"}).raise_for_status()
        items = [{"id": key, "text": text, "payload": payload} for key, (text, payload) in TEXTS.items()]
        items += [
            {"id": f"img-{key}", "image": _pattern_uri(color), "payload": {"color": key}}
            for key, color in IMAGES.items()
        ]
        client.put(f"/v1/collections/{name}/items", json={"items": items}).raise_for_status()
        yield name
        client.delete(f"/v1/collections/{name}")


def _pattern_uri(color: tuple[int, int, int]) -> str:
    """A 48 px image: the colour with a white diagonal band, so tiles are not plain squares."""
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", (48, 48), color)
    ImageDraw.Draw(image).line((0, 48, 48, 0), fill=(255, 255, 255), width=8)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class Transcript:
    """Steps and what was seen, written to a file whatever the outcome."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, line: str) -> None:
        self.lines.append(line)

    def save(self) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        TRANSCRIPT.write_text("\n".join(self.lines) + "\n")


def test_playground_searches_and_shows_errors(server, browser, collection, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    wait = WebDriverWait(browser, WAIT_SECONDS)
    log = Transcript()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    SCREENSHOT.unlink(missing_ok=True)
    shot = False

    def results_titled(prefix: str):
        def check(driver):
            title = driver.find_element(By.ID, "results-title").text
            return title if title.startswith(prefix) else False

        return check

    def cards() -> list[dict]:
        return browser.execute_script(
            """return [...document.querySelectorAll('#results article.hit')].map((card) => {
                 const img = card.querySelector('img');
                 return {id: card.dataset.id, modality: card.dataset.modality,
                         text: card.querySelector('.media').textContent,
                         score: card.querySelector('.score').textContent,
                         naturalWidth: img ? img.naturalWidth : null, complete: img ? img.complete : null};
               });"""
        )

    try:
        browser.get(f"{server.url}/playground")
        log(f"opened {server.url}/playground: title {browser.title!r}")
        wait.until(
            lambda d: (
                collection in [o.get_attribute("value") for o in Select(d.find_element(By.ID, "collection")).options]
            )
        )
        Select(browser.find_element(By.ID, "collection")).select_by_value(collection)
        log(f"picked collection {collection}: {browser.find_element(By.ID, 'collection-info').text!r}")

        # An API key is optional: with one typed in (kept in sessionStorage) searches work on a server
        # without auth; with auth on, the same header is what lets them through.
        key_field = browser.find_element(By.ID, "api-key")
        key_field.send_keys("test-key")
        browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", key_field)
        stored = browser.execute_script("return sessionStorage.getItem('duet.apiKey')")
        assert stored == "test-key"
        log(f"typed an API key; sessionStorage holds {stored!r}")

        # Text search: the closest text first, and every image tile decoded into pixels.
        browser.find_element(By.ID, "query").send_keys("someone making music with an instrument")
        k_field = browser.find_element(By.ID, "k")
        k_field.clear()
        k_field.send_keys("6")
        browser.find_element(By.ID, "search").click()
        title = wait.until(results_titled("6 results"))
        wait.until(lambda d: all(c["complete"] for c in cards() if c["modality"] == "image"))
        found = cards()
        log(f"text search -> {title!r}")
        for card in found:
            log(f"  {card['id']:<10} {card['modality']:<6} score {card['score']} naturalWidth {card['naturalWidth']}")
        assert found[0]["id"] == "guitar" and TEXTS["guitar"][0] in found[0]["text"]
        images = [c for c in found if c["modality"] == "image"]
        assert sorted(c["id"] for c in images) == ["img-blue", "img-green", "img-red"]
        assert all(c["naturalWidth"] and c["naturalWidth"] > 0 for c in images), images
        assert browser.find_element(By.ID, "banner").get_attribute("hidden") is not None
        # minilm-dual's image tower is untrained: the server's X-Duet-Warning is shown with the results.
        warning = browser.find_element(By.ID, "results-warning")
        log(f"warning: {warning.text!r}")
        assert warning.is_displayed() and "minilm-dual/1 is untrained" in warning.text
        shot = browser.save_screenshot(str(SCREENSHOT))
        log(f"screenshot of the results: {SCREENSHOT}")

        # Image search: a file chosen in the page, read as a data URI by the browser.
        picture = tmp_path / "query.png"
        picture.write_bytes(base64.b64decode(_pattern_uri(IMAGES["blue"]).split(",", 1)[1]))
        browser.find_element(By.ID, "image-file").send_keys(str(picture))
        wait.until(ec.visibility_of_element_located((By.ID, "image-preview")))
        browser.find_element(By.ID, "search").click()
        title = wait.until(results_titled("6 results for the image"))
        found = cards()
        log(f"image search with {picture.name} -> {title!r}; top {found[0]['id']} score {found[0]['score']}")
        assert found[0]["id"] == "img-blue", found[:3]
        browser.find_element(By.ID, "image-clear").click()

        # An error: k out of range; the banner shows the server's own message.
        expected = _server_message(server.url, collection, {"query": {"text": "music"}, "k": 0})
        k_field.clear()
        k_field.send_keys("0")
        browser.find_element(By.ID, "search").click()
        banner = wait.until(ec.visibility_of_element_located((By.ID, "banner-text")))
        log(f"k=0 -> banner {banner.text!r}")
        assert expected in banner.text and "HTTP 400" in banner.text

        # And an empty query: the server's message again, not one the page made up.
        expected = _server_message(server.url, collection, {"query": {"text": ""}, "k": 5})
        browser.find_element(By.ID, "banner-close").click()
        browser.find_element(By.ID, "query").clear()
        k_field.clear()
        k_field.send_keys("5")
        browser.find_element(By.ID, "search").click()
        wait.until(lambda d: expected in d.find_element(By.ID, "banner-text").text)
        log(f"empty query -> banner {browser.find_element(By.ID, 'banner-text').text!r}")
        assert expected.startswith("the query is empty"), expected  # plain words, not `queries[0].text`

        # The page links to the jobs page.
        assert browser.find_element(By.LINK_TEXT, "Training jobs").get_attribute("href").endswith("/jobs")
        # Script errors only: Chromium also logs the two 400s above, which the test asked for.
        errors = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE" and e.get("source") != "network"]
        log(f"browser console errors: {errors or 'none'}")
        assert errors == []
    finally:
        if not shot:
            browser.save_screenshot(str(SCREENSHOT))  # the page as it was when the test failed
        log.save()
        print(f"\nplayground screenshot: {SCREENSHOT}\nplayground transcript: {TRANSCRIPT}")
        print("\n".join(log.lines))


def _server_message(url: str, collection: str, body: dict) -> str:
    response = httpx.post(f"{url}/v1/collections/{collection}/search", json=body, timeout=60)
    assert response.status_code == 400, response.text
    return response.json()["error"]["message"]


def narrow(browser, width: int = 400, height: int = 900) -> None:
    """Emulate a phone-sized screen (a headless window is not made narrower than 500 px)."""
    metrics = {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)


# What sticks out past the window; a wide table scrolling inside its own box is fine.
OVERFLOW_JS = """return [window.innerWidth, document.documentElement.scrollWidth,
  [...document.querySelectorAll('body *')].filter((e) => e.getBoundingClientRect().right > window.innerWidth + 1
     && !e.closest('.list, .metrics-wrap')).map((e) => e.id || e.tagName).slice(0, 8)]"""


def test_playground_fits_a_400px_screen(server, browser, collection):
    """On a phone-sized screen nothing is wider than the screen, results shown: no sideways scrolling."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    narrow(browser)
    try:
        browser.get(f"{server.url}/playground")
        wait = WebDriverWait(browser, WAIT_SECONDS)
        options = lambda d: [o.get_attribute("value") for o in Select(d.find_element(By.ID, "collection")).options]  # noqa: E731
        wait.until(lambda d: collection in options(d))
        Select(browser.find_element(By.ID, "collection")).select_by_value(collection)
        browser.find_element(By.ID, "query").send_keys("a guitar")
        browser.find_element(By.ID, "search").click()
        wait.until(lambda d: d.find_element(By.ID, "results-title").text.startswith("6 results"))
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground-400px.png"))
        inner, scroll, wide = browser.execute_script(OVERFLOW_JS)
        assert inner == 400 and scroll <= inner and not wide, f"page {scroll} px wide in {inner} px: {wide}"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
