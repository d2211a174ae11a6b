"""Typed records of what a job produced: a trial's ``result.json`` (``TrialRecord``) and the
job's ``summary.json`` (``JobRecord``). They are written by the job lifecycle, logged to MLflow,
and read back by the report; nothing downstream reads these files as loose dicts.

Imports only pydantic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeResult(_Record):
    """A ticket retrained under one recipe."""

    val_acc: float | None
    test_acc: float | None
    retrain_epochs: int
    settings: dict[str, Any] = Field(default_factory=dict)


class TicketRecord(_Record):
    """A ticket as reported (no tensors; ``path`` is its ticket directory)."""

    name: str
    sparsity: float
    method: str | None = None
    trial_id: str | None = None
    round: int | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    search_epochs: int | None = None
    retrain_epochs: int | None = None
    target_sparsity: float | None = None  # the sparsity the method aimed at, if any
    achieved_sparsity: float | None = None  # targeted CS: before any exact rounding
    recipe: str | None = None
    recipes: dict[str, RecipeResult] | None = None
    path: str | None = None


class RoundRecord(_Record):
    """One trained round (search, retraining, dense or RigL training)."""

    phase: str
    round: int
    epochs: int
    sparsity: float
    val_acc: float | None
    test_acc: float | None
    recipe: str | None = None


class LedgerRecord(_Record):
    """The totals of a trial's ledger: epochs trained per phase, seconds, attempts."""

    device: str
    device_fraction: float
    epochs: dict[str, int]
    train_seconds: dict[str, float]
    recomputed_epochs: int
    wall_clock_s: float
    device_s: float
    attempts: int
    attempt_windows: list[list[float]]

    def phase_epochs(self, phases: tuple[str, ...]) -> int:
        return sum(self.epochs.get(phase, 0) for phase in phases)


class TrialRecord(_Record):
    """A finished trial: ``result.json`` in its trial directory and its MLflow run."""

    trial_id: str
    method: str
    name: str | None = None  # readable trial name
    group: str | None = None  # readable name of its setting without the seed
    seed: int | None = None
    run_id: str | None = None  # its MLflow run, when tracked
    tickets: list[TicketRecord]
    rounds: list[RoundRecord]
    final: dict[str, float | int | None]
    ledger: LedgerRecord
    data_sizes: dict[str, int] = Field(default_factory=dict)  # examples per split
    fused_group: str | None = None  # the fused group it trained in (resources.fuse), if any
    fused_with: list[str] = Field(default_factory=list)  # that group's other members

    @property
    def title(self) -> str:
        return self.name or self.trial_id


class Orchestration(_Record):
    """What running the trials through Ray cost beyond the trials themselves."""

    ray_startup_s: float
    driver_wall_s: float
    trial_wall_clock_sum_s: float
    critical_path_trial_s: float
    overhead_s: float
    overhead_fraction: float


class JobRecord(_Record):
    """A job as it ended (or as far as it got): ``summary.json`` in the job directory."""

    job: str
    spec_hash: str
    job_dir: str | None = None
    status: str = "FINISHED"
    driver_wall_s: float | None = None
    makespan_s: float | None = None
    orchestration: Orchestration | None = None
    failed_trials: list[str] = Field(default_factory=list)
    tracking: dict[str, str] | None = None
    trials: list[TrialRecord] = Field(default_factory=list)


def read_record(path: Path, kind: type[BaseModel]) -> Any:
    """A record file, or None if it does not exist."""
    path = Path(path)
    return kind.model_validate_json(path.read_text()) if path.exists() else None


def record_json(record: BaseModel) -> str:
    """Stable, readable JSON of a record (no NaN)."""
    data = record.model_dump(mode="json")
    return json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n"
