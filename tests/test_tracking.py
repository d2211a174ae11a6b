"""MLflow tracking on the default local SQLite store (no server)."""

import json
import os
import time
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


def ticket_runs(client, trial_run):
    return client.search_runs([trial_run.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{trial_run.info.run_id}'")


def test_round_metrics_step_from_one_and_no_single_value_series(tracked):
    job, summary, client = tracked
    imp = next(r for r in children(client, summary) if r.data.tags["method"] == "imp")
    rounds = client.get_metric_history(imp.info.run_id, "round_test_acc")
    assert [m.step for m in rounds] == [1, 2, 3]
    for run in children(client, summary):
        names = set(run.data.metrics)
        assert not {n for n in names if n.startswith(("ticket_", "final_", "retrain_"))}
        assert {"epoch", "round", "search_epochs_total"}.isdisjoint(names)
        assert {"train_loss", "epochs", "wall_clock_s", "device_s"} <= names


def test_one_run_per_ticket_under_its_trial_run_with_the_same_metrics(tracked):
    job, summary, client = tracked
    total = 64 * 32 + 32 * 16 + 16 * 10
    seen = {}
    for trial in children(client, summary):
        runs = ticket_runs(client, trial)
        result = json.load(open(f"{summary['job_dir']}/trials/{trial.data.tags['trial_id']}"
                                "/result.json"))
        assert sorted(r.data.tags["ticket"] for r in runs) == sorted(
            t["name"] for t in result["tickets"])
        for run in runs:
            seen[run.info.run_name] = run
            ticket = next(t for t in result["tickets"] if t["name"] == run.data.tags["ticket"])
            metrics = run.data.metrics
            assert {"sparsity", "density", "val_acc", "test_acc", "search_epochs"} <= set(metrics)
            assert metrics["test_acc"] == ticket["test_acc"]
            assert metrics["sparsity"] + metrics["density"] == pytest.approx(1)
            assert run.data.params["method"] == trial.data.tags["method"]
            assert run.data.tags["ticketsearch.kind"] == "ticket"
            assert run.info.status == "FINISHED"
            layers = {a.path for a in client.list_artifacts(run.info.run_id, "layers")}
            assert f"layers/{ticket['name']}.png" in layers
    assert len(seen) == 2 + 3
    imp = {r.data.params["round"]: r for r in seen.values() if r.data.params["method"] == "imp"}
    for k, run in imp.items():
        assert abs(run.data.metrics["sparsity"] - (1 - 0.8 ** int(k))) <= int(k) / total
    assert any(name.endswith(" round-02") and name.startswith("imp") for name in seen)


def test_a_ticket_model_loads_with_mlflow_and_scores_its_reported_accuracy(tracked, digits,
                                                                           monkeypatch):
    from ticketsearch.training import evaluate

    job, summary, client = tracked
    rows = tracking.list_tickets(summary["tracking"]["uri"], job=job.name)
    assert rows and all(r["model"] == f"runs:/{r['run_id']}/model" for r in rows)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", summary["tracking"]["uri"])
    for row in rows:
        model = mlflow.pytorch.load_model(row["model"])
        assert not any("parametrizations" in k for k in model.state_dict())
        _, accuracy = evaluate(model, digits.eval_batches("test", 256))
        assert accuracy == row["test_acc"], row["name"]
    run = client.get_run(rows[0]["run_id"])
    (output,) = run.outputs.model_outputs  # MLflow's Models column of the runs table
    model = client.get_logged_model(output.model_id)
    assert model.name == "model" and model.params["method"] == rows[0]["method"]


def test_a_ticket_run_sent_again_is_not_duplicated(tracked):
    job, summary, client = tracked
    trial = next(r for r in children(client, summary) if r.data.tags["method"] == "imp")
    (ticket_run,) = [r for r in ticket_runs(client, trial) if r.data.tags["ticket"] == "round-01"]
    trial_dir = Path(summary["job_dir"]) / "trials" / trial.data.tags["trial_id"]
    ticket = ticketsearch.load_ticket(trial_dir / "tickets" / "round-01")
    op = tracking.ticket_run_op(ticket, trial_dir / "tickets" / "round-01", [])
    op["metrics"]["timestamp"] = client.get_metric_history(
        ticket_run.info.run_id, "sparsity")[0].timestamp
    again = tracking.send_ticket_run(client, summary["tracking"]["uri"], trial.info.run_id, op)
    assert again == ticket_run.info.run_id
    assert len(ticket_runs(client, trial)) == 3
    assert len(client.get_metric_history(again, "sparsity")) == 1
    models = client.search_logged_models(experiment_ids=[trial.info.experiment_id],
                                         filter_string="name = 'model'")
    assert len([m for m in models if m.source_run_id == again]) == 1


def test_the_parent_run_holds_the_job_summary_metrics(tracked):
    job, summary, client = tracked
    parent = client.get_run(summary["tracking"]["parent_run_id"])
    metrics = parent.data.metrics
    assert metrics["cs.tickets"] == 2 and metrics["imp.tickets"] == 3
    assert metrics["imp.critical_path_epochs"] == 3 * 4
    assert metrics["cs.critical_path_epochs"] == 2 * 4
    assert "dense_test_acc" in metrics and "imp.best_test_acc" in metrics
    before = len(client.get_metric_history(parent.info.run_id, "cs.tickets"))
    tracking.log_report(Path(summary["job_dir"]), Path(summary["job_dir"]) / "report")
    assert len(client.get_metric_history(parent.info.run_id, "cs.tickets")) == before == 1


def test_register_puts_a_ticket_model_in_the_registry(tracked, capsys, monkeypatch):
    from ticketsearch import cli

    job, summary, client = tracked
    uri = summary["tracking"]["uri"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (row, *_) = tracking.list_tickets(uri, job=job.name, method="imp")
    assert cli.main(["register", row["run_id"], "--name", "tiny-imp", "--uri", uri]) == 0
    assert "registered tiny-imp version 1" in capsys.readouterr().out
    trial_dir = Path(summary["job_dir"]) / "trials"
    (ticket_dir,) = [p for p in trial_dir.glob(f"*/tickets/{row['name']}")
                     if p.parents[1].name.startswith("imp")]
    assert cli.main(["register", str(ticket_dir), "--name", "tiny-imp", "--uri", uri]) == 0
    version = client.get_model_version("tiny-imp", "2")
    assert version.tags["method"] == "imp" and version.tags["ticket"] == row["name"]
    assert float(version.tags["sparsity"]) == pytest.approx(row["sparsity"], abs=1e-5)
    assert "MLFLOW_TRACKING_URI" not in os.environ  # register left the process as it was
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pytorch.load_model("models:/tiny-imp/2")
    assert not any("parametrizations" in k for k in model.state_dict())
    dense = next(r for r in children(client, summary) if r.data.tags["method"] == "dense")
    assert cli.main(["register", dense.info.run_id, "--name", "x", "--uri", uri]) == 2
    assert "not a ticket's run" in capsys.readouterr().err


def test_ticket_artifacts_load_with_matching_checksums(tracked, tmp_path):
    job, summary, client = tracked
    for row in tracking.list_tickets(summary["tracking"]["uri"], job=job.name):
        trial_id = client.get_run(row["run_id"]).data.tags["trial_id"]
        trial_dir = f"{summary['job_dir']}/trials/{trial_id}"
        loaded = ticketsearch.load_ticket(row["artifact"], tracking_uri=summary["tracking"]["uri"])
        local = json.load(open(f"{trial_dir}/tickets/{row['name']}/ticket.json"))
        assert loaded.sparsity == pytest.approx(local["sparsity"])
        assert loaded.meta["test_acc"] == row["test_acc"] and loaded.trained is not None
        downloaded = mlflow.artifacts.download_artifacts(
            artifact_uri=row["artifact"], dst_path=str(tmp_path / row["run_id"]),
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
    assert len(runs) == 3  # parent, trial, ticket: nothing duplicated by the resume
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


def test_a_background_sender_never_keeps_the_trial_waiting_and_loses_nothing(
        tmp_path, monkeypatch):
    """With a sender thread, submit returns at once while the store is slow; close sends
    the rest, in order. Whatever the thread had not sent when it stopped stays journalled
    and a later replay (a resumed trial, ``sync``) sends it, in order."""
    import threading

    sent, gate = [], threading.Event()

    def apply(self, op):
        gate.wait(5)  # a store that takes its time
        sent.append(op["items"][0]["values"]["x"])

    monkeypatch.setattr(tracking.RunLogger, "_apply", apply)
    monkeypatch.setattr(tracking, "client_for", lambda uri: None)
    journal = tmp_path / "journal.jsonl"
    logger = tracking.RunLogger("http://unused", "run", journal, background=True)
    start = time.monotonic()
    for x in range(5):
        logger.submit(tracking.metrics_op({"x": x}, x))
    assert time.monotonic() - start < 1.0 and sent == []
    logger.stop()  # the thread stops after the operation it is sending
    gate.set()
    waiting = [json.loads(line)["items"][0]["values"]["x"]
               for line in journal.read_text().splitlines()]
    assert len(sent) <= 1 and sent + waiting == [0, 1, 2, 3, 4]
    later = tracking.RunLogger("http://unused", "run", journal)
    assert later.replay(force=True)
    assert sent == [0, 1, 2, 3, 4] and not journal.exists()

    again = tracking.RunLogger("http://unused", "run", journal, background=True)
    for x in range(5, 8):
        again.submit(tracking.metrics_op({"x": x}, x))
    assert again.close()
    assert sent == list(range(8)) and not journal.exists()


def test_flat_params_flattens_and_truncates():
    params = tracking.flat_params({"a": {"b": 1, "c": [1, 2]}, "d": "x" * 600})
    assert params == {"a.b": "1", "a.c": "[1, 2]", "d": "x" * 500}


def test_trial_runs_without_tracking_touch_no_mlflow_store(tmp_path, digits):
    (trial,) = parse_job(tiny_job_dict(cs={"rounds": 1})).trials()
    run_trial(trial, digits, TrialDirHooks(tmp_path / "t"))
    assert not list(tmp_path.rglob("mlflow.db"))
