"""The collection contract suite's two backends: every test that takes `backend` (or a fixture built on
it: `backend_server`, `backend_http`) runs once per backend, with the backend in its id (`[faiss]`,
`[milvus]`), so `pytest -k milvus` / `-k faiss` selects one half and `-m "not milvus"` skips Milvus.

- `faiss`: the session's shared `server` (tests/conftest.py): SQLite + FAISS under a data dir.
- `milvus`: a server with `collections_backend="milvus"` on the session's `milvus_uri` (CI's
  milvus-lite server, or a private one), under a Milvus name prefix unique to this session, so runs
  sharing one Milvus never meet. Started on first use and kept for the session.

Tests of the faiss backend's own mechanics (files on disk, snapshots, SQLite, the data-dir lock, GPU)
do not take `backend`; they carry `@pytest.mark.faiss_only(reason)` instead.

Loaded for every test module through `pytest_plugins` in tests/conftest.py.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import RunningServer, make_settings

BACKENDS = [pytest.param("faiss", id="faiss"), pytest.param("milvus", id="milvus", marks=pytest.mark.milvus)]

# One prefix per test session: every Milvus collection this run makes is named {SESSION_PREFIX}..._{name}_g{n}.
SESSION_PREFIX = "t" + uuid.uuid4().hex[:10]
_prefixes = itertools.count()


def milvus_prefix() -> str:
    """A Milvus name prefix no other server of this session (or any other session) uses."""
    return f"{SESSION_PREFIX}x{next(_prefixes)}"  # letters and digits only (index.milvus.names.PREFIX)


def backend_settings(backend: str, data_dir: Path, request: pytest.FixtureRequest, **overrides: Any):
    """`make_settings` for a server on `backend`; on milvus the session's Milvus and a fresh prefix (pass
    `milvus_prefix=` to share one between servers). `milvus_uri` is only started when a milvus test runs."""
    if backend == "milvus":
        if "milvus_prefix" not in overrides:
            overrides["milvus_prefix"] = milvus_prefix()
        if "milvus_uri" not in overrides:
            overrides["milvus_uri"] = request.getfixturevalue("milvus_uri")
        overrides = {"collections_backend": "milvus", **overrides}
    return make_settings(data_dir, **overrides)


@contextlib.contextmanager
def serving(backend: str, settings) -> Iterator[RunningServer]:
    """A `RunningServer` on `settings`, checked to serve collections from `backend` (a setting that is not
    wired must not pass the milvus half on faiss)."""
    with RunningServer(settings) as running:
        kind = running.state.collections.kind
        assert kind == backend, f"asked for the {backend} backend, the server runs {kind}"
        yield running


def reembed_leftovers(running: RunningServer, name: str) -> list[str]:
    """Generations of collection `name` above its live one: what a re-embed that never became live (failed,
    or finished but not flipped) left behind. On faiss `gen-N` folders (and an old-style `.reembed-{name}`
    folder); on milvus the Milvus collections `{prefix}_{name}_g{n}`. (A generation a re-embed replaced is
    below the live one and dropped after a grace, for requests still on it.)"""
    settings = running.state.settings
    if settings.collections_backend == "faiss":
        folder = settings.collections_dir / name
        live = json.loads((folder / "collection.json").read_text())["generation"]
        above = [p.name for p in folder.glob("gen-*") if int(p.name.removeprefix("gen-")) > live]
        return sorted(above) + [p.name for p in settings.collections_dir.glob(f".reembed-{name}")]
    from index.milvus import names

    with _milvus(running) as client:
        live_physical = client.describe_alias(names.alias(settings.milvus_prefix, name))["collection_name"]
    live = names.generation_of(settings.milvus_prefix, name, live_physical)
    assert live is not None, live_physical
    return [g for g in milvus_generations(running, name) if names.generation_of(settings.milvus_prefix, name, g) > live]


@contextlib.contextmanager
def _milvus(running: RunningServer) -> Iterator[Any]:
    from pymilvus import MilvusClient

    client = MilvusClient(uri=running.state.settings.milvus_uri, timeout=30)
    try:
        yield client
    finally:
        client.close()


def milvus_generations(running: RunningServer, name: str) -> list[str]:
    """The Milvus collections holding generations of collection `name` (`{prefix}_{name}_g{n}`, name encoded)."""
    from index.milvus import names

    prefix = running.state.settings.milvus_prefix
    with _milvus(running) as client:
        return sorted(c for c in client.list_collections() if names.generation_of(prefix, name, c) is not None)


class BackendServers:
    """One server per backend for the whole session, started on first use (so a faiss-only run never
    starts Milvus) and kept until the session ends, however pytest orders the tests."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
        self.request = request
        self.tmp_path_factory = tmp_path_factory
        self.servers: dict[str, RunningServer] = {}
        self.owned = contextlib.ExitStack()

    def get(self, backend: str) -> RunningServer:
        if backend not in self.servers:
            if backend == "faiss":
                self.servers[backend] = self.request.getfixturevalue("server")
            else:
                # Its own data dir (registering the default models at start): the faiss server holds the
                # bootstrapped one, and one data dir per server is the simple rule.
                data_dir = self.tmp_path_factory.mktemp(f"contract-{backend}")
                settings = backend_settings(backend, data_dir, self.request)
                self.servers[backend] = self.owned.enter_context(serving(backend, settings))
        return self.servers[backend]

    def close(self) -> None:
        self.owned.close()


@pytest.fixture(scope="session")
def backend_servers(request, tmp_path_factory) -> Iterator[BackendServers]:
    servers = BackendServers(request, tmp_path_factory)
    try:
        yield servers
    finally:
        servers.close()


@pytest.fixture(scope="module", params=BACKENDS)
def backend(request) -> str:
    """The collections backend under test: "faiss" or "milvus" (module-scoped, so a module's module-scoped
    fixtures can be built per backend; pytest runs a module's [faiss] tests, then its [milvus] ones)."""
    return request.param


@pytest.fixture()
def backend_server(backend, backend_servers) -> RunningServer:
    return backend_servers.get(backend)


@pytest.fixture()
def backend_http(backend_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=backend_server.url, timeout=60) as client:
        yield client
