"""The job directory: where a job's trials keep checkpoints, events, tickets and results.

Layout (one folder per job submission, named ``<job name>-<spec hash>``)::

    <storage>/<job>-<hash>/
        spec.yaml                 the normalised job spec
        summary.json              the job record (records.JobRecord), written at its end
        mlflow.json               the job's MLflow run ids (when tracked)
        trials/<trial_id>/
            checkpoint.pt         latest resumable state (atomic replace)
            events.jsonl          one line per trained epoch (and per round end)
            tickets/<name>/       ticket directories (see sparsity/ticketfile.py)
            result.json           the trial record (records.TrialRecord), once finished

``TrialDirHooks`` implements the runners' ``Hooks`` on such a folder; every executor runs its
trials through it (see ``job.run_one_trial``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .hooks import CheckpointError, EpochEvent, Hooks, RoundEvent, TrialResult
from .records import TrialRecord, read_record, record_json
from .tickets import Ticket


def job_dir(storage: str | Path, job_name: str, spec_hash: str) -> Path:
    return Path(storage) / f"{job_name}-{spec_hash}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and an atomic rename."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


class TrialDirHooks(Hooks):
    """Runner hooks that persist everything under one trial directory.

    ``progress`` (optional) is called with each event, for terminal output.
    """

    def __init__(self, trial_dir: Path, progress=None):
        self.dir = Path(trial_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.events_path = self.dir / "events.jsonl"
        self.checkpoint_path = self.dir / "checkpoint.pt"
        self.progress = progress
        self._reported = 0

    def _append(self, kind: str, payload: dict) -> None:
        with self.events_path.open("a") as f:
            f.write(json.dumps({"kind": kind, **payload}) + "\n")

    def epoch_end(self, event: EpochEvent) -> None:
        self._append("epoch", asdict(event))
        if self.progress:
            self.progress(event)

    def round_end(self, event: RoundEvent) -> None:
        self._append("round", asdict(event))
        if self.progress:
            self.progress(event)

    def ticket_found(self, ticket: Ticket) -> None:
        target = self.dir / "tickets" / ticket.name
        if not target.exists():  # a resumed trial may find the same ticket again
            ticket.save(target)
        self._append("ticket", {"name": ticket.name, "path": str(target), **ticket.summary()})

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        tmp = self.checkpoint_path.with_name("checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.checkpoint_path)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, or None. Events logged after it are dropped (they will be
        logged again when the lost epochs are retrained); their count is remembered."""
        if not self.checkpoint_path.exists():
            self.events_path.unlink(missing_ok=True)
            return None
        try:
            state = torch.load(self.checkpoint_path, weights_only=True, map_location="cpu")
        except Exception as err:
            raise CheckpointError(f"{self.checkpoint_path}: unreadable checkpoint ({err}); "
                                  "delete it to start the trial over") from None
        if not isinstance(state, dict) or not {"ledger", "rounds", "tickets"} <= state.keys():
            raise CheckpointError(f"{self.checkpoint_path}: not a ticketsearch checkpoint; "
                                  "delete it to start the trial over")
        self._truncate_events(state)
        return state

    def _truncate_events(self, state: dict[str, Any]) -> None:
        """Keep only the events the checkpoint already accounts for."""
        if not self.events_path.exists():
            return
        limits = {"epoch": len(state["ledger"]["entries"]), "round": len(state["rounds"]),
                  "ticket": len(state["tickets"])}
        counts = dict.fromkeys(limits, 0)
        kept = []
        for line in self.events_path.read_text().splitlines():
            try:
                kind = json.loads(line)["kind"]
            except (json.JSONDecodeError, KeyError):  # a line cut short by a crash
                continue
            counts[kind] += 1
            if counts[kind] <= limits[kind]:
                kept.append(line)
        self._reported = counts["epoch"]
        self.events_path.write_text("".join(line + "\n" for line in kept))

    def epochs_reported(self) -> int:
        return self._reported

    def write_result(self, result: TrialResult, trial=None,
                     run_id: str | None = None) -> TrialRecord:
        """Write ``result.json`` (the trial is finished; ``trial``, its TrialSpec, names it)
        and drop the checkpoint."""
        names = {} if trial is None else {"name": trial.name, "group": trial.group,
                                           "seed": trial.seed}
        record = TrialRecord.model_validate(result.summary() | names | {"run_id": run_id})
        for ticket in record.tickets:
            ticket.path = str(self.dir / "tickets" / ticket.name)
        write_text_atomic(self.dir / "result.json", record_json(record))
        self.checkpoint_path.unlink(missing_ok=True)
        return record


def read_result(trial_dir: Path) -> TrialRecord | None:
    """A finished trial's record, or None if it has not finished."""
    return read_record(Path(trial_dir) / "result.json", TrialRecord)
