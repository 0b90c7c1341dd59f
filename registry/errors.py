"""Registry errors; the service maps them to HTTP statuses in `service/errors.py`."""

from __future__ import annotations


class RegistryError(Exception):
    """Base class for registry problems."""


class InvalidNameError(RegistryError, ValueError):
    """A model name, version, alias or reference that is malformed or unsafe (path traversal)."""


class ModelNotFoundError(RegistryError, LookupError):
    """No registered model with that name."""


class VersionNotFoundError(RegistryError, LookupError):
    """The model exists, but not that version or alias."""


class IntegrityError(RegistryError):
    """A version's files no longer hash to what was recorded when it was registered."""


class IncompatibleVersionError(RegistryError):
    """An alias move asked to keep collections searchable (`require_compatible`) names a version whose
    queries cannot search the current holder's vectors."""


class UnusableMapError(RegistryError, ValueError):
    """A compatibility record's new -> old map file cannot be used: missing, unreadable, outside the version's
    artifact folder, not a 2-D matrix, or not finite."""


class ManifestError(RegistryError, ValueError):
    """A registered version's manifest cannot be read (not JSON, or not a manifest): the version cannot be
    used until it is registered again."""
