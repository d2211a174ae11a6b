"""Ray orchestration on a real local Ray (one session-wide instance, 2 CPUs + 1 logical GPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import kill_after_epochs, read_events, tiny_job_dict

from ticketsearch.cli import main
from ticketsearch.cluster import ClusterError, check_resources_fit, run_job_on_ray
from ticketsearch.jobdir import read_result
from ticketsearch.spec import parse_job

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[1]


def quiet(_):
    pass


def test_sweep_of_four_cs_settings_and_an_imp_chain(ray_local, tmp_path):
    data = tiny_job_dict(cs={"rounds": 2, "sweep": {"mask_init": [0.0, -0.01],
                                                    "seed": [0, 1]}},
                         imp={"rounds": 3})
    data["resources"] = {"cpus": 0.4}
    job = parse_job(data)
    summary = run_job_on_ray(job, storage=tmp_path, echo=quiet, track=False)
    cs, imp = summary["report"]["methods"]["cs"], summary["report"]["methods"]["imp"]
    assert cs["trials"] == 4 and len(cs["tickets"]) == 4
    assert [t["name"] for t in imp["tickets"]] == ["round-01", "round-02", "round-03"]
    assert cs["search_epochs"] == {"critical_path": 8, "total": 32}
    assert cs["retrain_epochs"] == {"critical_path": 4, "total": 16}
    assert imp["search_epochs"] == {"critical_path": 12, "total": 12}
    assert summary["failed_trials"] == []
    for trial in summary["trials"]:
        assert trial["ledger"]["recomputed_epochs"] == 0
        assert trial["ledger"]["attempts"] == 1
    # the same spec again is the same job: nothing is trained twice
    lines = []
    again = run_job_on_ray(job, storage=tmp_path, echo=lines.append, track=False)
    assert again["trials"] == summary["trials"]
    assert not any("resuming" in line for line in lines)  # no Tune run was even needed


def test_the_progress_callback_pickles_once_print_is_patched(monkeypatch):
    """Tune pickles its callbacks into its experiment state; a job whose echo is ``print``
    must still start when something in the process has replaced ``builtins.print``."""
    import builtins

    from ray import cloudpickle

    from ticketsearch.cluster import make_progress

    callback = make_progress({"a": "cs s0=0"}, print)
    monkeypatch.setattr(builtins, "print", lambda *args, **kwargs: None)
    restored = cloudpickle.loads(cloudpickle.dumps(callback))
    restored.printer.say("a line")  # a restored printer prints (to the patched print here)


def test_progress_table_shows_running_trials_and_finished_count():
    from ticketsearch.cluster import ProgressPrinter

    lines, now = [], [1000.0]
    printer = ProgressPrinter({"a": "cs s0=0", "b": "imp global", "c": "dense"}, lines.append,
                              every_s=0, planned={"a": 510, "b": 2635, "c": 85},
                              clock=lambda: now[0])
    now[0] += 10
    printer.result("a", {"step": 2, "epochs_planned": 510, "phase": "search", "round": 0,
                         "sparsity": 0.5, "test_acc": 0.9})
    now[0] += 50
    printer.result("a", {"step": 12, "epochs_planned": 510, "phase": "search", "round": 0,
                         "sparsity": 0.5, "test_acc": 0.9})
    printer.result("b", {"step": 2635, "epochs_planned": 2635, "phase": "done"})
    table = lines[-1]
    assert table.splitlines()[0] == ("1/3 trials finished, 1 running, 1 pending; epochs "
                                     "2647/3230; elapsed 1:00, ETA 48:35; running:")
    # 10 epochs in 50 s since the first result; 583 to go (b was done before this session)
    assert "cs s0=0" in table and "12/510" in table and "0.9000" in table
    rows = table.splitlines()[2:]
    assert len(rows) == 1 and "imp global" not in rows[0]
    printer.complete("b", {"step": 2635, "tickets": 30, "wall_clock_s": 40.0})
    assert lines[-1] == "imp global: finished, 2635 epochs, 30 tickets, 40.0s"


def test_quarter_gpu_trials_run_concurrently_on_one_logical_gpu(ray_local, tmp_path):
    data = tiny_job_dict(cs={"rounds": 3, "sweep": {"seed": [0, 1, 2, 3]}})
    data["train"]["epochs_per_round"] = 20  # long enough to outlast the actors' staggered start
    data["model"]["mlp_hidden"] = [300, 100]
    data["resources"] = {"cpus": 0.25, "gpus": 0.25}
    job = parse_job(data)
    summary = run_job_on_ray(job, storage=tmp_path, echo=quiet, track=False)
    windows = []
    for trial in summary["trials"]:
        events = read_events(Path(summary["job_dir"]) / "trials" / trial["trial_id"])
        assert events[0]["kind"] == "epoch"
        assert trial["ledger"]["device"] == "cpu"  # a logical GPU: CUDA is never touched
        (window,) = trial["ledger"]["attempt_windows"]
        windows.append(window)
    latest_start = max(start for start, _ in windows)
    earliest_end = min(end for _, end in windows)
    assert latest_start < earliest_end, windows  # all four were running at the same time


def test_impossible_resource_request_fails_fast(ray_local, tmp_path):
    data = tiny_job_dict(cs={"rounds": 1})
    data["resources"] = {"cpus": 1, "gpus": 2}
    job = parse_job(data)
    with pytest.raises(ClusterError, match="resources.gpus=2"):
        check_resources_fit(job.trials(), [{"CPU": 2.0, "GPU": 1.0}])
    started = time.monotonic()
    with pytest.raises(ClusterError, match="no node of the cluster"):
        run_job_on_ray(job, storage=tmp_path, echo=quiet, track=False)
    assert time.monotonic() - started < 30


def test_cli_refuses_impossible_resources_with_exit_2(ray_local, tmp_path, capsys):
    spec = tmp_path / "big.yaml"
    spec.write_text(json.dumps(tiny_job_dict(cs={"rounds": 1})
                               | {"resources": {"cpus": 64}}))
    assert main(["run", str(spec), "--storage", str(tmp_path / "runs"), "--no-tracking"]) == 2
    err = capsys.readouterr().err
    assert "resources.cpus=64" in err and "Traceback" not in err


def test_killed_worker_resumes_from_its_checkpoint(ray_local, tmp_path):
    data = tiny_job_dict(cs={"rounds": 2})
    data["model"]["mlp_hidden"] = [300, 100]
    data["train"].update(epochs_per_round=30, lr_milestones=[20], checkpoint_every=5)
    data["resources"] = {"cpus": 1, "max_failures": 2}
    job = parse_job(data)
    (trial,) = job.trials()
    trial_dir = tmp_path / f"{job.name}-{job.spec_hash()}" / "trials" / trial.trial_id
    thread, killed = kill_after_epochs(trial_dir, 37)
    summary = run_job_on_ray(job, storage=tmp_path, echo=quiet, track=False)
    thread.join()
    assert "pid" in killed, "the trial finished before it could be killed"
    (result,) = summary["trials"]
    ledger = result["ledger"]
    assert ledger["epochs"] == {"search": 60, "retrain": 30, "total": 90}  # nothing double-counted
    assert ledger["attempts"] == 2
    assert 1 <= ledger["recomputed_epochs"] <= 5  # at most checkpoint_every epochs were lost
    steps = [e["step"] for e in read_events(trial_dir)]
    assert steps == list(range(90))
    assert int((trial_dir / "worker.pid").read_text()) != killed["pid"]


def _safe_events(trial_dir: Path):
    try:
        return read_events(trial_dir, kind="epoch")
    except (json.JSONDecodeError, FileNotFoundError):
        return []


def test_killed_driver_resumes_and_no_trial_runs_twice(tmp_path):
    data = tiny_job_dict(cs={"rounds": 2, "sweep": {"mask_init": [0.0, -0.01]}}, imp={"rounds": 8})
    data["model"]["mlp_hidden"] = [300, 100]
    data["train"].update(epochs_per_round=10, lr_milestones=[8], checkpoint_every=2)
    data["resources"] = {"cpus": 1}
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    job = parse_job(data)
    root = tmp_path / "runs" / f"{job.name}-{job.spec_hash()}"
    command = [sys.executable, "-m", "ticketsearch.cli", "run", str(spec), "--storage",
               str(tmp_path / "runs"), "--no-tracking"]
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_ADDRESS="")
    env.pop("RAY_ADDRESS")
    driver = subprocess.Popen(command, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    imp_dir = root / "trials" / "imp-global-p=0.2-seed=0"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        finished = [d for d in (root / "trials").glob("*") if (d / "result.json").exists()] \
            if (root / "trials").exists() else []
        if finished and len(_safe_events(imp_dir)) >= 25:
            break
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray it started
    driver.wait()
    finished_before = {d.name: (d / "result.json").read_text() for d in finished}
    assert finished_before and read_result(imp_dir) is None
    resume = [sys.executable, "-m", "ticketsearch.cli", "resume", root.name, "--storage",
              str(tmp_path / "runs"), "--no-tracking"]
    rerun = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    for name, text in finished_before.items():
        assert (root / "trials" / name / "result.json").read_text() == text  # not run again
    imp = read_result(imp_dir)
    assert imp.ledger.attempts == 2
    assert imp.ledger.epochs["search"] == 80
    assert [e["step"] for e in read_events(imp_dir)] == list(range(90))
    summary = json.loads((root / "summary.json").read_text())
    assert len(summary["trials"]) == 3
    assert "resuming the Ray Tune experiment" in rerun.stdout
    assert summary["orchestration"]["critical_path_trial_s"] > 0


def test_a_trial_error_no_retry_can_mend_is_not_retried_and_ends_the_output(ray_local,
                                                                            tmp_path, capsys):
    data = tiny_job_dict(cs={"rounds": 1})
    data["resources"] = {"cpus": 1, "max_failures": 3}
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    job = parse_job(data)
    (trial,) = job.trials()
    root = tmp_path / "runs" / f"{job.name}-{job.spec_hash()}"
    trial_dir = root / "trials" / trial.trial_id
    trial_dir.mkdir(parents=True)
    (trial_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert main(["run", str(spec), "--storage", str(tmp_path / "runs"), "--no-tracking"]) == 2
    out, err = capsys.readouterr()
    last = err.strip().splitlines()[-1]
    assert trial.trial_id in last and "unreadable checkpoint" in last
    assert "stopped on an error that a retry cannot mend" in out
    assert (trial_dir / "error.json").exists()
    assert not list((root / "ray").rglob("error.txt"))  # Tune saw no failure: no retries
    (trial_dir / "checkpoint.pt").unlink()  # the cause fixed, the same command finishes it
    assert main(["run", str(spec), "--storage", str(tmp_path / "runs"), "--no-tracking"]) == 0
    assert read_result(trial_dir) is not None and not (trial_dir / "error.json").exists()


def test_a_run_tune_stops_early_is_an_interruption_not_a_finished_job(ray_local, tmp_path,
                                                                      capsys, monkeypatch):
    """Tune catches Ctrl-C itself and returns with trials unfinished: the job must not be
    closed as finished with a partial report; the user is told how to resume."""
    import ticketsearch.cluster as cluster

    class StoppedTuner:
        def fit(self):
            return []

    monkeypatch.setattr(cluster, "_tuner", lambda *args, **kwargs: StoppedTuner())
    data = tiny_job_dict(cs={"rounds": 1})
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    job = parse_job(data)
    root = tmp_path / "runs" / f"{job.name}-{job.spec_hash()}"
    assert main(["run", str(spec), "--storage", str(tmp_path / "runs"), "--no-tracking"]) == 130
    assert f"ticketsearch resume {root.name}" in capsys.readouterr().err
    assert not (root / "summary.json").exists() and not (root / "driver.lock").exists()


def test_rerunning_a_finished_job_keeps_its_orchestration_costs(ray_local, tmp_path):
    job = parse_job(tiny_job_dict(cs={"rounds": 1}) | {"resources": {"cpus": 1}})
    first = run_job_on_ray(job, storage=tmp_path, echo=quiet, track=False)
    again = run_job_on_ray(job, storage=tmp_path, echo=quiet, track=False)
    assert first["orchestration"]["overhead_s"] >= 0
    assert again["orchestration"] == first["orchestration"]  # nothing ran: no new costs


def test_a_restored_unit_this_session_did_not_plan_asks_for_the_jobs_resources():
    """A restored Tune experiment can hold a unit finished (or regrouped) since: it gets the
    job's resources instead of failing the restore (seen as a KeyError in CI)."""
    from ticketsearch.cluster import _resource_request

    job = parse_job(tiny_job_dict() | {"resources": {"cpus": 0.5}})
    request = _resource_request({}, job.resources)
    bundle = request({"trial": {"trial_id": "fused-2x-0123456789"}}).bundles
    assert bundle == [{"CPU": 0.5}]
