"""The jobs page in a real headless Chromium, on a phone-sized screen, showing jobs whose records are
given (the page's `fetch` answered by the test, no training run): a succeeded job's metrics coloured
by each metric's direction, its stage and learning rate, and a failed job's traceback summarised.

The browser comes from test_playground_browser.py (same install, same failure when it is missing)."""

from __future__ import annotations

import json

from tests.integration.test_playground_browser import (  # noqa: F401  (browser: a fixture)
    ARTIFACTS,
    OVERFLOW_JS,
    WAIT_SECONDS,
    browser,
    narrow,
)

TRACEBACK = """Traceback (most recent call last):
  File "/srv/duet/jobs/child.py", line 120, in run
    trainer.fit(config)
  File "/srv/duet/trainer/run.py", line 358, in fit
    raise ValueError("column 'anchor' is missing from train.csv")
ValueError: column 'anchor' is missing from train.csv"""

SUCCEEDED = {
    "id": "job_0000000000000001",
    "object": "job",
    "state": "succeeded",
    "config": {"base_model": "minilm", "output": {"name": "tuned"}, "learning_rate": 2e-5},
    "progress": {"step": 40, "max_steps": 40, "epoch": 1.0, "loss": 0.31, "learning_rate": 2e-5, "stage": None},
    "metrics": {
        "before": {"sts/spearman": 0.70, "sts/alignment": 0.80, "sts/uniformity": -2.0, "sts/modality_gap": 0.3},
        "after": {"sts/spearman": 0.80, "sts/alignment": 0.60, "sts/uniformity": -2.5, "sts/modality_gap": 0.4},
    },
    "result": {"model": "tuned/1", "promotion": None},
    "created_at": 1_796_300_000.0,
    "finished_at": 1_796_300_300.0,
}
FAILED = {
    "id": "job_0000000000000002",
    "object": "job",
    "state": "failed",
    "config": {"base_model": "minilm", "output": {"name": "broken"}},
    "progress": {},
    "metrics": {"before": {}, "after": {}},
    "error": TRACEBACK,
    "created_at": 1_796_300_600.0,
}

# Runs before the page's own script: `fetch` answers from the records above, EventSource stays silent.
STUB = (
    "const JOBS = "
    + json.dumps([SUCCEEDED, FAILED])
    + """;
window.fetch = async (url) => {
  const path = new URL(url, location.href).pathname;
  const one = JOBS.find((job) => path === "/v1/jobs/" + job.id);
  const body = path === "/v1/jobs" ? {object: "list", data: JOBS} : one;
  return new Response(JSON.stringify(body ?? {error: {message: "no", type: "x", code: "x", param: null}}),
                      {status: body ? 200 : 404, headers: {"Content-Type": "application/json"}});
};
window.EventSource = class { constructor() {} close() {} addEventListener() {} };
"""
)


def test_jobs_page_on_a_phone(server, browser):  # noqa: F811  (the imported fixture)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, WAIT_SECONDS)
    script = browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": STUB})
    narrow(browser)
    try:
        browser.get(f"{server.url}/jobs#{SUCCEEDED['id']}")
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#metrics-body tr td.num"))
        rows = browser.execute_script(
            "return [...document.querySelectorAll('#metrics-body tr')].map((r) => "
            "[r.cells[0].textContent, r.cells[3].className])"
        )
        colours = {name: cls for name, cls in rows}
        # Every change above is an improvement: higher Spearman, lower alignment and uniformity.
        assert colours["sts/spearman"] == "num up"
        assert colours["sts/alignment"] == "num up" and colours["sts/uniformity"] == "num up", colours
        assert colours["sts/modality_gap"] == "num"  # descriptive: neither good nor bad
        facts = dict(
            browser.execute_script(
                "return [...document.querySelectorAll('#d-facts div')].map((f) => "
                "[f.querySelector('dt').textContent, f.querySelector('dd').textContent])"
            )
        )
        assert facts["Stage"] == "done" and facts["Learning rate"] == "2.00e-5", facts
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "jobs-400px-succeeded.png"))
        inner, scroll, wide = browser.execute_script(OVERFLOW_JS)
        assert inner == 400 and scroll <= inner and not wide, f"page {scroll} px wide in {inner} px: {wide}"

        browser.find_element(By.CSS_SELECTOR, f"tr[data-id='{FAILED['id']}']").click()
        wait.until(lambda d: d.find_element(By.ID, "d-error").is_displayed())
        summary = browser.find_element(By.CSS_SELECTOR, "#d-error .error-summary").text
        assert summary == "ValueError: column 'anchor' is missing from train.csv"
        details = browser.find_element(By.CSS_SELECTOR, "#d-error details")
        assert details.get_attribute("open") is None  # the traceback is there, folded
        assert "Traceback" in browser.execute_script("return arguments[0].textContent", details)
        listed = browser.find_element(By.CSS_SELECTOR, f"tr[data-id='{FAILED['id']}'] td.result").text
        assert listed == summary
        browser.save_screenshot(str(ARTIFACTS / "jobs-400px-failed.png"))
        inner, scroll, wide = browser.execute_script(OVERFLOW_JS)
        assert scroll <= inner and not wide, f"page {scroll} px wide in {inner} px: {wide}"
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
        browser.execute_cdp_cmd("Page.removeScriptToEvaluateOnNewDocument", {"identifier": script["identifier"]})
