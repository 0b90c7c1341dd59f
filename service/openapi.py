"""The OpenAPI document's error responses and path-parameter patterns, stated in one place.

FastAPI documents only its own 422, which the service never sends (request validation answers 400,
as OpenAI does). Each operation instead lists the 4xx/5xx it can answer, all with the one error
body (`ErrorResponse`), so schema-driven clients and fuzzers (tests/integration/test_api_fuzz.py
checks status-code conformance) know them:

- from the route's shape: a JSON body -> 400, 413, 415; any parameter -> 400; a path parameter
  -> 404; every API route -> 401, 403 (keys) and 429 (rate and concurrency limits);
- from `ROUTE_ERRORS`: what the route's own work can answer (409 conflicts, 503 while a model or
  the job system or the collection store is unavailable, 507 for a model that does not fit memory, 422 for an input the
  model cannot embed).

Path parameters get the patterns their names must match (the same rules `registry.names` and
`index.collection` enforce, with a 400 naming the rule), so a client or a fuzzer can build valid
ones. The rules are documented here rather than validated by FastAPI, so a bad name keeps its
domain error code.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from index.config import NAME_PATTERN as COLLECTION_NAME_PATTERN
from registry.names import ALIAS_PATTERN, NAME_PATTERN, VERSION_PATTERN
from service.schemas import ErrorResponse

DESCRIPTIONS = {
    400: "Malformed or invalid request: the message says what to fix and `param` names the parameter",
    401: "No API key, or an unknown one (only when keys are configured)",
    403: "The API key lacks the scope this route needs",
    404: "The named thing (model, version, collection, item, job) does not exist",
    409: "Conflicts with the current state (exists already, busy, or not in a state that allows it)",
    413: "Request body too large",
    415: "Body is not `application/json`",
    422: "An input was well-formed but the model could not embed it",
    429: "Rate, concurrency or queue limit reached; see `Retry-After`",
    503: "Not available yet or any more (model failed to load, worker stopped, starting up, collection store "
    "unreachable: see `Retry-After`)",
    507: "The model is larger than the whole memory budget (DUET_MODEL_MEMORY_BUDGET_MB)",
}

_COLLECTION = "/v1/collections/{name}"
# What each route's own work can answer, beyond what its shape implies (see the module docstring).
ROUTE_ERRORS: dict[tuple[str, str], set[int]] = {
    ("POST", "/v1/embeddings"): {404, 422, 503, 507},
    ("GET", "/v1/models/{name}"): {404},
    ("PUT", "/v1/models/{name}/aliases/{alias}"): {404, 409},  # 409: require_compatible refused
    # Every collection route: 503 + Retry-After while the collection store is unreachable (milvus backend).
    ("POST", "/v1/collections"): {404, 409, 503, 507},
    ("GET", "/v1/collections"): {503},
    ("GET", _COLLECTION): {503},
    ("DELETE", _COLLECTION): {409, 503},
    ("POST", f"{_COLLECTION}/reembed"): {404, 409, 503, 507},
    ("POST", f"{_COLLECTION}/rebuild"): {409, 503},
    ("PUT", f"{_COLLECTION}/items"): {409, 422, 503, 507},
    ("GET", f"{_COLLECTION}/items"): {503},
    ("GET", f"{_COLLECTION}/items/{{item_id}}"): {503},
    ("POST", f"{_COLLECTION}/items/delete"): {409, 503},
    ("POST", f"{_COLLECTION}/search"): {409, 422, 503, 507},  # 409: a model the collection cannot be searched with
    ("POST", "/v1/jobs"): {409, 422, 503},
    ("GET", "/v1/jobs"): {503},
    ("GET", "/v1/jobs/{job_id}"): {503},
    ("GET", "/v1/jobs/{job_id}/events"): {503},
    ("POST", "/v1/jobs/{job_id}/cancel"): {409, 503},
    ("POST", "/v1/jobs/{job_id}/resume"): {409, 503},
    ("POST", "/v1/datasets"): {400, 409, 413},
    ("GET", "/v1/datasets"): {503},
    ("GET", "/health"): {503},
    ("GET", "/ready"): {503},
    ("GET", "/metrics"): {401, 403},
}

_MODEL_NAME = NAME_PATTERN
_ALIAS = ALIAS_PATTERN
# (path prefix, parameter) -> pattern; the first matching prefix wins.
PATH_PATTERNS: list[tuple[str, str, str]] = [
    ("/v1/models/{name}/", "name", f"^{_MODEL_NAME}$"),
    ("/v1/models/{name}", "name", f"^{_MODEL_NAME}(@{_ALIAS})?$"),  # a name, or name@alias
    ("/v1/models/", "version", f"^{VERSION_PATTERN}$"),
    ("/v1/models/", "alias", f"^{_ALIAS}$"),
    ("/v1/collections/", "name", f"^{COLLECTION_NAME_PATTERN}$"),
    ("/v1/collections/", "item_id", r"^[^\u0000-\u001f]{1,256}$"),
    ("/v1/jobs/", "job_id", r"^job_[0-9a-f]{1,64}$"),
]


def _statuses(method: str, path: str, operation: dict[str, Any]) -> set[int]:
    statuses = set(ROUTE_ERRORS.get((method, path), ()))
    parameters = operation.get("parameters", [])
    if "requestBody" in operation:
        statuses |= {400, 413}
        if "application/json" in operation["requestBody"].get("content", {}):
            statuses.add(415)
    if parameters:
        statuses.add(400)
    if any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    if path.startswith("/v1/"):
        statuses |= {401, 403, 429}
    return statuses


def _pattern(path: str, name: str) -> str | None:
    for prefix, parameter, pattern in PATH_PATTERNS:
        if parameter == name and path.startswith(prefix):
            return pattern
    return None


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the error responses and path patterns to a generated OpenAPI document (in place)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    generated = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(generated.pop("$defs", {}))
    components["ErrorResponse"] = generated
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    reference = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            for status in sorted(_statuses(method.upper(), path, operation)):
                responses[str(status)] = {
                    "description": DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": reference}},
                }
            for parameter in operation.get("parameters", []):
                pattern = _pattern(path, parameter["name"]) if parameter.get("in") == "path" else None
                if pattern:
                    parameter.setdefault("schema", {})["pattern"] = pattern
    return schema


def install_openapi(app: FastAPI) -> None:
    """Post-process the app's OpenAPI document once, when it is first generated."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(original())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
