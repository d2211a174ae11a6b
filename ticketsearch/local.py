"""The in-process executor: a job's trials one after another in this process, no Ray.

The same job lifecycle (``job.py``) and job directory as the Ray executor: re-running the same
job (same spec hash) skips finished trials and resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .job import JobInterrupted, JobRun, round_printer, run_one_group, run_one_trial
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
    """Every unfinished trial of ``run``, one unit (a trial or a fused group) after another."""
    datasets: dict[str, Any] = {}
    unfinished = {t.trial_id for t in run.unfinished()}
    for trial in run.trials:
        if trial.trial_id not in unfinished:
            echo(f"{trial.name}: already finished, skipped")
    for unit in run.units():
        data = _dataset(datasets, unit[0])
        if len(unit) == 1:
            echo(f"{unit[0].name}: started")
            outcomes = [run_one_trial(unit[0], run.root, run.tracker, data, round_printer(echo))]
        else:
            echo(f"fused group of {len(unit)}: {', '.join(t.name for t in unit)}: started")
            outcomes = run_one_group(unit, run.root, run.tracker, data, round_printer(echo), echo)
        for trial, (record, sent) in zip(unit, outcomes):
            _finished(run, trial, record, sent, echo)


def _finished(run: JobRun, trial, record, sent: bool, echo: Callable[[str], None]) -> None:
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
