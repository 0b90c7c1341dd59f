"""Errors of the collections package; mapped to HTTP statuses in `service/errors.py`."""

from __future__ import annotations


class CollectionError(Exception):
    """Base class of the collections package's errors."""


class InvalidCollectionError(CollectionError, ValueError):
    """A malformed collection name, option, or item."""


class CollectionNotFoundError(CollectionError, LookupError):
    pass


class CollectionExistsError(CollectionError):
    pass


class ItemNotFoundError(CollectionError, LookupError):
    pass


class InvalidVectorError(CollectionError, ValueError):
    """Wrong dimension, NaN/inf, zero norm, or not a list of numbers."""


class FilterError(CollectionError, ValueError):
    """A filter on an unknown field, with a wrong-typed value, or malformed."""


class PayloadError(CollectionError, ValueError):
    """A payload that is not a JSON object or whose field types clash with the collection's."""


class CollectionUnavailableError(CollectionError):
    """A collection on disk that cannot be opened (damaged or unreadable files); it is listed with the
    reason and can be dropped (HTTP 503)."""


class CollectionBusyError(CollectionError):
    """A write, drop or second re-embed while the collection is being re-embedded, a drop that in-flight
    requests outlasted, or a create while a drop of the same name finishes (HTTP 409)."""


class ReembedRefusedError(CollectionError):
    """A collection that cannot be re-embedded as asked: items without stored content, a model that
    does not embed some of its items' modalities, or the version it already holds (HTTP 409)."""


class BackendUnavailableError(CollectionError):
    """The collection store cannot be reached right now (a Milvus server down or timing out): nothing was
    written by the call that got it, and retrying later may succeed (HTTP 503 with Retry-After)."""

    retry_after = 5
