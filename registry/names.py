"""Parsing and validating model names, versions, aliases and references.

Names end up in file paths and database keys, so the grammar is deliberately narrow:
letters, digits, '.', '_' and '-', starting with a letter or digit, and never '..'.
A reference is `name` (its `production` alias), `name@alias` or `name/version`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.errors import InvalidNameError

DEFAULT_ALIAS = "production"
LATEST = "latest"

# Unanchored, so the OpenAPI document (service/openapi.py) states the same rules.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
ALIAS_PATTERN = r"[A-Za-z][A-Za-z0-9_-]{0,63}"
VERSION_PATTERN = r"[1-9][0-9]{0,8}"
_NAME = re.compile(rf"^{NAME_PATTERN}$")
_ALIAS = re.compile(rf"^{ALIAS_PATTERN}$")
_VERSION = re.compile(rf"^{VERSION_PATTERN}$")
# MLflow reserves these alias spellings (they would shadow versions and `latest`).
_RESERVED_ALIAS = re.compile(r"^(latest|v[0-9]+|version[0-9]+)$", re.IGNORECASE)


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidNameError(
            f"invalid model name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def validate_alias(alias: str) -> str:
    if not isinstance(alias, str) or not _ALIAS.match(alias):
        raise InvalidNameError(f"invalid alias {alias!r}: use 1-64 letters, digits, '_' or '-', starting with a letter")
    if _RESERVED_ALIAS.match(alias):
        raise InvalidNameError(f"alias {alias!r} is reserved (it reads as a version); pick another name")
    return alias


def validate_version(version: str | int) -> int:
    text = str(version)
    if not _VERSION.match(text):
        raise InvalidNameError(f"invalid version {text!r}: versions are positive integers like 1, 2, 3")
    return int(text)


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: exactly one of `version` or `alias` is set."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return f"{self.name}/{self.version}" if self.version is not None else f"{self.name}@{self.alias}"


def parse_model_ref(ref: str, default_alias: str = DEFAULT_ALIAS) -> ModelRef:
    """`minilm` -> production alias, `minilm@staging`, `minilm@latest`, `minilm/3`."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidNameError("model reference is empty: use 'name', 'name@alias' or 'name/version'")
    ref = ref.strip()
    if "@" in ref:
        name, _, alias = ref.partition("@")
        validate_name(name)
        if alias != LATEST:
            validate_alias(alias)
        return ModelRef(name=name, alias=alias)
    if "/" in ref:
        name, _, version = ref.partition("/")
        return ModelRef(name=validate_name(name), version=validate_version(version))
    return ModelRef(name=validate_name(ref), alias=default_alias)
