"""The web pages served by the service itself: jobs (`GET /jobs`) and the search playground
(`GET /playground`).

Each page is one static HTML file (`service/static/*.html`: markup, CSS and vanilla JS, no build step,
no CDN) plus the API client both share (`GET /static/api.js`: the fetch wrapper, the error banner, the
DOM helper), so a fix to how a page calls the API or shows its errors reaches both. Each is a client of
the public API only (the jobs page: `/v1/jobs`, the
job's event stream, cancel and resume; the playground: `/v1/collections`, search and items), so the
server has nothing to render and a page can show nothing that curl could not; keeping them out of the
OpenAPI schema keeps the schema to the API.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(tags=["pages"], include_in_schema=False)

# The page loads nothing from other hosts; the policy makes the browser hold it to that, so even a
# job field that slipped past the page's escaping could neither load a script nor send data away.
# Inline script and style are the page itself (one file, no build step to hash or nonce them); 'self'
# is the shared API client, served below.
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self' 'unsafe-inline'",
        "style-src 'unsafe-inline'",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)


@lru_cache(maxsize=4)
def static_file(name: str) -> bytes:
    """A file's bytes, read once from the installed package (works from a wheel or a checkout)."""
    return (files("service") / "static" / name).read_bytes()


@router.get("/jobs", response_class=HTMLResponse)
def jobs() -> HTMLResponse:
    """The jobs page. A sync route, so the first (uncached) file read happens off the event loop."""
    return _page(static_file("jobs.html"))


@router.get("/playground", response_class=HTMLResponse)
def playground() -> HTMLResponse:
    """The search playground (pick a collection, search by text or image). Sync for the same reason."""
    return _page(static_file("playground.html"))


@router.get("/static/api.js")
def api_client() -> Response:
    """The API client both pages load (a fixed name, not a folder: nothing else there is served)."""
    return Response(static_file("api.js"), media_type="text/javascript", headers=_HEADERS)


_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    # Revalidate every time, so an upgraded service serves its new page (and client) at once.
    "Cache-Control": "no-cache",
}


def _page(body: bytes) -> HTMLResponse:
    """A page with the headers every page gets: its content policy, no sniffing, revalidation."""
    return HTMLResponse(body, headers={"Content-Security-Policy": CONTENT_SECURITY_POLICY, **_HEADERS})
