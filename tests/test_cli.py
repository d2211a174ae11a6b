"""The ``ticketsearch`` command: validate, schema, run, ticket and bench overhead.

Most tests call ``ticketsearch.cli.main`` in-process; one runs the real command in a
subprocess, which is what proves a user error prints no traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_job_dict

import ticketsearch.local
from ticketsearch.cli import main
from ticketsearch.spec import load_job

REPO_ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = REPO_ROOT / "jobs" / "quickstart.yaml"

QUICKSTART_TARGETS = [1 - 0.8**k for k in (3, 5, 10, 15, 20)]  # IMP's densities
QUICKSTART_IDS = [
    "dense-seed=0",
    "cs-target=0.488-s0=0.5-beta=200-seed=0",
    "cs-target=0.67232-s0=0.5-beta=200-seed=0",
    "cs-target=0.892626-s0=0.5-beta=200-seed=0",
    "cs-target=0.964816-s0=0.5-beta=200-seed=0",
    "cs-target=0.988471-s0=0.5-beta=200-seed=0",
    "imp-global-p=0.2-seed=0",
]

TINY_JOB = """\
name: tiny-cli
data: {dataset: digits}
model: {name: mlp, mlp_hidden: [32, 16]}
train:
  epochs_per_round: 3
  batch_size: 128
  lr_milestones: [2]
  rewind_epoch: 1
  device: cpu
methods:
  dense: {}
  cs: {rounds: 2, mask_init: 0.0}
  imp: {rounds: 3, prune_fraction: 0.2}
"""
TINY_IDS = ["dense-seed=0", "cs-s0=0-lam=1e-08-beta=200-seed=0", "imp-global-p=0.2-seed=0"]
TINY_TICKETS = {
    "cs-s0=0-lam=1e-08-beta=200-seed=0": ["final"],
    "imp-global-p=0.2-seed=0": ["round-01", "round-02", "round-03"],
}


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``ticketsearch <argv>`` run in-process."""
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# --------------------------------------------------------------------------- validate


def test_validate_quickstart_lists_its_seven_trials(capsys):
    status, out, err = run_cli(capsys, "validate", str(QUICKSTART))
    assert status == 0, err
    assert err == ""
    assert "valid job 'quickstart'" in out
    assert "7 trials:" in out
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == QUICKSTART_IDS


def test_validate_json_lists_seven_resolved_trials(capsys):
    status, out, _ = run_cli(capsys, "validate", str(QUICKSTART), "--json")
    assert status == 0
    trials = json.loads(out)
    assert [t["trial_id"] for t in trials] == QUICKSTART_IDS
    assert [t["method"] for t in trials] == ["dense"] + ["cs"] * 5 + ["imp"]
    targets = [t["settings"]["target_sparsity"] for t in trials[1:6]]
    assert targets == pytest.approx(QUICKSTART_TARGETS)
    assert trials[6]["settings"]["rounds"] == 30
    assert all(t["train"]["epochs_per_round"] == 85 for t in trials)


def test_validate_override_narrows_the_cs_sweep_to_one_setting(capsys):
    status, out, _ = run_cli(
        capsys, "validate", str(QUICKSTART), "--set", "methods.cs.imp_rounds=[10]"
    )
    assert status == 0
    assert "3 trials:" in out
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == ["dense-seed=0", "cs-target=0.892626-s0=0.5-beta=200-seed=0",
                      "imp-global-p=0.2-seed=0"]


def test_validate_override_of_epochs_rescales_the_schedule(capsys):
    status, out, _ = run_cli(
        capsys, "validate", str(QUICKSTART), "--json", "--set", "train.epochs_per_round=10"
    )
    assert status == 0
    train = json.loads(out)[0]["train"]
    assert train["epochs_per_round"] == 10
    assert train["lr_milestones"] == [7, 8]  # 56*10/85 = 6.6 -> 7, 71*10/85 = 8.4 -> 8
    assert train["rewind_epoch"] == 2


BAD_SPECS = {
    "unknown key": (
        "name: bad\nmethods: {cs: {}}\ntrain: {epochs_per_rond: 3}\n",
        [],
        ["train.epochs_per_rond: unknown key", "did you mean 'epochs_per_round'?"],
    ),
    "wrong literal": (
        "name: bad\nmethods: {cs: {}}\nmodel: {name: resnet99}\n",
        [],
        ["model.name: must be one of 'mlp', 'resnet20', 'vgg16', 'resnet50'", "'resnet99'"],
    ),
    "wrong literal in a sweep": (
        "name: bad\nmethods: {imp: {sweep: {scope: [global, random]}}}\n",
        [],
        ["methods.imp.sweep.scope[1]: must be one of 'global', 'layerwise'"],
    ),
    "yaml syntax error": (
        "name: bad\nmethods: {cs: {}\ntrain: {lr: 0.1}\n",
        [],
        ["YAML syntax error at line 3"],
    ),
    "schedule outside the round": (
        "name: bad\nmethods: {cs: {}}\ntrain: {epochs_per_round: 4, rewind_epoch: 4, "
        "lr_milestones: [2]}\n",
        [],
        ["train.rewind_epoch: must be below train.epochs_per_round (4)"],
    ),
    "malformed override": (
        "name: ok\nmethods: {cs: {}}\n",
        ["--set", "train.lr"],
        ["override 'train.lr': expected dotted.key=value"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPECS), ids=list(BAD_SPECS))
def test_validate_reports_a_bad_spec_in_one_line_per_problem(tmp_path, capsys, case):
    text, extra, expected = BAD_SPECS[case]
    spec = tmp_path / "job.yaml"
    spec.write_text(text)
    status, out, err = run_cli(capsys, "validate", str(spec), *extra)
    assert status == 2
    assert out == ""
    assert err.startswith("error: ")
    for fragment in expected:
        assert fragment in err
    assert "Traceback" not in err


def test_validate_reports_a_missing_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    status, out, err = run_cli(capsys, "validate", str(missing))
    assert status == 2
    assert out == ""
    assert err == f"error: {missing}: job spec file not found; check the path\n"


def test_validate_error_in_a_real_process_has_no_traceback(tmp_path):
    spec = tmp_path / "job.yaml"
    spec.write_text("name: bad\nmethods: {cs: {lambda: -1}}\ntrain: {epochs_per_rond: 3}\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run(
        [sys.executable, "-m", "ticketsearch.cli", "validate", str(spec)],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ")
    assert "train.epochs_per_rond: unknown key" in proc.stderr
    assert "methods.cs.lambda: must be greater than or equal to 0 (got -1)" in proc.stderr


def test_schema_prints_the_job_json_schema(capsys):
    status, out, _ = run_cli(capsys, "schema")
    assert status == 0
    schema = json.loads(out)
    assert {"name", "methods", "train", "data", "model", "storage"} <= set(schema["properties"])
    assert schema["required"] == ["name", "methods"]


# --------------------------------------------------------------------------- run, ticket


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run the tiny job once through the CLI; return (status, stdout, stderr, job dir, spec)."""
    base = tmp_path_factory.mktemp("cli_run")
    spec = base / "tiny.yaml"
    spec.write_text(TINY_JOB)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["run", str(spec), "--in-process", "--storage", str(base / "runs")])
    job = load_job(spec)
    root = base / "runs" / f"{job.name}-{job.spec_hash()}"
    return status, out.getvalue(), err.getvalue(), root, spec


def test_run_prints_the_ticket_table_and_the_results_folder(tiny_run):
    status, out, err, root, _ = tiny_run
    assert status == 0, err
    assert "tickets (sparsity, val acc, test acc):" in out
    assert out.rstrip().endswith(f"results in {root}")
    report = json.loads((root / "report" / "report.json").read_text())
    for method, info in report["methods"].items():
        for ticket in info["tickets"]:
            line = f"{method:5s} {ticket['trial_id']}/{ticket['name']}: {ticket['sparsity']:.3f}"
            assert line in out
    assert "cs    search 6/6  retrain 3/3" in out
    assert "imp   search 9/9  retrain 3/3" in out


def test_run_writes_the_job_directory(tiny_run):
    _, _, _, root, spec = tiny_run
    assert load_job(root / "spec.yaml").spec_hash() == load_job(spec).spec_hash()
    summary = json.loads((root / "summary.json").read_text())
    assert [t["trial_id"] for t in summary["trials"]] == TINY_IDS
    for trial_id in TINY_IDS:
        trial_dir = root / "trials" / trial_id
        result = json.loads((trial_dir / "result.json").read_text())
        assert result["trial_id"] == trial_id
        assert not (trial_dir / "checkpoint.pt").exists()
        names = TINY_TICKETS.get(trial_id, [])
        assert [t["name"] for t in result["tickets"]] == names
        on_disk = sorted(p.name for p in (trial_dir / "tickets").iterdir()) if names else []
        assert on_disk == names
        for name in names:
            files = sorted(p.name for p in (trial_dir / "tickets" / name).iterdir())
            assert files == ["masks.bin", "rewind.safetensors", "ticket.json", "trained.safetensors"]
    assert not (root / "trials" / "dense-seed=0" / "tickets").exists()


def test_ticket_shows_the_sparsity_recorded_by_the_run(tiny_run, capsys):
    _, _, _, root, _ = tiny_run
    trial_dir = root / "trials" / "imp-global-p=0.2-seed=0"
    result = json.loads((trial_dir / "result.json").read_text())
    recorded = {t["name"]: t for t in result["tickets"]}
    status, out, err = run_cli(capsys, "ticket", str(trial_dir / "tickets" / "round-02"))
    assert status == 0, err
    info = json.loads(out)
    assert info["name"] == "round-02"
    assert info["method"] == "imp"
    assert info["round"] == 2
    assert info["sparsity"] == pytest.approx(recorded["round-02"]["sparsity"], abs=1e-12)
    assert info["sparsity"] == pytest.approx(1 - 1740 / 2720, abs=1e-12)  # 2720 -> 2176 -> 1740
    assert sorted(info["layer_densities"]) == ["fc1", "fc2", "fc3"]
    assert info["test_acc"] == recorded["round-02"]["test_acc"]


def test_ticket_with_a_flipped_mask_byte_fails_its_checksum(tiny_run, tmp_path, capsys):
    _, _, _, root, _ = tiny_run
    source = root / "trials" / "cs-s0=0-lam=1e-08-beta=200-seed=0" / "tickets" / "final"
    ticket = tmp_path / "final"
    shutil.copytree(source, ticket)
    masks = ticket / "masks.bin"
    data = bytearray(masks.read_bytes())
    data[0] ^= 0xFF
    masks.write_bytes(bytes(data))
    status, out, err = run_cli(capsys, "ticket", str(ticket))
    assert status == 2
    assert out == ""
    assert err.startswith("error: ")
    assert "masks.bin checksum mismatch" in err
    assert "Traceback" not in err


def test_ticket_on_a_missing_directory_is_a_user_error(tmp_path, capsys):
    status, out, err = run_cli(capsys, "ticket", str(tmp_path / "no-such-ticket"))
    assert status == 2
    assert out == ""
    assert err.startswith("error: ")
    assert "no-such-ticket" in err


@pytest.mark.parametrize("where", ["a_file", "under_a_file", "unwritable"])
def test_run_refuses_a_storage_path_it_cannot_use(tmp_path, capsys, where):
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(tiny_job_dict(cs={"rounds": 1})))
    (tmp_path / "file").write_text("not a folder")
    storage = {"a_file": tmp_path / "file", "under_a_file": tmp_path / "file" / "runs",
               "unwritable": Path("/sys/kernel/ticketsearch-runs")}[where]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(spec), "--storage", str(storage), "--in-process"]) == 2
    err = capsys.readouterr().err
    assert f"storage.path {storage}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / "file").read_text() == "not a folder"
    assert where == "a_file" or not storage.exists()


def test_run_interrupted_tells_the_user_how_to_resume(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ticketsearch.local, "_run_trials", interrupted)
    spec = tmp_path / "tiny.yaml"
    spec.write_text(TINY_JOB)
    job = load_job(spec)
    storage = tmp_path / "runs"
    status, _, err = run_cli(capsys, "run", str(spec), "--in-process", "--storage", str(storage))
    assert status == 130
    assert f"ticketsearch resume {job.name}-{job.spec_hash()} --storage {storage}" in err
    assert not (storage / f"{job.name}-{job.spec_hash()}" / "driver.lock").exists()


# --------------------------------------------------------------------------- bench


def test_bench_overhead_prints_both_ratios(capsys):
    status, out, err = run_cli(capsys, "bench", "overhead", "--models", "mlp", "--repeats", "1")
    assert status == 0, err
    number = r"(\d+\.\d+)"
    cs = re.search(rf"^mlp on \S+: cs/dense = {number} (meets|MISSES) the target <= 1\.10$",
                   out, re.MULTILINE)
    loop = re.search(
        rf"^mlp on \S+: loop/minimal = {number} (meets|MISSES) the target <= 1\.05$",
        out, re.MULTILINE)
    assert cs is not None, out
    assert loop is not None, out
    assert float(cs.group(1)) > 0
    assert float(loop.group(1)) > 0
    header = out.splitlines()[0].split()
    assert "cs/dense" in header and "loop/minimal" in header
    ratio = re.search(rf"^bookkeeping/epoch = {number} (meets|MISSES) the target <= 0\.10$",
                      out, re.MULTILINE)
    assert ratio is not None and float(ratio.group(1)) >= 0, out
    rows = [line.split() for line in out.splitlines() if line.startswith("cs digits+mlp")]
    assert [row[3:5] for row in rows] == [["by", "time"], ["every", "epoch"]]
    assert all(row[2] == "60" for row in rows)  # epochs of the tracked trial, each counted


def test_bookkeeping_is_what_passes_between_epochs_besides_training_and_evaluation():
    """A checkpoint after every epoch shows up as bookkeeping (it is work between epochs)."""
    from ticketsearch.bench import measure_bookkeeping

    lean = measure_bookkeeping(epochs=6)
    heavy = measure_bookkeeping(epochs=6, checkpoint_every=1)
    assert lean["epochs"] == heavy["epochs"] == 6
    assert 0 <= lean["bookkeeping_ms"] < heavy["bookkeeping_ms"]


# --------------------------------------------------------------- checked before anything


def _spec_file(tmp_path, **top) -> Path:
    data = tiny_job_dict(cs={"rounds": 1})
    for key, value in top.items():
        data[key] = value if key == "model" else {**data.get(key, {}), **value}
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    return spec


@pytest.mark.parametrize("case", ["missing_dataset", "val_size", "cuda_here", "cuda_on_ray"])
def test_run_checks_data_and_devices_before_writing_anything(tmp_path, capsys, monkeypatch,
                                                            case):
    """Found before the job directory or any MLflow run exists (and before Ray starts)."""
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    (tmp_path / "empty").mkdir()
    top, flags, message = {
        "missing_dataset": ({"data": {"dataset": "cifar10", "root": str(tmp_path / "empty")},
                             "model": {"name": "resnet20"}}, [], "cifar-10-batches-py"),
        "val_size": ({"data": {"val_size": 5000}}, [], "data.val_size=5000"),
        "cuda_here": ({"train": {"device": "cuda"}}, ["--in-process"], "train.device: cuda"),
        "cuda_on_ray": ({"train": {"device": "cuda"}}, [], "resources.gpus is 0"),
    }[case]
    spec = _spec_file(tmp_path, **top)
    storage = tmp_path / "runs"
    assert main(["run", str(spec), "--storage", str(storage), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not storage.exists()


def test_a_sweep_of_many_trials_needs_yes(tmp_path, capsys):
    data = tiny_job_dict(cs={"rounds": 1, "sweep": {"mask_init": [i / 1000 for i in range(501)]}})
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    storage = tmp_path / "runs"
    assert main(["run", str(spec), "--storage", str(storage), "--in-process"]) == 2
    err = capsys.readouterr().err
    assert "501 trials" in err and "--yes" in err
    assert not storage.exists()
    assert main(["validate", str(spec)]) == 0  # looking at it needs no confirmation


def test_creating_many_runs_shows_progress(tmp_path, monkeypatch):
    from ticketsearch.job import JobRun
    from ticketsearch.spec import parse_job

    monkeypatch.setattr("ticketsearch.tracking.RUNS_PROGRESS_EVERY", 2)
    job = parse_job(tiny_job_dict(cs={"rounds": 1, "sweep": {"mask_init": [0.0, 0.1, 0.2]}},
                                  imp={"rounds": 1}))
    lines = []
    run = JobRun(job, tmp_path / "runs", echo=lines.append)
    run.open()
    run.release()
    assert [line for line in lines if "trial runs" in line] == [
        "tracking: created 2/4 trial runs", "tracking: created 4/4 trial runs"]
