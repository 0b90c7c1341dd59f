"""The web pages served by the service itself: jobs (`GET /jobs`) and the search playground
(`GET /playground`).

Each page is one static, self-contained HTML file (`service/static/*.html`: markup, CSS and vanilla
JS, no build step, no CDN). Each is a client of the public API only (the jobs page: `/v1/jobs`, the
job's event stream, cancel and resume; the playground: `/v1/collections`, search and items), so the
server has nothing to render and a page can show nothing that curl could not; keeping them out of the
OpenAPI schema keeps the schema to the API.
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["pages"], include_in_schema=False)

# The page loads nothing from other hosts; the policy makes the browser hold it to that, so even a
# job field that slipped past the page's escaping could neither load a script nor send data away.
# Inline script and style are the page itself (one file, no build step to hash or nonce them).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'unsafe-inline'",
        "style-src 'unsafe-inline'",
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ]
)


@lru_cache(maxsize=1)
def jobs_page() -> bytes:
    """The page's bytes, read once from the installed package (works from a wheel or a checkout)."""
    return (files("service") / "static" / "jobs.html").read_bytes()


@lru_cache(maxsize=1)
def playground_page() -> bytes:
    """The search playground's bytes, read once like the jobs page's."""
    return (files("service") / "static" / "playground.html").read_bytes()


@router.get("/jobs", response_class=HTMLResponse)
def jobs() -> HTMLResponse:
    """The jobs page. A sync route, so the first (uncached) file read happens off the event loop."""
    return _page(jobs_page())


@router.get("/playground", response_class=HTMLResponse)
def playground() -> HTMLResponse:
    """The search playground (pick a collection, search by text or image). Sync for the same reason."""
    return _page(playground_page())


def _page(body: bytes) -> HTMLResponse:
    """A page with the headers every page gets: its content policy, no sniffing, revalidation."""
    return HTMLResponse(
        body,
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            # Revalidate every time, so an upgraded service serves its new page at once.
            "Cache-Control": "no-cache",
        },
    )
