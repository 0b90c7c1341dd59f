"""Errors of the collections package; mapped to HTTP statuses in `service/errors.py`."""

from __future__ import annotations


class IndexError_(Exception):
    """Base class (named with a trailing underscore so it never shadows the builtin)."""


class InvalidCollectionError(IndexError_, ValueError):
    """A malformed collection name, option, or item."""


class CollectionNotFoundError(IndexError_, LookupError):
    pass


class CollectionExistsError(IndexError_):
    pass


class ItemNotFoundError(IndexError_, LookupError):
    pass


class InvalidVectorError(IndexError_, ValueError):
    """Wrong dimension, NaN/inf, zero norm, or not a list of numbers."""


class FilterError(IndexError_, ValueError):
    """A filter on an unknown field, with a wrong-typed value, or malformed."""


class PayloadError(IndexError_, ValueError):
    """A payload that is not a JSON object or whose field types clash with the collection's."""


class CollectionUnavailableError(IndexError_):
    """A collection on disk that cannot be opened (damaged or unreadable files); it is listed with the
    reason and can be dropped (HTTP 503)."""


class CollectionBusyError(IndexError_):
    """A write, drop or second re-embed while the collection is being re-embedded, a drop that in-flight
    requests outlasted, or a create while a drop of the same name finishes (HTTP 409)."""


class ReembedRefusedError(IndexError_):
    """A collection that cannot be re-embedded as asked: items without stored content, a model that
    does not embed some of its items' modalities, or the version it already holds (HTTP 409)."""
