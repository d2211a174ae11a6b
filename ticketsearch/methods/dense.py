"""The dense baseline: the unpruned network trained for one round."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from ..spec import MethodSpec, Seed
from .base import TrialRun
from .registry import Method


class DenseSpec(MethodSpec):
    """A dense baseline: the unpruned network trained for one round."""

    sweep_axes: ClassVar[tuple[str, ...]] = ("seed",)

    seed: Seed = Field(0, description="Seed of weight initialisation and data order.")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Grid axes (allowed: seed), each a non-empty list of values; "
        "one dense trial per value.",
    )


def run_dense(run: TrialRun) -> dict[str, Any]:
    """Train the dense model for one round; its val/test accuracy is the baseline."""
    if run.enter("dense"):
        model = run.new_model()
        run.fit(model, run.new_optimizer(model))
    last = run.last_round()
    return {"val_acc": last.get("val_acc"), "test_acc": last.get("test_acc")}


def identity(spec: DenseSpec, swept: frozenset[str]) -> tuple[str, str]:
    return f"dense-seed={spec.seed}", f"dense seed={spec.seed}"


METHOD = Method(
    name="dense", spec=DenseSpec, run=run_dense, identity=identity,
    planned_epochs=lambda trial: trial.train.epochs_per_round,
    description="Dense baseline trained for one round",
    label="dense", order=0, search_phases=("dense",), makes_tickets=False,
    baseline=("", "dense trials"),
)
