"""Fused groups: K trials of one method trained at once as one fused network (``fusion.py``),
each member keeping its identity — its trial directory, events, ledger, MLflow run, tickets
and result — while one forward/backward pass per step trains them all.

``GroupRun`` is to a group what ``base.TrialRun`` is to a trial: the method's group runner
(``Method.run_group``, e.g. ``cs.run_cs_group``) enters its stages, loops its rounds and calls
``fit``, as a trial runner does. Every member is a ``TrialRun`` holding its own state (seed,
data order, ledger, snapshot, tickets, hooks); the group holds what they share: the fused
model, the optimizer, the stage, round and epoch, and one checkpoint
(``jobdir.GroupCheckpoint``) with every member's packed state in it, so the group resumes as
one. A member's epoch costs the group's epoch seconds divided by K, and its ledger's device
share is divided by K: the group's device time is split evenly between its members.

``units.plan_units`` decides which trials of a job share a group (``resources.fuse``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..fusion import (
    fuse_inputs,
    fuse_models,
    member_logits,
    member_state,
    stack_states,
)
from ..hooks import CHECKPOINT_VERSION, CheckpointError, EpochEvent, Hooks, RoundEvent, TrialResult
from ..sparsity import cs
from ..sparsity.masks import binary_masks, dense_state_dict, soft_masks, sparse_state_dict
from ..training import lr_for_epoch, set_lr, train_epoch
from .base import StepHook, TrialRun, at_offset, checkpoint_due, load_position
from .registry import get_method

GROUP_PREFIX = "fused-"


def group_id(trial_ids: list[str]) -> str:
    """A fused group's id: fixed by its members (the same members again are the same group)."""
    digest = hashlib.sha256("\n".join(sorted(trial_ids)).encode()).hexdigest()[:10]
    return f"{GROUP_PREFIX}{len(trial_ids)}x-{digest}"


class MemberLoss:
    """The batch loss of a fused step: each member's cross-entropy on its own labels (``y``
    is ``(B, K)``), summed, so each member's gradient is its own; the members' losses are
    kept (on the device) for their epoch records."""

    def __init__(self, members: int, smoothing: float = 0.0):
        self.members, self.smoothing = members, smoothing
        self.losses: list[Tensor] = []
        self.sizes: list[int] = []

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, step: int) -> Tensor:
        out = member_logits(model(x), self.members)
        per_example = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.t().reshape(-1),
                                      reduction="none", label_smoothing=self.smoothing)
        losses = per_example.view(self.members, -1).mean(1)
        self.losses.append(losses.detach())
        self.sizes.append(y.shape[0])
        return losses.sum()

    def means(self) -> list[float]:
        """Each member's batch-size-weighted mean loss over the epoch."""
        weights = torch.tensor(self.sizes, dtype=torch.float32, device=self.losses[0].device)
        return (torch.stack(self.losses, 1).float() @ weights / sum(self.sizes)).tolist()


def fused_batches(iterators: list[Iterator]) -> Iterator[tuple[Tensor, Tensor]]:
    """The members' batches (each from its own data order) as fused batches: inputs laid out
    member-major, labels ``(B, K)``."""
    for batches in zip(*iterators):
        yield fuse_inputs([x for x, _ in batches]), torch.stack([y for _, y in batches], 1)


class GroupRun:
    """A fused group being trained (or resumed): its members and what they share."""

    def __init__(self, trials, data, hooks: list[Hooks], store):
        self.members = [TrialRun(t, data, h) for t, h in zip(trials, hooks)]
        lead = self.members[0]
        self.method = get_method(lead.trial.method)
        self.train, self.data, self.device, self.fast = lead.train, data, lead.device, lead.fast
        self.layer_names = lead.layer_names
        self.size = len(self.members)
        self.id = group_id([t.trial_id for t in trials])
        for member in self.members:
            member.ledger.device_fraction /= self.size
        self.store = store
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.stage, self.stage_index, self.round, self.epoch = "", -1, 0, 0
        self.resuming: dict[str, Any] | None = None
        self.saved_at = time.monotonic()

    # --- the whole group ------------------------------------------------------------------
    def run(self) -> list[TrialResult]:
        """Run (or resume, from the group checkpoint) the group to the end; one result per
        member."""
        self.begin()
        self.method.run_group(self)
        results = []
        for member in self.members:
            member.ledger.touch()
            results.append(TrialResult(member.trial.trial_id, member.trial.method,
                                       sorted(member.tickets, key=lambda t: t.name),
                                       member.ledger, member.rounds_done, {},
                                       dict(self.data.sizes)))
        return results

    def begin(self) -> None:
        """Every member's state from the group checkpoint (or a fresh start)."""
        state = self.store.load()
        if state is None:
            for member in self.members:
                member.begin()
            return
        self._check(state)
        self.resuming = state
        for member, packed in zip(self.members, state["members"]):
            member.begin(member.hooks.unpack_checkpoint(packed))

    def _check(self, state: dict[str, Any]) -> None:
        ids = [m.trial.trial_id for m in self.members]
        if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION \
                or state.get("trial_ids") != ids:
            raise CheckpointError(f"{self.store.path}: not a checkpoint of this group's "
                                  f"members ({', '.join(ids)}) of version "
                                  f"{CHECKPOINT_VERSION}; delete it to start the group over")

    # --- building blocks for group runners ------------------------------------------------
    def new_model(self, activation: str = "relu") -> nn.Module:
        """The members' fresh models (each from its own seed) fused into one (whether the
        model can be fused is checked once, before the group starts: ``job.run_one_group``
        calls ``units.check_fusible``)."""
        models = [member.new_model(activation) for member in self.members]
        return fuse_models(models)

    def new_optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return self.members[0].new_optimizer(model)

    def enter(self, stage: str) -> bool:
        """Start the next stage; False if the checkpoint being resumed is past it."""
        self.stage_index += 1
        state = self.resuming
        if state is not None and state["stage_index"] > self.stage_index:
            return False
        self.stage, self.round = stage, 0
        for member in self.members:
            member.stage, member.stage_index, member.round = stage, self.stage_index, 0
        return True

    def rounds(self, count: int) -> Iterator[int]:
        state = self.resuming
        first = state["round"] if state and state["stage_index"] == self.stage_index else 0
        for number in range(first, count):
            self.round = number
            for member in self.members:
                member.round = number
            yield number

    def stack(self, values: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """The members' tensors (masks, snapshots) stacked as the fused model holds them."""
        return {k: v.to(self.device) for k, v in stack_states(values).items()}

    def fit(self, model: nn.Module, optimizer: torch.optim.Optimizer, epochs: int | None = None,
            *, snapshot_at: int | None = None, before_epoch: StepHook | None = None,
            on_step: StepHook | None = None, after_step: StepHook | None = None,
            extra_loss: Callable[[], Tensor] | None = None, smoothing: float = 0.0,
            lr_factor: Callable[[int], float] | None = None,
            recipe: str | None = None) -> tuple[list, list]:
        """``TrialRun.fit`` for the group: one round of fused training; returns every
        member's (val, test) accuracies at its end."""
        epochs = epochs or self.train.epochs_per_round
        self.model, self.optimizer = self.fast.prepare(model), optimizer
        self.epoch = self._restore_round(model, optimizer)
        if self.epoch == 0 and self.members[0].ledger.epochs() > 0:
            self.save()
        per_epoch = self.data.num_train_batches(self.train.batch_size)
        vals = tests = [None] * self.size
        while self.epoch < epochs:
            epoch = self.epoch
            if epoch == snapshot_at:
                self._take_snapshot(model)
            if before_epoch is not None:
                before_epoch(epoch)
            lr = lr_for_epoch(epoch, self.train, epochs)
            lr *= 1.0 if lr_factor is None else lr_factor(epoch)
            set_lr(optimizer, lr)
            loss = MemberLoss(self.size, smoothing)
            batches = fused_batches([self.data.train_batches(self.train.batch_size, m.generator)
                                     for m in self.members])
            stats = train_epoch(model, batches, optimizer, extra_loss,
                                at_offset(on_step, epoch * per_epoch), None, loss,
                                at_offset(after_step, epoch * per_epoch), self.fast)
            vals, tests = self._epoch_end(epoch, epochs, lr, stats.seconds, loss.means(),
                                          recipe)
        self._round_end(epochs, vals, tests, recipe)
        return vals, tests

    def keep_trained(self, tickets, model: nn.Module, activation: str) -> None:
        """Keep each member's trained sparse weights with its ticket (``base.keep_trained``)."""
        state = sparse_state_dict(model)
        for member, ticket in enumerate(tickets):
            ticket.trained = {k: v.clone() for k, v in member_state(state, member).items()}
            ticket.meta["trained_activation"] = activation

    # --- inside fit -----------------------------------------------------------------------
    def _take_snapshot(self, model: nn.Module) -> None:
        snapshot = dense_state_dict(model)
        for index, member in enumerate(self.members):
            member.snapshot = {k: v.clone() for k, v in member_state(snapshot, index).items()}

    def _epoch_end(self, epoch: int, epochs: int, lr: float, seconds: float,
                   losses: list[float], recipe: str | None) -> tuple[list, list]:
        last = epoch == epochs - 1
        start = time.perf_counter()
        vals = tests = [None] * self.size
        if last or (epoch + 1) % self.train.eval_every == 0:
            vals, tests = self._evaluate()
        eval_seconds = (time.perf_counter() - start) / self.size
        for index, member in enumerate(self.members):
            step = member.ledger.epochs()
            entry = member.ledger.record(self.stage, self.round, epoch, seconds / self.size,
                                         eval_seconds)
            event = EpochEvent(
                member.trial.trial_id, member.trial.method, self.stage, self.round, epoch, step,
                lr, cs.current_beta(self.model, index), losses[index], vals[index],
                tests[index], self._sparsity(index), seconds / self.size, recipe,
                entry.eval_seconds, entry.finished_at)
            member.ledger.touch()
            member.hooks.epoch_end(event)
        self.epoch += 1
        if not last and checkpoint_due(self.train, self.epoch, self.saved_at):
            self.save()
        return vals, tests

    def _round_end(self, epochs: int, vals: list, tests: list, recipe: str | None) -> None:
        for index, member in enumerate(self.members):
            record = {"phase": self.stage, "round": self.round, "epochs": epochs,
                      "sparsity": self._sparsity(index), "val_acc": vals[index],
                      "test_acc": tests[index]}
            if recipe is not None:
                record["recipe"] = recipe
            member.rounds_done.append(record)
            member.hooks.round_end(RoundEvent(member.trial.trial_id, member.trial.method,
                                              **record))

    def _evaluate(self) -> tuple[list, list]:
        batch = max(self.train.batch_size, 256)
        results = [evaluate_members(self.model, self.data.eval_batches(split, batch),
                                    self.size) for split in ("val", "test")]
        return results[0], results[1]

    def _sparsity(self, member: int) -> float:
        if soft_masks(self.model):
            return cs.cs_sparsity(self.model, member)
        masks = binary_masks(self.model)
        if not masks:
            return 0.0
        kept = sum(int(m[member].sum()) for m in masks.values())
        return 1.0 - kept / sum(m[member].numel() for m in masks.values())

    # --- the group checkpoint -------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the whole group at the current position (one file, every member)."""
        members = []
        for member in self.members:
            member.ledger.touch()
            members.append(member.hooks.pack_checkpoint(member.state()))
        self.store.save({
            "version": CHECKPOINT_VERSION, "group": self.id,
            "trial_ids": [m.trial.trial_id for m in self.members],
            "stage": self.stage, "stage_index": self.stage_index, "round": self.round,
            "epoch": self.epoch, "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
            "extra": self.fast.state(), "members": members,
        })
        self.saved_at = time.monotonic()

    def _restore_round(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
        state = self.resuming
        if state is None or state["stage_index"] != self.stage_index \
                or state["round"] != self.round:
            return 0
        self.resuming = None
        return load_position(state, model, optimizer, self.fast)


@torch.no_grad()
def evaluate_members(model: nn.Module, batches, members: int) -> list[float | None]:
    """Each member's accuracy over ``batches`` (shared inputs) in eval mode."""
    model.eval()
    correct = torch.zeros(members, dtype=torch.long)
    seen = 0
    for x, y in batches:
        logits = member_logits(model(fuse_inputs(x, members)), members)
        correct = correct.to(logits.device) + (logits.argmax(-1) == y).sum(1)
        seen += y.shape[0]
    if seen == 0:
        return [None] * members
    return (correct.double() / seen).tolist()


__all__ = ["GroupRun", "MemberLoss", "evaluate_members", "group_id"]
