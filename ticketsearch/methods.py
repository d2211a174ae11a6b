"""Method runners: a dense baseline, a CS ticket search, an IMP chain, a RigL run, ticket
retraining.

Each runner is a function of a ``TrialSpec``, a loaded dataset and a ``Hooks`` object (the
small reporter/checkpoint interface that the Ray and MLflow adapters implement). Runners are
pure PyTorch; they return a ``TrialResult`` with the tickets found and the epoch ledger.

Resumption: a runner saves its whole state through ``hooks.save_checkpoint`` every
``train.checkpoint_every`` epochs and at every round boundary, and starts from
``hooks.load_checkpoint()`` when that returns a state. A resumed run continues exactly where
the checkpoint left off; epochs trained after the checkpoint and lost are retrained once and
counted once, and reported in ``ledger.recomputed_epochs``.

Ticket retraining runs every pending ticket under every recipe of ``retrain.recipes`` (stage
``retrain``, one round per (ticket, recipe), ticket-major). The ticket's ``val_acc`` /
``test_acc`` / ``retrain_epochs`` are its first recipe's (named in ``meta["recipe"]``);
``meta["recipes"]`` holds every recipe's ``{val_acc, test_acc, retrain_epochs, settings}`` by
recipe name (JSON files sort its keys; the recipes' order is the spec's ``retrain.recipes``).

A RigL run (stage and ledger phase ``train``) trains one sparse network from step 0 and yields
it as a ticket whose rewind state is the initial weights (``rewind_epoch`` 0); it is not
retrained.
"""

from __future__ import annotations

import abc
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .models import create_model, masked_layer_names, model_info
from .recipes import make_batch_loss, warmup_factor
from .sparsity import cs, imp, rigl
from .sparsity.masks import (
    add_binary_masks,
    add_soft_masks,
    binary_masks,
    dense_state_dict,
    dense_weights,
    full_masks,
    load_dense_state,
    mask_density,
    set_binary_masks,
)
from .tickets import Ticket, clone_state
from .training import (
    EpochLedger,
    device_kind,
    evaluate,
    lr_for_epoch,
    make_optimizer,
    resolve_device,
    set_lr,
    train_epoch,
)

CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = {"version", "method", "trial_id", "stage", "round", "epoch", "model",
                   "optimizer", "generator", "torch_rng", "snapshot", "ledger", "tickets",
                   "pending", "rounds"}


class CheckpointError(ValueError):
    """A trial checkpoint that cannot be resumed (unreadable, or of another trial kind)."""


def check_checkpoint(state: Any, trial_id: str, method: str) -> None:
    """Raise CheckpointError unless ``state`` is a resumable ``method`` checkpoint."""
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise CheckpointError(f"checkpoint of trial {trial_id} is not a ticketsearch "
                              "checkpoint; delete it to start the trial over")
    if state["version"] != CHECKPOINT_VERSION or state["method"] != method:
        raise CheckpointError(
            f"checkpoint of trial {trial_id} is a {state['method']!r} checkpoint of version "
            f"{state['version']}, not a {method!r} checkpoint of version "
            f"{CHECKPOINT_VERSION}; delete it to start the trial over"
        )


@dataclass
class EpochEvent:
    """Emitted after every trained epoch. ``step`` is the trial's global epoch index."""

    trial_id: str
    method: str
    phase: str
    round: int
    epoch: int
    step: int
    lr: float
    beta: float
    train_loss: float
    val_acc: float | None
    test_acc: float | None
    sparsity: float
    seconds: float
    recipe: str | None = None  # retraining recipe (retrain phase only)

    def metrics(self) -> dict[str, float]:
        """The numeric metrics of this epoch (None values left out)."""
        keys = ("round", "lr", "beta", "train_loss", "val_acc", "test_acc",
                "sparsity", "seconds")
        values = {k: getattr(self, k) for k in keys}
        return {k: float(v) for k, v in values.items() if v is not None}


@dataclass
class RoundEvent:
    """Emitted at the end of every round (search, retraining or dense)."""

    trial_id: str
    method: str
    phase: str
    round: int
    epochs: int
    sparsity: float
    val_acc: float | None
    test_acc: float | None
    recipe: str | None = None  # retraining recipe (retrain phase only)


class Hooks:
    """What a runner reports to and how it checkpoints. Every method is optional (no-op)."""

    def epoch_end(self, event: EpochEvent) -> None:
        pass

    def round_end(self, event: RoundEvent) -> None:
        pass

    def ticket_found(self, ticket: Ticket) -> None:
        pass

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Persist ``state`` (tensors and plain values). Its tensors are the live ones:
        write or copy them before returning."""

    def load_checkpoint(self) -> dict[str, Any] | None:
        return None

    def epochs_reported(self) -> int:
        """Epochs this trial had reported before the current attempt (for recompute counts)."""
        return 0


@dataclass
class TrialResult:
    trial_id: str
    method: str
    tickets: list[Ticket]
    ledger: EpochLedger
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-able summary: tickets (no tensors; with their per-recipe retraining results
        under ``recipes`` when retrained), rounds, final metrics, ledger totals."""
        return {
            "trial_id": self.trial_id,
            "method": self.method,
            "tickets": [_ticket_summary(t) for t in self.tickets],
            "rounds": self.rounds,
            "final": self.final,
            "ledger": self.ledger.summary(),
        }


def _ticket_summary(ticket: Ticket) -> dict[str, Any]:
    """``Ticket.summary()`` plus the per-recipe results and the primary recipe, if any."""
    summary = ticket.summary()
    for key in ("recipe", "recipes"):
        if key in ticket.meta:
            summary[key] = ticket.meta[key]
    return summary


class _TrialRun(abc.ABC):
    """State and shared loop of one trial. Subclasses define the method's stages."""

    method = ""

    def __init__(self, trial, data, hooks: Hooks | None):
        self.trial = trial
        self.train = trial.train
        self.data = data
        self.hooks = hooks or Hooks()
        self.device = resolve_device(trial.train.device)
        gpus = trial.resources.gpus if self.device.type == "cuda" else 0.0
        self.ledger = EpochLedger(device_kind(self.device), gpus if gpus > 0 else 1.0)
        self.generator = torch.Generator().manual_seed(trial.seed)
        patterns = trial.model.masked_layers or model_info(trial.model.name).masked_layers
        self.layer_names = masked_layer_names(self.new_model(), patterns)
        self.stage, self.round, self.epoch = self.first_stage(), 0, 0
        self.snapshot: dict[str, torch.Tensor] | None = None
        self.tickets: list[Ticket] = []  # final: evaluated (or retraining disabled)
        self.pending: list[Ticket] = []  # found, awaiting retraining
        self.rounds: list[dict[str, Any]] = []
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    # --- construction -------------------------------------------------------------------
    def first_stage(self) -> str:
        return "search"

    def new_model(self, activation: str = "relu") -> nn.Module:
        """A freshly initialised, unmasked model (seeded by the trial seed)."""
        torch.manual_seed(self.trial.seed)
        model = create_model(
            self.trial.model.name, self.data.num_classes, tuple(self.data.input_shape),
            mlp_hidden=tuple(self.trial.model.mlp_hidden), activation=activation,
        )
        return model.to(self.device)

    def model_for_stage(self) -> nn.Module:
        """The (masked) model structure for the current stage, before state is loaded."""
        if self.stage == "retrain":
            index, recipe = self.retrain_position()
            model = self.new_model(recipe.activation)
            add_binary_masks(model, self.pending[index].masks)
            return model
        return self.new_model()

    # --- retraining recipes ---------------------------------------------------------------
    def recipes(self) -> list:
        """The retraining recipes of the job, in order (the first is the primary one)."""
        return list(self.trial.retrain.recipes)

    def retrain_position(self) -> tuple[int, Any]:
        """(pending ticket index, recipe) of the current retraining round."""
        recipes = self.recipes()
        return self.round // len(recipes), recipes[self.round % len(recipes)]

    def current_recipe(self):
        """The recipe being retrained under, or None outside the retrain stage."""
        return self.retrain_position()[1] if self.stage == "retrain" else None

    def start_stage_model(self) -> None:
        """Fresh model and optimizer for the current stage (not resuming)."""
        self.model = self.model_for_stage()
        if self.stage == "retrain":
            load_dense_state(self.model, self.snapshot)
        self.optimizer = make_optimizer(self.model, self.train)

    # --- the shared epoch loop ------------------------------------------------------------
    def epochs_in_stage(self) -> int:
        if self.stage == "retrain":
            return self.trial.retrain.epochs or self.train.epochs_per_round
        return self.train.epochs_per_round

    def before_epoch(self, epoch: int) -> None:
        if self.stage == "search" and self.round == 0 and epoch == self.train.rewind_epoch:
            self.snapshot = dense_state_dict(self.model)

    def extra_loss(self):
        return None

    def on_step(self):
        return None

    def after_backward(self):
        return None

    def batch_loss(self):
        """The current recipe's batch loss for the coming epoch (None = cross-entropy).
        Called once per epoch, after the epoch's batches were drawn."""
        recipe = self.current_recipe()
        if recipe is None:
            return None
        batches = self.data.num_train_batches(self.train.batch_size)
        return make_batch_loss(recipe, self.data.num_classes, batches, self.generator)

    def lr_for(self, epoch: int, epochs: int) -> float:
        """LR of ``epoch`` of the current round: the step schedule, times the current
        recipe's warm-up factor when retraining."""
        lr = lr_for_epoch(epoch, self.train, epochs)
        recipe = self.current_recipe()
        return lr if recipe is None else lr * warmup_factor(epoch, recipe.warmup_epochs)

    def beta(self) -> float:
        return 1.0

    def sparsity(self) -> float:
        masks = binary_masks(self.model)
        return 1.0 - mask_density(masks) if masks else 0.0

    def evaluate_now(self) -> tuple[float | None, float | None]:
        batch = max(self.train.batch_size, 256)
        val = evaluate(self.model, self.data.eval_batches("val", batch))
        test = evaluate(self.model, self.data.eval_batches("test", batch))
        return (val[1] if val else None), (test[1] if test else None)

    def fit(self) -> tuple[float | None, float | None]:
        """Train the current model from ``self.epoch`` to the end of the current round;
        return the (val, test) accuracy at its end."""
        epochs = self.epochs_in_stage()
        val = test = None
        while self.epoch < epochs:
            epoch = self.epoch
            self.before_epoch(epoch)
            lr = self.lr_for(epoch, epochs)
            set_lr(self.optimizer, lr)
            batches = self.data.train_batches(self.train.batch_size, self.generator)
            stats = train_epoch(self.model, batches, self.optimizer, self.extra_loss(),
                                self.on_step(), self.after_backward(), self.batch_loss())
            last = epoch == epochs - 1
            start = time.perf_counter()
            val = test = None
            if last or (epoch + 1) % self.train.eval_every == 0:
                val, test = self.evaluate_now()
            recipe = self.current_recipe()
            event = EpochEvent(
                self.trial.trial_id, self.method, self.stage, self.round, epoch,
                self.ledger.epochs(), lr, self.beta(), stats.train_loss,
                val, test, self.sparsity(), stats.seconds,
                None if recipe is None else recipe.name,
            )
            self.ledger.record(self.stage, self.round, epoch, stats.seconds,
                               time.perf_counter() - start)
            self.ledger.touch()
            self.epoch += 1
            self.hooks.epoch_end(event)
            if not last and self.epoch % self.train.checkpoint_every == 0:
                self.save()
        return val, test

    def end_round(self, val, test) -> None:
        """Record the round just trained and tell the hooks."""
        record = {"phase": self.stage, "round": self.round, "epochs": self.epochs_in_stage(),
                  "sparsity": self.sparsity(), "val_acc": val, "test_acc": test}
        recipe = self.current_recipe()
        if recipe is not None:
            record["recipe"] = recipe.name
        self.rounds.append(record)
        self.hooks.round_end(RoundEvent(self.trial.trial_id, self.method, **record))

    def advance(self, stage: str, round: int) -> None:
        """Move to the start of ``stage``/``round``, build its model, and checkpoint."""
        self.stage, self.round, self.epoch = stage, round, 0
        if stage != "done":
            self.start_stage_model()
        self.save()

    # --- tickets --------------------------------------------------------------------------
    def ticket_meta(self, **extra) -> dict[str, Any]:
        trial = self.trial
        settings = getattr(trial, self.method).model_dump(mode="json", by_alias=True)
        settings.pop("sweep", None)
        return {
            "method": self.method,
            "trial_id": trial.trial_id,
            "job": trial.job_name,
            "seed": trial.seed,
            "settings": settings,
            "model": trial.model.name,
            "model_kwargs": {"mlp_hidden": list(trial.model.mlp_hidden)},
            "dataset": trial.data.dataset,
            "num_classes": self.data.num_classes,
            "input_shape": list(self.data.input_shape),
            "rewind_epoch": self.train.rewind_epoch,
            "search_epochs": self.ledger.epochs("search"),
            "retrain_epochs": 0,
            "val_acc": None,
            "test_acc": None,
        } | extra

    def make_ticket(self, name: str, masks, **extra) -> Ticket:
        masks = {k: v.detach().cpu().clone() for k, v in masks.items()}
        return Ticket(name, masks, clone_state(self.snapshot), self.ticket_meta(**extra))

    def emit(self, ticket: Ticket) -> None:
        self.tickets.append(ticket)
        self.hooks.ticket_found(ticket)

    def retrain_pending(self) -> None:
        """Retrain every pending ticket under every recipe, from the rewind point with its mask
        fixed; emit each ticket once its last recipe is done."""
        per_ticket = len(self.recipes())
        runs = len(self.pending) * per_ticket
        while self.stage == "retrain" and self.round < runs:
            val, test = self.fit()
            self.end_round(val, test)
            index, recipe = self.retrain_position()
            ticket = self.pending[index]
            epochs = self.ledger.epochs("retrain", self.round)
            record_recipe_result(ticket, recipe, val, test, epochs,
                                 primary=self.round % per_ticket == 0)
            if self.round % per_ticket == per_ticket - 1:
                self.emit(ticket)
            nxt = self.round + 1
            self.advance("retrain" if nxt < runs else "done", nxt)

    def start_retraining(self) -> None:
        """After the search: retrain pending tickets, or emit them as found if disabled."""
        if self.pending and self.trial.retrain.enabled:
            self.advance("retrain", 0)
        else:
            for ticket in self.pending:
                self.emit(ticket)
            self.pending = []
            self.advance("done", 0)

    # --- checkpoints ----------------------------------------------------------------------
    def save(self) -> None:
        self.ledger.touch()
        self.hooks.save_checkpoint(self.state())

    def state(self) -> dict[str, Any]:
        def ticket_state(t: Ticket):
            return {"name": t.name, "masks": t.masks, "meta": t.meta}

        done = self.stage == "done"
        return {
            "version": CHECKPOINT_VERSION,
            "method": self.method,
            "trial_id": self.trial.trial_id,
            "stage": self.stage, "round": self.round, "epoch": self.epoch,
            "model": None if done else self.model.state_dict(),
            "optimizer": None if done else self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "snapshot": self.snapshot,
            "ledger": self.ledger.to_dict(),
            "tickets": [ticket_state(t) for t in self.tickets],
            "pending": [ticket_state(t) for t in self.pending],
            "rounds": self.rounds,
        }

    def restore(self, state: dict[str, Any]) -> None:
        check_checkpoint(state, self.trial.trial_id, self.method)
        self.stage, self.round, self.epoch = state["stage"], state["round"], state["epoch"]
        self.generator.set_state(state["generator"])
        self.ledger = EpochLedger.from_dict(state["ledger"])
        self.snapshot = None if state["snapshot"] is None else {
            k: v.to(self.device) for k, v in state["snapshot"].items()}
        self.rounds = list(state["rounds"])
        snapshot_cpu = clone_state(self.snapshot) if self.snapshot else {}
        self.tickets = [Ticket(t["name"], t["masks"], snapshot_cpu, t["meta"])
                        for t in state["tickets"]]
        self.pending = [Ticket(t["name"], t["masks"], snapshot_cpu, t["meta"])
                        for t in state["pending"]]
        if self.stage != "done":
            self.model = self.model_for_stage()
            self.model.load_state_dict(state["model"])
            self.optimizer = make_optimizer(self.model, self.train)
            self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])  # after new_model() reseeded it

    def begin(self) -> None:
        """Resume from the hooks' checkpoint, or start the first stage fresh."""
        state = self.hooks.load_checkpoint()
        if state is not None:
            self.restore(state)
            reported = self.hooks.epochs_reported()
            self.ledger.recomputed_epochs += max(0, reported - self.ledger.epochs())
        else:
            self.start_stage_model()
        self.ledger.start_attempt()

    def result(self, final: dict[str, Any] | None = None) -> TrialResult:
        self.ledger.touch()
        tickets = sorted(self.tickets, key=lambda t: t.name)
        return TrialResult(self.trial.trial_id, self.method, tickets, self.ledger,
                           self.rounds, final or {})

    def run(self) -> TrialResult:
        self.begin()
        self.stages()
        return self.result(self.final_metrics())

    def final_metrics(self) -> dict[str, Any]:
        return {}

    @abc.abstractmethod
    def stages(self) -> None:
        """Run the method's stages from the current (possibly resumed) position."""


def record_recipe_result(ticket: Ticket, recipe, val, test, epochs: int, primary: bool) -> None:
    """Store one recipe's retraining result in ``ticket.meta["recipes"][recipe.name]``; the
    primary (first) recipe's accuracy and epochs are also the ticket's own."""
    results = dict(ticket.meta.get("recipes") or {})
    results[recipe.name] = {"val_acc": val, "test_acc": test, "retrain_epochs": epochs,
                            "settings": recipe.tweaks()}
    ticket.meta["recipes"] = results
    if primary:
        ticket.meta.update(val_acc=val, test_acc=test, retrain_epochs=epochs, recipe=recipe.name)


class DenseRun(_TrialRun):
    """One round of dense training: the baseline accuracy."""

    method = "dense"

    def first_stage(self) -> str:
        return "dense"

    def stages(self) -> None:
        if self.stage == "dense":
            val, test = self.fit()
            self.end_round(val, test)
            self.advance("done", 0)

    def final_metrics(self) -> dict[str, Any]:
        last = self.rounds[-1] if self.rounds else {}
        return {"val_acc": last.get("val_acc"), "test_acc": last.get("test_acc")}

    def ticket_meta(self, **extra):  # dense runs make no tickets
        raise RuntimeError("dense runs make no tickets")


class CSRun(_TrialRun):
    """Continuous Sparsification search: ``rounds`` rounds, then one ticket (``s > 0``)."""

    method = "cs"

    def model_for_stage(self) -> nn.Module:
        if self.stage == "search":
            model = self.new_model()
            add_soft_masks(model, self.layer_names, self.trial.cs.mask_init)
            return model
        return super().model_for_stage()

    def before_epoch(self, epoch: int) -> None:
        super().before_epoch(epoch)
        settings = self.trial.cs
        if self.stage == "search" and settings.beta_schedule == "epoch":
            beta = cs.beta_for_epoch(epoch, self.train.epochs_per_round, settings.beta_final)
            cs.set_beta(self.model, beta)

    def on_step(self):
        settings = self.trial.cs
        if self.stage != "search" or settings.beta_schedule != "iteration":
            return None
        per_epoch = self.data.num_train_batches(self.train.batch_size)
        total = per_epoch * self.train.epochs_per_round
        offset = self.epoch * per_epoch

        def step(i: int) -> None:
            cs.set_beta(self.model, cs.beta_for_iteration(offset + i, total, settings.beta_final))

        return step

    def extra_loss(self):
        lam = self.trial.cs.lambda_
        if self.stage != "search" or lam == 0:
            return None
        return lambda: lam * cs.l0_penalty(self.model)

    def beta(self) -> float:
        return cs.current_beta(self.model) if self.stage == "search" else 1.0

    def sparsity(self) -> float:
        if self.stage == "search":
            return cs.cs_sparsity(self.model)
        return super().sparsity()

    def stages(self) -> None:
        rounds = self.trial.cs.rounds
        while self.stage == "search":
            val, test = self.fit()
            self.end_round(val, test)
            if self.round + 1 < rounds:
                beta_end = cs.current_beta(self.model)
                cs.soft_reset(self.model, self.trial.cs.soft_reset, beta_end)
                self.stage, self.round, self.epoch = "search", self.round + 1, 0
                self.optimizer = make_optimizer(self.model, self.train)
                self.save()
            else:
                ticket = self.make_ticket("final", cs.ticket_masks(self.model), round=rounds)
                self.pending = [ticket]
                self.start_retraining()
        self.retrain_pending()


class IMPRun(_TrialRun):
    """Iterative Magnitude Pruning chain. Round 1 trains the dense network; each round's end
    prunes ``prune_fraction`` of the remaining weights, giving the next ticket, which the next
    round trains (so each round both evaluates the previous ticket and finds the next)."""

    method = "imp"

    def model_for_stage(self) -> nn.Module:
        if self.stage == "search":
            model = self.new_model()
            add_binary_masks(model, full_masks(model, self.layer_names))
            return model
        return super().model_for_stage()

    def stages(self) -> None:
        settings = self.trial.imp
        while self.stage == "search":
            val, test = self.fit()
            self.end_round(val, test)
            if self.round > 0 and settings.rewind_between_rounds:
                ticket = self.pending.pop()
                ticket.meta.update(val_acc=val, test_acc=test)
                self.emit(ticket)
            self.prune_and_rewind(settings)
            if self.round + 1 < settings.rounds:
                self.stage, self.round, self.epoch = "search", self.round + 1, 0
                self.optimizer = make_optimizer(self.model, self.train)
                self.save()
            else:
                self.start_retraining()
        self.retrain_pending()

    def prune_and_rewind(self, settings) -> None:
        masks = binary_masks(self.model)
        pruned = imp.prune(dense_weights(self.model), masks, settings.prune_fraction,
                           settings.scope)
        number = self.round + 1
        self.pending.append(self.make_ticket(f"round-{number:02d}", pruned, round=number))
        if settings.rewind_between_rounds:
            load_dense_state(self.model, self.snapshot)
        set_binary_masks(self.model, pruned)

    def final_metrics(self) -> dict[str, Any]:
        first = self.rounds[0] if self.rounds else {}
        return {"dense_val_acc": first.get("val_acc"), "dense_test_acc": first.get("test_acc")}


class RigLRun(_TrialRun):
    """RigL: one sparse network trained from step 0 at fixed per-layer densities, its masks
    updated by drop/grow every ``update_interval`` steps until ``end_fraction`` of training.
    Yields one ticket (``final``): the final masks with the initial weights as rewind state,
    and the accuracy the run reached."""

    method = "rigl"

    def __init__(self, trial, data, hooks: Hooks | None):
        super().__init__(trial, data, hooks)
        self.gradients: rigl.DenseGradients | None = None

    def first_stage(self) -> str:
        return "train"

    def epochs_in_stage(self) -> int:
        if self.stage == "train":
            return self.trial.rigl.epochs or self.train.epochs_per_round
        return super().epochs_in_stage()

    def model_for_stage(self) -> nn.Module:
        model = self.new_model()
        add_binary_masks(model, self.initial_masks(model))
        return model

    def initial_masks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Random masks at the setting's per-layer densities (seeded by the trial seed)."""
        settings = self.trial.rigl
        modules = dict(model.named_modules())
        shapes = {name: tuple(modules[name].weight.shape) for name in self.layer_names}
        densities = rigl.layer_densities(settings.distribution, shapes, settings.sparsity)
        generator = torch.Generator().manual_seed(self.trial.seed)
        return rigl.random_masks(shapes, densities, generator, self.device)

    def start_stage_model(self) -> None:
        """Fresh masked model; its initial state is the rewind snapshot."""
        super().start_stage_model()
        self.snapshot = dense_state_dict(self.model)

    # --- the update schedule --------------------------------------------------------------
    def total_steps(self) -> int:
        return self.epochs_in_stage() * self.data.num_train_batches(self.train.batch_size)

    def end_step(self) -> int:
        return rigl.end_step(self.total_steps(), self.trial.rigl.end_fraction)

    def on_step(self):
        """Arm the dense-gradient capture before the forward pass of every update step."""
        interval, end = self.trial.rigl.update_interval, self.end_step()
        offset = self.epoch * self.data.num_train_batches(self.train.batch_size)
        self.gradients = rigl.DenseGradients(self.model)

        def step(i: int) -> None:
            if rigl.is_update_step(offset + i, interval, end):
                self.gradients.arm()

        return step

    def after_backward(self):
        """At an update step, drop and grow with the captured dense gradients."""
        alpha, end = self.trial.rigl.drop_fraction, self.end_step()
        offset = self.epoch * self.data.num_train_batches(self.train.batch_size)

        def update(i: int) -> None:
            if self.gradients is not None and self.gradients.armed:
                fraction = rigl.drop_fraction(offset + i, alpha, end)
                rigl.apply_update(self.model, self.optimizer, self.gradients.take(), fraction)

        return update

    def stages(self) -> None:
        if self.stage == "train":
            val, test = self.fit()
            self.end_round(val, test)
            ticket = self.make_ticket(
                "final", binary_masks(self.model), round=1, rewind_epoch=0,
                search_epochs=self.ledger.epochs("train"), val_acc=val, test_acc=test,
                target_sparsity=self.trial.rigl.sparsity,
            )
            self.emit(ticket)
            self.advance("done", 0)

    def final_metrics(self) -> dict[str, Any]:
        last = self.rounds[-1] if self.rounds else {}
        settings = self.trial.rigl
        updates = rigl.update_steps(self.total_steps(), settings.update_interval,
                                    settings.end_fraction)
        return {"val_acc": last.get("val_acc"), "test_acc": last.get("test_acc"),
                "sparsity": last.get("sparsity"), "mask_updates": len(updates)}


RUNNERS: dict[str, type[_TrialRun]] = {"dense": DenseRun, "cs": CSRun, "imp": IMPRun,
                                       "rigl": RigLRun}


def run_trial(trial, data, hooks: Hooks | None = None) -> TrialResult:
    """Run (or resume) one trial of any method."""
    return RUNNERS[trial.method](trial, data, hooks).run()


def run_dense(trial, data, hooks: Hooks | None = None) -> TrialResult:
    """Train the dense model for one round; ``final`` holds its val/test accuracy."""
    return DenseRun(trial, data, hooks).run()


def run_cs_search(trial, data, hooks: Hooks | None = None) -> TrialResult:
    """A CS ticket search (and, if enabled, the ticket's retraining)."""
    return CSRun(trial, data, hooks).run()


def run_imp_chain(trial, data, hooks: Hooks | None = None) -> TrialResult:
    """An IMP chain: one ticket per round (and the last one's retraining, if enabled)."""
    return IMPRun(trial, data, hooks).run()


def retrain_ticket(ticket: Ticket, trial, data, hooks: Hooks | None = None) -> TrialResult:
    """Retrain an existing ticket from its rewind point with its mask fixed, for one round
    of ``trial``'s schedule (``retrain.epochs`` or ``train.epochs_per_round``)."""
    run = RetrainRun(trial, data, hooks, ticket)
    return run.run()


class RetrainRun(_TrialRun):
    """Retrain one given ticket (e.g. loaded from disk) under the trial's recipes; per-recipe
    results the ticket carried from an earlier retraining are replaced, not merged."""

    def __init__(self, trial, data, hooks, ticket: Ticket):
        self.method = trial.method
        super().__init__(trial, data, hooks)
        self.given = ticket

    def first_stage(self) -> str:
        return "retrain"

    def begin(self) -> None:
        self.snapshot = {k: v.to(self.device) for k, v in self.given.rewind_state.items()}
        meta = {k: v for k, v in self.given.meta.items() if k not in ("recipe", "recipes")}
        self.pending = [Ticket(self.given.name, self.given.masks, self.given.rewind_state, meta)]
        super().begin()

    def stages(self) -> None:
        self.retrain_pending()


def planned_epochs(trial) -> int:
    """Epochs a trial is configured to train (for progress display only; the cost report
    counts epochs from the ledger). Retraining counts once per recipe."""
    epochs = trial.train.epochs_per_round
    retrain = (trial.retrain.epochs or epochs) if trial.retrain.enabled else 0
    retrain *= len(trial.retrain.recipes)
    if trial.method == "dense":
        return epochs
    if trial.method == "rigl":
        return trial.rigl.epochs or epochs
    if trial.method == "cs":
        return trial.cs.rounds * epochs + retrain
    retrained = 1 if trial.imp.rewind_between_rounds else trial.imp.rounds
    return trial.imp.rounds * epochs + retrained * retrain
