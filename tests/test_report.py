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
    page = (folder / "report.html").read_text()  # renders in MLflow's artifact view
    assert page.count('src="data:image/png;base64,') == 3 and "](pareto.png)" not in page
    assert "| cs |" in page and "Tickets are chosen on validation accuracy" in page


def test_figures_show_remaining_weights_on_a_log_axis_and_label_every_ticket(quickstart):
    import matplotlib.pyplot as plt

    from ticketsearch.report import cost_figure, pareto_figure, timeline_figure

    report = quickstart[1]["report"]
    pareto = pareto_figure(report)
    ax = pareto.axes[0]
    assert ax.get_xscale() == "log" and ax.xaxis_inverted()  # sparser to the right
    labels = [text.get_text() for text in ax.texts]
    scored = sum(t["test_acc"] is not None for m in report["methods"].values()
                 for t in m["tickets"])
    assert len(labels) == scored
    assert {f"r{k}" for k in range(1, 31)} <= set(labels)  # the IMP rounds
    assert sum(label.startswith("target=") for label in labels) == 5  # the CS targets
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"cs tickets", "cs frontier", "imp tickets", "imp frontier", "dense"} <= set(legend)
    cost = cost_figure(report)
    assert {"search, critical path", "retraining, critical path", "search, total",
            "retraining, total"} <= {t.get_text() for t in cost.axes[0].get_legend().get_texts()}
    timeline = timeline_figure(report)
    assert {t.get_text() for t in timeline.axes[0].get_legend().get_texts()} >= {"cs", "imp"}
    for fig in (pareto, cost, timeline):
        plt.close(fig)


def test_ticket_labels_name_what_differs_between_trials():
    from ticketsearch.report import ticket_labels

    tickets = [{"trial_id": "cs-s0=-0.1-lam=1e-08-beta=200-seed=0", "name": "final"},
               {"trial_id": "cs-s0=0-lam=1e-08-beta=200-seed=0", "name": "final"},
               {"trial_id": "imp-global-p=0.2-seed=0", "name": "round-01", "round": 1},
               {"trial_id": "imp-global-p=0.2-seed=0", "name": "round-02", "round": 2}]
    assert ticket_labels(tickets[:2]) == ["s0=-0.1", "s0=0"]
    assert ticket_labels(tickets[2:]) == ["r1", "r2"]


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


def _row(name, sparsity, val, test):
    return {"name": name, "trial_id": name, "sparsity": sparsity, "val_acc": val,
            "test_acc": test, "run_id": None}


def _methods(cs, imp, key="val_acc"):
    return {"cs": {"pareto": pareto_front(cs, key), "tickets": cs},
            "imp": {"pareto": pareto_front(imp, key), "tickets": imp}}


def test_pareto_front_and_frontier_comparison_on_hand_made_tickets():
    cs = [_row("a", 0.5, 0.90, 0.90), _row("b", 0.7, 0.91, 0.91), _row("c", 0.6, 0.89, 0.89),
          _row("d", 0.86, 0.80, 0.80)]
    assert [x["name"] for x in pareto_front(cs, "val_acc")] == ["b", "d"]
    imp = [_row("r1", 0.2, 0.92, 0.92), _row("r3", 0.49, 0.915, 0.915),
           _row("r5", 0.67, 0.90, 0.90), _row("r9", 0.87, 0.85, 0.85)]
    result = frontier_comparison(_methods(cs, imp))
    assert [(r["name"], r["reference_ticket"], r["reference_best_test_acc"], r["dominates"])
            for r in result["tickets"]] == [("b", "r9", 0.85, True), ("d", "r9", 0.85, False)]
    assert (result["dominating"], result["of"], result["without_comparator"]) == (1, 2, 0)


def test_a_ticket_sparser_than_every_reference_ticket_has_no_comparator():
    """The 4/4 headline of a 4-epoch quickstart: CS tickets sparser than any IMP ticket (one
    of them at 0.553 against a dense 0.944) were counted as dominating."""
    cs = [_row("s1", 0.990, 0.97, 0.97), _row("s2", 0.993, 0.96, 0.96),
          _row("s3", 0.996, 0.90, 0.90), _row("s4", 0.999, 0.55, 0.553)]
    imp = [_row("r1", 0.2, 0.95, 0.95), _row("r5", 0.67, 0.95, 0.95)]
    result = frontier_comparison(_methods(cs, imp))
    assert [r["dominates"] for r in result["tickets"]] == [None] * 4
    assert [r["reference_ticket"] for r in result["tickets"]] == [None] * 4
    assert (result["dominating"], result["of"], result["without_comparator"]) == (0, 0, 4)


def test_tickets_are_selected_on_validation_and_reported_on_test():
    """Matching, sparsest matching and the frontier are chosen by validation accuracy; the
    comparison with IMP is made on the test accuracy of the tickets so chosen."""
    cs = [_row("lucky", 0.9, 0.80, 0.99),  # best on test by chance, poor on validation
          _row("solid", 0.8, 0.95, 0.94)]
    imp = [_row("r9", 0.9, 0.93, 0.96), _row("r10", 0.95, 0.91, 0.97)]
    assert [t["name"] for t in pareto_front(cs, "val_acc")] == ["solid", "lucky"]
    assert [t["name"] for t in pareto_front(imp, "val_acc")] == ["r9", "r10"]
    row = frontier_comparison(_methods(cs, imp))["tickets"][0]
    assert (row["name"], row["reference_ticket"]) == ("solid", "r9")  # r9: best imp val acc
    assert row["reference_best_test_acc"] == 0.96 and row["dominates"] is False


def test_matching_is_judged_on_validation_accuracy():
    from ticketsearch.analysis import method_report
    from ticketsearch.records import TrialRecord

    def trial(tickets):
        return TrialRecord.model_validate({
            "trial_id": "cs-x", "method": "cs", "tickets": tickets, "rounds": [], "final": {},
            "ledger": {"device": "cpu", "device_fraction": 1.0, "epochs": {"total": 1},
                       "train_seconds": {}, "recomputed_epochs": 0, "wall_clock_s": 1.0,
                       "device_s": 1.0, "attempts": 1, "attempt_windows": [[0.0, 1.0]]},
            "data_sizes": {}})

    tickets = [{"name": "high-test", "sparsity": 0.9, "val_acc": 0.90, "test_acc": 0.99},
               {"name": "high-val", "sparsity": 0.8, "val_acc": 0.96, "test_acc": 0.93}]
    report = method_report([trial(tickets)], {"val_acc": 0.95, "test_acc": 0.95}, 0.01,
                           "val_acc")
    assert [t["name"] for t in report["matching"]] == ["high-val"]
    assert report["sparsest_matching"]["name"] == "high-val"


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
