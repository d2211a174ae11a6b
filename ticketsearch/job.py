"""The job lifecycle, shared by every executor: check the tracking store, open the job
directory, expand the trials once, start tracking, run one trial (the single per-trial body),
close the job and report on it from the job directory.

The executors — ``local.py`` (in this process) and ``cluster.py`` (Ray Tune) — only decide
*where* trials run::

    run = JobRun(spec, storage, track, echo)     # tracking store checked; nothing written
    run.open()                                   # job dir locked, spec.yaml, MLflow runs
    try:
        for trial in run.unfinished():
            run_one_trial(trial, run.root, run.tracker)   # here, or inside a Ray trial
        outcome = run.close()                    # summary.json, parent run closed, report
    finally:
        run.release()                            # the job directory's lock

A job directory is named ``<name>-<spec hash>``: the same spec again is the same job, whose
finished trials are not trained again and whose unfinished ones resume from their checkpoints.
One process at a time runs a job: ``open`` takes the directory's lock (``jobdir.JobLock``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .analysis import makespan, orchestration_costs
from .hooks import EpochEvent, RoundEvent
from .jobdir import (
    JobLock,
    TrialDirHooks,
    check_storage,
    job_dir,
    read_result,
    write_text_atomic,
)
from .records import JobRecord, TrialRecord, record_json
from .spec import JobSpec, TrialSpec, dump_job

Echo = Callable[[str], None]


class JobInterrupted(KeyboardInterrupt):
    """The job stopped before its trials finished (Ctrl-C); the message says how to finish
    it. Nothing is lost: finished trials are kept and the others resume."""

    def __init__(self, root: Path):
        super().__init__(f"interrupted; finish it with `ticketsearch resume {root.name} "
                         f"--storage {root.parent}` (or the same run command): finished "
                         "trials are kept, the others resume from their checkpoints")


class NullTracker:
    """The tracker of an untracked job: hooks pass through, nothing is logged.
    (``tracking.JobTracking`` is the MLflow one; both are small picklable values.)"""

    def start(self, job, job_dir: Path, trials, ray_address: str | None = None,
              echo: Echo | None = None) -> str | None:
        return None

    def trial_hooks(self, inner, trial_id: str):
        return inner

    def run_id(self, trial_id: str) -> str | None:
        return None

    def finish_trial(self, hooks, result) -> bool:
        return True

    def close(self, job_dir: Path, status: str) -> None:
        pass

    def unsent(self, job_dir: Path, trials) -> list[str]:
        return []

    def describe(self) -> dict[str, str] | None:
        return None


def preflight(job: JobSpec, trials, echo: Echo, on_ray: bool) -> None:
    """Check, before anything is written, what the spec alone cannot: the job's own model and
    data together (``preflight.inspect_job``: a dry forward pass), else that its dataset loads;
    and that the trials can have the device they ask for."""
    from .preflight import check_data, check_devices, inspect_job, needs_preflight, summary_line

    if needs_preflight(job):
        echo(summary_line(inspect_job(job)))
    else:
        check_data(job)
    check_devices(trials, on_ray)


def make_tracker(job: JobSpec, storage: str | Path | None, track: bool):
    """The job's tracker: MLflow's (its store checked to answer) or the null one."""
    if not track:
        return NullTracker()
    from .tracking import JobTracking

    return JobTracking.for_job(job, storage)


class JobRun:
    """One session of running a job: its spec, trials (expanded once), directory, tracker."""

    def __init__(self, spec: JobSpec, storage: str | Path | None = None, track: bool = True,
                 echo: Echo = print, on_ray: bool = False):
        from .tracking import take_credentials

        spec = take_credentials(spec)  # no password in what is stored or printed
        self.spec, self.echo = spec, echo
        self.trials = spec.trials()
        preflight(spec, self.trials, echo, on_ray)
        storage = Path(storage or spec.storage.path).expanduser()
        check_storage(storage)
        self.tracker = make_tracker(spec, storage, track)
        self.root = job_dir(storage, spec.name, spec.spec_hash())
        self.lock = JobLock(self.root)
        self.lock.check_free("run it")  # before Ray starts or anything is written
        self.trains = True  # whether this session has trials to train (known once open)
        self.started = time.time()

    def open(self, ray_address: str | None = None, note: str = "") -> None:
        """Lock the job directory (JobLockedError if another process runs the job), create
        it (with ``spec.yaml``) and start tracking."""
        self.lock.acquire()
        try:
            (self.root / "trials").mkdir(parents=True, exist_ok=True)
            spec_path = self.root / "spec.yaml"
            if not spec_path.exists():
                spec_path.write_text(dump_job(self.spec))
            line = self.tracker.start(self.spec, self.root, self.trials, ray_address,
                                      echo=self.echo)
        except BaseException:
            self.release()
            raise
        if line:
            self.echo(line)
        self.echo(f"job {self.spec.name} ({self.spec.spec_hash()}) -> {self.root}{note}")
        self.trains = bool(self.unfinished())
        self.started = time.time()

    def _orchestration(self, trials, driver_wall_s: float, ray_startup_s: float | None):
        """The orchestration costs of this session when it trained trials under Ray
        (``ray_startup_s`` given); those of the session that trained them when this one
        trained nothing; else none."""
        if not self.trains:
            return _previous_orchestration(self.root)
        if ray_startup_s is None:
            return None
        return orchestration_costs(trials, driver_wall_s, ray_startup_s)

    def release(self) -> None:
        """Give up the job directory's lock (call once the job ended, however it ended)."""
        self.lock.release()

    def trial_dir(self, trial: TrialSpec) -> Path:
        return self.root / "trials" / trial.trial_id

    def unfinished(self) -> list[TrialSpec]:
        return [t for t in self.trials if read_result(self.trial_dir(t)) is None]

    def units(self) -> list[list[TrialSpec]]:
        """The unfinished trials as units of work: one trial, or a fused group of several
        (``resources.fuse``; ``methods.group.plan_units``)."""
        from .methods.units import plan_units

        return plan_units(self.unfinished(), self.spec.resources.fuse, local_gpu_bytes())

    def finished(self) -> list[TrialRecord]:
        records = [read_result(self.trial_dir(t)) for t in self.trials]
        return [r for r in records if r is not None]

    def close(self, status: str = "FINISHED", failed: Sequence[str] = (),
              ray_startup_s: float | None = None) -> dict[str, Any]:
        """Write ``summary.json``, close the parent run, write the report (unless trials
        failed). Returns the job record as JSON with ``report`` and ``unsent`` added: the
        trials (and ``"parent run"``) whose tracking data still waits for ``ticketsearch
        sync``. A tracking or report failure here loses nothing: the results are on disk."""
        trials = self.finished()
        driver_wall_s = time.time() - self.started
        record = JobRecord(
            job=self.spec.name, spec_hash=self.spec.spec_hash(), job_dir=str(self.root),
            status=status, driver_wall_s=driver_wall_s, makespan_s=makespan(trials),
            orchestration=self._orchestration(trials, driver_wall_s, ray_startup_s),
            failed_trials=list(failed), tracking=self.tracker.describe(), trials=trials)
        write_text_atomic(self.root / "summary.json", record_json(record))
        report = None if failed else make_report(self.root, self.echo)
        unsent = self.tracker.unsent(self.root, self.trials)
        try:
            self.tracker.close(self.root, status)
        except Exception:
            unsent.append("parent run")
        return record.model_dump(mode="json") | {"report": report, "unsent": unsent}


def _previous_orchestration(root: Path):
    """The orchestration costs the job's summary already holds (from the session that
    trained its trials), or None."""
    from .records import read_record

    earlier = read_record(root / "summary.json", JobRecord)
    return None if earlier is None else earlier.orchestration


def trial_errors() -> tuple[type[BaseException], ...]:
    """Errors a trial can stop on that no retry mends (a bad spec, data, model, code or
    checkpoint): executors report them instead of retrying."""
    from .data import DatasetError
    from .fusion import FusionError
    from .hooks import CheckpointError
    from .models import ModelError
    from .sparsity.ticketfile import TicketFormatError
    from .spec import SpecError
    from .usercode import UserCodeError

    return (SpecError, DatasetError, ModelError, UserCodeError, CheckpointError,
            TicketFormatError, FusionError)


def run_one_trial(trial: TrialSpec, root: Path, tracker, data=None,
                  progress: Callable[[Any], None] | None = None) -> tuple[TrialRecord, bool]:
    """Run (or resume) one trial into its trial directory, logging through ``tracker``;
    ``progress`` sees every event. Returns its record and whether everything reached the
    tracking store (False: some of it waits in the trial's journal for ``sync``)."""
    from .data import load_dataset
    from .methods import run_trial
    from .training import resolve_device

    dir_hooks = TrialDirHooks(root / "trials" / trial.trial_id, progress=progress)
    hooks = tracker.trial_hooks(dir_hooks, trial.trial_id)
    if data is None:
        data = load_dataset(trial.data, resolve_device(trial.train.device))
    try:
        result = run_trial(trial, data, hooks)
    except BaseException:
        hooks.stop()  # what was not sent stays in the trial's journal
        raise
    record = dir_hooks.write_result(result, trial, tracker.run_id(trial.trial_id))
    return record, tracker.finish_trial(hooks, result)


def run_one_group(trials: list[TrialSpec], root: Path, tracker, data=None,
                  progress: Callable[[Any], None] | None = None,
                  echo: Echo = print) -> list[tuple[TrialRecord, bool]]:
    """``run_one_trial`` for a fused group: its members trained (or resumed) as one, each
    into its own trial directory and tracking run. With ``resources.fuse: auto``, a model
    that cannot be fused runs its members one after another instead (the reason echoed);
    with a number, that stops the group (``fusion.FusionError``)."""
    from .data import load_dataset
    from .fusion import FusionError
    from .jobdir import GroupCheckpoint
    from .methods.group import GroupRun
    from .methods.units import check_fusible
    from .training import resolve_device

    if data is None:
        data = load_dataset(trials[0].data, resolve_device(trials[0].train.device))
    try:
        check_fusible(trials, data)
    except FusionError as err:
        if trials[0].resources.fuse != "auto":
            raise
        echo(f"{len(trials)} trials not fused, run one after another: {err}")
        return [run_one_trial(t, root, tracker, data, progress) for t in trials]
    dirs = [TrialDirHooks(root / "trials" / t.trial_id, progress=progress) for t in trials]
    hooks = [tracker.trial_hooks(d, t.trial_id) for d, t in zip(dirs, trials)]
    name = group_name(trials)
    store = GroupCheckpoint(root / "groups" / name)
    if not store.path.exists():  # a member's own checkpoint (from an unfused run) is stale
        for folder in dirs:
            folder.checkpoint_path.unlink(missing_ok=True)
    try:
        results = GroupRun(trials, data, hooks, store).run()
    except BaseException:
        for member in hooks:
            member.stop()  # what was not sent stays in each member's journal
        raise
    outcomes = []
    ids = [t.trial_id for t in trials]
    for trial, folder, member, result in zip(trials, dirs, hooks, results):
        others = [i for i in ids if i != trial.trial_id]
        record = folder.write_result(result, trial, tracker.run_id(trial.trial_id),
                                     fused_group=name, fused_with=others)
        outcomes.append((record, tracker.finish_trial(member, result)))
    store.drop()
    return outcomes


def group_name(trials: list[TrialSpec]) -> str:
    from .methods.group import group_id

    return group_id([t.trial_id for t in trials])


def local_gpu_bytes() -> float | None:
    """The memory of the GPU this machine sees (None without one): what a fused group's
    size is planned against (a cluster's GPUs are assumed alike)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(0).total_memory)


def make_report(root: Path, echo: Echo) -> dict[str, Any] | None:
    """Write the job's report from its directory (and attach it to the parent run); a
    failure here never loses the job's results, which are on disk."""
    from .report import report_job
    from .tracking import log_report

    try:
        report = report_job(root, log=False)
    except Exception as err:
        echo(f"could not build the report ({type(err).__name__}: {err}); run "
             f"`ticketsearch report {root}` later")
        return None
    echo(f"report: {root / 'report' / 'report.md'}")
    try:
        log_report(root, root / "report")
    except Exception as err:
        echo(f"could not attach the report to the parent run ({type(err).__name__}); "
             f"`ticketsearch sync {root}` attaches it once the tracking server is back")
    return report


def round_printer(echo: Echo) -> Callable[[Any], None]:
    """A progress callback printing one line per finished round."""

    def progress(event) -> None:
        if isinstance(event, RoundEvent):
            acc = "-" if event.test_acc is None else f"{event.test_acc:.4f}"
            echo(f"  {event.trial_id}: {event.phase} round {event.round + 1} done, "
                 f"sparsity {event.sparsity:.3f}, test acc {acc}")
        elif isinstance(event, EpochEvent):
            return

    return progress
