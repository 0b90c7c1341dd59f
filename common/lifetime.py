"""What ties a Duet process to its data dir and to its parent: the data-dir lock and death
with the parent. Stdlib only, so `service` and the CLI share it.

One server per data dir: two would each replay and write the same collections and indexes,
and acknowledged items would go missing from search. `duet serve` (and every app's lifespan)
holds an exclusive `flock` on `<data_dir>/collections/.duet.lock` for its whole life; the kernel
releases it when the process ends, `kill -9` included, so a stale lock never needs cleaning up.
The file holds the holder's pid, for the refusal message only (the lock itself is the truth).
It lives in the collections folder because that is what one process must own: API replicas
may share a data dir (datasets, checkpoints) when each mounts its own collections folder over
it (README, "Scaling out"), and they then hold different locks.

The lock is per process, counted: apps created in one process on one data dir (tests) share
it. The embedded job worker does not take it: its server holds it, and the worker dies with
its server (`exit_with_parent`), so a worker of a killed server never writes beside a new one.
"""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.layout import collections_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; run one server per data dir by hand
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_NAME = ".duet.lock"  # in the collections folder; dot-names are no collection


def _lock_file(data_dir: Path) -> Path:
    return collections_dir(data_dir) / LOCK_NAME


PR_SET_PDEATHSIG = 1
PARENT_POLL_SECONDS = 1.0


class DataDirError(Exception):
    """The data dir cannot be used; the message is one line for the user, naming the path."""


class DataDirUnwritableError(DataDirError):
    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot write to the data dir {path} (DUET_DATA_DIR or --data-dir): {reason}")
        self.path = path


class DataDirLockedError(DataDirError):
    def __init__(self, path: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "another process"
        super().__init__(
            f"the data dir {path} is in use by another Duet server ({holder}), which has its collections "
            "open; stop it, or point DUET_DATA_DIR (--data-dir) at another folder"
        )
        self.path = path
        self.pid = pid


@dataclass
class _Held:
    fd: int
    count: int


_held: dict[Path, _Held] = {}
_mutex = threading.Lock()


class DataDirLease:
    """A hold on the data-dir lock; `release()` once (the process's last release unlocks)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._released = False

    def release(self) -> None:
        with _mutex:
            if self._released:
                return
            self._released = True
            held = _held.get(self.path)
            if held is None:
                return
            held.count -= 1
            if held.count == 0:
                del _held[self.path]
                os.close(held.fd)  # closing the only descriptor drops the flock


def check_writable(data_dir: Path) -> Path:
    """Create the data dir if needed and prove a file can be written there; returns it resolved."""
    path = data_dir.expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".duet-write-test-"):
            pass
    except OSError as exc:
        raise DataDirUnwritableError(path, exc.strerror or str(exc)) from None
    return path


def hold_data_dir(data_dir: Path, wait_seconds: float = 2.0) -> DataDirLease:
    """Take (or share, within this process) the exclusive lock on `data_dir`.

    Raises `DataDirLockedError` naming the holder's pid when another process holds it for longer
    than `wait_seconds` (a server killed a moment ago may still be exiting), and
    `DataDirUnwritableError` when the folder or its lock file cannot be written.
    """
    path = check_writable(data_dir)
    with _mutex:
        if path in _held:
            _held[path].count += 1
            return DataDirLease(path)
        try:
            _lock_file(path).parent.mkdir(exist_ok=True)
            fd = os.open(_lock_file(path), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DataDirUnwritableError(path, exc.strerror or str(exc)) from None
        try:
            _lock(fd, path, wait_seconds)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        _held[path] = _Held(fd, 1)
    return DataDirLease(path)


def _lock(fd: int, path: Path, wait_seconds: float) -> None:
    if fcntl is None:  # pragma: no cover
        return
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise DataDirLockedError(path, _read_pid(fd)) from None
            time.sleep(0.1)
        except OSError as exc:  # a filesystem without locks (some network mounts): say so, go on
            logger.warning("cannot lock the data dir %s (%s): make sure no other server uses it", path, exc)
            return


def _read_pid(fd: int) -> int | None:
    try:
        return int(os.pread(fd, 32, 0).decode().strip() or 0) or None
    except (OSError, ValueError):
        return None


def server_pid(data_dir: Path) -> int | None:
    """The pid of the process holding `data_dir`'s lock, or None when nobody holds it.

    Probes with a shared lock, released at once, so it never blocks a server for long (and
    `hold_data_dir` waits a moment before refusing anyway)."""
    path = data_dir.expanduser().resolve()
    try:
        fd = os.open(_lock_file(path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if fcntl is None:  # pragma: no cover
            return _read_pid(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        return None  # we got it: nobody holds it (closing the descriptor releases it)
    finally:
        os.close(fd)


def exit_with_parent(parent: int) -> None:
    """Kill this process (SIGKILL: nothing more gets written) when process `parent` ends.

    Linux: `PR_SET_PDEATHSIG`, immediate. Everywhere, and for a parent that ended before the
    prctl took effect: a thread polls `getppid()` each second. PDEATHSIG fires when the
    *thread* that started us ends, so the parent must start us from a long-lived thread (the
    server's event loop does)."""

    def alive() -> bool:
        return os.getppid() == parent

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the polling thread below does it
    _exit_unless(alive, f"parent pid {parent}")  # after the prctl: a parent gone before it took effect
    _watch(alive, f"parent pid {parent}")


def exit_with_process(pid: int) -> None:
    """Kill this process when process `pid` (not our parent) ends, polled each second."""
    _watch(lambda: _alive(pid), f"pid {pid}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _exit_unless(alive: Callable[[], bool], what: str) -> None:
    if not alive():
        logger.error("%s is gone; exiting", what)
        os.kill(os.getpid(), signal.SIGKILL)


def _watch(alive: Callable[[], bool], what: str) -> None:
    def watch() -> None:
        while alive():
            time.sleep(PARENT_POLL_SECONDS)
        _exit_unless(alive, what)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()
