"""A method added from outside the package — one module (this one) and one ``register`` call,
no file of ticketsearch edited — runs end to end through Ray and MLflow into the report.

The method is random pruning at a fixed density, the baseline lottery-ticket papers compare
against: a random mask at ``sparsity`` (per layer), retrained from the initial weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from conftest import tiny_job_dict
from pydantic import Field

from ticketsearch.cli import main
from ticketsearch.methods import Method, TrialRun, method_names, register, unregister
from ticketsearch.methods.retrain import planned_retrain_epochs, retrain_pending
from ticketsearch.spec import MethodSpec, SpecError, format_number, job_json_schema, parse_job


class RandomSpec(MethodSpec):
    """Random pruning: a random mask at a fixed sparsity, retrained from initialisation."""

    sweep_axes: ClassVar[tuple[str, ...]] = ("sparsity", "seed")

    sparsity: float = Field(0.8, gt=0, lt=1, description="Fraction of each layer pruned.")
    seed: int = Field(0, description="Seed of the weights, the mask and the data order.")
    sweep: dict[str, list[Any]] = Field(default_factory=dict, description="Grid axes.")


def run_random(run: TrialRun) -> dict[str, Any]:
    """Draw the mask; the initial weights are the rewind point; retrain."""
    s = run.settings
    if run.enter("draw"):
        model = run.new_model()
        run.snapshot = {k: v.detach().clone() for k, v in model.state_dict().items()}
        generator = torch.Generator().manual_seed(run.trial.seed)
        layers = dict(model.named_modules())
        masks = {name: torch.rand(layers[name].weight.shape, generator=generator) >= s.sparsity
                 for name in run.layer_names}
        run.pending = [run.make_ticket("random", masks, round=0, rewind_epoch=0)]
    retrain_pending(run)
    return {}


def identity(spec: RandomSpec, swept: frozenset[str]) -> tuple[str, str]:
    sparsity = format_number(spec.sparsity)
    return f"random-s={sparsity}-seed={spec.seed}", f"random s={sparsity} seed={spec.seed}"


def planned_epochs(trial) -> int:
    return planned_retrain_epochs(trial, 1)


RANDOM = Method(
    name="random", spec=RandomSpec, run=run_random, identity=identity,
    planned_epochs=planned_epochs, description="Random pruning at a fixed sparsity",
    label="random", order=40, search_phases=(),
)


@pytest.fixture(scope="module", autouse=True)
def random_method():
    """Registered for this module's tests (a Ray worker registers it from the trial's
    payload); other test modules see the built-in methods only."""
    register(RANDOM)
    yield RANDOM
    unregister(RANDOM.name)


def test_the_registered_method_is_part_of_the_spec_and_its_schema():
    assert method_names() == ["dense", "cs", "imp", "rigl", "random"]
    job = parse_job(tiny_job_dict(random={"sweep": {"sparsity": [0.5, 0.9]}}))
    assert [t.trial_id for t in job.trials()] == ["random-s=0.5-seed=0", "random-s=0.9-seed=0"]
    schema = job_json_schema()
    assert "random" in schema["$defs"]["MethodsSpec"]["properties"]
    with pytest.raises(SpecError) as error:
        parse_job(tiny_job_dict(random={"sparsity": 1.5}))
    assert error.value.problems == ["methods.random.sparsity: must be less than 1 (got 1.5)"]
    with pytest.raises(SpecError) as error:
        parse_job(tiny_job_dict(randm={}))
    assert "allowed keys are: cs, dense, imp, random, rigl (did you mean 'random'?)" in (
        error.value.problems[0])


@pytest.mark.integration
def test_a_method_registered_from_a_test_module_runs_through_ray_and_mlflow(
        ray_local, tmp_path, capsys):
    data = tiny_job_dict(imp={"rounds": 2}, random={"sweep": {"sparsity": [0.5, 0.9]}})
    data["name"] = "random-pruning"
    data["resources"] = {"cpus": 0.5}
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(data))
    storage = tmp_path / "runs"
    assert main(["run", str(spec), "--storage", str(storage)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "  random random-s=0.9-seed=0/random: " in out

    (job_dir,) = storage.glob("random-pruning-*")
    report = json.loads((job_dir / "report" / "report.json").read_text())
    assert list(report["methods"]) == ["imp", "random"]
    random = report["methods"]["random"]
    assert random["label"] == "random" and random["trials"] == 2
    assert [round(t["sparsity"], 1) for t in random["tickets"]] == [0.5, 0.9]
    assert random["search_epochs"] == {"critical_path": 0, "total": 0}
    assert random["retrain_epochs"] == {"critical_path": 4, "total": 8}
    assert all(t["test_acc"] is not None and t["run_id"] for t in random["tickets"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    for ticket in random["tickets"]:
        run = client.get_run(ticket["run_id"])
        assert run.data.tags["method"] == "random" and run.info.status == "FINISHED"
        assert run.data.params["settings.sparsity"] in ("0.5", "0.9")
        assert "result.json" in {a.path for a in client.list_artifacts(ticket["run_id"])}
        (own,) = client.search_runs([run.info.experiment_id],
                                    f"tags.mlflow.parentRunId = '{ticket['run_id']}' and "
                                    f"tags.ticket = '{ticket['name']}'")
        assert own.data.metrics["sparsity"] == pytest.approx(ticket["sparsity"])
        assert "ticket" in {a.path for a in client.list_artifacts(own.info.run_id)}
        assert own.data.tags["ticketsearch.has_model"] == "true"  # it was retrained
    result = json.loads(Path(random["tickets"][0]["path"]).parent.parent.joinpath(
        "result.json").read_text())
    assert result["method"] == "random" and result["ledger"]["epochs"] == {
        "retrain": 4, "total": 4}
