"""Continuous Sparsification (Savarese, Silva & Maire, NeurIPS 2020): a ticket search of
``rounds`` rounds with a rising mask temperature and a soft reset between rounds; the ticket
is ``s > 0``, then retrained from the rewind point."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import ConfigDict, Field, field_validator

from ..sparsity import cs
from ..sparsity.masks import add_soft_masks
from ..spec import MethodSpec, Seed, SpecError, format_number
from .base import TrialRun
from .registry import Method
from .retrain import planned_retrain_epochs, retrain_group, retrain_pending


class CSSpec(MethodSpec):
    """Continuous Sparsification (Savarese et al. 2020) ticket search."""

    model_config = ConfigDict(populate_by_name=True)
    sweep_axes: ClassVar[tuple[str, ...]] = ("lambda", "beta_final", "mask_init",
                                             "target_sparsity", "seed")

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
    target_sparsity: Annotated[float, Field(gt=0, lt=1)] | Literal["imp"] | None = Field(
        None,
        description="Steer the search to end at this sparsity: the ticket's kept fraction is "
        "constrained to 1 - target by a learned non-negative multiplier, a threshold on the "
        "mask logits (lambda and mask_init are then unused); 'imp' = one trial at each density "
        "the job's IMP chain reaches after the rounds in imp_rounds; null = plain CS.",
    )
    imp_rounds: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [3, 5, 10, 15, 20],
        description="With target_sparsity: imp, the IMP rounds whose ticket densities "
        "(1 - prune_fraction)^k the CS trials aim at.",
    )
    target_rounding: Literal["none", "exact"] = Field(
        "none",
        description="none: the ticket is s > 0 (its sparsity lands near the target); exact: "
        "keep the top (1 - target) fraction of entries by s, the target to one weight.",
    )
    multiplier_lr: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Step of the sparsity multiplier: the fraction of its gap to the round's "
        "target density it closes after every training step.",
    )
    target_mask_init: float = Field(
        0.5,
        description="Initial mask logit s0 of targeted trials (mask_init is for plain CS): "
        "above 0, so nothing is pruned until the multiplier asks.",
    )
    target_schedule: Literal["constant", "geometric"] = Field(
        "geometric",
        description="Density each round aims at: constant = the final target from round 1; "
        "geometric = (1 - target)^((r + 1) / rounds), reaching it in the last round.",
    )
    seed: Seed = Field(0, description="Seed of weight initialisation and data order.")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Grid axes (allowed: lambda, beta_final, mask_init, target_sparsity, seed), "
        "each a non-empty list of values; one CS trial per point of their cartesian product.",
    )

    @field_validator("sweep")
    @classmethod
    def _numeric_targets(cls, sweep: dict[str, list[Any]]) -> dict[str, list[Any]]:
        """A target_sparsity axis lists numbers ('imp' is a value of the scalar knob)."""
        if any(not isinstance(v, float) for v in sweep.get("target_sparsity", [])):
            raise ValueError("target_sparsity values must be numbers in (0, 1); to aim at the "
                             "IMP chain's densities set methods.cs.target_sparsity: imp")
        return sweep


def run_cs(run: TrialRun) -> dict[str, Any]:
    """Search ``rounds`` rounds, take the ticket ``s > 0``, retrain it."""
    s, epochs = run.settings, run.train.epochs_per_round
    targeted = s.target_sparsity is not None
    if run.enter("search"):
        model = run.new_model()
        add_soft_masks(model, run.layer_names, s.target_mask_init if targeted else s.mask_init)
        optimizer = run.new_optimizer(model)
        for rnd in run.rounds(s.rounds):
            run.fit(model, optimizer, snapshot_at=run.train.rewind_epoch if rnd == 0 else None,
                    before_epoch=epoch_temperature(model, [s], epochs),
                    on_step=step_temperature(model, [s], epochs, run.data, run.train.batch_size),
                    after_step=target_step([run], model, rnd),
                    extra_loss=None if targeted else penalty(model, [s]))
            if rnd + 1 < s.rounds:
                cs.soft_reset(model, s.soft_reset, cs.current_beta(model))
                run.extra.get("multiplier", torch.zeros(())).zero_()  # folded into the logits
                optimizer = run.new_optimizer(model)
        run.pending = [make_ticket(run, model)]
    retrain_pending(run)
    return {}


def run_cs_group(group) -> None:
    """``run_cs`` for a fused group (``methods.group.GroupRun``): every member's search in
    one fused network, each with its own s0, lambda, beta_final, target and data order; then
    every member's ticket retrained, fused too."""
    runs = group.members
    specs = [run.settings for run in runs]
    s, epochs = specs[0], group.train.epochs_per_round
    targeted = s.target_sparsity is not None
    if group.enter("search"):
        model = group.new_model()
        add_soft_masks(model, group.layer_names,
                       [x.target_mask_init if targeted else x.mask_init for x in specs])
        optimizer = group.new_optimizer(model)
        for rnd in group.rounds(s.rounds):
            group.fit(model, optimizer,
                      snapshot_at=group.train.rewind_epoch if rnd == 0 else None,
                      before_epoch=epoch_temperature(model, specs, epochs),
                      on_step=step_temperature(model, specs, epochs, group.data,
                                               group.train.batch_size),
                      after_step=target_step(runs, model, rnd),
                      extra_loss=None if targeted else penalty(model, specs))
            if rnd + 1 < s.rounds:
                cs.soft_reset(model, s.soft_reset,
                              [cs.current_beta(model, k) for k in range(len(runs))])
                for run in runs:
                    run.extra.get("multiplier", torch.zeros(())).zero_()
                optimizer = group.new_optimizer(model)
        for member, run in enumerate(runs):
            run.pending = [make_ticket(run, model, member)]
    retrain_group(group)


def fusible(trial) -> str | None:
    """Why a CS trial cannot be fused (None when it can): its retraining recipes mix
    examples (mixup, CutMix), which fused retraining does not do."""
    if trial.retrain.enabled and any(r.mixup_alpha > 0 or r.cutmix_alpha > 0
                                     for r in trial.retrain.recipes):
        return "its retraining recipes use mixup or CutMix, which fused groups do not run"
    return None


def make_ticket(run: TrialRun, model, member: int = 0):
    """The ticket ``s > 0`` (or, with exact rounding, the top entries by ``s``) of the run
    (of ``member``'s masks, in a fused group's model)."""
    s, achieved = run.settings, cs.cs_sparsity(model, member)
    if s.target_sparsity is None:
        return run.make_ticket("final", cs.ticket_masks(model, member), round=s.rounds)
    exact = s.target_rounding == "exact"
    masks = cs.round_to_density(model, 1 - s.target_sparsity, member) if exact \
        else cs.ticket_masks(model, member)
    return run.make_ticket("final", masks, round=s.rounds, target_sparsity=s.target_sparsity,
                           achieved_sparsity=achieved,
                           multiplier=float(run.extra["multiplier"]))


def epoch_temperature(model, specs: list[CSSpec], epochs: int):
    """Set beta at the start of each epoch (the paper's schedule), or None; one value per
    member of a fused group (``specs``: the members' settings)."""
    if specs[0].beta_schedule != "epoch":
        return None
    return lambda epoch: cs.set_beta(
        model, [cs.beta_for_epoch(epoch, epochs, s.beta_final) for s in specs])


def step_temperature(model, specs: list[CSSpec], epochs: int, data, batch_size: int):
    """Set beta before every step of the round (the per-iteration schedule), or None."""
    if specs[0].beta_schedule != "iteration":
        return None
    total = data.num_train_batches(batch_size) * epochs
    return lambda step: cs.set_beta(
        model, [cs.beta_for_iteration(step, total, s.beta_final) for s in specs])


def penalty(model, specs: list[CSSpec]):
    """``lambda * sum(m)``, the relaxed L0 term added to the loss (None when lambda is 0);
    in a fused group, each member's lambda times its own sum."""
    lams = [s.lambda_ for s in specs]
    if not any(lams):
        return None
    if len(specs) == 1:
        return lambda: lams[0] * cs.l0_penalty(model)
    weights = torch.tensor(lams, device=cs.mask_bank(model).logits.device)
    return lambda: cs.l0_penalty(model, weights)


def target_step(runs: list[TrialRun], model, rnd: int):
    """With a target: after every step, each run's sparsity multiplier's step towards the
    density round ``rnd`` aims at (None without a target). ``runs``: the trial, or a fused
    group's members in member order."""
    if runs[0].settings.target_sparsity is None:
        return None
    steps = []
    for member, run in enumerate(runs):
        s = run.settings
        multiplier = run.extra.setdefault("multiplier", torch.zeros((), device=run.device))
        steps.append((multiplier, round_density(s, rnd), s.multiplier_lr, member))

    def step(_):
        for multiplier, density, rate, member in steps:
            cs.threshold_step(model, multiplier, density, rate, member)

    return step


def round_density(s: CSSpec, rnd: int) -> float:
    """The kept fraction round ``rnd`` aims at."""
    final = 1.0 - s.target_sparsity
    if s.target_schedule == "constant":
        return final
    return final ** ((rnd + 1) / s.rounds)


def identity(spec: CSSpec, swept: frozenset[str]) -> tuple[str, str]:
    """Plain CS is named by s0, lambda, beta; targeted CS by its target, s0 and beta."""
    s0, lam, beta = (format_number(x) for x in (spec.mask_init, spec.lambda_, spec.beta_final))
    if spec.target_sparsity is None:
        return (f"cs-s0={s0}-lam={lam}-beta={beta}-seed={spec.seed}",
                f"cs s0={s0} λ={lam} β={beta} seed={spec.seed}")
    target = format_number(round(spec.target_sparsity, 6))
    s0 = format_number(spec.target_mask_init)
    return (f"cs-target={target}-s0={s0}-beta={beta}-seed={spec.seed}",
            f"cs target={target} s0={s0} β={beta} seed={spec.seed}")


def planned_epochs(trial) -> int:
    return trial.settings.rounds * trial.train.epochs_per_round + planned_retrain_epochs(trial, 1)


def aim_at_imp(section: CSSpec, sections: dict[str, Any]) -> CSSpec:
    """``target_sparsity: imp``: one target per IMP round in ``imp_rounds``, the density
    ``(1 - prune_fraction)^k`` that the job's IMP chain reaches after round k."""
    if section.target_sparsity != "imp":
        return section
    imp = sections.get("imp")
    where = "methods.cs.target_sparsity"
    if imp is None:
        raise SpecError(f"{where}: 'imp' aims at the IMP chain's densities, but the job has no "
                        "methods.imp; add one or give the target as a number")
    if "prune_fraction" in imp.sweep or "target_sparsity" in section.sweep:
        raise SpecError(f"{where}: 'imp' needs one IMP prune_fraction and no target_sparsity "
                        "sweep axis; remove methods.imp.sweep.prune_fraction or the cs axis")
    rounds = max(imp.sweep.get("rounds", [imp.rounds]))
    if max(section.imp_rounds) > rounds:
        raise SpecError(f"methods.cs.imp_rounds: round {max(section.imp_rounds)} is past the "
                        f"IMP chain's last round ({rounds}); lower it or raise methods.imp.rounds")
    targets = [round(1 - (1 - imp.prune_fraction) ** k, 10)
               for k in sorted(set(section.imp_rounds))]
    return section.model_copy(update={"target_sparsity": None,
                                      "sweep": {**section.sweep, "target_sparsity": targets}})


METHOD = Method(
    name="cs", spec=CSSpec, run=run_cs, identity=identity, planned_epochs=planned_epochs,
    description="Continuous Sparsification ticket search", label="cs", order=10,
    prepare=aim_at_imp, run_group=run_cs_group, fusible=fusible,
    fuse_axes=("lambda", "beta_final", "mask_init", "target_mask_init", "target_sparsity",
               "seed"),
)
