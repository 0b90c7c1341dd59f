"""What every benchmark needs around the thing it measures, written once: free ports, server (and
worker) subprocesses that are always stopped, the machine's load and description, the state of the
code, and timing budgets. Each benchmark keeps only what it measures; `bench/results.py` writes
the results.

Why one module: the benchmarks had grown four server-process classes, five `free_port`s, two
`LoadSampler`s and two `machine_summary`s, each fixed in one copy and not the others (one stopped
only the server's leader process, one left its log file open on errors). A fix here reaches
every benchmark. Stdlib only, so a benchmark that loads no model imports nothing heavy through it.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
# The CLI through this interpreter, not the `duet` script: the command line then holds neither
# "duet serve" nor "duet.cli serve", patterns that others' clean-ups on a shared machine kill by.
DUET_CLI = (sys.executable, "-c", "from duet.cli import app; app()")
# A benchmark's server must not join a Redis that happens to be configured in the caller's shell.
HERMETIC_UNSET = ("REDIS_URL", "DUET_REDIS_URL")


def free_port() -> int:
    """A port nothing listens on now (the OS picks it); a server started right after binds it."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def executable(name: str, hint: str = "pip install -e '.[dev]'") -> str:
    """The console script `name` of this interpreter's environment, else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise ServerError(f"`{name}` is not installed ({hint})")
    return found


# -- processes -------------------------------------------------------------------------------------


class ServerError(RuntimeError):
    """A server (or worker) exited early, or was not ready in time. `reason` says which; the message
    adds the log's tail, for a benchmark that shows it as it is."""

    def __init__(self, reason: str, log_tail: str = "") -> None:
        super().__init__(f"{reason}; log tail:\n{log_tail}" if log_tail else reason)
        self.reason = reason


class ServerProcess:
    """A subprocess in its own session (so a signal to the benchmark never reaches it and stopping it
    ends everything it started), its output in a log file; `stop` or `kill` always reaps it.

    Used for `duet serve` (see `duet_serve`), `duet worker`, infinity-emb and milvus-lite alike.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        unset: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = log_path
        self.extra_env = dict(env or {})
        self.unset = tuple(unset)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    @property
    def base(self) -> str:
        """The server's URL root (`http://127.0.0.1:PORT`)."""
        return f"http://{HOST}:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} was not started"
        return self.proc.pid

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in self.unset}
        return {**env, **self.extra_env}

    def start(self) -> ServerProcess:
        with self.log_path.open("wb") as log:  # the child holds its own copy of the descriptor
            self.proc = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started = time.monotonic()
        return self

    def __enter__(self) -> ServerProcess:
        return self.start() if self.proc is None else self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise ServerError(f"{self.name} exited with code {code}", self.log_tail())

    def wait_ready(self, timeout: float, path: str = "/ready", poll: float = 0.2) -> float:
        """Poll `path` until it answers 200; seconds since the start. Raises ServerError if the process
        exits first or `timeout` passes."""
        url = f"{self.base}{path}"
        while time.monotonic() - self.started < timeout:
            self.check_alive()
            with contextlib.suppress(OSError, urllib.error.URLError), urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return time.monotonic() - self.started
            time.sleep(poll)
        raise ServerError(f"{self.name} not ready after {timeout:.0f}s", self.log_tail())

    def wait_listening(self, timeout: float, poll: float = 0.1) -> float:
        """Wait until the port accepts TCP connections (a gRPC server has no HTTP route to poll)."""
        while time.monotonic() - self.started < timeout:
            self.check_alive()
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port or 0), timeout=1):
                return time.monotonic() - self.started
            time.sleep(poll)
        raise ServerError(f"{self.name} not listening after {timeout:.0f}s", self.log_tail())

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM to the process group, then SIGKILL to whatever of the group is left (a worker's
        training process too), and reap."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace)
        self._signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def kill(self, timeout: float = 15.0) -> None:
        """SIGKILL the whole process group at once (a crash, not a shutdown) and reap the leader."""
        if self.proc is None:
            return
        self._signal(signal.SIGKILL)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired as exc:
            raise ServerError(f"{self.name} (pid {self.proc.pid}) still alive {timeout:.0f}s after SIGKILL") from exc

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 25) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"

    def log_problems(self, limit: int = 5) -> tuple[int, list[str]]:
        """Lines of the log that look like errors: their count and the first few."""
        bad = [
            line.strip()
            for line in self.log_text().splitlines()
            if "Traceback" in line or " ERROR" in line or "ERROR:" in line or "Exception" in line
        ]
        return len(bad), bad[:limit]


def duet_serve(
    data_dir: Path,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    cli: Sequence[str] = DUET_CLI,
    name: str = "duet serve",
) -> ServerProcess:
    """`duet serve` on a fresh free port with its own data dir (not started yet: `start()` or `with`).
    `env` is added to this process's environment, without Redis unless `env` names one."""
    port = free_port()
    return ServerProcess(name, duet_serve_command(data_dir, port, args, cli), log_path, env, HERMETIC_UNSET, port)


def duet_serve_command(data_dir: Path, port: int, args: Sequence[str] = (), cli: Sequence[str] = DUET_CLI) -> list[str]:
    return [*cli, "serve", "--data-dir", str(data_dir), "--host", HOST, "--port", str(port), *args]


def milvus_lite(data_dir: Path, log_path: Path) -> ServerProcess:
    """`milvus-lite server` (a Milvus gRPC server in one Python process) on a fresh free port."""
    port = free_port()
    command = [executable("milvus-lite"), "server", "--data-dir", str(data_dir), "--host", HOST, "--port", str(port)]
    return ServerProcess("milvus-lite server", command, log_path, port=port)


# -- the machine ------------------------------------------------------------------------------------


def nproc() -> int:
    """Cores this process may run on (what `nproc` prints), not the machine's total."""
    return len(os.sched_getaffinity(0))


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def memory_gib() -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def machine_summary(software: Sequence[str], memory: bool = False, gpu: str | None = None, system: bool = False) -> str:
    """`nproc N, CPU[, M GiB RAM[, GPU g];] <software>, Python X[, Linux R]`: one line a results
    section starts with, so a figure can be read against the machine that made it."""
    hardware = [f"nproc {nproc()}", cpu_model()]
    if memory:
        hardware.append(f"{memory_gib():.0f} GiB RAM" + (f", GPU {gpu}" if gpu else ""))
    tail = [*software, f"Python {platform.python_version()}"]
    if system:
        tail.append(f"{platform.system()} {platform.release()}")
    return ", ".join(hardware) + ("; " if memory else ", ") + ", ".join(tail)


def code_state(dirs: Sequence[str]) -> str:
    """The commit the measured code ran from, and uncommitted edits under `dirs` (others may be editing
    the same checkout while a benchmark runs: the figures belong to that exact state). Read it at the
    start of a run."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30)
        return done.stdout

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = git("log", "-1", "--format=%h %cI").strip()
        changed = [line[3:] for line in git("status", "--porcelain", "--", *dirs).splitlines()]
        if not changed:
            return f"commit {head}, {'/, '.join(dirs)}/ clean"
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        return f"commit {head} plus uncommitted changes to {shown}"
    return "unknown (no git)"


class LoadSampler:
    """The 1-minute load average every few seconds, on a daemon thread (others may share the cores)."""

    def __init__(self, every_s: float = 5.0, digits: int = 1) -> None:
        self.digits = digits
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def summary(self) -> str:
        d, values = self.digits, self.samples
        return f"min {min(values):.{d}f}, median {statistics.median(values):.{d}f}, max {max(values):.{d}f}"


@dataclass(frozen=True)
class Budget:
    """How long each timing runs: at least `*_min` calls, then until `*_max` calls or `*_s` seconds;
    `concurrent_s` for a fixed-time run of concurrent clients (0: the benchmark has none)."""

    batch_min: int
    batch_max: int
    batch_s: float
    single_min: int
    single_max: int
    single_s: float
    concurrent_s: float = 0.0
