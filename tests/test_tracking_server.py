"""MLflow tracking against a real ``mlflow server`` (SQLite store, proxied artifacts):
concurrent trials in separate processes, a server that goes away mid-trial and comes back,
a server that is down until the trial has ended (then ``ticketsearch sync``), and a server
that is unreachable before the job starts."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
import yaml
from conftest import tiny_job_dict
from mlflow.tracking import MlflowClient
from servers import MlflowServer, free_port, run_trial_worker

import ticketsearch
from ticketsearch import cli, tracking
from ticketsearch.data import load_dataset
from ticketsearch.job import JobRun
from ticketsearch.jobdir import TrialDirHooks, read_result
from ticketsearch.methods import run_trial
from ticketsearch.spec import parse_job

pytestmark = pytest.mark.integration

MASK_INITS = [-0.1, -0.05, 0.0, 0.05]
SEEDS = [0, 1]
TRAIN = {"epochs_per_round": 3, "lr_milestones": [2], "rewind_epoch": 1,
         "checkpoint_every": 2, "device": "cpu"}
WORKER_TIMEOUT_S = 180


def job_of(name: str, uri: str | None = None, **methods):
    """A tiny digits + mlp [32, 16] job, 3 epochs per round, tracked at ``uri``."""
    data = tiny_job_dict(**methods)
    data["name"] = name
    data["train"] = TRAIN
    if uri:
        data["tracking"] = {"uri": uri}
    return parse_job(data)


def open_job(job, storage: Path) -> JobRun:
    """The driver's start of a job: its directory and MLflow runs."""
    run = JobRun(job, storage, echo=lambda _: None)
    run.open()
    return run


@pytest.fixture(autouse=True)
def no_global_tracking_uri(monkeypatch):
    """A tracking URI in the environment must not redirect these tests."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for the module; a test that stops it starts it again (same port, store)."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-shared"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def own_server(tmp_path):
    """A server of this test alone (fixed port and store); it may be stopped and restarted.
    Returned unstarted."""
    server = MlflowServer(tmp_path / "server-store", free_port())
    try:
        yield server
    finally:
        server.stop()


def step_values(client, run_id: str, key: str) -> list[int]:
    """The sorted steps at which ``key`` was logged to ``run_id``."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def ticket_runs(client, trial_run_id: str) -> dict[str, Any]:
    """The ticket runs under a trial's run, by ticket name (each name at most once)."""
    experiment = client.get_run(trial_run_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{trial_run_id}'")
    names = [r.data.tags["ticket"] for r in runs]
    assert len(names) == len(set(names)), names
    return {r.data.tags["ticket"]: r for r in runs}


def ledger_epochs(trial_dir: Path) -> int:
    """Epochs a finished trial trained, from its result.json."""
    return read_result(trial_dir).ledger.epochs["total"]


# --------------------------------------------------------------- 8 concurrent trials


def run_workers(job, job_dir: Path, jt: tracking.JobTracking) -> dict[str, tuple]:
    """Run every trial of ``job`` in its own spawned process, all at once; return
    ``trial_id -> (finished, error)``."""
    context = multiprocessing.get_context("spawn")
    trials = job.trials()
    data = pickle.dumps(load_dataset(trials[0].data, "cpu"))
    barrier = context.Barrier(len(trials))
    results = context.Queue()
    workers = [
        context.Process(target=run_trial_worker, name=f"trial-{t.trial_id}", args=(
            str(job_dir / "spec.yaml"), t.trial_id, str(job_dir), jt.uri,
            jt.trial_runs[t.trial_id], data, barrier, results))
        for t in trials
    ]
    for worker in workers:
        worker.start()
    outcome: dict[str, tuple] = {}
    deadline = time.monotonic() + WORKER_TIMEOUT_S
    try:
        while len(outcome) < len(workers) and time.monotonic() < deadline:
            try:
                trial_id, finished, error = results.get(timeout=1.0)
            except queue.Empty:
                if not any(worker.is_alive() for worker in workers):
                    break  # a worker died without reporting: its trial is missing
                continue
            outcome[trial_id] = (finished, error)
    finally:
        for worker in workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join()
    return outcome


@pytest.fixture(scope="module")
def concurrent_job(shared_server, tmp_path_factory):
    """The driver flow of a distributed run: job directory and runs first, then 8 trials in
    8 processes at the same time, then the job summary and the parent run closed."""
    job = job_of("server-sweep", shared_server.uri,
                 cs={"rounds": 2, "sweep": {"mask_init": MASK_INITS, "seed": SEEDS}})
    run = open_job(job, tmp_path_factory.mktemp("storage"))
    outcome = run_workers(job, run.root, run.tracker)
    if not run.unfinished():
        run.close()
    return job, run.root, run.tracker, outcome


def test_eight_concurrent_trials_each_finish_their_own_child_run(concurrent_job):
    job, job_dir, jt, outcome = concurrent_job
    assert len(job.trials()) == 8
    assert outcome == {t.trial_id: (True, None) for t in job.trials()}
    client = MlflowClient(jt.uri)
    experiment = client.get_experiment_by_name("server-sweep")
    assert experiment.experiment_id == jt.experiment_id
    runs = client.search_runs([jt.experiment_id], max_results=100)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == jt.parent_run_id]
    tickets = [r for r in runs if r.data.tags.get("ticketsearch.kind") == "ticket"]
    assert len(runs) == 1 + 8 + 8 and len(children) == 8 and len(tickets) == 8
    assert {r.info.run_id for r in children} == set(jt.trial_runs.values())
    assert {r.data.tags["mlflow.parentRunId"] for r in tickets} == set(jt.trial_runs.values())
    assert client.get_run(jt.parent_run_id).info.status == "FINISHED"
    default = client.get_experiment_by_name("Default")
    assert default is None or client.search_runs([default.experiment_id]) == []
    names = {t.trial_id: t.name for t in job.trials()}
    for trial_id, run_id in jt.trial_runs.items():
        run = client.get_run(run_id)
        assert run.data.tags["mlflow.parentRunId"] == jt.parent_run_id
        assert run.data.tags["trial_id"] == trial_id
        assert run.info.run_name == names[trial_id]
        assert run.info.status == "FINISHED"
        epochs = ledger_epochs(job_dir / "trials" / trial_id)
        assert epochs == 9  # 2 search rounds + retraining, 3 epochs each
        assert step_values(client, run_id, "train_loss") == list(range(epochs))
        assert step_values(client, run_id, "test_acc") == list(range(epochs))
        assert not (job_dir / "trials" / trial_id / tracking.PENDING_FILE).exists()


def test_each_cs_ticket_downloads_from_the_server_unchanged(concurrent_job, tmp_path):
    job, job_dir, jt, _ = concurrent_job
    for trial_id, run_id in jt.trial_runs.items():
        local_dir = job_dir / "trials" / trial_id / "tickets" / "final"
        local_json = json.loads((local_dir / "ticket.json").read_text())
        artifact = f"runs:/{ticket_runs(MlflowClient(jt.uri), run_id)['final'].info.run_id}/ticket"
        ticket = ticketsearch.load_ticket(artifact, tracking_uri=jt.uri)
        assert ticket.name == "final" and ticket.meta["trial_id"] == trial_id
        downloaded = mlflow.artifacts.download_artifacts(
            artifact_uri=artifact, dst_path=str(tmp_path / trial_id), tracking_uri=jt.uri)
        remote_json = json.loads((Path(downloaded) / "ticket.json").read_text())
        assert remote_json["mask_sha256"] == local_json["mask_sha256"]
        assert remote_json["state_sha256"] == local_json["state_sha256"]
        local = ticketsearch.load_ticket(local_dir)
        assert ticket.sparsity == local.sparsity


# --------------------------------------------------------------- outages


class OutageHooks(tracking.MlflowHooks):
    """MLflow hooks whose server goes away mid-trial: after handling global step ``stop_at``
    they stop ``server``; after handling step ``stop_at + 3`` they record the journal's
    operations (what could not be sent meanwhile) and start the server again."""

    def __init__(self, inner: TrialDirHooks, uri: str, run_id: str, server: MlflowServer,
                 stop_at: int):
        super().__init__(inner, uri, run_id)
        self.server = server
        self.stop_at = stop_at
        self.journal_before_restart: list[dict] = []

    def epoch_end(self, event) -> None:
        super().epoch_end(event)
        if event.step == self.stop_at:
            assert wait_until_sent(self.logger)  # what came before the outage is delivered
            self.server.stop()
        elif event.step == self.stop_at + 3:
            journal = self.logger.journal
            lines = journal.read_text().splitlines() if journal.exists() else []
            self.journal_before_restart = [json.loads(line) for line in lines]
            self.server.start()


def wait_until_sent(logger, timeout: float = 20.0) -> bool:
    """Wait for a logger's sender thread to empty its journal; True if it did."""
    deadline = time.monotonic() + timeout
    while logger.journal.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not logger.journal.exists()


def epoch_steps(ops: list[dict]) -> list[int]:
    """The steps of the per-epoch metrics (``train_loss``) in journal operations."""
    return [item["step"] for op in ops if op["op"] == "metrics" for item in op["items"]
            if "train_loss" in item["values"]]


def tracked_trial(job, storage: Path):
    """Job directory and runs of a one-trial job: (trial, trial_dir, JobTracking)."""
    run = open_job(job, storage)
    (trial,) = job.trials()
    return trial, run.trial_dir(trial), run.tracker


def test_a_server_restarted_mid_trial_receives_every_epoch(own_server, tmp_path, digits,
                                                           monkeypatch):
    monkeypatch.setattr(tracking, "RETRY_INTERVAL_S", 0.0)
    own_server.start()
    trial, trial_dir, jt = tracked_trial(job_of("outage-mid", own_server.uri, cs={"rounds": 2}),
                                         tmp_path / "storage")
    run_id = jt.trial_runs[trial.trial_id]
    hooks = OutageHooks(TrialDirHooks(trial_dir), jt.uri, run_id, own_server, stop_at=2)
    result = run_trial(trial, digits, hooks)
    assert wait_until_sent(hooks.logger)  # the sender delivered it once the server was back
    TrialDirHooks(trial_dir).write_result(result)
    assert hooks.finish(result) is True
    journaled = epoch_steps(hooks.journal_before_restart)
    assert journaled and set(journaled) <= {2, 3, 4, 5}  # epochs trained while it was down
    assert not (trial_dir / tracking.PENDING_FILE).exists()
    client = MlflowClient(own_server.uri)
    epochs = result.ledger.epochs()
    assert epochs == 9
    assert step_values(client, run_id, "train_loss") == list(range(epochs))
    assert step_values(client, run_id, "test_acc") == list(range(epochs))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_trial_that_ends_while_the_server_is_down_is_sent_by_sync(shared_server, tmp_path,
                                                                     digits, capsys):
    trial, trial_dir, jt = tracked_trial(job_of("outage-end", shared_server.uri,
                                                cs={"rounds": 1}), tmp_path / "storage")
    run_id = jt.trial_runs[trial.trial_id]
    shared_server.stop()
    try:
        hooks = tracking.MlflowHooks(TrialDirHooks(trial_dir), jt.uri, run_id)
        result = run_trial(trial, digits, hooks)
        TrialDirHooks(trial_dir).write_result(result)
        assert hooks.finish(result) is False
    finally:
        shared_server.start()
    journal = trial_dir / tracking.PENDING_FILE
    ops = [json.loads(line)["op"] for line in journal.read_text().splitlines()]
    assert ops[0] == "status" and ops[-1] == "terminate"
    assert cli.main(["sync", str(trial_dir.parent.parent)]) == 0
    assert "synced 1 trial journals" in capsys.readouterr().out
    assert not journal.exists()
    client = MlflowClient(shared_server.uri)
    epochs = result.ledger.epochs()
    assert epochs == 6
    assert step_values(client, run_id, "train_loss") == list(range(epochs))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id)} >= {"result.json"}
    (ticket,) = ticket_runs(client, run_id).values()
    assert {a.path for a in client.list_artifacts(ticket.info.run_id)} >= {"ticket", "layers"}
    assert ticket.info.status == "FINISHED"


def test_run_refuses_an_unreachable_server_before_writing_anything(tmp_path, capsys):
    uri = f"http://127.0.0.1:{free_port()}"
    spec = tiny_job_dict(cs={"rounds": 1})
    spec["name"] = "unreachable"
    spec["tracking"] = {"uri": uri}
    spec_path = tmp_path / "job.yaml"
    spec_path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    storage = tmp_path / "storage"
    started = time.monotonic()
    code = cli.main(["run", str(spec_path), "--storage", str(storage)])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert code == 2
    assert elapsed < 10
    assert uri in err and "unreachable" in err
    assert not storage.exists() or list(storage.iterdir()) == []


# --------------------------------------------------------------- resumed trials, outages


class CrashAfterTicket(TrialDirHooks):
    """Stands in for a worker killed right after a round end was sent (its epochs after the
    last checkpoint reached MLflow) and its ticket saved, before the next checkpoint."""

    def ticket_found(self, ticket) -> None:
        super().ticket_found(ticket)
        raise RuntimeError(f"killed after ticket {ticket.name}")


def test_a_resumed_trial_sends_every_step_once(shared_server, tmp_path, digits):
    job = job_of("resume-once", shared_server.uri, imp={"rounds": 3})
    trial, trial_dir, jt = tracked_trial(job, tmp_path / "storage")
    run_id = jt.trial_runs[trial.trial_id]
    crashed = tracking.MlflowHooks(CrashAfterTicket(trial_dir), jt.uri, run_id)
    with pytest.raises(RuntimeError, match="killed after ticket"):
        run_trial(trial, digits, crashed)
    assert crashed.logger.close()  # its sender delivered everything before the worker died
    client = MlflowClient(shared_server.uri)
    sent_before = step_values(client, run_id, "train_loss")
    state = torch.load(trial_dir / "checkpoint.pt", weights_only=True)
    checkpointed = state["ledger"]["entries"]  # a count: the event log holds them
    assert sent_before == list(range(len(sent_before)))
    assert checkpointed < len(sent_before)  # epochs sent after the last checkpoint: retrained
    hooks = tracking.MlflowHooks(TrialDirHooks(trial_dir), jt.uri, run_id)
    result = run_trial(trial, digits, hooks)
    TrialDirHooks(trial_dir).write_result(result)
    assert hooks.finish(result) is True
    assert result.ledger.recomputed_epochs == len(sent_before) - checkpointed
    epochs = result.ledger.epochs()
    for key in ("train_loss", "epoch_seconds", "sparsity"):
        assert step_values(client, run_id, key) == list(range(epochs)), key
    assert step_values(client, run_id, "round_sparsity") == [1, 2, 3]
    tickets = ticket_runs(client, run_id)
    assert sorted(tickets) == ["round-01", "round-02", "round-03"]
    for ticket in tickets.values():
        assert step_values(client, ticket.info.run_id, "sparsity") == [0]
        models = client.search_logged_models(
            experiment_ids=[ticket.info.experiment_id],
            filter_string=f"tags.`ticketsearch.ticket_key` = "
                          f"'{ticket.data.tags['ticketsearch.ticket_key']}'")
        assert len(models) == 1


def test_a_job_that_ends_in_an_outage_says_so_and_sync_completes_it(ray_local, own_server,
                                                                     tmp_path, capsys):
    """SIGKILL the server mid-job and keep it down: the job's report is complete anyway (it
    comes from the job directory), the command exits 3 naming `ticketsearch sync`, and sync
    delivers every step once and closes every run, the parent with the job's summary."""
    own_server.start()
    data = tiny_job_dict(cs={"rounds": 2}, imp={"rounds": 2})
    data.update(name="outage-job", tracking={"uri": own_server.uri}, resources={"cpus": 1})
    data["model"]["mlp_hidden"] = [300, 100]
    data["train"].update(epochs_per_round=20, lr_milestones=[15], checkpoint_every=5)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    job = parse_job(data)
    root = tmp_path / "runs" / f"{job.name}-{job.spec_hash()}"
    killed = threading.Thread(target=_kill_server_after_epochs, args=(own_server, root, 5))
    killed.start()
    code = cli.main(["run", str(spec), "--storage", str(tmp_path / "runs")])
    killed.join()
    out, err = capsys.readouterr()
    assert code == cli.EXIT_UNSENT, err[-2000:]
    assert f"ticketsearch sync {root}" in err
    report = json.loads((root / "report" / "report.json").read_text())
    trials = {t.trial_id: read_result(root / "trials" / t.trial_id) for t in job.trials()}
    assert all(trials.values())
    assert report["methods"]["cs"]["search_epochs"]["total"] == 40
    assert report["methods"]["imp"]["search_epochs"]["total"] == 40
    assert any((root / "trials" / t / tracking.PENDING_FILE).exists() for t in trials)

    own_server.start()
    assert cli.main(["sync", str(root)]) == 0
    assert "parent run closed" in capsys.readouterr().out
    client = MlflowClient(own_server.uri)
    state = tracking.JobTracking.load(root)
    for trial_id, record in trials.items():
        run_id = state.trial_runs[trial_id]
        assert client.get_run(run_id).info.status == "FINISHED"
        epochs = record.ledger.epochs["total"]
        assert step_values(client, run_id, "train_loss") == list(range(epochs)), trial_id
    parent = client.get_run(state.parent_run_id)
    assert parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(state.parent_run_id)}
    assert {"summary.json", "report"} <= names
    assert not any((root / "trials" / t / tracking.PENDING_FILE).exists() for t in trials)


def _kill_server_after_epochs(server: MlflowServer, root: Path, epochs: int) -> None:
    """SIGKILL ``server`` once some trial of the job in ``root`` has logged ``epochs``."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for events in root.glob("trials/*/events.jsonl"):
            lines = events.read_text().count('"kind": "epoch"')
            if lines >= epochs:
                os.killpg(server.process.pid, signal.SIGKILL)
                server.process.wait()
                server.process = None
                return
        time.sleep(0.02)


def test_a_killed_ray_worker_resumes_with_every_step_once_and_its_time_kept(
        ray_local, shared_server, tmp_path):
    """SIGKILL a Tune trial's worker right after a round end was sent, before the next
    checkpoint: the resumed trial's MLflow history has every step once, and the killed
    attempt's wall-clock lasts until the kill, not until its last checkpoint."""
    from ticketsearch.cluster import run_job_on_ray

    data = tiny_job_dict(imp={"rounds": 3})
    data.update(name="killed-tracked", tracking={"uri": shared_server.uri},
                resources={"cpus": 1, "max_failures": 2})
    data["model"]["mlp_hidden"] = [300, 100]
    data["train"].update(epochs_per_round=10, lr_milestones=[8], checkpoint_every=1000)
    job = parse_job(data)
    (trial,) = job.trials()
    trial_dir = tmp_path / f"{job.name}-{job.spec_hash()}" / "trials" / trial.trial_id
    killed = {}
    thread = threading.Thread(target=_kill_worker_after_rounds, args=(trial_dir, 2, killed))
    thread.start()
    outcome = run_job_on_ray(job, storage=tmp_path, echo=lambda _: None)
    thread.join()
    assert "pid" in killed, "the trial finished before it could be killed"
    assert outcome["unsent"] == []
    record = read_result(trial_dir)
    assert record.ledger.attempts == 2 and record.ledger.recomputed_epochs >= 1
    first_attempt = record.ledger.attempt_windows[0]
    assert first_attempt[1] >= killed["last_event_t"]
    client = MlflowClient(shared_server.uri)
    run_id = record.run_id
    assert step_values(client, run_id, "train_loss") == list(range(record.ledger.epochs["total"]))
    assert step_values(client, run_id, "round_sparsity") == [1, 2, 3]
    tickets = ticket_runs(client, run_id)  # each ticket's run once, after the SIGKILL too
    assert sorted(tickets) == [t.name for t in record.tickets]
    assert all(step_values(client, r.info.run_id, "sparsity") == [0] for r in tickets.values())


def _kill_worker_after_rounds(trial_dir: Path, rounds: int, killed: dict) -> None:
    """SIGKILL the trial's worker as soon as its ``rounds``-th round end is logged."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            events = [json.loads(line) for line in
                      (trial_dir / "events.jsonl").read_text().splitlines()]
        except (OSError, json.JSONDecodeError):
            events = []
        if sum(e["kind"] == "round" for e in events) >= rounds:
            killed["pid"] = int((trial_dir / "worker.pid").read_text())
            killed["last_event_t"] = max(e["t"] for e in events)
            os.kill(killed["pid"], signal.SIGKILL)
            return
        time.sleep(0.005)
