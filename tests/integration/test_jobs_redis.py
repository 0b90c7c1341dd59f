"""Distributed mode: the service and a separate `duet worker` process share a real Redis.
Redis restarts in the middle of a running job: the job endpoints answer 503 while it is
away, embeddings keep working, and the job finishes with every event recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from encoders.encoder import describe, load_sentence_transformer
from registry.manifest import Manifest
from registry.store import ModelRegistry
from tests.helpers import RunningServer, make_settings
from tests.integration.test_jobs_api import DEV, TRAIN, events, job_config, wait_for
from tests.redis_server import RedisServer


@pytest.fixture()
def cluster(tmp_path, tiny_model_dir) -> Iterator[tuple[RunningServer, RedisServer]]:
    redis_server = RedisServer(tmp_path / "redis").start()
    data_dir = tmp_path / "data"
    registry = ModelRegistry.embedded(data_dir / "registry")
    manifest = Manifest(contract=describe(load_sentence_transformer(tiny_model_dir)), trained=True)
    registry.register("tiny", tiny_model_dir, manifest, aliases=("production",))
    settings = make_settings(
        data_dir,
        preload_models=["tiny"],
        default_model="tiny",
        register_default_models=False,
        redis_url=redis_server.url,
        job_heartbeat_seconds=0.5,
        job_heartbeat_timeout_seconds=20.0,
    )
    env = {
        **os.environ,
        "REDIS_URL": redis_server.url,
        "DUET_DATA_DIR": str(data_dir),
        "DUET_JOB_HEARTBEAT_SECONDS": "0.5",
        "DUET_JOB_HEARTBEAT_TIMEOUT_SECONDS": "20",
    }
    worker = subprocess.Popen([sys.executable, "-m", "duet.cli", "worker", "--name", "w1"], env=env)
    try:
        with RunningServer(settings) as server:
            yield server, redis_server
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        redis_server.stop()


def test_redis_restart_mid_job_loses_nothing(cluster):
    server, redis_server = cluster
    with httpx.Client(base_url=server.url, timeout=60) as api:
        train = api.post("/v1/datasets", params={"filename": "train.jsonl"}, content=TRAIN).json()["path"]
        dev = api.post("/v1/datasets", params={"filename": "dev.jsonl"}, content=DEV).json()["path"]
        config = job_config({"train": train, "dev": dev}, max_steps=300, checkpoint_every_steps=50)
        job = api.post("/v1/jobs", json={"config": config, "idempotency_key": "redis-1"}).json()
        wait_for(api, job["id"], lambda j: (j["progress"]["step"] or 0) >= 3)

        redis_server.stop()
        away = api.get(f"/v1/jobs/{job['id']}")
        assert away.status_code == 503 and away.headers["retry-after"] == "5"
        assert away.json()["error"]["code"] == "job_store_unavailable"
        assert away.json()["error"]["message"].endswith("; jobs are unavailable until it is back")
        assert api.post("/v1/jobs", json={"config": config}).status_code == 503
        embedded = api.post("/v1/embeddings", json={"input": "still serving", "model": "tiny"})
        assert embedded.status_code == 200  # embeddings do not depend on the job store
        time.sleep(2)  # the worker keeps training and buffers its reports
        redis_server.start()

        done = wait_for(api, job["id"], lambda j: j["state"] in ("succeeded", "failed", "cancelled"), timeout=300)
        assert done["state"] == "succeeded", done
        assert done["worker"] == "w1" and done["attempt"] == 1
        stream = events(api, job["id"])
        assert [seq for seq, _, _ in stream] == list(range(1, len(stream) + 1))
        steps = [data["step"] for _, kind, data in stream if kind == "progress"]
        assert steps == sorted(steps) and steps[-1] == 300
        assert json.loads(json.dumps(stream[-1][2]))["result"]["model"].startswith("tiny-tuned/")
        again = api.post("/v1/jobs", json={"config": config, "idempotency_key": "redis-1"})
        assert again.status_code == 200 and again.json()["id"] == job["id"]
