"""Hot swap: an alias moves while clients hammer /v1/embeddings; nothing fails, and the new
version answers only once it is warm. An incompatible version is refused and the old one
keeps serving."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import httpx

from tests.helpers import RunningServer, make_settings, register_trained

CLIENTS = 4
DEADLINE_SECONDS = 180  # a guard against hanging, not a performance assertion


def serve(tmp_path: Path, model: str):
    from service.state import open_registry

    settings = make_settings(
        tmp_path / "data", preload_models=[model], register_default_models=False, alias_refresh_seconds=0.5
    )
    return settings, open_registry(settings)


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


class Hammer:
    """Several threads posting embeddings requests back to back; every answer recorded per thread."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.stop = threading.Event()
        self.answers: list[list[tuple[int, str | None]]] = [[] for _ in range(CLIENTS)]
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _run(self, i: int) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    response = client.post("/v1/embeddings", json={"model": self.model, "input": [f"text {i}", "x"]})
                    self.answers[i].append((response.status_code, response.json().get("model")))
                except Exception as exc:  # a dropped connection or a non-JSON body is a failed request too
                    self.answers[i].append((0, repr(exc)))

    def models(self) -> list[str | None]:
        return [model for answers in self.answers for _, model in list(answers)]

    def __enter__(self) -> Hammer:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def test_alias_move_under_load_fails_no_request(tmp_path, tiny_model_dir, caplog):
    caplog.set_level(logging.INFO, logger="service.model_pool")
    settings, registry = serve(tmp_path, "hot")
    register_trained(registry, "hot", tiny_model_dir, aliases=("production",))
    register_trained(registry, "hot", tiny_model_dir)
    with RunningServer(settings) as running, Hammer(running.url, "hot") as hammer:
        wait_for(lambda: all(len(a) >= 5 for a in hammer.answers), "every client to get answers from hot/1")
        moved = httpx.put(f"{running.url}/v1/models/hot/aliases/production", json={"version": 2})
        assert moved.status_code == 200, moved.text
        wait_for(lambda: all(("hot/2" in {m for _, m in a[-3:]}) for a in hammer.answers), "hot/2 to answer everyone")
        metrics = httpx.get(f"{running.url}/metrics").text

    answers = [answer for client in hammer.answers for answer in client]
    failed = [answer for answer in answers if answer[0] != 200]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the swap: {failed[:5]}"
    assert {model for _, model in answers} == {"hot/1", "hot/2"}
    for client in hammer.answers:  # once a client has seen the new version, it never sees the old one again
        models = [model for _, model in client]
        assert "hot/1" not in models[models.index("hot/2") :]
    assert 'duet_alias_swaps_total{alias="hot@production"} 1.0' in metrics
    assert "first response from hot/2 after swap from hot/1" in caplog.text


def test_incompatible_version_is_refused_and_a_later_move_retries(tmp_path, tiny_model_dir, minilm_path, caplog):
    caplog.set_level(logging.INFO, logger="service.model_pool")
    settings, registry = serve(tmp_path, "mixed")
    register_trained(registry, "mixed", tiny_model_dir, aliases=("production",))  # 32-d
    register_trained(registry, "mixed", minilm_path)  # 384-d: another space
    register_trained(registry, "mixed", tiny_model_dir)  # 32-d again
    failure = 'duet_alias_swap_failures_total{alias="mixed@production",reason="contract"} 1.0'
    with RunningServer(settings) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        assert http.post("/v1/embeddings", json={"model": "mixed", "input": "x"}).json()["model"] == "mixed/1"
        assert http.put("/v1/models/mixed/aliases/production", json={"version": 2}).status_code == 200
        wait_for(lambda: failure in http.get("/metrics").text, "the refused swap to be counted")
        answer = http.post("/v1/embeddings", json={"model": "mixed", "input": "x"})
        assert answer.status_code == 200 and answer.json()["model"] == "mixed/1"
        assert len(answer.json()["data"][0]["embedding"]) == 32
        assert "not swapping alias mixed@production from mixed/1 to mixed/2" in caplog.text
        assert "dimension 32 -> 384" in caplog.text
        assert "mixed/2" not in running.state.pool.loaded  # loaded for the check only, then freed

        assert http.put("/v1/models/mixed/aliases/production", json={"version": 3}).status_code == 200
        wait_for(
            lambda: http.post("/v1/embeddings", json={"model": "mixed", "input": "x"}).json()["model"] == "mixed/3",
            "the compatible version to be swapped in",
        )


def test_an_alias_never_served_resolves_on_first_use(tmp_path, tiny_model_dir):
    settings, registry = serve(tmp_path, "fresh/1")
    register_trained(registry, "fresh", tiny_model_dir, aliases=("production",))
    register_trained(registry, "fresh", tiny_model_dir)
    with RunningServer(settings) as running, httpx.Client(base_url=running.url, timeout=60) as http:
        registry.set_alias("fresh", "production", 2)
        assert http.post("/v1/embeddings", json={"model": "fresh", "input": "x"}).json()["model"] == "fresh/2"
