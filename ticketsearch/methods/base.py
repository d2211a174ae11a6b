"""``TrialRun``: what every method runner shares — models, the round loop ``fit``, tickets,
the ledger, and resumption.

A runner is a straight function of a ``TrialRun`` (see ``cs.py``): it enters its stages in
order (``if run.enter("search"):``), loops ``for rnd in run.rounds(n)`` and trains each round
with ``run.fit(model, optimizer, ...)``. Resumption needs nothing more from the runner:

- ``fit`` checkpoints the whole trial at the start of every round after the first epoch of
  the trial and, inside a round, at the first epoch end ``train.checkpoint_every_s`` seconds
  after the last checkpoint (or every ``train.checkpoint_every`` epochs, when set), never
  after the last epoch of a round (the next round's start is the next checkpoint);
- when the trial resumes, ``enter`` skips the stages the checkpoint is past (their tickets,
  snapshot and round records come back with the checkpoint), ``rounds`` starts at the
  checkpointed round, and ``fit`` loads the checkpointed model, optimizer and random state
  into the model and optimizer it is given and continues from the checkpointed epoch.

Epochs trained after the checkpoint and lost are trained again once and counted once, and
reported in ``ledger.recomputed_epochs``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..hooks import (
    CHECKPOINT_VERSION,
    CheckpointError,
    EpochEvent,
    Hooks,
    RoundEvent,
    TrialResult,
    check_checkpoint,
)
from ..layers import select_masked_layers
from ..models import build_model
from ..parallel import FollowerHooks, Shard
from ..sparsity import cs
from ..sparsity.masks import (
    binary_masks,
    dense_state_dict,
    mask_density,
    soft_masks,
    sparse_state_dict,
)
from ..tickets import Ticket, clone_state
from ..training import (
    EpochLedger,
    FastPath,
    device_kind,
    evaluate,
    lr_for_epoch,
    make_optimizer,
    resolve_device,
    set_lr,
    train_epoch,
)
from .registry import get_method

StepHook = Callable[[int], None]


class TrialRun:
    """One trial being trained (or resumed): its spec, data, hooks, ledger and results."""

    def __init__(self, trial, data, hooks: Hooks | None = None):
        self.trial, self.train, self.data = trial, trial.train, data
        self.settings = trial.settings
        self.method = get_method(trial.method)
        self.shard = Shard.current()  # a data-parallel trial's rank; None for one worker
        hooks = hooks or Hooks()
        self.hooks = hooks if self.shard is None or self.shard.rank == 0 else FollowerHooks(hooks)
        self.device = resolve_device(trial.train.device)
        gpus = trial.resources.gpus if self.device.type == "cuda" else 0.0
        self.ledger = EpochLedger(device_kind(self.device), gpus if gpus > 0 else 1.0)
        self.generator = torch.Generator().manual_seed(trial.seed)
        model = self.new_model()
        self.layer_names = select_masked_layers(model, trial.model, data.num_classes)
        self.fast = FastPath.for_trial(trial.train, self.device, model)
        self.fast.shard = self.shard
        self.snapshot: dict[str, torch.Tensor] | None = None  # the rewind point
        self.tickets: list[Ticket] = []  # emitted (final)
        self.pending: list[Ticket] = []  # found, awaiting retraining
        self.rounds_done: list[dict[str, Any]] = []
        self.extra: dict[str, torch.Tensor] = {}  # a runner's own state (checkpointed)
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.stage, self.stage_index, self.round, self.epoch = "", -1, 0, 0
        self.resuming: dict[str, Any] | None = None  # the checkpoint, until fully restored
        self.saved_at = time.monotonic()  # when the last checkpoint was written

    # --- the whole trial ------------------------------------------------------------------
    def run(self) -> TrialResult:
        """Run (or resume, from the hooks' checkpoint) the trial's method to the end."""
        self.begin()
        final = self.method.run(self)
        self.ledger.touch()
        tickets = sorted(self.tickets, key=lambda t: t.name)
        return TrialResult(self.trial.trial_id, self.trial.method, tickets, self.ledger,
                           self.rounds_done, final, dict(self.data.sizes))

    def begin(self, state: dict[str, Any] | None = None) -> None:
        """Restore everything but the model from ``state`` (a fused group member's, from the
        group checkpoint) or else from the hooks' checkpoint, if there is one."""
        state = self.hooks.load_checkpoint() if state is None else state
        if state is not None:
            self.restore(state)
            reported = self.hooks.epochs_reported()
            self.ledger.recomputed_epochs += max(0, reported - self.ledger.epochs())
        self.ledger.merge_attempts(self.hooks.attempt_windows())
        self.ledger.start_attempt()
        self.hooks.attempt_started(self.ledger.attempts[-1][0])

    # --- building blocks for runners ------------------------------------------------------
    def new_model(self, activation: str = "relu") -> nn.Module:
        """A freshly initialised, unmasked model on the trial's device (seeded by the trial
        seed, so every call gives the same initial weights)."""
        torch.manual_seed(self.trial.seed)
        model = build_model(self.trial.model, self.data.num_classes,
                            tuple(self.data.input_shape), activation)
        return model.to(self.device)

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """A fresh SGD optimizer for ``model`` (weight decay on weights, none on logits)."""
        return make_optimizer(model, self.train)

    def enter(self, stage: str) -> bool:
        """Start the method's next stage; False if the checkpoint being resumed is past it."""
        self.stage_index += 1
        state = self.resuming
        if state is not None and state["stage_index"] > self.stage_index:
            return False
        if state is not None and state["stage_index"] == self.stage_index \
                and state["stage"] != stage:
            raise CheckpointError(f"checkpoint of trial {self.trial.trial_id} is in stage "
                                  f"{state['stage']!r}, not {stage!r}; delete it to start over")
        self.stage, self.round = stage, 0
        return True

    def rounds(self, count: int) -> Iterator[int]:
        """The round numbers of the current stage, from the checkpointed one when resuming."""
        first = self.resuming["round"] if self._resuming_this_stage() else 0
        for number in range(first, count):
            self.round = number
            yield number

    def fit(self, model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int | None = None,
            *, snapshot_at: int | None = None, before_epoch: StepHook | None = None,
            on_step: StepHook | None = None, after_backward: StepHook | None = None,
            after_step: StepHook | None = None, extra_loss: Callable[[], torch.Tensor] | None = None,
            batch_loss: Callable[[], Any] | None = None,
            lr_factor: Callable[[int], float] | None = None,
            recipe: str | None = None) -> tuple[float | None, float | None]:
        """Train ``model`` for one round of ``epochs`` (default ``train.epochs_per_round``)
        epochs; return its (val, test) accuracy at the end.

        ``snapshot_at``: take the rewind snapshot before that epoch. ``before_epoch(e)`` runs
        before epoch ``e``; ``on_step(i)`` / ``after_backward(i)`` / ``after_step(i)`` before
        step ``i`` of the round, after its backward pass and after its optimizer step; ``extra_loss()`` is added to every step's loss;
        ``batch_loss()`` makes the epoch's batch loss (None = cross-entropy) after its batches
        are drawn; the LR is the step schedule times ``lr_factor(e)``; ``recipe`` labels the
        events of a retraining round.
        """
        epochs = epochs or self.train.epochs_per_round
        self.model, self.optimizer = self.fast.prepare(model), optimizer
        self.epoch = self._restore_round(model, optimizer)
        if self.epoch == 0 and self.ledger.epochs() > 0:
            self.save()
        per_epoch = self.data.num_train_batches(self.train.batch_size)
        val = test = None
        while self.epoch < epochs:
            epoch = self.epoch
            if epoch == snapshot_at:
                self.snapshot = dense_state_dict(model)
            if before_epoch is not None:
                before_epoch(epoch)
            lr = lr_for_epoch(epoch, self.train, epochs)
            lr *= 1.0 if lr_factor is None else lr_factor(epoch)
            set_lr(optimizer, lr)
            batches = self.data.train_batches(self.train.batch_size, self.generator)
            trains = model if self.shard is None else self.shard.module(model, self.device)
            stats = train_epoch(trains, batches, optimizer, extra_loss,
                                at_offset(on_step, epoch * per_epoch),
                                at_offset(after_backward, epoch * per_epoch),
                                None if batch_loss is None else batch_loss(),
                                at_offset(after_step, epoch * per_epoch), self.fast)
            val, test = self._epoch_end(epoch, epochs, lr, stats, recipe)
        self._round_end(epochs, val, test, recipe)
        return val, test

    def make_ticket(self, name: str, masks: dict[str, torch.Tensor], **extra) -> Ticket:
        """A ticket of ``masks`` with the rewind snapshot and the trial's metadata."""
        masks = {k: v.detach().cpu().clone() for k, v in masks.items()}
        trial = self.trial
        settings = trial.settings.model_dump(mode="json", by_alias=True)
        settings.pop("sweep", None)
        meta = {
            "method": trial.method,
            "trial_id": trial.trial_id,
            "job": trial.job_name,
            "seed": trial.seed,
            "settings": settings,
            **model_meta(trial.model),
            "dataset": trial.data.label(),
            "num_classes": self.data.num_classes,
            "input_shape": list(self.data.input_shape),
            "rewind_epoch": self.train.rewind_epoch,
            "search_epochs": sum(self.ledger.epochs(p) for p in self.method.search_phases),
            "retrain_epochs": 0,
            "val_acc": None,
            "test_acc": None,
        }
        return Ticket(name, masks, clone_state(self.snapshot), meta | extra)

    def emit(self, ticket: Ticket, trained: nn.Module | None = None, **meta) -> None:
        """A final ticket (``meta`` updates its metadata): kept and reported. ``trained``: the
        model (built with the default activation) whose accuracy the ticket reports; its
        weights are kept with the ticket."""
        ticket.meta.update(meta)
        if trained is not None:
            keep_trained(ticket, trained, "relu")
        self.tickets.append(ticket)
        self.hooks.ticket_found(ticket)

    def last_round(self) -> dict[str, Any]:
        return self.rounds_done[-1] if self.rounds_done else {}

    # --- inside fit -----------------------------------------------------------------------

    def _epoch_end(self, epoch: int, epochs: int, lr: float, stats, recipe: str | None):
        """Evaluate when due, record the epoch, tell the hooks, checkpoint when due."""
        last = epoch == epochs - 1
        start = time.perf_counter()
        val = test = None
        if last or (epoch + 1) % self.train.eval_every == 0:
            val, test = self._evaluate()
        step = self.ledger.epochs()
        entry = self.ledger.record(self.stage, self.round, epoch, stats.seconds,
                                   time.perf_counter() - start)
        event = EpochEvent(
            self.trial.trial_id, self.trial.method, self.stage, self.round, epoch, step, lr,
            cs.current_beta(self.model), stats.train_loss, val, test, self._sparsity(),
            stats.seconds, recipe, entry.eval_seconds, entry.finished_at,
        )
        self.ledger.touch()
        self.epoch += 1
        self.hooks.epoch_end(event)
        if not last and checkpoint_due(self.train, self.epoch, self.saved_at):
            self.save()
        return val, test

    def _round_end(self, epochs: int, val, test, recipe: str | None) -> None:
        record = {"phase": self.stage, "round": self.round, "epochs": epochs,
                  "sparsity": self._sparsity(), "val_acc": val, "test_acc": test}
        if recipe is not None:
            record["recipe"] = recipe
        self.rounds_done.append(record)
        self.hooks.round_end(RoundEvent(self.trial.trial_id, self.trial.method, **record))

    def _evaluate(self) -> tuple[float | None, float | None]:
        batch = max(self.train.batch_size, 256)
        val = evaluate(self.model, self.data.eval_batches("val", batch))
        test = evaluate(self.model, self.data.eval_batches("test", batch))
        return (val[1] if val else None), (test[1] if test else None)

    def _sparsity(self) -> float:
        """CS sparsity (s <= 0) of a soft-masked model, else the binary masks' sparsity."""
        if soft_masks(self.model):
            return cs.cs_sparsity(self.model)
        masks = binary_masks(self.model)
        return 1.0 - mask_density(masks) if masks else 0.0

    # --- checkpoints ----------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the whole trial at the current position."""
        self.ledger.touch()
        self.hooks.save_checkpoint(self.state())
        self.saved_at = time.monotonic()

    def state(self) -> dict[str, Any]:
        def ticket_state(t: Ticket, trained: bool = False):  # emitted ones are on disk
            return {"name": t.name, "masks": t.masks, "meta": t.meta,
                    "trained": t.trained if trained else None}

        return {
            "version": CHECKPOINT_VERSION, "method": self.trial.method,
            "trial_id": self.trial.trial_id, "stage": self.stage,
            "stage_index": self.stage_index, "round": self.round, "epoch": self.epoch,
            "model": None if self.model is None else self.model.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state(),
            "snapshot": self.snapshot, "ledger": self.ledger.to_dict(),
            "tickets": [ticket_state(t) for t in self.tickets],
            "pending": [ticket_state(t, trained=True) for t in self.pending],
            "rounds": self.rounds_done, "extra": self.extra | self.fast.state(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take back everything but the model and optimizer, which ``fit`` restores when it
        reaches the checkpointed round."""
        check_checkpoint(state, self.trial.trial_id, self.trial.method)
        if not isinstance(state["ledger"]["entries"], list):  # a reference not given back
            raise CheckpointError(f"checkpoint of trial {self.trial.trial_id} counts "
                                  f"{state['ledger']['entries']} epochs that its event log "
                                  "does not hold; delete it to start the trial over")
        self.resuming = state
        self.generator.set_state(state["generator"])
        self.ledger = EpochLedger.from_dict(state["ledger"])
        self.snapshot = None if state["snapshot"] is None else {
            k: v.to(self.device) for k, v in state["snapshot"].items()}
        self.rounds_done = list(state["rounds"])
        self.extra = {k: v.to(self.device) for k, v in state["extra"].items()
                      if not k.startswith("amp.")}  # the gradient scaler's, restored by fit
        snapshot_cpu = clone_state(self.snapshot) if self.snapshot else {}
        self.tickets = [Ticket(t["name"], t["masks"], snapshot_cpu, t["meta"])
                        for t in state["tickets"]]
        self.pending = [Ticket(t["name"], t["masks"], snapshot_cpu, t["meta"], t.get("trained"))
                        for t in state["pending"]]

    def _resuming_this_stage(self) -> bool:
        state = self.resuming
        return state is not None and state["stage_index"] == self.stage_index

    def _restore_round(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        """Load the checkpoint into ``model`` and ``optimizer`` if it is of this round;
        returns the epoch to continue from (0 when not resuming)."""
        state = self.resuming
        if not self._resuming_this_stage() or state["round"] != self.round:
            return 0
        self.resuming = None
        return load_position(state, model, optimizer, self.fast)


def load_position(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                  fast: FastPath) -> int:
    """Load a checkpoint's model, optimizer, gradient scaler (in ``extra``) and torch RNG
    state; returns the epoch to continue from (a trial's or a fused group's checkpoint)."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    fast.load_state(state["extra"])
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"]


def keep_trained(ticket: Ticket, model: nn.Module, activation: str) -> None:
    """Keep ``model``'s trained sparse weights with ``ticket`` (and the ``activation`` it
    was built with, which rebuilding it needs)."""
    ticket.trained = sparse_state_dict(model)
    ticket.meta["trained_activation"] = activation


def model_meta(spec) -> dict[str, Any]:
    """How a ticket records its model: ``model`` (name or factory path), ``model_kwargs``
    and, for a factory, ``model_factory``: what ``models.model_from_meta`` rebuilds it from."""
    if spec.builtin:
        return {"model": spec.name, "model_kwargs": {"mlp_hidden": list(spec.mlp_hidden)}}
    meta = {"model": spec.label(), "model_kwargs": dict(spec.kwargs)}
    return meta | ({"model_factory": spec.factory} if spec.factory else {})


def checkpoint_due(train, epochs_done: int, saved_at: float) -> bool:
    """Whether a round with ``epochs_done`` epochs trained checkpoints now: every
    ``train.checkpoint_every`` epochs when set, else ``train.checkpoint_every_s`` seconds
    (monotonic) after the last checkpoint."""
    every = train.checkpoint_every
    if every is not None and epochs_done % every == 0:
        return True
    return time.monotonic() - saved_at >= train.checkpoint_every_s


def at_offset(hook: StepHook | None, offset: int) -> StepHook | None:
    """``hook`` taking the step within the round, given the step within the epoch."""
    if hook is None:
        return None
    return lambda step: hook(offset + step)
