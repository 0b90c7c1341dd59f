"""What the model pool refuses, as errors of its own; `service.errors` maps them to HTTP.

The pool is a service component, not a route: it says what went wrong (a model that can never
fit, or no room for it right now) and leaves the status, code and headers to the one mapping
table, so the hot-swap watcher can tell the two apart without reading HTTP statuses.
"""

from __future__ import annotations


class ModelPoolError(Exception):
    """A model version could not be made ready to serve."""


class ModelMemoryBudgetError(ModelPoolError):
    """The version alone needs more than the whole memory budget: no eviction can make room."""


class ModelMemoryBusyError(ModelPoolError):
    """No room now: the loaded versions that would have to go are busy. Worth retrying shortly."""

    retry_after = 5  # seconds, for the answer's Retry-After
