"""The jobs web page (`GET /jobs`), served by the service itself.

The page is one static, self-contained HTML file (`service/static/jobs.html`: markup, CSS and
vanilla JS, no build step, no CDN). It is a client of the public jobs API only (`/v1/jobs`, the
job's event stream, cancel and resume), so the server has nothing to render and the page can show
nothing that curl could not; keeping it out of the OpenAPI schema keeps the schema to the API.
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


@router.get("/jobs", response_class=HTMLResponse)
def jobs() -> HTMLResponse:
    """The jobs page. A sync route, so the first (uncached) file read happens off the event loop."""
    return HTMLResponse(
        jobs_page(),
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "X-Content-Type-Options": "nosniff",
            # Revalidate every time, so an upgraded service serves its new page at once.
            "Cache-Control": "no-cache",
        },
    )
