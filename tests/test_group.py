"""Fused groups end to end: each member's identity in its trial directory, MLflow runs and
report; a group killed mid-round resumes as one, to the tickets of an uninterrupted run."""

import json

import pytest
import torch
from conftest import kill_after_epochs, read_events, tiny_job_dict
from mlflow.tracking import MlflowClient

from ticketsearch.cluster import run_job_on_ray
from ticketsearch.local import run_job_locally
from ticketsearch.spec import parse_job
from ticketsearch.tickets import load_ticket_dir

pytestmark = pytest.mark.usefixtures("one_thread")


def fused_job(epochs: int = 4, **train):
    data = tiny_job_dict(cs={"rounds": 2, "sweep": {"mask_init": [0.0, -0.01, 0.02],
                                                    "lambda": [1e-8]}})
    data["train"].update(epochs_per_round=epochs, **train)
    data["resources"] = {"cpus": 1, "max_failures": 2, "fuse": 3}
    return parse_job(data)


def child_runs(client, summary):
    exp = summary["tracking"]["experiment_id"]
    parent = summary["tracking"]["parent_run_id"]
    return client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")


def test_each_member_of_a_fused_group_keeps_its_runs_tickets_and_report_row(tmp_path):
    job = fused_job()
    lines: list[str] = []
    summary = run_job_locally(job, storage=tmp_path, echo=lines.append)
    assert any(line.startswith("fused group of 3:") for line in lines)
    root = tmp_path / f"{job.name}-{job.spec_hash()}"
    ids = sorted(t.trial_id for t in job.trials())
    records = {t["trial_id"]: t for t in summary["trials"]}
    assert sorted(records) == ids
    assert len({r["fused_group"] for r in records.values()}) == 1
    assert not list(root.glob("groups/*/checkpoint.pt"))  # dropped once the group finished
    client = MlflowClient(summary["tracking"]["uri"])
    trial_runs = [r for r in child_runs(client, summary)
                  if r.data.tags.get("ticketsearch.kind") == "trial"]
    assert sorted(r.data.tags["trial_id"] for r in trial_runs) == ids
    for run in trial_runs:
        record = records[run.data.tags["trial_id"]]
        assert record["ledger"]["epochs"] == {"search": 8, "retrain": 4, "total": 12}
        assert record["ledger"]["device_fraction"] == pytest.approx(1 / 3)
        assert sorted(record["fused_with"] + [record["trial_id"]]) == ids
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert steps == list(range(12))
        (ticket_run,) = client.search_runs(
            [run.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        (ticket,) = record["tickets"]
        assert ticket_run.data.metrics["test_acc"] == pytest.approx(ticket["test_acc"])
        assert ticket_run.data.metrics["sparsity"] == pytest.approx(ticket["sparsity"])
    rows = summary["report"]["methods"]["cs"]["tickets"]
    assert sorted(r["trial_id"] for r in rows) == ids
    markdown = (root / "report" / "report.md").read_text()
    assert "cs: 3 trials trained as 1 fused group(s)" in markdown


def masks_of(root, trial_id):
    ticket = load_ticket_dir(root / "trials" / trial_id / "tickets" / "final")
    return ticket.masks, ticket.meta["test_acc"]


@pytest.mark.integration
def test_a_fused_group_killed_mid_round_resumes_to_the_tickets_of_an_uninterrupted_run(
        ray_local, tmp_path):
    job = fused_job(epochs=30, lr_milestones=[20], checkpoint_every=5)
    first = sorted(t.trial_id for t in job.trials())[0]
    root = tmp_path / "killed" / f"{job.name}-{job.spec_hash()}"
    thread, killed = kill_after_epochs(root / "trials" / first, 37)
    summary = run_job_on_ray(job, storage=tmp_path / "killed", echo=lambda _: None)
    thread.join()
    assert "pid" in killed, "the group finished before it could be killed"
    reference = run_job_locally(job, storage=tmp_path / "whole", echo=lambda _: None)
    whole = tmp_path / "whole" / f"{job.name}-{job.spec_hash()}"
    client = MlflowClient(summary["tracking"]["uri"])
    runs = {r.data.tags["trial_id"]: r for r in child_runs(client, summary)
            if r.data.tags.get("ticketsearch.kind") == "trial"}
    for record in summary["trials"]:
        trial_id, ledger = record["trial_id"], record["ledger"]
        assert ledger["epochs"] == {"search": 60, "retrain": 30, "total": 90}
        assert ledger["attempts"] == 2
        assert 1 <= ledger["recomputed_epochs"] <= 5
        assert [e["step"] for e in read_events(root / "trials" / trial_id)] == list(range(90))
        history = client.get_metric_history(runs[trial_id].info.run_id, "train_loss")
        assert sorted(m.step for m in history) == list(range(90))  # none twice, none missing
        got, want = masks_of(root, trial_id), masks_of(whole, trial_id)
        assert got[1] == want[1]
        assert all(torch.equal(got[0][k], want[0][k]) for k in want[0])
    assert [t["trial_id"] for t in reference["trials"]] == \
        [t["trial_id"] for t in summary["trials"]]
    assert not list(root.glob("groups/*/checkpoint.pt"))
    assert json.loads((root / "trials" / first / "result.json").read_text())["fused_group"]


def test_a_members_own_checkpoint_from_an_unfused_run_does_not_leak_into_its_group(tmp_path):
    job = fused_job()
    member = sorted(t.trial_id for t in job.trials())[0]
    stale = tmp_path / f"{job.name}-{job.spec_hash()}" / "trials" / member / "checkpoint.pt"
    stale.parent.mkdir(parents=True)
    torch.save({"left": "by a run that trained this trial alone"}, stale)
    summary = run_job_locally(job, storage=tmp_path, echo=lambda _: None, track=False)
    assert [t["ledger"]["epochs"]["total"] for t in summary["trials"]] == [12, 12, 12]
    assert not stale.exists()
