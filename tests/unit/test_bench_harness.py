"""bench/harness.py, the one process and machine harness every benchmark uses: its servers are found
ready, stopped with everything they started, kept apart from the caller's Redis, and explained when
they die. Real subprocesses (a stdlib HTTP server, small Python scripts), no model, each well under a
second; every wait is bounded but nothing is judged by how long it took."""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import pytest

from bench.harness import (
    DUET_CLI,
    Budget,
    LoadSampler,
    ServerError,
    ServerProcess,
    code_state,
    duet_serve,
    free_port,
    machine_summary,
)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def alive(pid: int) -> bool:
    """Exists and is not a zombie (an orphan's zombie may wait for a reaper that never comes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_for(condition, what: str, limit: float = 30.0) -> None:
    end = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < end, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_a_server_is_found_ready_and_stopped(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)]
    with ServerProcess("http.server", command, tmp_path / "server.log", port=port) as server:
        assert server.wait_ready(60, path="/") >= 0
        assert server.wait_listening(60) >= 0
        assert server.running()
    assert not server.running() and server.proc is not None and server.proc.returncode is not None


def test_a_server_that_dies_early_is_explained_with_its_log(tmp_path):
    command = python("import sys; print('cannot bind: port taken', flush=True); sys.exit(3)")
    server = ServerProcess("broken", command, tmp_path / "broken.log", port=free_port()).start()
    with pytest.raises(ServerError) as raised:
        server.wait_ready(60)
    assert raised.value.reason == "broken exited with code 3"
    assert "cannot bind: port taken" in str(raised.value)
    server.stop()


def test_stop_ends_what_the_server_started_too(tmp_path):
    spawner = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    server = ServerProcess("spawner", python(spawner), tmp_path / "spawner.log").start()
    wait_for(lambda: server.log_text().strip(), "the child's pid in the log")
    child = int(server.log_text().split()[0])
    assert alive(child)
    server.stop(grace=10)
    wait_for(lambda: not alive(child), "the child to end with its group")


def test_kill_is_immediate_and_reaps(tmp_path):
    server = ServerProcess("sleeper", python("import time; time.sleep(120)"), tmp_path / "sleeper.log").start()
    server.kill()
    assert server.proc is not None and server.proc.returncode == -9


def test_a_server_gets_its_environment_without_the_callers_redis(tmp_path, monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://somewhere:6379/0")
    monkeypatch.setenv("DUET_REDIS_URL", "redis://elsewhere:6379/0")
    show = python("import os; print(os.environ.get('REDIS_URL'), os.environ.get('DUET_X'), os.environ.get('HOME'))")
    server = duet_serve(tmp_path / "data", tmp_path / "env.log", env={"DUET_X": "1"})
    assert server.command[: len(DUET_CLI)] == list(DUET_CLI)
    assert server.command[len(DUET_CLI) :] == [
        "serve",
        "--data-dir",
        str(tmp_path / "data"),
        "--host",
        "127.0.0.1",
        "--port",
        str(server.port),
    ]
    server.command = show  # the same environment, a command that prints it
    with server:
        assert server.proc is not None
        server.proc.wait(60)
    assert server.log_text().split() == ["None", "1", str(Path.home())]

    server = duet_serve(tmp_path / "data", tmp_path / "env2.log", env={"REDIS_URL": "redis://mine:6379/0"})
    server.command = show
    with server:
        assert server.proc is not None
        server.proc.wait(60)
    assert server.log_text().split()[0] == "redis://mine:6379/0"


def test_log_problems_counts_error_lines(tmp_path):
    log = tmp_path / "x.log"
    log.write_text("INFO ready\nTraceback (most recent call last):\nValueError: no\nx ERROR y\nfine\n")
    server = ServerProcess("x", ["true"], log)
    assert server.log_problems(limit=1) == (2, ["Traceback (most recent call last):"])
    assert server.log_tail(2) == "x ERROR y\nfine"
    assert ServerProcess("y", ["true"], tmp_path / "missing.log").log_tail() == "(no log)"


def test_machine_summary_and_code_state_read_the_machine_and_the_checkout():
    plain = machine_summary(["torch 9"])
    assert plain.startswith("nproc ") and ", torch 9, Python 3." in plain and "GiB" not in plain
    full = machine_summary(["faiss 1"], memory=True, gpu="H200", system=True)
    assert " GiB RAM, GPU H200; faiss 1, Python 3." in full and full.endswith(platform.release())
    state = code_state(("bench",))
    assert state.startswith("commit ") and ("bench/ clean" in state or "uncommitted changes to bench/" in state)


def test_load_sampler_and_budget():
    sampler = LoadSampler(every_s=60, digits=2)
    sampler.stop()
    parts = sampler.summary().split(", ")
    assert [p.split()[0] for p in parts] == ["min", "median", "max"]
    assert all(len(p.split()[1].split(".")[1]) == 2 for p in parts)
    budget = Budget(batch_min=1, batch_max=2, batch_s=1.0, single_min=1, single_max=2, single_s=1.0)
    assert budget.concurrent_s == 0.0
