"""MLflow tracking on the default local SQLite store (no server)."""

import json
from pathlib import Path

import mlflow
import pytest
from conftest import tiny_job_dict
from mlflow.tracking import MlflowClient

import ticketsearch
from ticketsearch import tracking
from ticketsearch.jobdir import TrialDirHooks
from ticketsearch.local import run_job_locally
from ticketsearch.methods import run_trial
from ticketsearch.spec import parse_job


def tiny_job(**extra):
    data = tiny_job_dict(dense={}, cs={"rounds": 2, "sweep": {"mask_init": [0.0, -0.01]}},
                         imp={"rounds": 3})
    data.update(extra)
    return parse_job(data)


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    storage = tmp_path_factory.mktemp("tracked")
    job = tiny_job()
    summary = run_job_locally(job, storage=storage, echo=lambda _: None)
    client = MlflowClient(summary["tracking"]["uri"])
    return job, summary, client


def children(client, summary):
    exp = summary["tracking"]["experiment_id"]
    parent = summary["tracking"]["parent_run_id"]
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def test_parent_run_describes_the_job(tracked):
    job, summary, client = tracked
    assert summary["tracking"]["uri"].startswith("sqlite:///")
    parent = client.get_run(summary["tracking"]["parent_run_id"])
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.name == job.name
    tags = parent.data.tags
    assert tags["ticketsearch.spec_hash"] == job.spec_hash()
    assert tags["ticketsearch.job"] == job.name and "ticketsearch.version" in tags
    assert parent.data.params["train.epochs_per_round"] == "4"
    assert parent.data.params["methods.cs.sweep.mask_init"] == "[0.0, -0.01]"
    assert parent.info.status == "FINISHED"
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"spec.yaml", "summary.json"} <= names
    default = client.get_experiment_by_name("Default")
    assert default is None or not client.search_runs([default.experiment_id])


def test_one_child_run_per_trial_with_contiguous_epoch_metrics(tracked):
    job, summary, client = tracked
    runs = children(client, summary)
    trials = {t.trial_id: t for t in job.trials()}
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(trials)
    epochs = {t["trial_id"]: t["ledger"]["epochs"]["total"] for t in summary["trials"]}
    for run in runs:
        trial = trials[run.data.tags["trial_id"]]
        assert run.info.run_name == trial.name
        assert run.data.tags["method"] == trial.method
        assert run.data.tags["model"] == "mlp" and run.data.tags["dataset"] == "digits"
        assert run.info.status == "FINISHED"
        assert run.data.params["train.lr"] == "0.1"
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == list(range(epochs[trial.trial_id]))
        for key in ("test_acc", "val_acc", "sparsity", "beta", "lr", "epoch_seconds"):
            assert len(client.get_metric_history(run.info.run_id, key)) == len(steps), key
        assert run.data.metrics["wall_clock_s"] > 0


def test_round_metrics_and_ticket_metrics(tracked):
    job, summary, client = tracked
    imp = next(r for r in children(client, summary) if r.data.tags["method"] == "imp")
    rounds = client.get_metric_history(imp.info.run_id, "round_test_acc")
    assert [m.step for m in rounds] == [0, 1, 2]
    sparsity = {m.step: m.value for m in client.get_metric_history(imp.info.run_id,
                                                                     "ticket_sparsity")}
    assert sorted(sparsity) == [1, 2, 3]
    total = 64 * 32 + 32 * 16 + 16 * 10
    for k, value in sparsity.items():
        assert abs(value - (1 - 0.8**k)) <= k / total
    assert imp.data.tags["has_ticket"] == "true"
    assert imp.data.tags["ticket_name.2"] == "round-02"
    layers = {a.path for a in client.list_artifacts(imp.info.run_id, "ticket_layers")}
    assert "ticket_layers/round-02.png" in layers and "ticket_layers/round-02.json" in layers


def test_ticket_artifacts_load_with_matching_checksums(tracked, tmp_path):
    job, summary, client = tracked
    for run in children(client, summary):
        if run.data.tags["method"] == "dense":
            assert "has_ticket" not in run.data.tags
            continue
        trial_dir = f"{summary['job_dir']}/trials/{run.data.tags['trial_id']}"
        for ticket in json.load(open(f"{trial_dir}/result.json"))["tickets"]:
            uri = f"runs:/{run.info.run_id}/tickets/{ticket['name']}"
            loaded = ticketsearch.load_ticket(uri, tracking_uri=summary["tracking"]["uri"])
            local = json.load(open(f"{trial_dir}/tickets/{ticket['name']}/ticket.json"))
            assert loaded.sparsity == pytest.approx(local["sparsity"])
            assert loaded.meta["test_acc"] == ticket["test_acc"]
            downloaded = mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(tmp_path / run.info.run_id),
                tracking_uri=summary["tracking"]["uri"])
            remote = json.load(open(Path(downloaded) / "ticket.json"))
            assert remote["mask_sha256"] == local["mask_sha256"]
            assert remote["state_sha256"] == local["state_sha256"]


def test_list_tickets_filters_and_sorts(tracked):
    job, summary, client = tracked
    uri = summary["tracking"]["uri"]
    rows = tracking.list_tickets(uri, job=job.name)
    assert len(rows) == 2 + 3
    assert [r["sparsity"] for r in rows] == sorted((r["sparsity"] for r in rows), reverse=True)
    assert all(r["artifact"].startswith("runs:/") for r in rows)
    assert {r["method"] for r in tracking.list_tickets(uri, method="imp")} == {"imp"}
    assert all(r["sparsity"] >= 0.3 for r in tracking.list_tickets(uri, min_sparsity=0.3))
    with pytest.raises(tracking.TrackingError, match="no experiment named"):
        tracking.list_tickets(uri, job="nope")


def test_variants_of_a_job_are_told_apart_by_job_id(tracked, capsys):
    from ticketsearch import cli

    job, summary, _ = tracked
    storage = Path(summary["job_dir"]).parent
    variant = tiny_job(train={**tiny_job_dict()["train"], "lr": 0.05})
    run_job_locally(variant, storage=storage, echo=lambda _: None)
    ids = {f"{job.name}-{job.spec_hash()}", f"{variant.name}-{variant.spec_hash()}"}
    uri = summary["tracking"]["uri"]
    both = tracking.list_tickets(uri, job=job.name)  # the experiment: both variants
    assert {r["job_id"] for r in both} == ids
    only = tracking.list_tickets(uri, job=f"{variant.name}-{variant.spec_hash()}")
    assert {r["job_id"] for r in only} == {f"{variant.name}-{variant.spec_hash()}"}
    assert len(only) == len(both) // 2
    assert cli.main(["tickets", "--uri", uri, "--json"]) == 0
    assert {r["job_id"] for r in json.loads(capsys.readouterr().out)} == ids
    assert cli.main(["tickets", "--uri", uri, "--job", variant.name]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["sparsity", "test", "val"] and "job" in table[0].split()
    assert any(f"{variant.name}-{variant.spec_hash()}" in line for line in table[1:])


def test_ticket_command_reads_a_logged_ticket_from_the_local_store(tracked, capsys,
                                                                   monkeypatch):
    from ticketsearch import cli

    job, summary, _ = tracked
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    storage = Path(summary["job_dir"]).parent
    (row, *_) = tracking.list_tickets(summary["tracking"]["uri"], job=job.name)
    assert cli.main(["ticket", row["artifact"], "--storage", str(storage)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == row["name"] and shown["sparsity"] == pytest.approx(row["sparsity"])


class Crash(Exception):
    pass


def test_a_resumed_job_continues_its_own_runs(tmp_path, monkeypatch):
    job = parse_job(tiny_job_dict(cs={"rounds": 2}))
    crashed = {"done": False}
    original = TrialDirHooks.epoch_end

    def crash_once(self, event):
        original(self, event)
        if event.step == 5 and not crashed["done"]:
            crashed["done"] = True
            raise Crash()

    monkeypatch.setattr(TrialDirHooks, "epoch_end", crash_once)
    with pytest.raises(Crash):
        run_job_locally(job, storage=tmp_path, echo=lambda _: None)
    summary = run_job_locally(job, storage=tmp_path, echo=lambda _: None)
    client = MlflowClient(summary["tracking"]["uri"])
    experiment = client.get_experiment_by_name(job.name)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # one parent, one child: nothing duplicated by the resume
    child = next(r for r in runs if r.data.tags.get("ticketsearch.kind") == "trial")
    steps = {m.step for m in client.get_metric_history(child.info.run_id, "train_loss")}
    assert steps == set(range(12))
    assert child.info.status == "FINISHED"
    # the crash at step 5 came before that epoch's checkpoint: steps 4 and 5 were retrained
    assert child.data.metrics["recomputed_epochs"] == 2


def test_journal_keeps_operations_in_order_until_the_store_answers(tmp_path, monkeypatch):
    sent = []
    failing = {"on": True}

    def apply(self, op):
        if failing["on"]:
            raise ConnectionError("down")
        sent.append(op["items"][0]["values"]["x"])

    monkeypatch.setattr(tracking.RunLogger, "_apply", apply)
    monkeypatch.setattr(tracking, "client_for", lambda uri: None)
    monkeypatch.setattr(tracking, "RETRY_INTERVAL_S", 0.0)
    logger = tracking.RunLogger("http://unused", "run", tmp_path / "journal.jsonl")
    for x in range(3):
        logger.submit(tracking.metrics_op({"x": x}, x))
    assert sent == [] and len((tmp_path / "journal.jsonl").read_text().splitlines()) == 3
    failing["on"] = False
    logger.submit(tracking.metrics_op({"x": 3}, 3))
    assert sent == [0, 1, 2, 3]
    assert not (tmp_path / "journal.jsonl").exists()


def test_flat_params_flattens_and_truncates():
    params = tracking.flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 600})
    assert params == {"a.b": "1", "a.c": "[1, 2]", "d": "x" * 500}


def test_trial_runs_without_tracking_touch_no_mlflow_store(tmp_path, digits):
    (trial,) = parse_job(tiny_job_dict(cs={"rounds": 1})).trials()
    run_trial(trial, digits, TrialDirHooks(tmp_path / "t"))
    assert not list(tmp_path.rglob("mlflow.db"))
