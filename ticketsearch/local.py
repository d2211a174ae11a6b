"""Run a job's trials one after another in this process (no Ray, no MLflow).

The same runners and the same job directory as a distributed run: re-running the same job
(same spec hash) skips finished trials and resumes unfinished ones from their checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .data import load_dataset
from .jobdir import TrialDirHooks, job_dir, read_result, write_json_atomic
from .methods import EpochEvent, RoundEvent, run_trial
from .spec import JobSpec, dump_job
from .summary import job_summary
from .training import resolve_device


def prepare_job_dir(job: JobSpec, storage: str | Path | None = None) -> Path:
    """Create the job directory (``<storage>/<name>-<hash>``) and write the spec into it."""
    root = job_dir(storage or job.storage.path, job.name, job.spec_hash())
    (root / "trials").mkdir(parents=True, exist_ok=True)
    spec_path = root / "spec.yaml"
    if not spec_path.exists():
        spec_path.write_text(dump_job(job))
    return root


def round_printer(echo: Callable[[str], None]) -> Callable[[Any], None]:
    """A progress callback printing one line per finished round."""

    def progress(event) -> None:
        if isinstance(event, RoundEvent):
            acc = "-" if event.test_acc is None else f"{event.test_acc:.4f}"
            echo(f"  {event.trial_id}: {event.phase} round {event.round + 1} done, "
                 f"sparsity {event.sparsity:.3f}, test acc {acc}")
        elif isinstance(event, EpochEvent):
            return

    return progress


def make_report(root: Path, echo: Callable[[str], None]) -> dict[str, Any] | None:
    """Write the job's report (from MLflow when tracked) and print its table; a failure here
    never loses the job's results, which are on disk."""
    from .report import format_table, report_job

    try:
        report = report_job(root)
    except Exception as err:
        echo(f"could not build the report ({type(err).__name__}: {err}); run "
             f"`ticketsearch report {root}` later")
        return None
    echo(format_table(report))
    echo(f"report: {root / 'report' / 'report.md'}")
    return report


def open_job(job: JobSpec, storage: str | Path | None, track: bool) -> tuple[Path, str | None]:
    """Check the tracking store (before anything is written), then create the job directory.
    Returns the directory and the tracking URI (None without tracking)."""
    uri = None
    if track:
        from .tracking import check_reachable, tracking_uri_for

        uri = tracking_uri_for(job, storage)
        check_reachable(uri)
    return prepare_job_dir(job, storage), uri


def start_tracking(job: JobSpec, root: Path, uri: str | None, echo: Callable[[str], None],
                   ray_address: str | None = None):
    """Create (or find again) the job's MLflow runs; None without tracking."""
    if uri is None:
        return None
    from .tracking import setup_job_tracking

    tracking = setup_job_tracking(job, root, uri, ray_address=ray_address)
    echo(f"tracking: {uri} (experiment {job.tracking.experiment or job.name}, "
         f"parent run {tracking.parent_run_id})")
    return tracking


def close_job(job: JobSpec, root: Path, results: list[dict[str, Any]], driver_wall_s: float,
              tracking, echo: Callable[[str], None], status: str = "FINISHED",
              extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``summary.json`` from the trials' results and close the parent run; a tracking
    failure here never loses the results, which are on disk."""
    summary = job_summary(job, results, driver_wall_s) | (extra or {})
    if tracking is not None:
        summary["tracking"] = {"uri": tracking.uri, "experiment_id": tracking.experiment_id,
                               "parent_run_id": tracking.parent_run_id}
    write_json_atomic(root / "summary.json", summary)
    if tracking is not None:
        from .tracking import finish_job_tracking

        try:
            finish_job_tracking(tracking, root, status)
        except Exception as err:
            echo(f"could not close the parent run ({type(err).__name__}); "
                 f"run `ticketsearch sync {root}` once the tracking server is back")
    summary["job_dir"] = str(root)
    return summary


def run_job_locally(job: JobSpec, storage: str | Path | None = None,
                    echo: Callable[[str], None] = print, track: bool = True) -> dict[str, Any]:
    """Run every unfinished trial of ``job`` in turn; return and write the job summary.

    With ``track`` (the default) every trial is logged to MLflow (see ``tracking.py``); the
    tracking store is checked before anything runs.
    """
    root, uri = open_job(job, storage, track)
    tracking = start_tracking(job, root, uri, echo)
    echo(f"job {job.name} ({job.spec_hash()}) -> {root}")
    started = time.time()
    datasets: dict[str, Any] = {}
    summaries = []
    for trial in job.trials():
        trial_dir = root / "trials" / trial.trial_id
        done = read_result(trial_dir)
        if done is not None:
            echo(f"{trial.name}: already finished, skipped")
            summaries.append(done)
            continue
        key = trial.data.model_dump_json() + trial.train.device
        if key not in datasets:
            datasets[key] = load_dataset(trial.data, resolve_device(trial.train.device))
        echo(f"{trial.name}: started")
        dir_hooks = TrialDirHooks(trial_dir, progress=round_printer(echo))
        hooks = dir_hooks
        if tracking is not None:
            from .tracking import MlflowHooks

            hooks = MlflowHooks(dir_hooks, tracking.uri, tracking.trial_runs[trial.trial_id])
        result = run_trial(trial, datasets[key], hooks)
        summaries.append(dir_hooks.write_result(result))
        if tracking is not None and not hooks.finish(result):
            echo(f"{trial.name}: tracking server unreachable; metrics kept in "
                 f"{trial_dir}, send them later with `ticketsearch sync {root}`")
        echo(f"{trial.name}: finished in {result.ledger.wall_clock_s:.1f}s, "
             f"{result.ledger.epochs()} epochs, {len(result.tickets)} tickets")
    summary = close_job(job, root, summaries, time.time() - started, tracking, echo)
    summary["report"] = make_report(root, echo)
    return summary
