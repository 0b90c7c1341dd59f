"""Fine-tuning jobs through HTTP only, embedded mode (SQLite store + the service's local
worker process): upload, submit, stream events, cancel, a killed worker, resume."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import zipfile
from collections.abc import Iterator

import httpx
import pytest

from encoders.encoder import describe, load_sentence_transformer
from jobs.sse import parse_events
from registry.manifest import Manifest
from tests.helpers import PAIRS, RunningServer, make_settings

TRAIN = "\n".join(json.dumps({"anchor": a, "positive": p}) for a, p in PAIRS * 4).encode()
DEV = "\n".join(json.dumps({"anchor": a, "positive": p}) for a, p in PAIRS).encode()


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory, tiny_model_dir) -> Iterator[RunningServer]:
    data_dir = tmp_path_factory.mktemp("jobs-data")
    settings = make_settings(
        data_dir,
        preload_models=[],
        register_default_models=False,
        job_heartbeat_seconds=0.5,
        job_heartbeat_timeout_seconds=10.0,  # generous: a loaded 2-core CI machine
        job_cancel_grace_seconds=60.0,
    )
    with RunningServer(settings) as server:
        contract = describe(load_sentence_transformer(tiny_model_dir))
        manifest = Manifest(contract=contract, trained=True, description="tiny test model")
        server.state.registry.register("tiny", tiny_model_dir, manifest, aliases=("production",))
        yield server


@pytest.fixture()
def api(jobs_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=jobs_server.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def uploaded(jobs_server) -> dict[str, str]:
    with httpx.Client(base_url=jobs_server.url, timeout=60) as client:
        train = client.post("/v1/datasets", params={"filename": "train.jsonl"}, content=TRAIN)
        dev = client.post("/v1/datasets", params={"filename": "dev.jsonl"}, content=DEV)
    assert train.status_code == 201, train.text
    return {"train": train.json()["path"], "dev": dev.json()["path"]}


def job_config(uploaded, **overrides):
    config = {
        "base_model": "tiny",
        "train": [{"path": uploaded["train"]}],
        "eval": [{"path": uploaded["dev"], "name": "dev"}],
        "loss": {"name": "infonce"},
        "batch_size": 8,
        "max_steps": 6,
        "learning_rate": 1e-3,
        "checkpoint_every_steps": 2,
        "log_every_steps": 1,
        "output": {"name": "tiny-tuned", "promote": {"alias": "production", "metric": "dev/a_to_b/mrr@10"}},
        "seed": 7,
    }
    config.update(overrides)
    return config


def events(api: httpx.Client, job_id: str, after: int = 0, timeout: float = 300) -> list[tuple[int, str, dict]]:
    """Read the job's server-sent events until the stream ends."""
    with api.stream("GET", f"/v1/jobs/{job_id}/events", params={"after": after}, timeout=timeout) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(parse_events(response.iter_lines()))


def wait_for(api: httpx.Client, job_id: str, predicate, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if predicate(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job never reached the expected state: {job}")
        time.sleep(0.3)


# -- bad input -------------------------------------------------------------------------------------


def test_invalid_configs_are_refused_with_every_problem(api, uploaded):
    bad = job_config(uploaded, loss={"name": "nope"}, batch_size=0)
    response = api.post("/v1/jobs", json={"config": bad})
    assert response.status_code == 422
    message = response.json()["error"]["message"]
    assert "loss" in message and "batch_size" in message
    assert all(j["config"] != bad for j in api.get("/v1/jobs").json()["data"])  # nothing was queued


def test_missing_dataset_and_model_fail_fast(api, uploaded):
    missing = job_config(uploaded, train=[{"path": "0000000000000000/none.jsonl"}])
    response = api.post("/v1/jobs", json={"config": missing})
    assert response.status_code == 422 and "none.jsonl" in response.json()["error"]["message"]
    no_alias = job_config(uploaded, base_model="tiny@nope")
    response = api.post("/v1/jobs", json={"config": no_alias})
    assert response.status_code == 422 and "nope" in response.json()["error"]["message"]


def test_server_paths_are_refused(api, uploaded, tiny_model_dir):
    response = api.post("/v1/jobs", json={"config": job_config(uploaded, train=[{"path": "/etc/passwd"}])})
    assert response.status_code == 422 and "uploaded dataset" in response.json()["error"]["message"]
    response = api.post("/v1/jobs", json={"config": job_config(uploaded, base_model=str(tiny_model_dir))})
    assert response.status_code == 422 and "server path" in response.json()["error"]["message"]


def test_bad_requests(api):
    assert api.post("/v1/jobs", content="{}", headers={"content-type": "text/plain"}).status_code == 415
    assert api.post("/v1/jobs", json={"cfg": {}}).status_code == 400
    assert api.get("/v1/jobs/job_nope").status_code == 404
    assert api.post("/v1/jobs/job_nope/cancel").json()["error"]["code"] == "job_not_found"
    assert api.get("/v1/jobs/job_nope/events").status_code == 404
    assert api.get("/v1/jobs", params={"state": "sleeping"}).status_code == 400


def test_dataset_uploads(api):
    first = api.post("/v1/datasets", params={"filename": "pairs.jsonl"}, content=DEV)
    again = api.post("/v1/datasets", params={"filename": "pairs.jsonl"}, content=DEV)
    assert first.status_code == 201 and first.json()["id"] == again.json()["id"]
    assert first.json()["path"].endswith("/pairs.jsonl") and first.json()["bytes"] == len(DEV)
    assert any(d["id"] == first.json()["id"] for d in api.get("/v1/datasets").json()["data"])
    assert api.post("/v1/datasets", params={"filename": "../x.jsonl"}, content=DEV).status_code == 400
    assert api.post("/v1/datasets", params={"filename": "x.exe"}, content=DEV).status_code == 400
    assert api.post("/v1/datasets", params={"filename": "x.jsonl"}, content=b"").status_code == 400
    evil = io.BytesIO()
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../../escape.txt", "x")
    response = api.post("/v1/datasets", params={"filename": "evil.zip"}, content=evil.getvalue())
    assert response.status_code == 400 and "outside" in response.json()["error"]["message"]
    assert api.post("/v1/datasets", params={"filename": "bad.zip"}, content=b"not a zip").status_code == 400


# -- running -------------------------------------------------------------------------------------


def test_a_job_runs_streams_events_registers_and_promotes(api, uploaded, jobs_server):
    body = {"config": job_config(uploaded), "idempotency_key": "run-1"}
    created = api.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job = created.json()
    retried = api.post("/v1/jobs", json=body)
    assert retried.status_code == 200 and retried.json()["id"] == job["id"]

    stream = events(api, job["id"])
    kinds = [kind for _, kind, _ in stream]
    assert kinds[0] == "state" and kinds[-1] == "end"
    assert "progress" in kinds and "evaluation" in kinds
    assert [seq for seq, _, _ in stream] == list(range(1, len(stream) + 1))  # nothing skipped
    progress = [data for _, kind, data in stream if kind == "progress"]
    assert progress[-1]["step"] == 6 and progress[-1]["max_steps"] == 6 and progress[-1]["loss"] is not None
    final = stream[-1][2]
    assert final["state"] == "succeeded", final
    assert final["result"]["model"].startswith("tiny-tuned/")
    assert final["metrics"]["before"] and final["metrics"]["after"]
    assert final["progress"]["step"] == 6
    # what the jobs page reads: a training stage between the evaluations, the learning rate kept,
    # no stage left once the job is over
    stages = [data["stage"] for _, kind, data in stream if kind == "stage"]
    assert stages.index("evaluating base model") < stages.index("training") < stages.index("evaluating trained model")
    assert final["progress"]["learning_rate"] is not None and final["progress"]["stage"] is None
    # a finished run keeps no checkpoints (optimizer state) nor a second copy of the registered model
    run_dir = jobs_server.state.settings.data_dir / "jobs" / job["id"]
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "model").exists()

    # reconnecting after the last id replays nothing but the end
    assert [kind for _, kind, _ in events(api, job["id"], after=len(stream) - 1)] == ["end"]
    listed = api.get("/v1/jobs", params={"state": "succeeded"}).json()["data"]
    assert job["id"] in [j["id"] for j in listed]
    conflict = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "job_state_conflict"


def test_cancel_stops_a_running_job_at_the_next_step(api, uploaded):
    long = job_config(uploaded, max_steps=100_000, checkpoint_every_steps=1_000_000, output={"name": "tiny-long"})
    job = api.post("/v1/jobs", json={"config": long}).json()
    wait_for(api, job["id"], lambda j: (j["progress"]["step"] or 0) >= 2)
    flagged = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert flagged["cancel_requested"] is True
    final = wait_for(api, job["id"], lambda j: j["state"] != "running", timeout=120)
    assert final["state"] == "cancelled" and final["error"].startswith("cancelled at step")
    assert final["resumable"] is True and final["result"] is None


def test_a_killed_worker_fails_its_job_which_resumes_from_its_checkpoint(api, uploaded, jobs_server):
    config = job_config(uploaded, max_steps=60, checkpoint_every_steps=5, output={"name": "tiny-resumed"})
    job = api.post("/v1/jobs", json={"config": config}).json()
    wait_for(api, job["id"], lambda j: (j["progress"]["step"] or 0) >= 12)
    worker = jobs_server.state.jobs.worker_process
    os.kill(worker.pid, signal.SIGKILL)  # the training process dies with it (PR_SET_PDEATHSIG)

    failed = wait_for(api, job["id"], lambda j: j["state"] != "running", timeout=60)
    assert failed["state"] == "failed" and "stopped sending heartbeats" in failed["error"]
    assert failed["resumable"] is True

    resumed = api.post(f"/v1/jobs/{job['id']}/resume").json()
    assert resumed["state"] == "queued" and resumed["attempt"] == 2
    done = wait_for(api, job["id"], lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout=300)
    assert done["state"] == "succeeded", done
    stream = events(api, job["id"])
    stages = [data.get("stage", "") for _, kind, data in stream if kind == "stage"]
    assert "starting attempt 2" in stages, stages
    assert any(stage.startswith("resuming from checkpoint-") for stage in stages), stages
    assert [seq for seq, _, _ in stream] == list(range(1, len(stream) + 1))  # the old attempt's end is kept too
    assert "attempt_end" in [kind for _, kind, _ in stream]
    states = [data["state"] for _, kind, data in stream if kind == "state"]
    assert states == ["queued", "running", "failed", "queued", "running", "succeeded"]
    assert stream[-1][1] == "end" and stream[-1][2]["state"] == "succeeded"
    assert jobs_server.state.jobs.worker_restarts >= 1
