"""The shape of the package: a core free of Ray and MLflow, executors side by side, adapters
on the protocol module, short classes, one expansion of the trials, stable job hashes."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import ClassVar

import pytest
from pydantic import Field

import ticketsearch.methods.cs as cs_method
from ticketsearch.methods import Method, get_method, register
from ticketsearch.spec import JobSpec, load_job, parse_job

PACKAGE = Path(__file__).resolve().parents[1] / "ticketsearch"
JOBS = PACKAGE.parent / "jobs"
CORE = ["spec.py", "catalog.py", "data.py", "models.py", "training.py", "tickets.py",
        "recipes.py", "hooks.py", "records.py", "analysis.py", "sparsity", "methods",
        "usercode.py", "layers.py", "userdata.py", "preflight.py"]


def imports_of(path: Path) -> set[str]:
    """Every module a file imports (at any depth), relative ones resolved in the package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
                base = ".".join(parts + ((node.module,) if node.module else ()))
                names |= {base} | {f"{base}.{alias.name}" for alias in node.names}
            else:
                names.add(node.module)
    return names


def files(*names: str) -> list[Path]:
    out = []
    for name in names:
        path = PACKAGE / name
        out += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return out


@pytest.mark.parametrize("path", files(*CORE), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_the_core_imports_neither_ray_nor_mlflow(path):
    outside = {name for name in imports_of(path)
               if name.split(".")[0] in ("ray", "mlflow")
               or name.startswith(("ticketsearch.tracking", "ticketsearch.cluster",
                                   "ticketsearch.local", "ticketsearch.job"))}
    assert not outside, f"{path.name} imports {sorted(outside)}"


def test_the_executors_are_siblings_and_the_adapters_use_the_protocol_module():
    local, cluster = imports_of(PACKAGE / "local.py"), imports_of(PACKAGE / "cluster.py")
    assert not any(name.startswith("ticketsearch.cluster") for name in local)
    assert not any(name.startswith("ticketsearch.local") for name in cluster)
    for adapter in ("jobdir.py", "tracking.py"):
        names = imports_of(PACKAGE / adapter)
        assert "ticketsearch.hooks" in names
        assert not any(name.startswith("ticketsearch.methods") for name in names), adapter


def test_a_ray_trial_never_parses_the_job():
    tree = ast.parse((PACKAGE / "cluster.py").read_text())
    calls = {node.func.attr if isinstance(node.func, ast.Attribute) else
             getattr(node.func, "id", "") for node in ast.walk(tree) if isinstance(node, ast.Call)}
    assert not calls & {"parse_job", "load_job", "trials"}


def test_no_class_has_more_than_twenty_methods():
    for path in files("."):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                count = sum(isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef)
                            for item in node.body)
                assert count <= 20, f"{path.name}: {node.name} has {count} methods"


def test_the_trials_are_expanded_once_per_job(monkeypatch):
    calls = []
    expand = JobSpec._expand
    monkeypatch.setattr(JobSpec, "_expand", lambda self, *a: calls.append(a[0]) or
                        expand(self, *a))
    job = load_job(JOBS / "quickstart.yaml")
    first = job.trials()
    assert job.trials() == first and job.trials() is not first  # a copy of one expansion
    assert calls == ["dense", "cs", "imp"]


# --- the job hash: non-default fields only ---------------------------------------------------

PINNED = {
    "quickstart.yaml": "d03f07addeda",
    "paper-resnet20-cifar10.yaml": "427d47ab29dc",
    "recipes-ablation.yaml": "1d1d1d897340",
    "rigl-resnet20-cifar10.yaml": "128e9fd81d20",
}


def test_pinned_job_hashes():
    assert parse_job({"name": "job", "methods": {"cs": {}}}).spec_hash() == "b42980da69c3"
    assert {name: load_job(JOBS / name).spec_hash() for name in PINNED} == PINNED


def test_a_knob_added_with_a_default_leaves_the_hashes_unchanged():
    before = dict(PINNED)

    class CSWithANewKnob(cs_method.CSSpec):
        warmup_rounds: int = Field(0, ge=0, description="A knob added later.")
        sweep_axes: ClassVar[tuple[str, ...]] = cs_method.CSSpec.sweep_axes

    original = get_method("cs")
    register(Method(**{**original.__dict__, "spec": CSWithANewKnob}))
    try:
        after = {name: load_job(JOBS / name).spec_hash() for name in before}
        changed = load_job(JOBS / "quickstart.yaml", ["methods.cs.warmup_rounds=1"])
        assert type(changed.methods["cs"]) is CSWithANewKnob
    finally:
        register(original)
    assert after == before
    assert changed.spec_hash() != before["quickstart.yaml"]
