"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis).

Schemathesis reads `/openapi.json` from a real running server and sends, per operation, valid and
invalid requests (wrong types, missing fields, odd strings, boundary numbers) generated from the
schema; a stateful run then chains operations through the links it infers (create a collection, then
upsert into it, search it, page it, drop it). These properties are checked on every response:

- no 5xx: whatever a client sends, the server answers it as the client's mistake or succeeds;
- every 4xx has our one error shape, `{"error": {"message", "type", "code", "param"}}`, so clients
  (and the OpenAI SDK) can always show the message;
- every status is one the OpenAPI document lists for the operation (service/openapi.py states each
  route's 4xx).

Schemathesis' `allow_header_conformance` is left out: it compares a 405's `Allow` with the one
template it fuzzed, but `/v1/collections/{name}/items/delete` (POST) is also a match of
`/items/{item_id:path}` (GET reads the item named "delete"), so the truthful `Allow: GET, HEAD, POST`
reads as wrong to it. tests/integration/test_http_semantics.py checks `Allow` instead.

The server is real (uvicorn in a thread, the lifespan runs) rather than schemathesis' ASGI transport,
whose test client would have to drive our lifespan, background batcher threads and durable stores
itself. It gets its own data dir (a copy of the session's registry database, so no models are
registered again) and no local job worker, so fuzzed jobs queue and never train.

Excluded: `GET /v1/jobs/{job_id}/events`, a server-sent event stream that stays open until the job
ends (a queued job never does here), so every call would wait for the client's timeout.

Deterministic (`derandomize=True`) and bounded (`MAX_EXAMPLES` per operation), so a run is
repeatable and fits the CI budget; the summary (operations, cases, statuses, failures) is printed.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error, status_code_conformance

from tests.helpers import RunningServer, make_settings, png_data_uri

MAX_EXAMPLES = 25
STATEFUL_EXAMPLES = 40
STATEFUL_STEPS = 8
EXCLUDED_PATHS = ["/v1/jobs/{job_id}/events"]
SEEDED = "fuzz-seeded"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SUMMARY = ARTIFACTS / "fuzz-summary.txt"
HYPOTHESIS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported as found, fast
    suppress_health_check=list(HealthCheck),
)

# operation label -> Counter of "status" / "failed"; filled by both tests, printed at module teardown.
SEEN: dict[str, Counter] = defaultdict(Counter)


@pytest.fixture(scope="module")
def fuzz_server(bootstrapped_data_dir, tmp_path_factory) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("fuzz-data")
    (data_dir / "registry").mkdir()
    # SQLite's backup API: a consistent copy even while the session's server has the database open.
    # Versions' artifact URIs still point at the session's (immutable, hash-checked) folders.
    with (
        sqlite3.connect(bootstrapped_data_dir / "registry" / "mlflow.db") as source,
        sqlite3.connect(data_dir / "registry" / "mlflow.db") as target,
    ):
        source.backup(target)
    with RunningServer(make_settings(data_dir, local_worker=False)) as running:
        yield running


@pytest.fixture(scope="module")
def api_schema(fuzz_server, request):
    _seed(fuzz_server.url)
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    _aim_at_the_seeded_collection(schema)
    started = time.monotonic()
    request.addfinalizer(lambda: _print_summary(request, time.monotonic() - started))
    return schema.exclude(path=EXCLUDED_PATHS)


def _seed(url: str) -> None:
    """A collection with texts, an image and typed payloads, for the fuzzed requests to reach."""
    with httpx.Client(base_url=url, timeout=120) as client:
        client.post("/v1/collections", json={"name": SEEDED, "model": "minilm-dual"}).raise_for_status()
        items = [
            {"id": "guitar", "text": "A man is playing a guitar.", "payload": {"year": 2020, "lang": "en"}},
            {"id": "gitarre", "text": "Ein Mann spielt Gitarre.", "payload": {"year": 2019, "lang": "de"}},
            {"id": "red", "image": png_data_uri(color=(255, 0, 0)), "payload": {"year": 2021, "lang": "en"}},
        ]
        client.put(f"/v1/collections/{SEEDED}/items", json={"items": items}).raise_for_status()


def _aim_at_the_seeded_collection(schema) -> None:
    """Random collection names and random bodies stop at the first 404 or 422; these hooks send half of
    the cases to the seeded collection, and half of the search and upsert bodies with a valid query or
    item (the rest of the body still fuzzed: k, filter, modality, nprobe, model), so the fuzzing reaches
    embedding, filters and FAISS too. Dropping the seeded collection is left to the stateful run."""

    @schema.hook
    def flatmap_path_parameters(context, path_parameters):
        operation = context.operation
        if not isinstance(path_parameters, dict) or "name" not in path_parameters:
            return st.just(path_parameters)
        if operation.path.startswith("/v1/collections/") and operation.method != "delete":
            return st.sampled_from([path_parameters, {**path_parameters, "name": SEEDED}])
        return st.just(path_parameters)

    @schema.hook
    def flatmap_body(context, body):
        path = context.operation.path
        if not isinstance(body, dict):
            return st.just(body)
        if path.endswith("/search"):
            valid = {key: value for key, value in body.items() if key != "queries"}
            return st.sampled_from([body, {**valid, "query": {"text": "music"}}])
        if path.endswith("/items") and context.operation.method == "put":
            item = {"id": "fuzzed", "text": "a fuzzed item", "payload": {"year": 2022, "lang": "xx"}}
            return st.sampled_from([body, {**body, "items": [item]}])
        return st.just(body)


# Excluded on the lazy schema too: `parametrize` applies its own filters, not the fixture's.
schema = schemathesis.pytest.from_fixture("api_schema").exclude(path=EXCLUDED_PATHS)


@schemathesis.check
def error_shape(ctx, response, case) -> bool | None:
    """Every 4xx carries our one error object, so any client can show its message."""
    if not 400 <= response.status_code < 500:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} body is not JSON: {response.content[:200]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(body, dict) and set(body) == {"error"}, f"{response.status_code} body is not {{'error': ...}}"
    assert isinstance(error, dict) and set(error) == {"message", "type", "code", "param"}, f"error keys: {error}"
    assert isinstance(error["message"], str) and error["message"], "error.message is not a non-empty string"
    assert isinstance(error["type"], str) and isinstance(error["code"], str), "error.type/code are not strings"
    assert error["param"] is None or isinstance(error["param"], str), "error.param is not a string or null"
    return True


CHECKS = [not_a_server_error, error_shape, status_code_conformance]


def _record(case, call, stateful: bool = False) -> None:
    """Run one call and count its status (or its failure) under its operation."""
    label = f"{case.operation.method.upper()} {case.operation.path}"
    if stateful:
        SEEN[label]["stateful"] += 1
    try:
        response = call()
    except Exception:
        SEEN[label]["failed"] += 1
        raise
    SEEN[label][str(response.status_code)] += 1


@schema.parametrize()
@HYPOTHESIS
def test_api_answers_every_request_without_5xx_in_one_error_shape(case):
    _record(case, lambda: case.call_and_validate(checks=CHECKS, timeout=60))


def test_api_stateful_sequences(api_schema, fuzz_server):
    """Chains of calls through the links schemathesis infers (a created collection's name into its item,
    search and drop routes; a job's id into cancel and resume), with the same two checks. Its own schema,
    without the seeding hooks: the links supply real names. Each scenario starts from the same server
    state (only the seeded collection), so a replayed scenario takes the same branches, as Hypothesis
    requires (otherwise a name created by an earlier scenario answers 409 and the links differ)."""
    plain = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json").exclude(path=EXCLUDED_PATHS)
    workflow = plain.as_state_machine()
    url = fuzz_server.url

    class Workflow(workflow):  # type: ignore[misc, valid-type]
        def setup(self):
            with httpx.Client(base_url=url, timeout=60) as client:
                for info in client.get("/v1/collections").json()["data"]:
                    if info["name"] != SEEDED:
                        client.delete(f"/v1/collections/{info['name']}")

        def call(self, case, **kwargs):
            kwargs.setdefault("timeout", 60)
            return case.call(**kwargs)

        def step(self, input):
            done = {}

            def call():
                done["output"] = super(Workflow, self).step(input)
                return done["output"].response

            _record(input.case, call, stateful=True)
            return done["output"]

        def validate_response(self, response, case, additional_checks=None, **kwargs):
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs or None)

    Workflow.run(
        settings=settings(
            HYPOTHESIS, max_examples=STATEFUL_EXAMPLES, stateful_step_count=STATEFUL_STEPS, phases=[Phase.generate]
        )
    )


def _print_summary(request, elapsed: float) -> None:
    """Operations, cases and statuses per operation, failures; shown even without `-s`."""
    lines = [f"schemathesis {schemathesis.SCHEMATHESIS_VERSION}: fuzz summary ({elapsed:.0f} s)"]
    total = failed = 0
    for label in sorted(SEEN):
        counts = SEEN[label]
        statuses = {k: v for k, v in sorted(counts.items()) if k.isdigit()}
        cases = sum(statuses.values()) + counts["failed"]
        total += cases
        failed += counts["failed"]
        detail = " ".join(f"{k}x{v}" for k, v in statuses.items())
        extra = f" stateful {counts['stateful']}" if counts["stateful"] else ""
        extra += f"  FAILED {counts['failed']}" if counts["failed"] else ""
        lines.append(f"  {label:<48} {cases:>4} cases  {detail}{extra}")
    lines.append(f"  {len(SEEN)} operations, {total} cases, {failed} failing; excluded: {', '.join(EXCLUDED_PATHS)}")
    text = "\n".join(lines)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(text + "\n")
    # Past pytest's output capture, so the summary shows in every run, not only with -s.
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(f"\n{text}\n  (also in {SUMMARY})")
    else:
        print(text)
