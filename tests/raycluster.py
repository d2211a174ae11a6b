"""A real multi-node Ray cluster on 127.0.0.1 for the integration tests, with token auth on.

``ray_cluster()`` does what a user does on real machines: ``ray get-auth-token --generate``
on the head (a fresh token in a private HOME), then ``ray start --head`` and ``ray start
--address`` with ``RAY_AUTH_MODE=token`` and that token file. Each node gets its own temp
dir, 1 CPU, no GPU and optional custom resources, so a test can tell the nodes apart.

The cluster is stopped by killing exactly its own processes (those whose command line or
working directory names the cluster's private folder, and their descendants): ``ray stop``
would stop every Ray process on the machine, including other sessions' clusters.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from servers import free_port

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
RAY = VENV_BIN / "ray"
HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
ENV_NAMES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
             "RAY_AUTH_MODE")


@dataclass
class Cluster:
    address: str            # the Job API (dashboard) URL
    env: dict[str, str]     # a client environment that holds the token
    token_path: Path
    root: Path              # private folder: Ray temp dirs, token, storage

    def token(self) -> str:
        """The cluster's token (what ``ray get-auth-token`` prints on the head)."""
        return self.token_path.read_text().strip()


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 60.0):
    """The real ``ticketsearch`` command in a subprocess (what a user runs)."""
    base = dict(os.environ if env is None else env)
    base["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "ticketsearch.cli", *argv], env=base,
                          capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- processes


def _pids_with_ppid() -> dict[int, int]:
    """pid -> parent pid of every process on the machine."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def cmdline(pid: int) -> str:
    """The command line of ``pid`` ('' once it is gone)."""
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def _cwd(pid: int) -> str:
    try:
        return os.readlink(Path("/proc") / str(pid) / "cwd")
    except OSError:
        return ""


def cluster_pids(marker: str) -> set[int]:
    """Processes whose command line or working directory contains ``marker`` (the cluster's
    private temp dir), with all their descendants (workers, job drivers). The working
    directory catches a job's entrypoint that outlived its supervisor (re-parented to init)."""
    parents = _pids_with_ppid()
    found = {pid for pid in parents if marker in cmdline(pid) or marker in _cwd(pid)}
    found.discard(os.getpid())
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


def _signal_all(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_cluster(marker: str, timeout: float = 5.0) -> None:
    """SIGTERM then SIGKILL this cluster's processes, until none is left (checked)."""
    for sig in (signal.SIGTERM, signal.SIGKILL, signal.SIGKILL):
        pids = cluster_pids(marker)
        if not pids:
            return
        _signal_all(pids, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and cluster_pids(marker):
            time.sleep(0.2)
    left = {pid: cmdline(pid)[:120] for pid in cluster_pids(marker)}
    assert not left, f"Ray processes survived the cluster's shutdown: {left}"


# --------------------------------------------------------------------------- the cluster


def _ray(args: list[str], env: dict[str, str], cwd: Path) -> None:
    done = subprocess.run([str(RAY), *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=START_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"`ray {' '.join(args)}` failed ({done.returncode}):\n"
                           f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")


def make_token(root: Path, env: dict[str, str]) -> Path:
    """What a user does on the head: ``ray get-auth-token --generate`` (writes
    ~/.ray/auth_token; here HOME is a private folder)."""
    home = root / "home"
    home.mkdir()
    done = subprocess.run([str(RAY), "get-auth-token", "--generate"], env={**env, "HOME": str(home)},
                          capture_output=True, text=True, timeout=START_TIMEOUT_S)
    token_path = home / ".ray" / "auth_token"
    assert done.returncode == 0 and token_path.exists(), done.stderr
    assert done.stdout.strip() == token_path.read_text().strip()
    return token_path


def wait_for_job_api(address: str, env: dict[str, str]) -> None:
    """Until the dashboard answers /api/version with the token (and not without it)."""
    import requests

    token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            answer = requests.get(f"{address}/api/version", timeout=2,
                                  headers={"Authorization": f"Bearer {token}"})
            if answer.status_code == 200:
                assert requests.get(f"{address}/api/version", timeout=2).status_code == 401
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the Ray job API at {address} did not answer in {START_TIMEOUT_S:.0f}s")


def _node_args(temp_dir: Path, resources: dict[str, float] | None) -> list[str]:
    """Arguments every node gets: 1 CPU, no GPU, a small object store, its own temp dir."""
    args = ["--node-ip-address", HOST, "--num-cpus", "1", "--num-gpus", "0",
            "--object-store-memory", str(100 * 2**20), "--disable-usage-stats",
            "--temp-dir", str(temp_dir), "--dashboard-agent-listen-port", str(free_port())]
    if resources:
        args += ["--resources", json.dumps(resources)]
    return args


@contextlib.contextmanager
def ray_cluster(head_resources: dict[str, float] | None = None,
                worker_resources: dict[str, float] | None = None,
                head_env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """A head (dashboard on) and one worker node on 127.0.0.1, 1 CPU each, token auth on,
    each node with the given custom resources; stopped (only its own processes) on exit.
    ``head_env`` is added to the head's environment only (what its Ray processes, job drivers
    included, inherit), as a head node's start command would export it.

    Everything lives under one private folder; its path is how the shutdown finds the
    cluster's processes. One temp dir per node, as on separate machines: nodes sharing one
    would share the runtime_resources folder, and one node's unpacking of a job's
    working_dir would replace the folder the other node's driver runs in."""
    root = Path(tempfile.mkdtemp(prefix="tsr-", dir="/tmp"))  # short: Ray's socket paths
    dropped = ENV_NAMES + ("PYTHONPATH", "MLFLOW_TRACKING_URI")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` = this venv
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["OMP_NUM_THREADS"] = "1"
    try:
        token_path = make_token(root, env)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
        gcs_port, dashboard_port = free_port(), free_port()
        _ray(["start", "--head", "--port", str(gcs_port), "--dashboard-host", HOST,
              "--dashboard-port", str(dashboard_port), "--include-dashboard", "true",
              "--ray-client-server-port", str(free_port()),
              *_node_args(root / "head", head_resources)], {**env, **(head_env or {})}, root)
        _ray(["start", "--address", f"{HOST}:{gcs_port}",
              *_node_args(root / "node", worker_resources)], env, root)
        raylets = [pid for pid in cluster_pids(str(root)) if "raylet/raylet" in cmdline(pid)]
        assert len(raylets) == 2, "expected a head and a worker raylet"
        address = f"http://{HOST}:{dashboard_port}"
        wait_for_job_api(address, env)
        yield Cluster(address=address, env=env, token_path=token_path, root=root)
    finally:
        stop_cluster(str(root))
        shutil.rmtree(root, ignore_errors=True)
