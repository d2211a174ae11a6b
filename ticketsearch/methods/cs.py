"""Continuous Sparsification (Savarese, Silva & Maire, NeurIPS 2020): a ticket search of
``rounds`` rounds with a rising mask temperature and a soft reset between rounds; the ticket
is ``s > 0``, then retrained from the rewind point."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field

from ..sparsity import cs
from ..sparsity.masks import add_soft_masks
from ..spec import MethodSpec, format_number
from .base import TrialRun
from .registry import Method
from .retrain import planned_retrain_epochs, retrain_pending


class CSSpec(MethodSpec):
    """Continuous Sparsification (Savarese et al. 2020) ticket search."""

    model_config = ConfigDict(populate_by_name=True)
    sweep_axes: ClassVar[tuple[str, ...]] = ("lambda", "beta_final", "mask_init", "seed")

    rounds: int = Field(5, ge=1, description="Search rounds of E epochs each.")
    lambda_: float = Field(
        1e-8,
        alias="lambda",
        ge=0,
        description="Weight of the mask penalty lambda * sum(soft mask) added to the loss.",
    )
    beta_final: float = Field(
        200.0,
        ge=1,
        description="Mask temperature reached in the last epoch of each round (beta starts at 1).",
    )
    mask_init: float = Field(
        0.0,
        description="Initial mask logit s0; larger gives denser tickets, e.g. -0.1 gives "
        "high sparsity.",
    )
    beta_schedule: Literal["epoch", "iteration"] = Field(
        "epoch", description="Raise beta once per epoch (paper) or every iteration."
    )
    soft_reset: Literal["scaled", "clip"] = Field(
        "scaled",
        description="Mask-logit reset between rounds: scaled = min(beta_end * s, s0) (paper), "
        "clip = min(s, s0) (reference code).",
    )
    seed: int = Field(0, description="Seed of weight initialisation and data order.")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Grid axes (allowed: lambda, beta_final, mask_init, seed), each a non-empty "
        "list of values; one CS trial per point of their cartesian product.",
    )


def run_cs(run: TrialRun) -> dict[str, Any]:
    """Search ``rounds`` rounds, take the ticket ``s > 0``, retrain it."""
    s, epochs = run.settings, run.train.epochs_per_round
    if run.enter("search"):
        model = run.new_model()
        add_soft_masks(model, run.layer_names, s.mask_init)
        optimizer = run.new_optimizer(model)
        for rnd in run.rounds(s.rounds):
            run.fit(model, optimizer, snapshot_at=run.train.rewind_epoch if rnd == 0 else None,
                    before_epoch=epoch_temperature(model, s, epochs),
                    on_step=step_temperature(model, s, epochs, run.data, run.train.batch_size),
                    extra_loss=penalty(model, s.lambda_))
            if rnd + 1 < s.rounds:
                cs.soft_reset(model, s.soft_reset, cs.current_beta(model))
                optimizer = run.new_optimizer(model)
        run.pending = [run.make_ticket("final", cs.ticket_masks(model), round=s.rounds)]
    retrain_pending(run)
    return {}


def epoch_temperature(model, s: CSSpec, epochs: int):
    """Set beta at the start of each epoch (the paper's schedule), or None."""
    if s.beta_schedule != "epoch":
        return None
    return lambda epoch: cs.set_beta(model, cs.beta_for_epoch(epoch, epochs, s.beta_final))


def step_temperature(model, s: CSSpec, epochs: int, data, batch_size: int):
    """Set beta before every step of the round (the per-iteration schedule), or None."""
    if s.beta_schedule != "iteration":
        return None
    total = data.num_train_batches(batch_size) * epochs
    return lambda step: cs.set_beta(model, cs.beta_for_iteration(step, total, s.beta_final))


def penalty(model, lam: float):
    """``lambda * sum(m)``, the relaxed L0 term added to the loss (None when lambda is 0)."""
    if lam == 0:
        return None
    return lambda: lam * cs.l0_penalty(model)


def identity(spec: CSSpec, swept: frozenset[str]) -> tuple[str, str]:
    s0, lam, beta = (format_number(x) for x in (spec.mask_init, spec.lambda_, spec.beta_final))
    return (f"cs-s0={s0}-lam={lam}-beta={beta}-seed={spec.seed}",
            f"cs s0={s0} λ={lam} β={beta} seed={spec.seed}")


def planned_epochs(trial) -> int:
    return trial.settings.rounds * trial.train.epochs_per_round + planned_retrain_epochs(trial, 1)


METHOD = Method(
    name="cs", spec=CSSpec, run=run_cs, identity=identity, planned_epochs=planned_epochs,
    description="Continuous Sparsification ticket search", label="cs", order=10,
)
