"""Iterative Magnitude Pruning with rewinding (Frankle & Carbin; Frankle et al.).

Round 1 trains the dense network; each round's end prunes ``prune_fraction`` of the remaining
weights, giving the next ticket, which the next round trains — so each round both evaluates
the previous ticket and finds the next. IMP-C (``rewind_between_rounds: false``) continues
from the current weights and retrains every ticket at the end instead.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ..sparsity import imp
from ..sparsity.masks import (
    add_binary_masks,
    binary_masks,
    dense_weights,
    full_masks,
    load_dense_state,
    set_binary_masks,
)
from ..spec import MethodSpec, Seed, format_number
from .base import TrialRun
from .registry import Method
from .retrain import planned_retrain_epochs, retrain_pending


class IMPSpec(MethodSpec):
    """Iterative Magnitude Pruning with rewinding (Frankle et al.)."""

    sweep_axes: ClassVar[tuple[str, ...]] = (
        "prune_fraction",
        "rounds",
        "scope",
        "rewind_between_rounds",
        "seed",
    )

    rounds: int = Field(
        30,
        ge=1,
        description="Serial prune rounds; round k's ticket has density (1 - prune_fraction)^k.",
    )
    prune_fraction: float = Field(
        0.2, gt=0, lt=1, description="Fraction of the remaining weights pruned per round."
    )
    scope: Literal["global", "layerwise"] = Field(
        "global",
        description="Prune with one magnitude threshold across all prunable tensors (global) "
        "or per tensor (layerwise).",
    )
    rewind_between_rounds: bool = Field(
        True,
        description="Rewind surviving weights to the rewind snapshot after each round; "
        "false = IMP-C (continue training, rewind only for the final retraining).",
    )
    seed: Seed = Field(0, description="Seed of weight initialisation and data order.")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Grid axes (allowed: prune_fraction, rounds, scope, rewind_between_rounds, "
        "seed), each a non-empty list of values; one IMP chain per point of their product.",
    )


def run_imp(run: TrialRun) -> dict[str, Any]:
    """``rounds`` rounds of train, prune, rewind; one ticket per round."""
    s = run.settings
    if run.enter("search"):
        model = run.new_model()
        add_binary_masks(model, full_masks(model, run.layer_names))
        optimizer = run.new_optimizer(model)
        for rnd in run.rounds(s.rounds):
            val, test = run.fit(model, optimizer,
                                snapshot_at=run.train.rewind_epoch if rnd == 0 else None)
            if rnd > 0 and s.rewind_between_rounds:  # this round trained the last ticket
                run.emit(run.pending.pop(), trained=model, val_acc=val, test_acc=test)
            pruned = imp.prune(dense_weights(model), binary_masks(model), s.prune_fraction,
                               s.scope)
            run.pending.append(run.make_ticket(f"round-{rnd + 1:02d}", pruned, round=rnd + 1))
            if s.rewind_between_rounds:
                load_dense_state(model, run.snapshot)
            set_binary_masks(model, pruned)
            optimizer = run.new_optimizer(model)
    retrain_pending(run)
    first = run.rounds_done[0] if run.rounds_done else {}
    return {"dense_val_acc": first.get("val_acc"), "dense_test_acc": first.get("test_acc")}


def identity(spec: IMPSpec, swept: frozenset[str]) -> tuple[str, str]:
    """The round count is named only when the sweep varies it."""
    variant = "imp" if spec.rewind_between_rounds else "imp-c"
    parts = [spec.scope, f"p={format_number(spec.prune_fraction)}"]
    if "rounds" in swept:
        parts.append(f"r={spec.rounds}")
    parts.append(f"seed={spec.seed}")
    return "-".join([variant, *parts]), " ".join([variant, *parts])


def planned_epochs(trial) -> int:
    s = trial.settings
    retrained = 1 if s.rewind_between_rounds else s.rounds
    return s.rounds * trial.train.epochs_per_round + planned_retrain_epochs(trial, retrained)


METHOD = Method(
    name="imp", spec=IMPSpec, run=run_imp, identity=identity, planned_epochs=planned_epochs,
    description="Iterative Magnitude Pruning chain(s)", label="imp", order=20,
    baseline=("dense_", "first round of the IMP chains"),
)
