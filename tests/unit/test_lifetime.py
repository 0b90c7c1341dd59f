"""The data-dir lock (one server per data dir) and dying with the parent process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from common.lifetime import DataDirLockedError, DataDirUnwritableError, hold_data_dir, server_pid

HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from common.lifetime import DataDirError, hold_data_dir
    try:
        hold_data_dir(Path(sys.argv[1]), wait_seconds=0)
    except DataDirError as exc:
        print(exc, flush=True)
        sys.exit(1)
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
    """
)


def _hold_elsewhere(data_dir, seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLD, str(data_dir), str(seconds)], stdout=subprocess.PIPE, text=True
    )


def test_another_process_is_refused_with_the_holders_pid(tmp_path):
    lease = hold_data_dir(tmp_path / "data")
    try:
        other = _hold_elsewhere(tmp_path / "data", 0)
        out, _ = other.communicate(timeout=60)
        assert other.returncode == 1
        assert f"pid {os.getpid()}" in out and str((tmp_path / "data").resolve()) in out
        assert server_pid(tmp_path / "data") == os.getpid()
    finally:
        lease.release()
    assert server_pid(tmp_path / "data") is None
    again = _hold_elsewhere(tmp_path / "data", 0)
    assert again.communicate(timeout=60)[0].strip() == "held" and again.returncode == 0


def test_apps_in_one_process_share_the_lock_until_the_last_release(tmp_path):
    first = hold_data_dir(tmp_path)
    second = hold_data_dir(tmp_path)
    first.release()
    first.release()  # twice is once
    assert server_pid(tmp_path) == os.getpid()
    second.release()
    assert server_pid(tmp_path) is None


def test_a_killed_holder_frees_the_data_dir(tmp_path):
    holder = _hold_elsewhere(tmp_path, 600)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DataDirLockedError, match=f"pid {holder.pid}"):
        hold_data_dir(tmp_path, wait_seconds=0)
    holder.kill()  # -9: no clean-up runs; the kernel drops the flock
    holder.wait(30)
    hold_data_dir(tmp_path, wait_seconds=0).release()


def test_an_unwritable_data_dir_names_the_path_and_the_setting(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DataDirUnwritableError, match="DUET_DATA_DIR") as raised:
        hold_data_dir(blocker / "data")
    assert str(blocker / "data") in str(raised.value)


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from common.lifetime import exit_with_parent
    exit_with_parent(int(sys.argv[1]))
    print(os.getpid(), flush=True)
    time.sleep(600)
    """
)
MIDDLE = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(os.getpid())], stdout=subprocess.PIPE, text=True)
    print(child.stdout.readline().strip(), flush=True)
    time.sleep(600)
    """
)


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_child_dies_with_its_parent_on_kill_9():
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, CHILD], stdout=subprocess.PIPE, text=True)
    child = int(middle.stdout.readline())
    assert _running(child)
    middle.kill()
    middle.wait(30)
    deadline = time.monotonic() + 30
    while _running(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(child)


def test_a_child_whose_parent_is_already_gone_exits_at_once():
    gone = subprocess.run([sys.executable, "-c", CHILD, "1"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == -9 and gone.stdout == ""
