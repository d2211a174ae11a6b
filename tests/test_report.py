"""The cost report: built from MLflow, regenerated from MLflow alone, and its presets."""

import json
import shutil
from pathlib import Path

import jsonschema
import pytest

from ticketsearch.analysis import REPORT_SCHEMA, build_report, frontier_comparison, pareto_front
from ticketsearch.cli import main
from ticketsearch.local import run_job_locally
from ticketsearch.report import record_from_job_dir
from ticketsearch.spec import load_job

JOBS = Path(__file__).resolve().parents[1] / "jobs"
REDUCED_QUICKSTART = ["train.epochs_per_round=2"]  # keeps CS 5 rounds vs IMP 30 rounds
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    storage = tmp_path_factory.mktemp("quickstart")
    job = load_job(JOBS / "quickstart.yaml", REDUCED_QUICKSTART)
    summary = run_job_locally(job, storage=storage, echo=lambda _: None)
    return job, summary, storage


def test_quickstart_report_shows_the_one_to_six_critical_path(quickstart):
    job, summary, _ = quickstart
    report = summary["report"]
    jsonschema.validate(report, REPORT_SCHEMA)
    cs, imp = report["methods"]["cs"], report["methods"]["imp"]
    assert cs["search_epochs"]["critical_path"] == 5 * 2
    assert imp["search_epochs"]["critical_path"] == 30 * 2
    assert report["ratios"]["imp/cs"]["search_epochs.critical_path"] == 6.0
    assert cs["search_epochs"]["total"] == 5 * 5 * 2
    assert report["dense"]["test_acc"] is not None and report["dense"]["source"] == "dense trials"
    masked = 64 * 300 + 300 * 100 + 100 * 10
    sparsities = {t["name"]: t["sparsity"] for t in imp["tickets"]}
    assert len(sparsities) == 30
    for k in range(1, 31):
        assert abs(sparsities[f"round-{k:02d}"] - (1 - 0.8**k)) <= k / masked
    assert all(t["run_id"] for m in report["methods"].values() for t in m["tickets"])
    assert len(report["timeline"]) == 7
    assert [row["imp"]["ticket"] for row in report["paired"]] == [
        "round-03", "round-05", "round-10", "round-15", "round-20"]


def test_report_files_and_plots_are_written(quickstart):
    _, summary, _ = quickstart
    folder = Path(summary["job_dir"]) / "report"
    on_disk = json.loads((folder / "report.json").read_text())
    jsonschema.validate(on_disk, REPORT_SCHEMA)
    assert on_disk == json.loads(json.dumps(summary["report"]))
    for name in ("pareto.png", "cost.png", "timeline.png"):
        data = (folder / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    markdown = (folder / "report.md").read_text()
    assert "| cs |" in markdown and "| imp |" in markdown and "![Pareto frontier]" in markdown


def test_report_regenerates_from_mlflow_alone(quickstart, tmp_path, capsys):
    job, summary, storage = quickstart
    before = json.loads((Path(summary["job_dir"]) / "report" / "report.json").read_text())
    shutil.rmtree(summary["job_dir"])
    out = tmp_path / "again"
    status = main(["report", "--experiment", job.name, "--storage", str(storage),
                   "--out", str(out), "--no-log"])
    assert status == 0, capsys.readouterr().err
    assert json.loads((out / "report.json").read_text()) == before
    assert "imp/cs: search epochs critical path x6.00" in capsys.readouterr().out


def test_report_is_logged_to_the_parent_run(quickstart):
    from mlflow.tracking import MlflowClient

    _, summary, _ = quickstart
    client = MlflowClient(summary["tracking"]["uri"])
    names = {a.path for a in client.list_artifacts(summary["tracking"]["parent_run_id"],
                                                   "report")}
    assert {"report/report.json", "report/report.md", "report/pareto.png"} <= names


def test_pareto_front_and_frontier_comparison_on_hand_made_tickets():
    def t(name, sparsity, acc):
        return {"name": name, "trial_id": name, "sparsity": sparsity, "test_acc": acc,
                "val_acc": None, "run_id": None}

    cs = [t("a", 0.5, 0.90), t("b", 0.7, 0.91), t("c", 0.6, 0.89), t("d", 0.9, 0.80)]
    assert [x["name"] for x in pareto_front(cs)] == ["b", "d"]
    imp = [t("r1", 0.2, 0.92), t("r3", 0.49, 0.915), t("r5", 0.67, 0.90), t("r9", 0.87, 0.85)]
    methods = {"cs": {"pareto": pareto_front(cs), "tickets": cs},
               "imp": {"pareto": pareto_front(imp), "tickets": imp}}
    result = frontier_comparison(methods)
    assert [(r["name"], r["reference_best_test_acc"], r["dominates"])
            for r in result["tickets"]] == [("b", 0.85, True), ("d", None, True)]
    assert result["dominating"] == 2 and result["of"] == 2


def test_report_of_an_untracked_job_comes_from_its_directory(tmp_path):
    from conftest import tiny_job_dict

    from ticketsearch.spec import parse_job

    job = parse_job(tiny_job_dict(cs={"rounds": 1}, imp={"rounds": 2}))
    summary = run_job_locally(job, storage=tmp_path, echo=lambda _: None, track=False)
    report = build_report(record_from_job_dir(Path(summary["job_dir"])))
    jsonschema.validate(report, REPORT_SCHEMA)
    assert report["dense"]["source"] == "first round of the IMP chains"
    assert summary["report"]["methods"]["imp"]["search_epochs"]["critical_path"] == 8


@pytest.mark.parametrize("preset", sorted(p.name for p in JOBS.glob("*.yaml")))
def test_every_preset_validates(preset, capsys):
    assert main(["validate", str(JOBS / preset)]) == 0, capsys.readouterr().err


SMOKE = {
    "paper-resnet20-cifar10.yaml": ["data.synthetic_shape=[3,32,32]"],
    "paper-vgg16-cifar10.yaml": ["data.synthetic_shape=[3,32,32]"],
    "resnet50-imagenet.yaml": ["data.synthetic_shape=[3,32,32]", "data.val_size=16"],
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(SMOKE))
def test_paper_presets_run_cut_down_on_synthetic_data(preset, tmp_path):
    overrides = SMOKE[preset] + [
        "data.dataset=synthetic", "data.synthetic_size=32", "train.epochs_per_round=1",
        "train.batch_size=16", "train.device=cpu", "methods.cs.rounds=2",
        "methods.cs.sweep.mask_init=[0.0]", "methods.imp.rounds=2", "resources.gpus=0",
        "resources.cpus=1",
    ]
    job = load_job(JOBS / preset, overrides)
    summary = run_job_locally(job, storage=tmp_path, echo=lambda _: None, track=False)
    methods = summary["report"]["methods"]
    assert methods["cs"]["search_epochs"]["critical_path"] == 2
    assert methods["imp"]["search_epochs"]["critical_path"] == 2
    assert len(methods["imp"]["tickets"]) == 2
    assert summary["report"] is not None


def test_recipe_comparison_lists_each_recipe_against_the_primary():
    from types import SimpleNamespace

    from ticketsearch.analysis import recipe_comparison
    from ticketsearch.records import TicketRecord

    ticket = {"name": "final", "sparsity": 0.8, "recipe": "vanilla",
              "recipes": {"vanilla": {"val_acc": 0.9, "test_acc": 0.90, "retrain_epochs": 4},
                          "mixup": {"val_acc": 0.91, "test_acc": 0.93, "retrain_epochs": 4}}}
    single = {"name": "round-01", "sparsity": 0.2, "recipe": "vanilla",
              "recipes": {"vanilla": {"val_acc": 0.9, "test_acc": 0.9, "retrain_epochs": 4}}}
    tickets = [TicketRecord.model_validate(t) for t in (ticket, single)]
    rows = recipe_comparison([SimpleNamespace(method="cs", trial_id="t", tickets=tickets)])
    assert [(r["recipe"], r["primary"]) for r in rows] == [("mixup", False), ("vanilla", True)]
    assert rows[0]["test_acc_delta"] == pytest.approx(0.03)
    assert rows[1]["test_acc_delta"] == 0.0
