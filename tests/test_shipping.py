"""What ``ticketsearch submit`` ships of a job's own code (Ray py_modules, pip), and the
import path a local run gives it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from ticketsearch.cli import main
from ticketsearch.spec import load_job
from ticketsearch.submit import SubmitError, code_to_ship, package_dir, runtime_env
from ticketsearch.usercode import add_import_paths, code_paths


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """proj/ (the spec's folder) with a package, a module, data and noise; work/ (the current
    directory) with another module, a package of the same name and a src/ folder."""
    proj, work = tmp_path / "proj", tmp_path / "work"
    for folder in (proj / "my_pkg", proj / "ticketsearch", proj / ".hidden_pkg",
                   proj / "data", work / "my_pkg", work / "src" / "extra_pkg"):
        folder.mkdir(parents=True)
    for path in (proj / "my_pkg" / "__init__.py", proj / "helpers.py", proj / "__init__.py",
                 proj / "ticketsearch" / "__init__.py", proj / ".hidden_pkg" / "__init__.py",
                 work / "my_pkg" / "__init__.py", work / "tools.py", work / "not-a-name.py",
                 work / "src" / "extra_pkg" / "__init__.py", work / "src" / "one.py"):
        path.write_text("")
    (proj / "data" / "x.npy").write_text("")
    spec = {"name": "ship", "methods": {"cs": {}}, "model": {"factory": "my_pkg:build"},
            "code": {"py_modules": ["../work/src/extra_pkg"], "pip": ["einops>=0.7"]}}
    (proj / "job.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(work)
    return proj / "job.yaml"


def test_the_modules_of_the_spec_folder_and_the_current_directory_are_shipped(project):
    job = load_job(project)
    shipped = code_to_ship(project, job, ["src/one.py"])
    proj, work = project.parent, project.parent.parent / "work"
    assert shipped == [proj / "helpers.py", proj / "my_pkg", work / "tools.py",
                       work / "src" / "extra_pkg", work / "src" / "one.py"]
    env = runtime_env(Path("/tmp/job"), shipped, [*job.code.pip, "timm"])
    assert env["working_dir"] == "/tmp/job"
    assert env["py_modules"] == [str(package_dir()), *map(str, shipped)]
    assert env["pip"] == ["einops>=0.7", "timm"]
    assert "pip" not in runtime_env(Path("/tmp/job"))


def test_a_missing_path_to_ship_is_an_error(project, capsys):
    job = load_job(project)
    with pytest.raises(SubmitError, match=r"^--py-module: .*/work/nope does not exist"):
        code_to_ship(project, job, ["nope"])
    spec = yaml.safe_load(project.read_text())
    spec["code"]["py_modules"] = ["gone.py"]
    project.write_text(yaml.safe_dump(spec))
    assert main(["submit", str(project), "--address", "http://127.0.0.1:9",
                 "--storage", "/shared/runs"]) == 2
    assert capsys.readouterr().err.startswith("error: code.py_modules: ")


def test_a_local_run_imports_from_the_spec_folder_the_current_directory_and_py_modules(
        project, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    proj, work = project.parent.resolve(), (project.parent.parent / "work").resolve()
    paths = code_paths(project, ["../work/src/extra_pkg", "missing.py"])
    assert paths == [str(proj), str(work), str(work / "src")]
    add_import_paths(paths)
    assert sys.path[:3] == paths
    add_import_paths(paths)
    assert sys.path.count(str(proj)) == 1
