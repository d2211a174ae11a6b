"""The job directory: where a job's trials keep checkpoints, events, tickets and results.

Layout (one folder per job submission, named ``<job name>-<spec hash>``)::

    <storage>/<job>-<hash>/
        spec.yaml                 the normalised job spec
        summary.json              the job record (records.JobRecord), written at its end
        driver.lock               held by the one process running the job (see ``JobLock``)
        mlflow.json               the job's MLflow run ids (when tracked)
        trials/<trial_id>/
            checkpoint.pt         latest resumable state (atomic replace)
            events.jsonl          one line per trained epoch (and per round end)
            tickets/<name>/       ticket directories (see sparsity/ticketfile.py)
            result.json           the trial record (records.TrialRecord), once finished
            error.json            why the trial stopped, when retrying cannot help

``TrialDirHooks`` implements the runners' ``Hooks`` on such a folder; every executor runs its
trials through it (see ``job.run_one_trial``).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .hooks import CheckpointError, EpochEvent, Hooks, RoundEvent, TrialResult
from .records import TrialRecord, read_record, record_json
from .tickets import Ticket, load_ticket_dir

LOCK_FILE = "driver.lock"
ERROR_FILE = "error.json"  # a trial's deterministic failure (not retried)
HEARTBEAT_S = 10.0  # a holder refreshes its lock this often
STALE_AFTER_S = 60.0  # a lock not refreshed for this long is abandoned (holder on another host)


class JobLockedError(RuntimeError):
    """The job directory is held by another live process running the same job."""


class StorageError(RuntimeError):
    """The storage folder cannot hold job directories (a file, or not writable)."""


def check_storage(path: Path) -> None:
    """Raise StorageError unless job directories can be made under ``path``; nothing is left
    behind (a temporary file in the nearest existing folder tells that it is writable)."""
    import tempfile

    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise StorageError(f"storage.path {path}: {existing} is a file, not a folder; choose a "
                           "folder (it is created if missing), with storage.path or --storage")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise StorageError(f"storage.path {path}: cannot write in {existing} "
                           f"({err.strerror or type(err).__name__}); choose a folder you can "
                           "write, with storage.path or --storage") from None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of process ``pid`` (tells a reused pid apart), None if it
    does not exist (or there is no procfs)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    """True while process ``pid`` (started at ``start``, when known) runs on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


class JobLock:
    """An exclusive claim on a job directory for the life of one driver.

    ``acquire`` creates ``driver.lock`` (pid, host, start time, command) atomically; a thread
    refreshes its time every ``HEARTBEAT_S``. A lock left by a killed holder is taken over: on
    the same host when its process is gone, from any host when it has not been refreshed for
    ``STALE_AFTER_S``. Anything else raises JobLockedError naming the holder."""

    def __init__(self, root: Path):
        self.path = Path(root) / LOCK_FILE
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict[str, Any] | None:
        """The live holder's record, or None when the lock is free or abandoned."""
        try:
            info = json.loads(self.path.read_text())
            age = time.time() - self.path.stat().st_mtime
        except (OSError, ValueError):
            return None
        if info.get("host") == socket.gethostname():
            return info if _alive(int(info.get("pid", -1)), info.get("start")) else None
        return info if age < STALE_AFTER_S else None

    def check_free(self, doing: str) -> None:
        """Raise JobLockedError if a live process holds the job (``doing``: what the caller
        was about to do, for the message)."""
        info = self.holder()
        if info is not None and info.get("pid") != os.getpid():
            raise JobLockedError(
                f"{self.path.parent} is being run by another process (pid {info.get('pid')} on "
                f"{info.get('host')}, since {time.ctime(info.get('started', 0))}: "
                f"{info.get('command', '?')}); cannot {doing} while it runs. Wait for it to "
                f"end, or stop it; a killed run's lock is taken over automatically")

    def acquire(self) -> None:
        """Claim the job directory (see the class docstring); idempotent in one process."""
        if self._thread is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.check_free("run it")
            if self._create() or self._held_here():
                break
            self._drop_abandoned()
        else:
            self.check_free("run it")
            raise JobLockedError(f"{self.path}: could not take the job's lock; try again")
        self._thread = threading.Thread(target=self._beat, daemon=True, name="job-lock")
        self._thread.start()

    def _create(self) -> bool:
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "start": _process_start(os.getpid()), "started": time.time(),
                  "command": " ".join(sys.argv)[:300]}
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True

    def _held_here(self) -> bool:
        """True when this process already holds the lock (one process, one driver)."""
        info = self.holder()
        return info is not None and info.get("pid") == os.getpid()

    def _drop_abandoned(self) -> None:
        """Move an abandoned lock aside (atomically: one contender wins)."""
        if self.holder() is None:
            try:
                os.replace(self.path, self.path.with_name(f"{LOCK_FILE}.abandoned"))
            except FileNotFoundError:
                pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Give the job directory up (nothing if this process does not hold it)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def job_dir(storage: str | Path, job_name: str, spec_hash: str) -> Path:
    return Path(storage) / f"{job_name}-{spec_hash}"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and an atomic rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a JSON-lines file, in order ([] if it does not exist); a line
    cut short by a crash while it was written is left out."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


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
        self._windows: list[list[float]] = []

    def _append(self, kind: str, payload: dict) -> None:
        with self.events_path.open("a") as f:
            f.write(json.dumps({"kind": kind, **payload, "t": time.time()}) + "\n")

    def attempt_started(self, start: float) -> None:
        self._append("attempt", {"start": start})

    def attempt_windows(self) -> list[list[float]]:
        return [list(w) for w in self._windows]

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
        """Write ``state`` with its tickets and ledger entries by reference (the ticket
        folders and the event log hold them), so a checkpoint does not grow with the epochs
        and tickets a trial has done."""
        tmp = self.checkpoint_path.with_name("checkpoint.pt.tmp")
        torch.save(self.pack_checkpoint(state), tmp)
        os.replace(tmp, self.checkpoint_path)

    def pack_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        ledger = state["ledger"] | {"entries": len(state["ledger"]["entries"])}
        tickets = [{"name": t["name"]} for t in state["tickets"]]
        return state | {"ledger": ledger, "tickets": tickets}

    def unpack_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        """A member's packed state from a group checkpoint: events after it dropped (their
        count remembered), its ledger entries and tickets read back."""
        return self._dereference(state, self._truncate_events(state))

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The last checkpoint, or None. Events logged after it are dropped (they will be
        logged again when the lost epochs are retrained); their count is remembered."""
        if not self.checkpoint_path.exists():
            self._windows = _attempt_windows(read_jsonl(self.events_path))
            self.events_path.unlink(missing_ok=True)
            return None
        try:
            state = torch.load(self.checkpoint_path, weights_only=True, map_location="cpu")
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{self.checkpoint_path}: unreadable checkpoint ({first}); "
                                  "delete it to start the trial over") from None
        if not isinstance(state, dict) or not {"ledger", "rounds", "tickets"} <= state.keys():
            raise CheckpointError(f"{self.checkpoint_path}: not a ticketsearch checkpoint; "
                                  "delete it to start the trial over")
        kept = self._truncate_events(state)
        return self._dereference(state, kept)

    def _dereference(self, state: dict[str, Any], events: list[dict]) -> dict[str, Any]:
        """``state`` with the ledger entries and tickets it refers to read back from the
        kept ``events`` and the ticket folders."""
        ledger = state["ledger"]
        epochs = [e for e in events if e.get("kind") == "epoch"]
        if isinstance(ledger["entries"], int) and len(epochs) == ledger["entries"]:
            ledger = ledger | {"entries": [_ledger_entry(e) for e in epochs]}
        tickets = [t if "masks" in t else self._ticket_state(t["name"])
                   for t in state["tickets"]]
        return state | {"ledger": ledger, "tickets": tickets}

    def _ticket_state(self, name: str) -> dict[str, Any]:
        folder = self.dir / "tickets" / name
        try:
            ticket = load_ticket_dir(folder)
        except Exception as err:
            raise CheckpointError(f"{folder}: the checkpoint refers to this ticket, which "
                                  f"cannot be read ({err}); delete {self.checkpoint_path} to "
                                  "start the trial over") from None
        return {"name": name, "masks": ticket.masks, "meta": ticket.meta, "trained": None}

    def _truncate_events(self, state: dict[str, Any]) -> list[dict[str, Any]]:
        """Keep only the events the checkpoint already accounts for (and every attempt's
        start); remember how many epochs were reported and when each attempt was alive.
        Returns the events kept."""
        events = read_jsonl(self.events_path)
        self._windows = _attempt_windows(events)
        entries = state["ledger"]["entries"]
        limits = {"epoch": entries if isinstance(entries, int) else len(entries),
                  "round": len(state["rounds"]), "ticket": len(state["tickets"])}
        counts = dict.fromkeys(limits, 0)
        kept = []
        for event in events:
            kind = event.get("kind")
            if kind in limits:
                counts[kind] += 1
                if counts[kind] > limits[kind]:
                    continue
            kept.append(event)
        self._reported = counts["epoch"]
        self.events_path.write_text("".join(json.dumps(e) + "\n" for e in kept))
        return kept

    def epochs_reported(self) -> int:
        return self._reported

    def write_result(self, result: TrialResult, trial=None, run_id: str | None = None,
                     **extra) -> TrialRecord:
        """Write ``result.json`` (the trial is finished; ``trial``, its TrialSpec, names it;
        ``extra``: more ``TrialRecord`` fields) and drop the checkpoint."""
        names = {} if trial is None else {"name": trial.name, "group": trial.group,
                                           "seed": trial.seed}
        record = TrialRecord.model_validate(result.summary() | names | {"run_id": run_id}
                                            | extra)
        for ticket in record.tickets:
            ticket.path = str(self.dir / "tickets" / ticket.name)
        write_text_atomic(self.dir / "result.json", record_json(record))
        self.checkpoint_path.unlink(missing_ok=True)
        return record


def write_trial_error(trial_dir: Path, err: BaseException) -> None:
    """Record that the trial stopped on ``err``, an error no retry can mend."""
    write_json_atomic(Path(trial_dir) / ERROR_FILE,
                      {"error": type(err).__name__, "message": str(err)})


def read_trial_error(trial_dir: Path) -> str | None:
    """The message of the trial's recorded error, or None."""
    path = Path(trial_dir) / ERROR_FILE
    return json.loads(path.read_text())["message"] if path.exists() else None


def _ledger_entry(event: dict[str, Any]) -> dict[str, Any]:
    """The ledger entry (``training.LedgerEntry`` as a dict) an epoch event carries."""
    return {"phase": event["phase"], "round": event["round"], "epoch": event["epoch"],
            "seconds": event["seconds"], "eval_seconds": event.get("eval_seconds", 0.0),
            "finished_at": event.get("finished_at") or event.get("t", 0.0)}


def _attempt_windows(events: list[dict[str, Any]]) -> list[list[float]]:
    """``[start, last event time]`` of each attempt logged in ``events``."""
    windows: list[list[float]] = []
    for event in events:
        if event.get("kind") == "attempt":
            windows.append([event["start"], event["start"]])
        elif windows and "t" in event:
            windows[-1][1] = max(windows[-1][1], event["t"])
    return windows


class GroupCheckpoint:
    """The one checkpoint of a fused group (``groups/<group id>/checkpoint.pt`` in the job
    directory): the fused model and optimizer and every member's packed state, written
    atomically, so the group resumes as one."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)
        self.path = self.dir / "checkpoint.pt"

    def save(self, state: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name("checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        try:
            return torch.load(self.path, weights_only=True, map_location="cpu")
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{self.path}: unreadable group checkpoint ({first}); "
                                  "delete it to start the group over") from None

    def drop(self) -> None:
        self.path.unlink(missing_ok=True)


def read_result(trial_dir: Path) -> TrialRecord | None:
    """A finished trial's record, or None if it has not finished."""
    return read_record(Path(trial_dir) / "result.json", TrialRecord)
