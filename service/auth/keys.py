"""API keys with scopes: how they are configured, and how a presented key is verified.

Keys come from `DUET_API_KEYS_FILE` (YAML or JSON list) and/or `DUET_API_KEYS` (JSON), each
`{name, key_sha256 (or hash), salt?, scopes, rate_limit_per_second?, rate_limit_burst?,
concurrency_limit?}`. Only hashes are configured (`duet keys create` prints a key once, with
its entry); a presented key is hashed and compared in constant time, and is never logged or
kept. Kept apart from the middleware so the key rules can be read (and tested) without ASGI.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from service.limits import Limits
from service.settings import Settings

SCOPES = ("embed", "search", "write", "train", "admin")
ANY_KEY = "any"  # a route any valid key may call, whatever its scopes
MAX_KEY_CHARS = 512


class KeyConfig(BaseModel):
    """One configured key: its hash, never the key."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1, max_length=100)
    key_sha256: str = Field(
        validation_alias=AliasChoices("key_sha256", "hash"),
        description="hex sha256 of salt + key (of the key alone without a salt)",
    )
    salt: str = ""
    scopes: list[str]
    rate_limit_per_second: float | None = Field(default=None, ge=0)
    rate_limit_burst: int | None = Field(default=None, ge=0)
    concurrency_limit: int | None = Field(default=None, ge=0)

    @field_validator("key_sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.removeprefix("sha256:").strip().lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("must be a hex sha256 digest (64 hex characters; `duet keys create` prints one)")
        return value

    @field_validator("scopes", mode="before")
    @classmethod
    def _known_scopes(cls, value: Any) -> list[str]:
        scopes = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
        scopes = [s for s in scopes if s]
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown:
            raise ValueError(f"unknown scopes {unknown}; scopes are {', '.join(SCOPES)}")
        return scopes


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes
    salt: bytes
    scopes: frozenset[str]
    limits: Limits

    def allows(self, scope: str) -> bool:
        return scope == ANY_KEY or "admin" in self.scopes or scope in self.scopes


def hash_key(key: str, salt: str = "") -> str:
    return hashlib.sha256(salt.encode() + key.encode()).hexdigest()


class KeyRing:
    """The configured keys. `verify` hashes a presented key once per distinct salt and
    compares against every digest with `hmac.compare_digest`; hits are cached by the
    presented key's unsalted hash, so a busy key costs one sha256 per request."""

    def __init__(self, keys: list[ApiKey]) -> None:
        names = [k.name for k in keys]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"API key names must be unique; repeated: {duplicates}")
        self.keys = keys
        self._salts = sorted({k.salt for k in keys})
        self._cache: dict[bytes, ApiKey] = {}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def verify(self, presented: str) -> ApiKey | None:
        if not presented or len(presented) > MAX_KEY_CHARS:
            return None
        raw = presented.encode()
        cache_key = hashlib.sha256(raw).digest()
        cached = self._cache.get(cache_key)
        if cached is not None:
            return cached
        digests = {salt: hashlib.sha256(salt + raw).digest() for salt in self._salts}
        found = None
        for key in self.keys:
            if hmac.compare_digest(digests[key.salt], key.digest):
                found = key
        if found is not None:
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[cache_key] = found
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Keys from the file and the environment together; any problem stops start-up with
        a message naming the entry (a service that silently runs without auth is worse)."""
        entries: list[tuple[str, Any]] = []
        if settings.api_keys_file is not None:
            entries += [(f"{settings.api_keys_file}[{i}]", e) for i, e in enumerate(_read_keys_file(settings))]
        entries += [(f"DUET_API_KEYS[{i}]", e) for i, e in enumerate(settings.api_keys or [])]
        keys = []
        for where, entry in entries:
            try:
                config = KeyConfig.model_validate(entry)
            except ValidationError as exc:
                problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors())
                raise ValueError(f"invalid API key entry {where}: {problems}") from None
            keys.append(_api_key(config, settings))
        return cls(keys)


def _read_keys_file(settings: Settings) -> list[Any]:
    path = Path(settings.api_keys_file or "")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"DUET_API_KEYS_FILE {path}: {exc}") from None
    loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    if isinstance(loaded, dict) and "keys" in loaded:
        loaded = loaded["keys"]
    if not isinstance(loaded, list):
        raise ValueError(f"DUET_API_KEYS_FILE {path}: expected a list of keys (or a mapping with 'keys')")
    return loaded


def default_limits(settings: Settings) -> Limits:
    return Limits(settings.rate_limit_per_second, settings.rate_limit_burst, settings.concurrency_limit)


def _api_key(config: KeyConfig, settings: Settings) -> ApiKey:
    defaults = default_limits(settings)
    limits = Limits(
        per_second=_pick(config.rate_limit_per_second, defaults.per_second),
        burst=_pick(config.rate_limit_burst, defaults.burst),
        concurrency=_pick(config.concurrency_limit, defaults.concurrency),
    )
    return ApiKey(
        name=config.name,
        digest=bytes.fromhex(config.key_sha256),
        salt=config.salt.encode(),
        scopes=frozenset(config.scopes),
        limits=limits,
    )


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value
