"""RigL dynamic sparse training (Evci et al., ICML 2020): one sparse network trained from
step 0 at fixed per-layer densities, its masks updated by drop/grow every ``update_interval``
steps until ``end_fraction`` of training. It yields one ticket (``final``): the final masks
with the initial weights as rewind state and the accuracy the run reached; not retrained."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from ..sparsity import rigl
from ..sparsity.masks import add_binary_masks, binary_masks, dense_state_dict
from ..spec import MethodSpec, Seed, format_number
from .base import TrialRun
from .registry import Method


class RigLSpec(MethodSpec):
    """RigL dynamic sparse training (Evci et al. 2020): one sparse network per setting."""

    sweep_axes: ClassVar[tuple[str, ...]] = ("sparsity", "distribution", "seed")

    sparsity: float = Field(
        0.9,
        gt=0,
        lt=1,
        description="Target sparsity of the masked layers, fixed from the first step.",
    )
    distribution: Literal["uniform", "erk"] = Field(
        "erk",
        description="Per-layer densities: uniform = every layer at the target sparsity except "
        "the first masked layer, which stays dense (so the network is a little denser than "
        "the target); erk = Erdős–Rényi-Kernel, density ∝ sum(dims)/prod(dims), totalling the "
        "target exactly.",
    )
    update_interval: int = Field(
        100, ge=1, description="Steps between mask updates (ΔT)."
    )
    end_fraction: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Fraction of the training steps after which the masks stop changing.",
    )
    drop_fraction: float = Field(
        0.3,
        gt=0,
        le=1,
        description="Initial fraction α of each layer's active weights dropped and regrown per "
        "update; decays as α/2·(1 + cos(π t / T_end)).",
    )
    epochs: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="Training epochs of the RigL run; null = train.epochs_per_round "
        "(LR milestones scale proportionally).",
    )
    seed: Seed = Field(0, description="Seed of weight initialisation, initial masks and data order.")
    sweep: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Grid axes (allowed: sparsity, distribution, seed), each a non-empty list "
        "of values; one RigL run per point of their cartesian product.",
    )


def run_rigl(run: TrialRun) -> dict[str, Any]:
    """Train one sparse network, moving its masks on schedule; it is the ticket."""
    s = run.settings
    epochs = s.epochs or run.train.epochs_per_round
    total = epochs * run.data.num_train_batches(run.train.batch_size)
    end = rigl.end_step(total, s.end_fraction)
    if run.enter("train"):
        model = run.new_model()
        add_binary_masks(model, initial_masks(run, model))
        run.snapshot = run.snapshot or dense_state_dict(model)  # the initial weights
        optimizer = run.new_optimizer(model)
        gradients = rigl.DenseGradients(model)

        def arm(step: int) -> None:
            if rigl.is_update_step(step, s.update_interval, end):
                gradients.arm()

        def drop_and_grow(step: int) -> None:
            if gradients.armed:
                fraction = rigl.drop_fraction(step, s.drop_fraction, end)
                grads = gradients.take()
                if run.shard is not None:  # this rank's shard's: use the global batch's
                    run.shard.average(grads)
                rigl.apply_update(model, optimizer, grads, fraction)

        val, test = run.fit(model, optimizer, epochs, on_step=arm, after_backward=drop_and_grow)
        run.emit(run.make_ticket("final", binary_masks(model), round=1, rewind_epoch=0,
                                 val_acc=val, test_acc=test, target_sparsity=s.sparsity),
                 trained=model)
    last = run.last_round()
    return {"val_acc": last.get("val_acc"), "test_acc": last.get("test_acc"),
            "sparsity": last.get("sparsity"),
            "mask_updates": len(rigl.update_steps(total, s.update_interval, s.end_fraction))}


def initial_masks(run: TrialRun, model) -> dict[str, torch.Tensor]:
    """Random masks at the setting's per-layer densities (seeded by the trial seed)."""
    s = run.settings
    modules = dict(model.named_modules())
    shapes = {name: tuple(modules[name].weight.shape) for name in run.layer_names}
    densities = rigl.layer_densities(s.distribution, shapes, s.sparsity)
    generator = torch.Generator().manual_seed(run.trial.seed)
    return rigl.random_masks(shapes, densities, generator, run.device)


def identity(spec: RigLSpec, swept: frozenset[str]) -> tuple[str, str]:
    sparsity = format_number(spec.sparsity)
    return (f"rigl-{spec.distribution}-s={sparsity}-seed={spec.seed}",
            f"rigl {spec.distribution} s={sparsity} seed={spec.seed}")


METHOD = Method(
    name="rigl", spec=RigLSpec, run=run_rigl, identity=identity,
    planned_epochs=lambda trial: trial.settings.epochs or trial.train.epochs_per_round,
    description="RigL dynamic sparse training run(s)", label="rigl", order=30,
    search_phases=("train",),
)
