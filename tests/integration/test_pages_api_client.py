"""The API client both pages share (`GET /static/api.js`): served as JavaScript that the pages' content
policy lets run, loaded by each page, and the only copy of the fetch wrapper, banner and DOM helper.

Like the other page checks, the app holds only the pages router. These catch a page going back to
its own copy of the client, the client being served so the browser refuses it (type, policy), or the
client looking up an element a page no longer has; the browser tests run it for real.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.test_jobs_page import Outline

PAGES = ("/jobs", "/playground")
SCRIPT_TAG = '<script src="/static/api.js"></script>'


@pytest.fixture(scope="module")
def script(pages_client) -> str:
    response = pages_client.get("/static/api.js")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["x-content-type-options"] == "nosniff"
    return response.text


def test_the_client_is_not_in_the_openapi_schema(pages_client):
    assert "/static/api.js" not in pages_client.app.openapi()["paths"]


@pytest.mark.parametrize("path", PAGES)
def test_each_page_loads_the_client_before_its_own_script_and_may_run_it(pages_client, path):
    response = pages_client.get(path)
    page = response.text
    assert page.count(SCRIPT_TAG) == 1
    assert page.index(SCRIPT_TAG) < page.index("<script>\n"), "the page's own script uses Duet: load it first"
    policy = dict(part.split(" ", 1) for part in response.headers["content-security-policy"].split("; "))
    assert "'self'" in policy["script-src"].split(), policy["script-src"]


@pytest.mark.parametrize("path", PAGES)
def test_no_page_keeps_its_own_copy_of_the_client(pages_client, path):
    page = pages_client.get(path).text
    for copy in ("function el(", "class ApiError", "fetch(", "function showError(", 'getElementById("banner'):
        assert copy not in page, f"{path} defines {copy!r} again; it belongs in service/static/api.js"


def test_the_client_reaches_no_other_host_and_inserts_no_markup(script):
    assert re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", script, flags=re.IGNORECASE) == []
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
    assert "window.Duet = " in script
    for name in ("el", "ApiError", "client", "errorMessage", "banner"):
        assert re.search(rf"return \{{[^}}]*\b{name}\b", script), f"Duet.{name} is not exported"


@pytest.mark.parametrize("path", PAGES)
def test_every_element_the_client_looks_up_exists_on_each_page(pages_client, script, path):
    outline = Outline()
    outline.feed(pages_client.get(path).text)
    outline.close()
    wanted = set(re.findall(r'getElementById\("([\w-]+)"\)', script))
    assert wanted == {"banner", "banner-text", "banner-close"}
    assert sorted(wanted - set(outline.ids)) == []
