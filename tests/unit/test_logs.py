"""JSON log lines and the request id: from the request's header to its log lines, its
response, the job it creates, the worker running that job and the training process."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from common.logs import (
    JsonFormatter,
    JsonLinesStream,
    TextFormatter,
    adopt_library_loggers,
    clean_request_id,
    log_context,
)
from jobs.records import JobRecord, JobState
from jobs.sqlite_store import SqliteJobStore
from jobs.worker import Worker, WorkerOptions
from tests.helpers import make_settings

TRAIN = b'{"anchor": "a cat", "positive": "a kitten"}\n{"anchor": "a dog", "positive": "a puppy"}\n'


class Lines:
    """JSON lines a logger wrote (through the formatter the service uses)."""

    def __init__(self, logger_name: str) -> None:
        self.buffer = io.StringIO()
        self.handler = logging.StreamHandler(self.buffer)
        self.handler.setFormatter(JsonFormatter())
        self.logger = logging.getLogger(logger_name)

    def __enter__(self) -> Lines:
        self.logger.addHandler(self.handler)
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.buffer.getvalue().splitlines()]


def test_json_lines_carry_the_bound_context_and_extra_fields():
    with Lines("duet.test") as lines:
        log = logging.getLogger("duet.test")
        with log_context(request_id="req-1", job_id=None):
            log.info("hello %s", "world", extra={"items": 3})
        log.warning("after")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
    first, second, third = lines.records()
    assert set(first) >= {"ts", "level", "logger", "message", "request_id"}
    assert first["message"] == "hello world" and first["level"] == "info" and first["logger"] == "duet.test"
    assert first["request_id"] == "req-1" and first["items"] == 3 and "job_id" not in first
    assert first["ts"].endswith("Z")
    assert "request_id" not in second  # unbound after the block
    assert "ValueError: boom" in third["exc_info"]


def test_text_lines_name_the_request():
    record = logging.LogRecord("duet", logging.INFO, __file__, 1, "hi", None, None)
    with log_context(request_id="req-2"):
        assert TextFormatter().format(record).endswith("hi [req-2]")
    assert TextFormatter().format(record).endswith("hi")


def test_request_ids_are_cleaned_or_made():
    assert clean_request_id("abc-123_x.y") == "abc-123_x.y"
    assert clean_request_id('a b"c\n<d>') == "abcd"
    assert len(clean_request_id("x" * 500)) == 128
    made = clean_request_id(" \n")
    assert len(made) == 32 and made != clean_request_id(None)


@pytest.fixture()
def client(tmp_path) -> Iterator[TestClient]:
    from service.app import create_app

    settings = make_settings(tmp_path, preload_models=[], register_default_models=False, local_worker=False)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_the_response_header_and_the_access_line_share_the_request_id(client):
    with Lines("duet.access") as lines:
        given = client.get("/v1/models", headers={"X-Request-ID": "trace-42"})
        made = client.get("/v1/models")
    assert given.headers["x-request-id"] == "trace-42"
    first, second = lines.records()
    assert first["request_id"] == "trace-42" and first["path"] == "/v1/models" and first["status"] == 200
    assert second["request_id"] == made.headers["x-request-id"] and len(second["request_id"]) == 32


def test_a_job_keeps_the_request_id_of_the_request_that_created_it(client):
    path = client.post("/v1/datasets", params={"filename": "pairs.jsonl"}, content=TRAIN).json()["path"]
    config = {"base_model": "org/some-model", "train": [{"path": path}], "output": {"name": "tuned"}}
    response = client.post("/v1/jobs", json={"config": config}, headers={"X-Request-ID": "job-req 7"})
    assert response.status_code == 201, response.text
    assert response.headers["x-request-id"] == "job-req7"
    assert response.json()["request_id"] == "job-req7"
    assert client.get(f"/v1/jobs/{response.json()['id']}").json()["request_id"] == "job-req7"


def test_the_worker_and_the_training_process_log_with_the_job_request_id(tmp_path, monkeypatch):
    """A config the training process refuses at once: enough to see both processes' lines."""
    monkeypatch.setenv("DUET_LOG_FORMAT", "json")  # the spawned training process reads it
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    store.create(JobRecord(id="job_logs", config={"loss": {"name": "nope"}}, request_id="req-from-api"))
    claimed = store.claim("w1")
    assert claimed is not None
    worker = Worker(store, WorkerOptions(data_dir=tmp_path, registry_dir=tmp_path / "registry", name="w1"))
    with Lines("jobs.worker") as lines:
        worker.run_job(claimed)
    assert store.get("job_logs").state is JobState.failed
    worker_lines = lines.records()
    assert worker_lines and all(line["request_id"] == "req-from-api" for line in worker_lines)
    assert all(line["job_id"] == "job_logs" for line in worker_lines)
    child_lines = [
        json.loads(line) for line in (tmp_path / "jobs" / "job_logs" / "attempt-1.log").read_text().splitlines()
    ]
    assert child_lines and all(line["request_id"] == "req-from-api" for line in child_lines)
    store.close()


def test_libraries_with_their_own_stderr_handler_are_routed_through_ours():
    """MLflow, transformers and alembic attach a plain-text stderr handler and stop propagation."""
    library = logging.getLogger("some_library")
    plain = logging.StreamHandler(io.StringIO())
    library.addHandler(plain)
    library.propagate = False
    try:
        with Lines("") as lines:  # the root logger, where Duet's handler lives
            adopt_library_loggers()
            library.warning("from the library")
        assert plain not in library.handlers and library.propagate
        assert plain.stream.getvalue() == ""
        assert lines.records()[-1]["logger"] == "some_library"
    finally:
        library.handlers.clear()


def test_stray_output_becomes_json_lines():
    out = io.StringIO()
    stream = JsonLinesStream(out, "stderr")
    stream.write('plain words\n{"already": "json"}\nhalf')
    stream.write(" a line\rLoading: 50%\r\n")
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line.get("message") for line in lines] == ["plain words", None, "half a line", "Loading: 50%"]
    assert lines[0]["logger"] == "stderr" and lines[1] == {"already": "json"}


def test_a_library_imported_after_set_up_logs_json_lines_too():
    """transformers adds its plain-text stderr handler when imported: on a model loaded on
    demand, or in the training process, that comes after logging was set up."""
    import subprocess
    import sys

    code = (
        "from common.logs import setup_logging; setup_logging('info', 'json');"
        "import transformers.utils.logging as t; t.get_logger('transformers.demo').warning('plain?')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line) for line in lines), result.stderr
    assert json.loads(lines[-1])["logger"] == "transformers.demo"
