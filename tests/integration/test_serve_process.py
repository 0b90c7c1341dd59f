"""A real `duet serve` process: one server per data dir, clear refusals before start-up, JSON
lines only, and its embedded job worker dying with it on `kill -9`."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import free_port


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DUET_") and k not in ("REDIS_URL",)}
    env.update(
        DUET_DATA_DIR=str(data_dir),
        DUET_LOG_FORMAT="json",
        DUET_REGISTER_DEFAULT_MODELS="false",
        DUET_PRELOAD_MODELS='["tiny"]',
    )
    env.update(extra)
    return env


def _serve(data_dir: Path, port: int, out: Path | None = None, **extra: str) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "duet.cli", "serve", "--port", str(port)]
    sink = out.open("wb") if out is not None else subprocess.PIPE
    return subprocess.Popen(command, env=_env(data_dir, **extra), stdout=sink, stderr=sink)


def _refused(data_dir: Path, port: int) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "duet.cli", "serve", "--port", str(port)]
    env = _env(data_dir, DUET_LOG_FORMAT="text")
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def _running(pid: int) -> bool:
    """Alive and not a zombie (a container's pid 1 may never reap an orphan)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(errors="replace").splitlines() if line.strip()]


def _records(path: Path) -> list[dict]:
    records = []
    for line in _lines(path):
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


class Served:
    def __init__(self, data_dir: Path, port: int, log: Path, process: subprocess.Popen[bytes]) -> None:
        self.data_dir, self.port, self.log, self.process = data_dir, port, log, process

    def worker_pid(self) -> int:
        for record in _records(self.log):
            if record.get("message", "").startswith("local job worker started (pid "):
                return int(record["message"].split("pid ")[1].rstrip(")"))
        raise AssertionError("no worker start in the log")

    def wait_for(self, message: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(message in record.get("message", "") for record in _records(self.log)):
                return
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError(f"no {message!r} in the log: {self.log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir) -> Iterator[Served]:
    """`duet serve` in its own process, preloading a small model (so transformers runs)."""
    from encoders.encoder import describe, load_sentence_transformer
    from registry.manifest import Manifest
    from registry.store import ModelRegistry

    root = tmp_path_factory.mktemp("served")
    data_dir = root / "data"
    registry = ModelRegistry.embedded(data_dir / "registry")
    manifest = Manifest(contract=describe(load_sentence_transformer(tiny_model_dir)), trained=True)
    registry.register("tiny", tiny_model_dir, manifest, aliases=("production",))
    port = free_port()
    log = root / "serve.log"
    process = _serve(data_dir, port, out=log)
    running = Served(data_dir, port, log, process)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert process.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        running.wait_for("waiting for jobs")  # the worker's own start-up lines are in the log too
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(60)


def test_a_second_server_on_the_data_dir_is_refused_naming_the_first(served):
    result = _refused(served.data_dir, free_port())
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert str(served.data_dir.resolve()) in lines[0] and f"pid {served.process.pid}" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_a_busy_port_is_refused_before_start_up(served, tmp_path):
    result = _refused(tmp_path / "other", served.port)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{served.port}" in lines[0] and "DUET_PORT" in lines[0], result.stderr
    assert not (tmp_path / "other" / "registry").exists()  # refused before the registry, models or a worker


def test_an_unwritable_data_dir_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = _refused(blocker / "data", free_port())
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(blocker / "data") in lines[0] and "DUET_DATA_DIR" in lines[0], result.stderr


def test_every_line_of_a_server_start_is_json(served):
    lines = _lines(served.log)
    assert any("mlflow" in line or "alembic" in line for line in lines)  # the libraries did speak
    for line in lines:
        assert isinstance(json.loads(line), dict), line


def test_kill_9_of_the_server_takes_its_worker_and_frees_the_data_dir(served):
    """Last in this module: it kills the module's server."""
    from common.lifetime import server_pid

    worker = served.worker_pid()
    assert _running(worker)
    assert server_pid(served.data_dir) == served.process.pid
    served.process.send_signal(signal.SIGKILL)
    served.process.wait(30)
    deadline = time.monotonic() + 30  # PR_SET_PDEATHSIG is immediate; the poll fallback takes ~1 s
    while _running(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(worker), "the embedded worker outlived its server"
    assert server_pid(served.data_dir) is None  # the kernel dropped the lock with the process
