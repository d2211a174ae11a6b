"""The job directory's lock and the trial directory's record of attempts."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ticketsearch.jobdir import LOCK_FILE, JobLock, JobLockedError

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from ticketsearch.jobdir import JobLock
lock = JobLock(sys.argv[1])
lock.acquire()
print("held", flush=True)
time.sleep(60)
"""


def _holder(root: Path) -> subprocess.Popen:
    """A real other process holding ``root``'s lock (until killed)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root)], env=env,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_cannot_take_a_held_job(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(JobLockedError, match=f"pid {holder.pid}"):
            JobLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_killed_holder_is_taken_over(tmp_path):
    holder = _holder(tmp_path)
    holder.kill()
    holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # SIGKILL left it behind
    lock = JobLock(tmp_path)
    lock.acquire()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_reused_pid_does_not_keep_a_dead_lock(tmp_path):
    """A lock naming this process's pid but another start time was left by a dead process
    whose pid was reused."""
    (tmp_path / LOCK_FILE).write_text(json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "start": "1", "started": 0}))
    other = JobLock(tmp_path)
    assert other.holder() is None
    other.acquire()
    other.release()


def test_another_hosts_lock_holds_until_its_heartbeat_stops(tmp_path):
    path = tmp_path / LOCK_FILE
    path.write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": time.time()}))
    with pytest.raises(JobLockedError, match="elsewhere"):
        JobLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(path, (old, old))  # its holder stopped refreshing it an hour ago
    lock = JobLock(tmp_path)
    lock.acquire()
    lock.release()


def test_a_holder_refreshes_its_lock(tmp_path, monkeypatch):
    monkeypatch.setattr("ticketsearch.jobdir.HEARTBEAT_S", 0.05)
    lock = JobLock(tmp_path)
    lock.acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK_FILE, (old, old))
    time.sleep(0.3)
    assert time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 5
    lock.release()
