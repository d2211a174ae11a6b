"""A user's own package (a CNN factory and numpy data in a folder of its own) run end to end:
a CS sweep and an IMP chain through a local Ray with MLflow, whose tickets apply to a fresh
model from the same factory; and the same job submitted to a two-node ``ray start``
cluster whose nodes do not have the package, which fails clearly without shipping the code
(``--no-ship``) and succeeds with it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from raycluster import REPO, ray_cluster
from userpkg import job_dict, write_package

from ticketsearch import load_ticket
from ticketsearch.cli import main
from ticketsearch.spec import load_job

pytestmark = pytest.mark.integration
JOB_TIMEOUT_S = 300.0


def project(root: Path, package: str, job: str) -> Path:
    """``root/proj``: the package and ``job.yaml``, as in a researcher's project folder."""
    folder = root / "proj"
    write_package(folder, package)
    (folder / "job.yaml").write_text(yaml.safe_dump(job_dict(job, package)))
    return folder / "job.yaml"


def check_tickets(job_dir: Path, build_net) -> list[str]:
    """Every ticket of the job loads, records its factory, and applies to a fresh model from
    the factory: its pruned weights are zero, the rest are the rewind point's."""
    names = []
    for path in sorted(job_dir.glob("trials/*/tickets/*")):
        ticket = load_ticket(path)
        assert ticket.meta["model_factory"].endswith(".nets:build_net")
        assert ticket.meta["model_kwargs"] == {"width": 8}
        model = ticket.apply(build_net(num_classes=3, input_shape=(1, 8, 8), width=8))
        for layer in ("conv1", "conv2"):
            expected = ticket.rewind_state[f"{layer}.weight"] * ticket.masks[layer]
            assert torch.equal(getattr(model, layer).weight, expected)
        names.append(f"{path.parent.parent.name}/{path.name}")
    return names


def test_own_package_runs_cs_and_imp_through_local_ray_and_mlflow(
        ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    spec = project(tmp_path, "ownpkg_local", "own-local")
    storage = tmp_path / "runs"
    assert main(["run", str(spec), "--storage", str(storage)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "preflight: ownpkg_local.nets:build_net on ownpkg_local.data:load: 2 of 3 weight " \
        "layers masked" in out

    (job_dir,) = storage.glob("own-local-*")
    report = json.loads((job_dir / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["cs", "imp"]
    assert report["methods"]["cs"]["trials"] == 2 and report["methods"]["imp"]["trials"] == 1
    from ownpkg_local.nets import build_net

    tickets = check_tickets(job_dir, build_net)
    assert tickets == ["cs-s0=-0.05-lam=1e-08-beta=200-seed=0/final",
                       "cs-s0=0-lam=1e-08-beta=200-seed=0/final",
                       "imp-global-p=0.2-seed=0/round-01", "imp-global-p=0.2-seed=0/round-02"]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    for ticket in report["methods"]["cs"]["tickets"]:
        run = client.get_run(ticket["run_id"])
        assert run.data.tags["model"] == "ownpkg_local.nets:build_net"
        assert run.data.tags["dataset"] == "ownpkg_local.data:load"
        assert run.data.params["model.kwargs.width"] == "8"
        assert run.info.status == "FINISHED"


def submit(spec: Path, env: dict[str, str], address: str, storage: Path, *flags: str):
    """``cd <project>; ticketsearch submit job.yaml ... --wait``, as the user runs it."""
    command = [sys.executable, "-m", "ticketsearch.cli", "submit", spec.name, "--address",
               address, "--storage", str(storage), "--wait", "--timeout", str(JOB_TIMEOUT_S),
               *flags]
    return subprocess.run(command, cwd=spec.parent, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=JOB_TIMEOUT_S + 60)


def test_own_package_on_a_cluster_needs_the_code_shipped(tmp_path, monkeypatch):
    spec = project(tmp_path, "ownpkg_cluster", "own-cluster")
    with ray_cluster() as cluster:
        assert not (cluster.root / "ownpkg_cluster").exists()
        storage = cluster.root / "runs"
        refused = submit(spec, cluster.env, cluster.address, storage, "--no-ship")
        assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
        assert "your code: not shipped (--no-ship)" in refused.stdout
        assert "error: data.factory: cannot import module 'ownpkg_cluster.data' " \
            "(ModuleNotFoundError: No module named 'ownpkg_cluster'); searched: " in refused.stdout
        assert refused.stdout.rstrip().endswith(": FAILED")
        assert not list(storage.glob("own-cluster-*"))  # nothing written

        shipped = submit(spec, cluster.env, cluster.address, storage)
        assert shipped.returncode == 0, shipped.stdout[-3000:] + shipped.stderr[-3000:]
        assert "your code: shipped ownpkg_cluster/" in shipped.stdout
        assert shipped.stdout.rstrip().endswith(": SUCCEEDED")
        job_dir = storage / f"own-cluster-{load_job(spec).spec_hash()}"
        trials = {json.loads((d / "result.json").read_text())["trial_id"]
                  for d in (job_dir / "trials").iterdir()}
        assert len(trials) == 3
        monkeypatch.setattr(sys, "path", [str(spec.parent), *sys.path])
        from ownpkg_cluster.nets import build_net

        assert len(check_tickets(job_dir, build_net)) == 4
