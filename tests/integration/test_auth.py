"""API keys, scopes and limits against real servers (and a real Redis for the shared limiter).

Every route of the app is enumerated: each one not documented as public answers 401 without a
key (even with a body FastAPI would refuse: auth runs before the body is read), 403 with a
valid key that lacks its scope, and passes with the right one.
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.auth.keys import ANY_KEY, hash_key
from service.auth.route_policy import PUBLIC, ROUTE_SCOPES, app_routes, rule_for, unmapped_routes
from service.limits import Limits, RedisLimiter
from tests.helpers import RunningServer, make_settings
from tests.redis_server import RedisServer

SECRET = {scope: f"key-{scope}-secret" for scope in ("embed", "search", "write", "train", "admin")}
SECRET.update(none="key-none-secret", fast="key-fast-secret", narrow="key-narrow-secret")
# A key that lacks each scope: the 403 case.
WRONG = {"embed": "search", "search": "embed", "write": "search", "train": "embed", "admin": "write"}


def key_entries() -> list[dict]:
    entries = [
        {
            "name": scope,
            "key_sha256": hash_key(SECRET[scope], f"salt-{scope}"),
            "salt": f"salt-{scope}",
            "scopes": [scope],
        }
        for scope in ("embed", "search", "write", "train", "admin")
    ]
    entries += [
        {"name": "none", "hash": hash_key(SECRET["none"]), "scopes": []},
        {"name": "fast", "hash": hash_key(SECRET["fast"]), "scopes": "embed,search", "rate_limit_per_second": 0.5},
        {"name": "narrow", "hash": hash_key(SECRET["narrow"]), "scopes": ["train"], "concurrency_limit": 1},
    ]
    return entries


def auth_settings(data_dir: Path, **overrides):
    values = dict(
        preload_models=[],
        register_default_models=False,
        local_worker=False,
        api_keys=key_entries(),
        rate_limit_burst=2,
    )
    values.update(overrides)
    return make_settings(data_dir, **values)


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {SECRET[name]}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[RunningServer]:
    with RunningServer(auth_settings(tmp_path_factory.mktemp("auth-data"))) as running:
        yield running


@pytest.fixture()
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "x", path)


def protected_routes(app) -> list[tuple[str, str, str]]:
    """(method, template, scope) of every route that needs a key."""
    found = []
    for route in app_routes(app.routes):
        for method in sorted(route.methods - {"HEAD"}):
            rule = rule_for(route, method, app_settings(app))
            if rule.scope != PUBLIC:
                found.append((method, route.path, rule.scope))
    return found


def app_settings(app):
    return app.state.duet.settings


def test_every_route_has_a_scope_and_only_documented_routes_are_public(server):
    routes = app_routes(server.app.routes)
    assert unmapped_routes(routes) == []
    public = {r.path for r in routes if rule_for(r, sorted(r.methods)[0], app_settings(server.app)).scope == PUBLIC}
    assert public == {"/health", "/ready", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"} | {
        r.path for r in routes if "pages" in r.tags
    }
    assert {"/jobs"} <= public
    assert len(protected_routes(server.app)) == len(ROUTE_SCOPES) + 1  # + /metrics (any key)


def test_the_scope_policy(server):
    """The table says what the docs say: jobs and datasets train, reads search, writes write."""
    for (method, path), scope in ROUTE_SCOPES.items():
        if path.startswith(("/v1/jobs", "/v1/datasets")):
            assert scope == "train", (method, path)
        elif path == "/v1/embeddings":
            assert scope == "embed"
        elif path.startswith("/v1/models"):
            assert scope == (ANY_KEY if method == "GET" else "write"), (method, path)
        elif path.startswith("/v1/collections"):
            read = method == "GET" or path.endswith("/search")
            assert scope == ("search" if read else "admin" if method == "DELETE" else "write"), (method, path)


def test_every_protected_route_answers_401_then_403_then_passes(server, http):
    junk = {"content": b"{not json", "headers": {"Content-Type": "application/json"}}
    for method, path, scope in protected_routes(server.app):
        url = concrete(path)
        anonymous = http.request(method, url, **junk)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        assert anonymous.json()["error"]["type"] == "authentication_error"
        unknown = http.request(method, url, headers={"Authorization": "Bearer not-a-key"})
        assert unknown.status_code == 401 and unknown.json()["error"]["code"] == "invalid_api_key"
        if scope != ANY_KEY:
            wrong = http.request(method, url, headers={**junk["headers"], **bearer(WRONG[scope])}, content=b"{x")
            assert wrong.status_code == 403, (method, path, wrong.text)
            assert f"'{scope}' scope" in wrong.json()["error"]["message"]
            assert wrong.json()["error"]["code"] == "insufficient_scope"
        allowed = "none" if scope == ANY_KEY else scope
        for name in (allowed, "admin"):
            passed = http.request(method, url, headers={**junk["headers"], **bearer(name)}, content=b"{x")
            assert passed.status_code not in (401, 403, 429), (method, path, name, passed.text)


def test_x_api_key_header_and_public_routes(http):
    assert http.get("/v1/models", headers={"X-API-Key": SECRET["search"]}).status_code == 200
    assert http.get("/health").status_code == 200
    assert http.get("/ready").status_code == 200
    assert http.get("/jobs").status_code == 200
    assert http.get("/metrics").status_code == 401
    metrics = http.get("/metrics", headers=bearer("none"))
    assert metrics.status_code == 200 and "duet_jobs" in metrics.text
    assert http.get("/no-such-path").status_code == 401  # no probing for paths without a key
    assert http.get("/no-such-path", headers=bearer("none")).status_code == 404


def test_public_health_and_metrics_follow_the_settings(tmp_path):
    from service.app import create_app

    settings = auth_settings(tmp_path, auth_public_health=False, auth_public_metrics=True)
    with TestClient(create_app(settings)) as client:
        assert client.get("/health").status_code == 401
        assert client.get("/ready", headers=bearer("none")).status_code == 200
        assert client.get("/metrics").status_code == 200


def test_a_bad_key_entry_stops_start_up(tmp_path):
    from service.app import create_app

    with pytest.raises(ValueError, match=r"DUET_API_KEYS\[0\].*scopes"):
        create_app(make_settings(tmp_path, api_keys=[{"name": "x", "hash": "0" * 64, "scopes": ["fly"]}]))
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text(f"- name: filed\n  key_sha256: {hash_key('filed-key')}\n  scopes: [search]\n")
    settings = make_settings(tmp_path, preload_models=[], register_default_models=False, api_keys_file=keys_file)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/collections").status_code == 401
        assert client.get("/v1/collections", headers={"X-API-Key": "filed-key"}).status_code == 200


def test_auth_off_without_keys(tmp_path):
    from service.app import create_app

    settings = make_settings(tmp_path, preload_models=[], register_default_models=False, local_worker=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/collections").status_code == 200
        assert client.get("/metrics").status_code == 200


def test_without_keys_the_limits_apply_per_client_address(tmp_path):
    from service.app import create_app

    settings = make_settings(
        tmp_path, preload_models=[], register_default_models=False, rate_limit_per_second=0.5, rate_limit_burst=1
    )
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/collections").status_code == 200
        refused = client.get("/v1/collections")
        assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
        assert "this client" in refused.json()["error"]["message"]
        assert client.get("/health").status_code == 200  # probes are never limited


def test_per_key_rate_limit_answers_429_with_retry_after(http):
    statuses = [http.get("/v1/models", headers=bearer("fast")) for _ in range(3)]
    assert [r.status_code for r in statuses[:2]] == [200, 200]  # the burst
    refused = statuses[2]
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limited"
    assert http.get("/v1/models", headers=bearer("search")).status_code == 200  # other keys unaffected


class SlowUpload:
    """A dataset upload whose body arrives slowly: a request held in flight on purpose."""

    def __init__(self, url: str, key: str, seconds: float = 1.5, fail: bool = False) -> None:
        self.url, self.key, self.seconds, self.fail = url, key, seconds, fail
        self.status: int | None = None
        self.started = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _body(self) -> Iterator[bytes]:
        self.started.set()
        for _ in range(int(self.seconds / 0.1)):
            time.sleep(0.1)
            yield b'{"anchor": "a", "positive": "b"}\n'
        if self.fail:
            raise RuntimeError("client gave up")  # the connection drops mid-body

    def _run(self) -> None:
        try:
            response = httpx.post(
                f"{self.url}/v1/datasets",
                params={"filename": "slow.jsonl"},
                content=self._body(),
                headers=bearer(self.key),
                timeout=30,
            )
            self.status = response.status_code
        except (RuntimeError, httpx.HTTPError):
            self.status = -1

    def __enter__(self) -> SlowUpload:
        self.thread.start()
        self.started.wait(10)
        time.sleep(0.3)  # the headers are in: the slot is taken
        return self

    def __exit__(self, *exc) -> None:
        self.thread.join(30)


def wait_until_allowed(http: httpx.Client, url: str, key: str, timeout: float = 10) -> int:
    deadline = time.monotonic() + timeout
    while True:
        status = http.get(url, headers=bearer(key)).status_code
        if status != 429 or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_concurrency_limit_answers_429_and_frees_the_slot_on_every_path(server, http):
    with SlowUpload(server.url, "narrow") as upload:
        refused = http.get("/v1/datasets", headers=bearer("narrow"))
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "too_many_concurrent_requests"
        assert refused.headers["retry-after"] == "1"
    assert upload.status == 201
    assert http.get("/v1/datasets", headers=bearer("narrow")).status_code == 200
    with SlowUpload(server.url, "narrow", fail=True) as dropped:  # a client that disconnects
        assert http.get("/v1/datasets", headers=bearer("narrow")).status_code == 429
    assert dropped.status == -1
    assert wait_until_allowed(http, "/v1/datasets", "narrow") == 200


@pytest.fixture()
def redis_server(tmp_path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def test_redis_limits_are_shared_by_replicas_and_fail_open(tmp_path, redis_server):
    settings = [auth_settings(tmp_path / name, redis_url=redis_server.url, redis_prefix="authtest") for name in "ab"]
    with RunningServer(settings[0]) as a, RunningServer(settings[1]) as b, httpx.Client(timeout=30) as http:
        assert [http.get(f"{a.url}/v1/models", headers=bearer("fast")).status_code for _ in range(2)] == [200, 200]
        shared = http.get(f"{b.url}/v1/models", headers=bearer("fast"))
        assert shared.status_code == 429 and int(shared.headers["retry-after"]) >= 1
        with SlowUpload(a.url, "narrow") as upload:
            assert http.get(f"{b.url}/v1/datasets", headers=bearer("narrow")).status_code == 429
        assert upload.status == 201
        assert http.get(f"{b.url}/v1/datasets", headers=bearer("narrow")).status_code == 200
        redis_server.stop()
        statuses = [http.get(f"{a.url}/v1/models", headers=bearer("fast")).status_code for _ in range(5)]
        assert statuses == [200] * 5  # Redis away: limits fail open, traffic flows
        metrics = http.get(f"{a.url}/metrics", headers=bearer("none")).text
        assert re.search(r"^duet_limiter_unavailable_total [1-9]", metrics, re.M), metrics


def test_a_dead_replicas_concurrency_slots_expire(redis_server):
    """Slots taken and never released (the replica died) free themselves after the lease."""
    asyncio.run(_dead_replica(redis_server.url))


async def _dead_replica(url: str) -> None:
    limits = Limits(concurrency=1)
    dead = RedisLimiter(url, "leasetest", lease_seconds=1.0)
    alive = RedisLimiter(url, "leasetest", lease_seconds=1.0)
    assert (await dead.acquire("key:x", limits)).allowed
    assert not (await alive.acquire("key:x", limits)).allowed
    await asyncio.sleep(1.2)
    taken = await alive.acquire("key:x", limits)
    assert taken.allowed
    await alive.release(taken)
    assert (await alive.acquire("key:x", limits)).allowed
    await dead.close()
    await alive.close()


def test_item_and_body_limits_apply_to_every_many_item_route(tmp_path):
    """DUET_MAX_INPUTS_PER_REQUEST (and DUET_MAX_SEARCH_QUERIES for search) bound every route
    that takes a list; DUET_MAX_BODY_BYTES bounds every body but dataset uploads (their own)."""
    from service.app import create_app

    settings = make_settings(
        tmp_path,
        preload_models=[],
        register_default_models=False,
        local_worker=False,
        max_inputs_per_request=3,
        max_search_queries=3,
        max_body_bytes=4096,
    )
    many = ["a", "b", "c", "d"]
    cases = [
        ("POST", "/v1/embeddings", {"input": many}, "input"),
        ("PUT", "/v1/collections/c/items", {"items": [{"id": i, "text": i} for i in many]}, "items"),
        ("POST", "/v1/collections/c/items/delete", {"ids": many}, "ids"),
        ("POST", "/v1/collections/c/search", {"queries": [{"text": i} for i in many]}, "queries"),
    ]
    with TestClient(create_app(settings)) as client:
        for method, path, body, param in cases:
            refused = client.request(method, path, json=body)
            assert refused.status_code == 400, (path, refused.text)
            assert refused.json()["error"]["param"] == param
            too_big = client.request(method, path, json={"input": "x" * 5000})
            assert too_big.status_code == 413, path
