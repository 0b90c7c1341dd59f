"""HTTP semantics that load balancers and schema-driven clients rely on: HEAD wherever GET is
answered, 405 with an `Allow` header that lists every method of the path, and an OpenAPI document
that lists each route's error responses and the patterns of its path parameters."""

from __future__ import annotations

import pytest

GET_PATHS = [
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/models/minilm",
    "/v1/collections",
    "/jobs",
    "/playground",
    "/openapi.json",
    "/v1/jobs",
]


@pytest.mark.parametrize("path", GET_PATHS)
def test_head_is_answered_wherever_get_is(http, path):
    get = http.get(path)
    head = http.head(path)
    assert head.status_code == get.status_code == 200, (path, head.status_code)
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"]


def test_head_of_a_missing_thing_is_its_get_status(http):
    assert http.head("/v1/collections/not-there").status_code == 404


def test_head_is_counted_under_its_route(http):
    http.head("/v1/models")
    metrics = http.get("/metrics").text
    assert 'route="/v1/models",status="200"' in metrics
    before = _count(metrics, '/v1/models",status="200"')
    http.head("/v1/models")
    assert _count(http.get("/metrics").text, '/v1/models",status="200"') == before + 1


def _count(metrics: str, needle: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if needle in line and "_total" in line)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/embeddings", {"POST"}),
        ("POST", "/health", {"GET", "HEAD"}),
        ("PATCH", "/v1/collections/anything", {"GET", "HEAD", "DELETE"}),
        ("DELETE", "/v1/collections", {"GET", "HEAD", "POST"}),
    ],
)
def test_405_names_every_allowed_method(http, method, path, allowed):
    response = http.request(method, path)
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} == allowed
    assert response.json()["error"]["code"] == "method_not_allowed"


@pytest.fixture(scope="module")
def openapi(server):
    import httpx

    return httpx.get(f"{server.url}/openapi.json").json()


@pytest.mark.parametrize(
    ("method", "path", "statuses"),
    [
        ("post", "/v1/embeddings", {"400", "404", "413", "415", "429", "503"}),
        ("get", "/v1/models/{name}", {"400", "404"}),
        ("post", "/v1/collections", {"400", "404", "409", "413", "415"}),
        ("get", "/v1/collections/{name}", {"400", "404"}),
        ("post", "/v1/collections/{name}/search", {"400", "404", "413", "415", "429"}),
        ("get", "/v1/jobs/{job_id}", {"400", "404"}),
        ("get", "/health", {"503"}),
    ],
)
def test_openapi_lists_the_error_responses(openapi, method, path, statuses):
    responses = openapi["paths"][path][method]["responses"]
    assert statuses <= set(responses), sorted(responses)
    for status in statuses:
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorResponse"}
    # FastAPI's own 422 (validation) is gone: validation answers 400; a 422 is only an unembeddable input.
    assert "422" not in responses or "could not embed" in responses["422"]["description"]
    assert "error" in openapi["components"]["schemas"]["ErrorResponse"]["properties"]


def test_every_operation_lists_its_errors(openapi):
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            assert any(s.startswith("4") or s == "503" for s in operation["responses"]), (method, path)


@pytest.mark.parametrize(
    ("path", "param", "pattern"),
    [
        ("/v1/collections/{name}", "name", "^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$"),
        ("/v1/jobs/{job_id}", "job_id", "^job_[0-9a-f]{1,64}$"),
        ("/v1/models/{name}/versions/{version}", "version", "^[1-9][0-9]{0,8}$"),
        ("/v1/models/{name}/aliases/{alias}", "alias", "^[A-Za-z][A-Za-z0-9_-]{0,63}$"),
    ],
)
def test_openapi_states_path_parameter_patterns(openapi, path, param, pattern):
    operation = next(iter(openapi["paths"][path].values()))
    parameter = next(p for p in operation["parameters"] if p["name"] == param)
    assert parameter["schema"]["pattern"] == pattern
