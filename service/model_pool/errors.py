"""What the model pool refuses, as errors of its own; `service.errors` maps them to HTTP.

The pool is a service component, not a route: it says what went wrong (a model that can never
fit, or no room for it right now) and leaves the status, code and headers to the one mapping
table, so the hot-swap watcher can tell the two apart without reading HTTP statuses.
"""

from __future__ import annotations

from registry.errors import InvalidNameError


class ModelPoolError(Exception):
    """A model version could not be made ready to serve."""


class ModelMemoryBudgetError(ModelPoolError):
    """The version alone needs more than the whole memory budget: no eviction can make room."""


class ModelMemoryBusyError(ModelPoolError):
    """No room now: the loaded versions that would have to go are busy. Worth retrying shortly."""

    retry_after = 5  # seconds, for the answer's Retry-After


class VariantUnavailableError(ModelPoolError, InvalidNameError):
    """A reference names a variant this server will not serve: the fidelity gate refused it (the
    message carries the measured numbers), or its runtime is not installed here. The client's to
    fix (ask for the version itself, or another variant), so it answers as a bad model reference
    (400 `invalid_model_reference`) through the registry's row in `service.errors`."""
