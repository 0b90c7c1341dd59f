"""The jobs page: served as HTML by the service, self-contained, wired to the jobs API.

The app here holds only the pages router: the page is a static file and needs no models, registry
or jobs backend to be served, so the test stays fast and independent of the jobs API's state.
The browser side (EventSource, canvas) is not run here; these checks catch the page losing a
piece of its wiring, reaching off-host, or being cut into markup a browser would mangle.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest

VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


@pytest.fixture(scope="module")
def page(pages_client) -> str:
    response = pages_client.get("/jobs")
    assert response.status_code == 200
    return response.text


class Outline(HTMLParser):
    """Collects tags, ids and the script text, and records every nesting mistake it sees."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.problems: list[str] = []
        self.tags: dict[str, int] = {}
        self.ids: dict[str, str] = {}
        self.scripts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            if name == "id" and value:
                if value in self.ids:
                    self.problems.append(f"duplicate id {value!r}")
                self.ids[value] = tag
        if tag not in VOID_ELEMENTS:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in VOID_ELEMENTS:
            self.stack.pop()

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.problems.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            if tag in self.stack:
                del self.stack[self.stack.index(tag) :]
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        if self.stack and self.stack[-1] == "script":
            self.scripts.append(data)


@pytest.fixture(scope="module")
def outline(page) -> Outline:
    parser = Outline()
    parser.feed(page)
    parser.close()
    return parser


def test_page_is_served_as_html(pages_client):
    response = pages_client.get("/jobs")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert "connect-src 'self'" in response.headers["content-security-policy"]


def test_page_is_not_in_the_openapi_schema(pages_client):
    assert "/jobs" not in pages_client.app.openapi()["paths"]


def test_page_uses_the_jobs_api(page):
    for needle in ("/v1/jobs", "EventSource", "/events", "/cancel", "/resume"):
        assert needle in page, needle
    for event in ("state", "stage", "progress", "evaluation", "log", "end"):
        assert f'"{event}"' in page, event


def test_page_reaches_no_other_host(page):
    assert re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page, flags=re.IGNORECASE) == []
    # Links to the service's other pages are navigation, not loads; the shared API client is the one load.
    loads = re.search(r"\b(?:src|href)\s*=\s*[\"'](?!data:|#|/playground[\"']|/static/api\.js[\"'])", page)
    assert not loads, "the page loads no other file than the shared API client"


def test_page_never_inserts_markup(page):
    """Job names, logs and errors reach the page from users; they go in as text only."""
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in page, sink


def test_page_is_well_formed(outline):
    assert outline.problems == []
    assert outline.stack == [], f"unclosed: {outline.stack}"
    assert outline.tags.get("html") == 1 and outline.tags.get("script") == 2  # the shared client, the page's own


def test_page_has_its_table_charts_and_buttons(outline):
    ids = outline.ids
    assert ids["jobs-table"] == "table" and ids["jobs-body"] == "tbody"
    assert ids["loss-chart"] == "canvas" and ids["metrics-chart"] == "canvas"
    assert ids["btn-cancel"] == "button" and ids["btn-resume"] == "button"
    assert ids["banner"] == "div"


def test_every_element_the_script_looks_up_exists(outline):
    script = "".join(outline.scripts)
    wanted = set(re.findall(r"\$\(\"([\w-]+)\"\)", script))
    assert wanted, "the script looks its elements up with $(id)"
    assert sorted(wanted - set(outline.ids)) == []
