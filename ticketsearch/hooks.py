"""The protocol between the core and its adapters: what a trial reports and how it checkpoints.

A method runner (``methods/``) talks to the outside only through a ``Hooks`` object: it emits
an ``EpochEvent`` after every trained epoch, a ``RoundEvent`` at every round end and each
ticket it finds, and it saves and loads its resumable state. The adapters — the job directory
(``jobdir.py``), MLflow (``tracking.py``) and Ray Tune (``cluster.py``) — implement ``Hooks``;
they import this module, never the runners. A finished trial is a ``TrialResult``.

Imports nothing of Ray or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tickets import Ticket
    from .training import EpochLedger

CHECKPOINT_VERSION = 3  # 3: CS logits in one flat bank; tickets and ledger entries by reference
CHECKPOINT_KEYS = frozenset({
    "version", "method", "trial_id", "stage", "stage_index", "round", "epoch", "model",
    "optimizer", "generator", "torch_rng", "snapshot", "ledger", "tickets", "pending", "rounds",
    "extra",
})


class CheckpointError(ValueError):
    """A trial checkpoint that cannot be resumed (unreadable, or of another trial kind)."""


def check_checkpoint(state: Any, trial_id: str, method: str) -> None:
    """Raise CheckpointError unless ``state`` is a resumable ``method`` checkpoint."""
    if not isinstance(state, dict) or not CHECKPOINT_KEYS <= state.keys():
        raise CheckpointError(f"checkpoint of trial {trial_id} is not a ticketsearch "
                              f"checkpoint of version {CHECKPOINT_VERSION}; delete it to start "
                              "the trial over")
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
    eval_seconds: float = 0.0  # the ledger entry's evaluation time and end time, so the
    finished_at: float = 0.0  # ledger can be read back from the event log

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
        write or copy them before returning. Its ``tickets`` were all passed to
        ``ticket_found`` and its ledger entries to ``epoch_end`` first, so hooks that keep
        those may store references to them and give them back in ``load_checkpoint``."""

    def load_checkpoint(self) -> dict[str, Any] | None:
        return None

    def pack_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """``state`` as a fused group's checkpoint keeps it for this member (the group
        writes one file for all its members): what ``save_checkpoint`` would write."""
        return state

    def unpack_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """The member's state a group checkpoint kept (``pack_checkpoint``'s output), read
        back as ``load_checkpoint`` reads its own file."""
        return state

    def epochs_reported(self) -> int:
        """Epochs this trial had reported before the current attempt (for recompute counts)."""
        return 0

    def attempt_started(self, start: float) -> None:
        """An attempt of the trial began at unix time ``start``."""

    def attempt_windows(self) -> list[list[float]]:
        """``[start, last seen alive]`` of every earlier attempt this trial recorded, including
        the work after its last checkpoint (which the checkpoint's ledger does not know)."""
        return []

    def stop(self) -> None:
        """The trial stopped before finishing: end any work running in the background."""


@dataclass
class TrialResult:
    """A finished trial: its tickets (sorted by name), ledger, round records and final
    metrics. ``record()`` is its JSON form (``records.TrialRecord``)."""

    trial_id: str
    method: str
    tickets: list[Ticket]
    ledger: EpochLedger
    rounds: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)
    data_sizes: dict[str, int] = field(default_factory=dict)  # examples per split

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
            "data_sizes": self.data_sizes,
        }


def _ticket_summary(ticket: Ticket) -> dict[str, Any]:
    """``Ticket.summary()`` plus the per-recipe results and the primary recipe, if any."""
    summary = ticket.summary()
    for key in ("recipe", "recipes"):
        if key in ticket.meta:
            summary[key] = ticket.meta[key]
    return summary
