"""Who may call what, checked before a request's body is read.

Three parts, each with one job:
- `keys`: the configured API keys (hashes only) and how a presented key is verified;
- `route_policy`: which scope every route needs (`ROUTE_SCOPES`, one table to review);
- `middleware`: the ASGI middleware that applies both, then the client's rate and
  concurrency limits (`service.limits`).

No keys configured: auth is off (the embedded default works with no setup), and the limits
apply per client address.
"""
