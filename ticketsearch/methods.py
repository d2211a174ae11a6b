"""Method runners: a dense baseline, a CS ticket search, an IMP chain, ticket retraining.

Each runner is a function of a ``TrialSpec``, a loaded dataset and a ``Hooks`` object (the
small reporter/checkpoint interface that the Ray and MLflow adapters implement). Runners are
pure PyTorch; they return a ``TrialResult`` with the tickets found and the epoch ledger.

Resumption: a runner saves its whole state through ``hooks.save_checkpoint`` every
``train.checkpoint_every`` epochs and at every round boundary, and starts from
``hooks.load_checkpoint()`` when that returns a state. A resumed run continues exactly where
the checkpoint left off; epochs trained after the checkpoint and lost are retrained once and
counted once, and reported in ``ledger.recomputed_epochs``.
"""

from __future__ import annotations

import abc
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .models import create_model, masked_layer_names, model_info
from .sparsity import cs, imp
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
        """JSON-able summary: tickets (no tensors), rounds, final metrics, ledger totals."""
        return {
            "trial_id": self.trial_id,
            "method": self.method,
            "tickets": [t.summary() for t in self.tickets],
            "rounds": self.rounds,
            "final": self.final,
            "ledger": self.ledger.summary(),
        }


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

    def new_model(self) -> nn.Module:
        """A freshly initialised, unmasked model (seeded by the trial seed)."""
        torch.manual_seed(self.trial.seed)
        model = create_model(
            self.trial.model.name, self.data.num_classes, tuple(self.data.input_shape),
            mlp_hidden=tuple(self.trial.model.mlp_hidden),
        )
        return model.to(self.device)

    def model_for_stage(self) -> nn.Module:
        """The (masked) model structure for the current stage, before state is loaded."""
        if self.stage == "retrain":
            model = self.new_model()
            add_binary_masks(model, self.pending[self.round].masks)
            return model
        return self.new_model()

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
            lr = lr_for_epoch(epoch, self.train, epochs)
            set_lr(self.optimizer, lr)
            batches = self.data.train_batches(self.train.batch_size, self.generator)
            stats = train_epoch(self.model, batches, self.optimizer, self.extra_loss(),
                                self.on_step())
            last = epoch == epochs - 1
            start = time.perf_counter()
            val = test = None
            if last or (epoch + 1) % self.train.eval_every == 0:
                val, test = self.evaluate_now()
            event = EpochEvent(
                self.trial.trial_id, self.method, self.stage, self.round, epoch,
                self.ledger.epochs(), lr, self.beta(), stats.train_loss,
                val, test, self.sparsity(), stats.seconds,
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
        """Retrain every pending ticket from the rewind point with its mask fixed."""
        while self.stage == "retrain" and self.round < len(self.pending):
            epochs_before = self.ledger.epochs("retrain")
            val, test = self.fit()
            self.end_round(val, test)
            ticket = self.pending[self.round]
            ticket.meta.update(val_acc=val, test_acc=test,
                               retrain_epochs=self.ledger.epochs("retrain") - epochs_before)
            self.emit(ticket)
            nxt = self.round + 1
            self.advance("retrain" if nxt < len(self.pending) else "done", nxt)

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


RUNNERS: dict[str, type[_TrialRun]] = {"dense": DenseRun, "cs": CSRun, "imp": IMPRun}


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
    """Retrain one given ticket (e.g. loaded from disk)."""

    def __init__(self, trial, data, hooks, ticket: Ticket):
        self.method = trial.method
        super().__init__(trial, data, hooks)
        self.given = ticket

    def first_stage(self) -> str:
        return "retrain"

    def begin(self) -> None:
        self.snapshot = {k: v.to(self.device) for k, v in self.given.rewind_state.items()}
        self.pending = [Ticket(self.given.name, self.given.masks, self.given.rewind_state,
                               dict(self.given.meta))]
        super().begin()

    def stages(self) -> None:
        self.retrain_pending()


def asdict_event(event) -> dict[str, Any]:
    """An event as a plain dict (for JSON lines)."""
    return asdict(event)


def planned_epochs(trial) -> int:
    """Epochs a trial is configured to train (for progress display only; the cost report
    counts epochs from the ledger)."""
    epochs = trial.train.epochs_per_round
    retrain = (trial.retrain.epochs or epochs) if trial.retrain.enabled else 0
    if trial.method == "dense":
        return epochs
    if trial.method == "cs":
        return trial.cs.rounds * epochs + retrain
    retrained = 1 if trial.imp.rewind_between_rounds else trial.imp.rounds
    return trial.imp.rounds * epochs + retrained * retrain
