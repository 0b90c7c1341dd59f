"""The search playground page, served and checked as a file (no browser; see test_playground_browser.py).

Like the jobs page's checks: the app holds only the pages router, so these run in milliseconds and
catch the page losing its wiring to the collections API, reaching off-host, or inserting markup.
"""

from __future__ import annotations

import re

import pytest

from tests.integration.test_jobs_page import Outline


@pytest.fixture(scope="module")
def page(pages_client) -> str:
    response = pages_client.get("/playground")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "img-src data:" in response.headers["content-security-policy"]
    return response.text


@pytest.fixture(scope="module")
def outline(page) -> Outline:
    parser = Outline()
    parser.feed(page)
    parser.close()
    return parser


def test_page_is_not_in_the_openapi_schema(pages_client):
    assert "/playground" not in pages_client.app.openapi()["paths"]


def test_page_uses_the_collections_api_and_the_key(page):
    for needle in ('"/v1/collections"', "/search", "/items/", "Authorization", "Bearer", "sessionStorage"):
        assert needle in page, needle


def test_page_reaches_no_other_host_and_inserts_no_markup(page):
    assert re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page, flags=re.IGNORECASE) == []
    loads = re.search(r"\b(?:src|href)\s*=\s*[\"'](?!data:|#|/jobs[\"']|/static/api\.js[\"'])", page)
    assert not loads, "the page loads only the shared API client (and links to /jobs)"
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page, sink


def test_page_is_well_formed_and_its_elements_exist(outline):
    assert outline.problems == [] and outline.stack == []
    script = "".join(outline.scripts)
    wanted = set(re.findall(r"\$\(\"([\w-]+)\"\)", script))
    assert wanted and sorted(wanted - set(outline.ids)) == []


def test_page_shows_compatible_query_models_and_the_answering_pair(page):
    """The collection info lists GET /v1/collections/{name}'s compatible versions; results name the pair."""
    assert "compatible_models" in page and "collectionUrl(name)" in page
    assert "body.models.query" in page and "body.models.gallery" in page
