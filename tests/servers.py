"""Helpers of the integration tests: free ports, MLflow servers in subprocesses, and a trial
worker that a spawned process runs.

Every server binds 127.0.0.1 only and runs in its own process group, so that stopping it
also stops the processes it starts (uvicorn workers); ``MlflowServer.stop`` is safe to call
twice and on a server that never started.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of the call)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    """The environment of a server subprocess: this one, minus a tracking URI that would
    point elsewhere, without MLflow's background job runner (not needed, slows the start)."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def is_healthy(url: str, timeout: float = 1.0) -> bool:
    """True when ``<url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_for_health(url: str, process: subprocess.Popen, log: Path | None = None,
                    timeout: float = START_TIMEOUT_S) -> None:
    """Poll ``<url>/health`` until it answers; raise RuntimeError (with the log's tail) if the
    process exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_healthy(url):
            return
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with status {process.returncode}"
                               f"{log_tail(log)}")
        time.sleep(0.25)
    raise RuntimeError(f"server for {url} did not answer /health within {timeout:.0f}s"
                       f"{log_tail(log)}")


def log_tail(log: Path | None, lines: int = 30) -> str:
    """The last lines of a server log, for error messages ('' without a log)."""
    if log is None or not Path(log).exists():
        return ""
    text = Path(log).read_text(errors="replace").splitlines()[-lines:]
    return "; log tail:\n" + "\n".join(text)


def start_process(command: list[str], log: Path, env: dict[str, str] | None = None,
                  cwd: Path | None = None) -> subprocess.Popen:
    """Start ``command`` in a new process group, stdout and stderr appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env or server_env(),
                                cwd=cwd, start_new_session=True)


def stop_process_group(process: subprocess.Popen | None,
                       timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group of ``process`` and wait; SIGKILL it if it lingers."""
    if process is None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        _reap_group(process.pid, timeout)
        break
    if process.poll() is None:
        process.wait(timeout=timeout)


def group_alive(pgid: int) -> bool:
    """True while a live (not zombie) process of group ``pgid`` exists."""
    proc = Path("/proc")
    if not proc.is_dir():  # no procfs: ask the kernel (zombies count as alive there)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _reap_group(pgid: int, timeout: float) -> None:
    """Wait until no live process of group ``pgid`` is left (children of the leader);
    SIGKILL stragglers once ``timeout`` has passed."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid):
        if time.monotonic() > deadline:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return
        time.sleep(0.1)


class MlflowServer:
    """An ``mlflow server`` on 127.0.0.1 with a SQLite store and proxied artifacts under
    ``store``. ``start``/``stop`` may be repeated; the port and the store stay the same."""

    def __init__(self, store: Path, port: int | None = None):
        self.store = Path(store)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        self.log = self.store / "server.log"

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.store / 'mlflow.db'}",
            "--artifacts-destination", str(self.store / "artifacts"),
            "--host", HOST, "--port", str(self.port), "--workers", "1",
        ]

    def start(self, timeout: float = START_TIMEOUT_S) -> MlflowServer:
        """Start the server and return once ``/health`` answers."""
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError(f"server {self.uri} is already running")
        self.store.mkdir(parents=True, exist_ok=True)
        self.process = start_process(self.command(), self.log, cwd=self.store)
        try:
            wait_for_health(self.uri, self.process, self.log, timeout)
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (its whole process group) and wait until the port is free."""
        stop_process_group(self.process)
        self.process = None
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while is_healthy(self.uri, timeout=0.5) and time.monotonic() < deadline:
            time.sleep(0.1)


# --- a trial run in a worker process -----------------------------------------------------


def run_trial_worker(spec_path: str, trial_id: str, job_dir: str, uri: str, run_id: str,
                     data: bytes, barrier: Any, results: Any) -> None:
    """Run one trial of the job in ``spec_path`` as a distributed worker would: trial
    directory hooks wrapped in MLflow hooks, result written, run closed.

    ``data`` is the pickled dataset (loaded once by the test, not once per worker). Waits on
    ``barrier`` (after imports) so that all workers train and log at the same time; puts
    ``(trial_id, finished, error)`` on ``results``: ``finished`` is what
    ``MlflowHooks.finish`` returned, ``error`` the text of an exception or None.
    """
    try:
        import pickle

        import torch

        from ticketsearch.jobdir import TrialDirHooks
        from ticketsearch.methods import run_trial
        from ticketsearch.spec import load_job
        from ticketsearch.tracking import MlflowHooks

        torch.set_num_threads(1)
        (trial,) = [t for t in load_job(spec_path).trials() if t.trial_id == trial_id]
        dataset = pickle.loads(data)
        barrier.wait(timeout=START_TIMEOUT_S)
        dir_hooks = TrialDirHooks(Path(job_dir) / "trials" / trial_id)
        hooks = MlflowHooks(dir_hooks, uri, run_id)
        result = run_trial(trial, dataset, hooks)
        dir_hooks.write_result(result)
        results.put((trial_id, hooks.finish(result), None))
    except BaseException as err:  # reported to the test, which fails with it
        results.put((trial_id, False, f"{type(err).__name__}: {err}"))
        raise
