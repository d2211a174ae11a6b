"""The in-process executor: a job's trials one after another in this process, no Ray.

The same job lifecycle (``job.py``) and job directory as the Ray executor: re-running the same
job (same spec hash) skips finished trials and resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .job import JobInterrupted, JobRun, round_printer, run_one_trial
from .jobdir import read_result
from .spec import JobSpec


def run_job_locally(job: JobSpec, storage: str | Path | None = None,
                    echo: Callable[[str], None] = print, track: bool = True) -> dict[str, Any]:
    """Run every unfinished trial of ``job`` in turn; returns the job record (as JSON, with
    ``job_dir`` and ``report``). With ``track`` every trial is logged to MLflow; the tracking
    store is checked before anything is written."""
    run = JobRun(job, storage, track, echo)
    run.open()
    try:
        try:
            _run_trials(run, echo)
        except KeyboardInterrupt:
            raise JobInterrupted(run.root) from None
        return run.close()
    finally:
        run.release()


def _run_trials(run: JobRun, echo: Callable[[str], None]) -> None:
    """Every unfinished trial of ``run``, one after another."""
    datasets: dict[str, Any] = {}
    for trial in run.trials:
        if read_result(run.trial_dir(trial)) is not None:
            echo(f"{trial.name}: already finished, skipped")
            continue
        echo(f"{trial.name}: started")
        data = _dataset(datasets, trial)
        record, sent = run_one_trial(trial, run.root, run.tracker, data, round_printer(echo))
        if not sent:
            echo(f"{trial.name}: tracking server unreachable; metrics kept in "
                 f"{run.trial_dir(trial)}, send them later with `ticketsearch sync {run.root}`")
        echo(f"{trial.name}: finished in {record.ledger.wall_clock_s:.1f}s, "
             f"{record.ledger.epochs['total']} epochs, {len(record.tickets)} tickets")


def _dataset(cache: dict[str, Any], trial):
    """The trial's dataset, loaded once per (data spec, device) in this process."""
    from .data import load_dataset
    from .training import resolve_device

    key = trial.data.model_dump_json() + trial.train.device
    if key not in cache:
        cache[key] = load_dataset(trial.data, resolve_device(trial.train.device))
    return cache[key]
