"""The job lifecycle through real `ticketsearch` processes: one process per job directory,
a killed run's lock taken over, an unreachable cluster refused fast."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import read_events, tiny_job_dict

from ticketsearch.spec import parse_job

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RAY_ADDRESS", None)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ticketsearch.cli", *args]


def _job(tmp_path, epochs_per_round: int):
    """A one-trial CS job (3 rounds + retraining) trained in-process: (spec, storage, job dir)."""
    data = tiny_job_dict(cs={"rounds": 3})
    data["model"]["mlp_hidden"] = [300, 100]
    data["train"].update(epochs_per_round=epochs_per_round,
                         lr_milestones=[epochs_per_round - 10], checkpoint_every=5)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    job = parse_job(data)
    storage = tmp_path / "runs"
    return spec, storage, storage / f"{job.name}-{job.spec_hash()}"


def _start(spec: Path, storage: Path) -> subprocess.Popen:
    return subprocess.Popen(_cli("run", str(spec), "--storage", str(storage), "--in-process",
                                 "--no-tracking"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_epochs(root: Path, epochs: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (root / "driver.lock").exists() and sum(
                len(read_events(d)) for d in root.glob("trials/*")) >= epochs:
            return
        time.sleep(0.05)
    raise AssertionError(f"{root}: the job did not start training in {timeout}s")


def test_a_second_run_of_a_running_job_is_refused_and_nothing_trains_twice(tmp_path):
    spec, storage, root = _job(tmp_path, epochs_per_round=100_000)  # runs until killed
    first = _start(spec, storage)
    try:
        _wait_for_epochs(root, 3)
        refused = [subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for command in (
            _cli("run", str(spec), "--storage", str(storage), "--in-process", "--no-tracking"),
            _cli("resume", root.name, "--storage", str(storage), "--no-tracking"))]
        outcomes = [(p.wait(timeout=120), p.stderr.read()) for p in refused]
        assert first.poll() is None  # the refusals came while it trained
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    for code, stderr in outcomes:
        assert code == 2, stderr[-2000:]
        assert f"pid {first.pid}" in stderr and "Traceback" not in stderr
    (trial_dir,) = root.glob("trials/*")
    steps = [e["step"] for e in read_events(trial_dir)]
    assert len(steps) >= 3 and steps == list(range(len(steps)))  # one trainer: each epoch once


def test_the_lock_of_a_killed_run_is_taken_over(tmp_path):
    spec, storage, root = _job(tmp_path, epochs_per_round=100)
    first = _start(spec, storage)
    _wait_for_epochs(root, 12)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert (root / "driver.lock").exists()
    again = subprocess.run(_cli("run", str(spec), "--storage", str(storage), "--in-process",
                                "--no-tracking"),
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    (trial_dir,) = root.glob("trials/*")
    assert [e["step"] for e in read_events(trial_dir)] == list(range(400))


def test_an_unreachable_cluster_is_refused_fast_and_nothing_is_written(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(tiny_job_dict()))
    storage = tmp_path / "runs"
    started = time.monotonic()
    result = subprocess.run(_cli("run", str(spec), "--storage", str(storage), "--address",
                                 "127.0.0.1:1"), env=_env(), capture_output=True, text=True,
                            timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stderr[-2000:]
    assert "127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 30
    assert not storage.exists()


LOCAL_RAY = """
import json, os, subprocess, sys, time
from ticketsearch.cluster import init_ray
init_ray(None)
import ray
ray.get(ray.remote(lambda: 1).remote())
time.sleep(2)  # every server of the node is up


def tree(root):
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = open(f"/proc/{entry}/stat").read()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo += children.get(pid, [])
    return found


pids = tree(os.getpid())
lines = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
binds = sorted({line.split()[3] for line in lines if any(f"pid={p}," in line for p in pids)})
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "binds": binds}))
ray.shutdown()
"""


def test_a_local_ray_listens_on_loopback_only_and_joins_no_other_cluster(tmp_path):
    """Every port of the local Ray that `run` starts (its metrics ports among them) is bound
    to loopback; and a cluster this machine's Ray would join by default (its address file)
    is not joined."""
    import shutil
    import tempfile

    if shutil.which("ss") is None:
        pytest.skip("needs ss (iproute2) to list listening sockets")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rl", dir="/tmp"))  # short: Ray's socket paths
    (ray_tmp / "ray").mkdir()  # where a plain ray.init() looks for the last `ray start`:
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")
    env = dict(_env(), RAY_TMPDIR=str(ray_tmp))
    done = subprocess.run([sys.executable, "-c", LOCAL_RAY], env=env, capture_output=True,
                          text=True, timeout=180)
    shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["gcs"] != "127.0.0.1:1"
    assert found["binds"], "no listening socket found"
    outside = [b for b in found["binds"] if b.rsplit(":", 1)[0] not in
               ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")]
    assert outside == []


def test_a_run_prints_no_ray_tune_or_mlflow_notices(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(tiny_job_dict(cs={"rounds": 1})))
    done = subprocess.run(_cli("run", str(spec), "--storage", str(tmp_path / "runs")),
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout + done.stderr
    for notice in ("Token authentication is enabled", "Configuration for experiment",
                   "TensorBoard", "Creating initial MLflow database tables",
                   "Started a local Ray instance", "View detailed results here"):
        assert notice not in text, notice
    assert "results in" in done.stdout
