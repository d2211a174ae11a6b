"""Ray orchestration: one Ray Tune trial per CS setting / IMP chain / dense baseline.

The driver prepares the job directory and the MLflow runs, starts (or joins) Ray, refuses
resource requests no node can satisfy, and runs a ``Tuner`` whose trials are the job's
trials. Each trial is a thin function: it rebuilds its ``TrialSpec``, trains through the
pure-PyTorch runner, and reports through ``RayTrialHooks`` — per-epoch results to Tune;
checkpoints, events, tickets and results into its trial directory (resumed from after a
worker failure, or after a driver failure once ``Tuner.restore`` restarts the trial) — and
metrics to MLflow.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .jobdir import TrialDirHooks, read_result
from .local import close_job, make_report, open_job, start_tracking
from .methods import EpochEvent, planned_epochs, run_trial
from .spec import JobSpec, parse_job

PROGRESS_EVERY_S = 10.0


class ClusterError(RuntimeError):
    """The cluster cannot run the job as asked (unreachable, or resources that never fit)."""


# --- inside a trial ---------------------------------------------------------------------------


class RayTrialHooks(TrialDirHooks):
    """Trial-directory hooks that also report every epoch to Tune as a result.

    Checkpoints stay in the trial directory (``checkpoint.pt``, on storage every node sees),
    not in Tune's checkpoint store: a retried trial and a trial restored after the driver died
    both resume from it. (Tune prunes old checkpoints while its experiment snapshot can still
    point at them, so a driver killed at the wrong moment left a snapshot that could not be
    restored.)
    """

    def __init__(self, trial_dir: Path, planned: int):
        super().__init__(trial_dir)
        self.planned = planned

    def epoch_end(self, event: EpochEvent) -> None:
        from ray import tune

        super().epoch_end(event)
        tune.report({"step": event.step + 1, "epochs_planned": self.planned,
                     "phase": event.phase, **event.metrics()})


def _configure_torch(trial) -> None:
    """Threads = the CPUs Ray gave the trial; a memory cap when a GPU is shared."""
    torch.set_num_threads(max(1, int(trial.resources.cpus)))
    gpus = trial.resources.gpus
    if 0 < gpus < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpus)


def trial_function(config: dict[str, Any], job_data: dict[str, Any], job_dir: str,
                   tracking: dict[str, Any] | None) -> None:
    """The Tune trainable: run (or resume) one trial of the job."""
    from ray import tune

    from .data import load_dataset
    from .training import resolve_device

    job = parse_job(job_data)
    trial = next(t for t in job.trials() if t.trial_id == config["trial_id"])
    trial_dir = Path(job_dir) / "trials" / trial.trial_id
    done = read_result(trial_dir)
    if done is not None:  # finished by an earlier attempt of this job
        tune.report({"step": done["ledger"]["epochs"]["total"], "done": True})
        return
    _configure_torch(trial)
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / "worker.pid").write_text(str(os.getpid()))
    dir_hooks = RayTrialHooks(trial_dir, planned_epochs(trial))
    hooks = dir_hooks
    if tracking is not None:
        from .tracking import MlflowHooks

        hooks = MlflowHooks(dir_hooks, tracking["uri"], tracking["trial_runs"][trial.trial_id])
    data = load_dataset(trial.data, resolve_device(trial.train.device))
    result = run_trial(trial, data, hooks)
    summary = dir_hooks.write_result(result)
    if tracking is not None:
        hooks.finish(result)
    ledger = summary["ledger"]
    tune.report({"step": ledger["epochs"]["total"], "epochs_planned": dir_hooks.planned,
                 "phase": "done", "done": True, "tickets": len(result.tickets),
                 "wall_clock_s": ledger["wall_clock_s"]})


# --- the driver -------------------------------------------------------------------------------


def init_ray(address: str | None, dashboard: bool = False) -> float:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a local one; returns
    the seconds it took."""
    import ray

    # Checkpointing every few epochs is intended; Tune's "excessive snapshot" warning is noise.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    start = time.perf_counter()
    if ray.is_initialized():
        return 0.0
    address = address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=False)
        else:
            ray.init(include_dashboard=dashboard, log_to_driver=False)
    except ConnectionError as err:
        raise ClusterError(f"cannot reach a Ray cluster at {address}: {err}; check the "
                           "address (ray://... or HOST:6379) and that the cluster is up") from None
    return time.perf_counter() - start


def node_capacities() -> list[dict[str, float]]:
    """CPU and GPU totals of every alive node."""
    import ray

    return [{"CPU": n["Resources"].get("CPU", 0.0), "GPU": n["Resources"].get("GPU", 0.0)}
            for n in ray.nodes() if n.get("Alive")]


def check_resources_fit(trials, nodes: list[dict[str, float]]) -> None:
    """Refuse trials that no node can ever hold (Ray would wait for them forever)."""
    for trial in trials:
        need = trial.resources
        if any(n["CPU"] >= need.cpus and n["GPU"] >= need.gpus for n in nodes):
            continue
        largest = max(nodes, key=lambda n: (n["GPU"], n["CPU"]), default={"CPU": 0, "GPU": 0})
        raise ClusterError(
            f"trial {trial.trial_id} asks for resources.cpus={need.cpus:g}, "
            f"resources.gpus={need.gpus:g}, but no node of the cluster has that much (the "
            f"largest offers {largest['CPU']:g} CPUs and {largest['GPU']:g} GPUs); lower "
            "resources.cpus / resources.gpus, or add nodes that fit (on an autoscaling "
            "cluster pass --skip-resource-check)"
        )


class ProgressPrinter:
    """Tune callback printing a progress table every few seconds and a line per finished
    trial. Subclassing ``tune.Callback`` happens in ``make_progress`` (Ray imported lazily)."""

    def __init__(self, names: dict[str, str], echo: Callable[[str], None],
                 every_s: float = PROGRESS_EVERY_S):
        self.names = names
        self.echo = echo
        self.every_s = every_s
        self.latest: dict[str, dict[str, Any]] = {}
        self.last_print = time.monotonic()

    def result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.latest[trial_id] = result
        if time.monotonic() - self.last_print >= self.every_s:
            self.last_print = time.monotonic()
            self.echo(self.table())

    def table(self) -> str:
        running = {k: r for k, r in self.latest.items() if r.get("phase") != "done"}
        finished = len(self.latest) - len(running)
        lines = [f"{finished}/{len(self.names)} trials finished; running:",
                 f"{'trial':44} {'epochs':>11} {'phase':8} {'round':>5} {'sparsity':>8} "
                 f"{'test acc':>8}"]
        for trial_id, r in sorted(running.items()):
            test = r.get("test_acc")
            lines.append(
                f"{self.names.get(trial_id, trial_id)[:44]:44} "
                f"{int(r.get('step', 0)):>5}/{int(r.get('epochs_planned', 0)):<5} "
                f"{str(r.get('phase', '')):8} {int(r.get('round', 0)) + 1:>5} "
                f"{r.get('sparsity', 0.0):>8.3f} {'-' if test is None else f'{test:.4f}':>8}")
        return "\n".join(lines)

    def complete(self, trial_id: str, result: dict[str, Any]) -> None:
        self.echo(f"{self.names.get(trial_id, trial_id)}: finished, {int(result.get('step', 0))}"
                  f" epochs, {result.get('tickets', 0)} tickets, "
                  f"{result.get('wall_clock_s', 0.0):.1f}s")

    def error(self, trial_id: str) -> None:
        self.echo(f"{self.names.get(trial_id, trial_id)}: FAILED (it will be retried if "
                  "resources.max_failures allows)")


def make_progress(names: dict[str, str], echo: Callable[[str], None]):
    from ray import tune

    class _Callback(tune.Callback):
        def __init__(self):
            self.printer = ProgressPrinter(names, echo)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.printer.result(trial.config["trial_id"], result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.printer.complete(trial.config["trial_id"], trial.last_result or {})

        def on_trial_error(self, iteration, trials, trial, **info):
            self.printer.error(trial.config["trial_id"])

    return _Callback()


def _tuner(job: JobSpec, root: Path, pending: list[str], tracking, echo):
    from ray import tune

    trainable = tune.with_parameters(
        trial_function, job_data=job.model_dump(mode="json", by_alias=True),
        job_dir=str(root.resolve()), tracking=None if tracking is None else tracking.__dict__,
    )
    resources = {t.trial_id: t.resources for t in job.trials()}
    trainable = tune.with_resources(trainable, _resource_request(resources))
    names = {t.trial_id: t.name for t in job.trials()}
    storage = str((root / "ray").resolve())
    path = Path(storage) / "tune"
    if tune.Tuner.can_restore(str(path)):
        echo(f"resuming the Ray Tune experiment in {path}")
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                  resume_errored=True)
    run_config = tune.RunConfig(
        name="tune", storage_path=storage, verbose=0,
        failure_config=tune.FailureConfig(max_failures=job.resources.max_failures),
        callbacks=[make_progress(names, echo)],
    )
    # Reusing trial actors saves each trial's process start-up and imports (~7 s here).
    return tune.Tuner(trainable, param_space={"trial_id": tune.grid_search(pending)},
                      tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True),
                      run_config=run_config)


def _resource_request(resources: dict[str, Any]) -> Callable[[dict], dict]:
    """Per-trial resources (trials of one job may differ) as Tune's callable form."""

    from ray import tune

    def request(config: dict):
        spec = resources[config["trial_id"]]
        bundle = {"CPU": spec.cpus}
        if spec.gpus:
            bundle["GPU"] = spec.gpus
        return tune.PlacementGroupFactory([bundle])

    return request


def run_job_on_ray(job: JobSpec, storage: str | Path | None = None, address: str | None = None,
                   echo: Callable[[str], None] = print, track: bool = True,
                   check_resources: bool = True, dashboard: bool = False) -> dict[str, Any]:
    """Run (or resume) every unfinished trial of ``job`` as Ray Tune trials."""
    root, uri = open_job(job, storage, track)
    startup_s = init_ray(address, dashboard)
    if check_resources:
        check_resources_fit(job.trials(), node_capacities())
    tracking = start_tracking(job, root, uri, echo, ray_address=address)
    echo(f"job {job.name} ({job.spec_hash()}) -> {root}; Ray started in {startup_s:.1f}s")
    started = time.time()
    # Longest first: the serial IMP chain starts at once instead of after the short trials.
    pending = [t.trial_id for t in sorted(job.trials(), key=planned_epochs, reverse=True)
               if read_result(root / "trials" / t.trial_id) is None]
    failed = []
    if pending:
        results = _tuner(job, root, pending, tracking, echo).fit()
        failed = [r.config.get("trial_id") for r in results if r.error is not None]
    results = [read_result(root / "trials" / t.trial_id) for t in job.trials()]
    results = [r for r in results if r is not None]
    driver_wall_s = time.time() - started
    costs = orchestration_costs(results, driver_wall_s, startup_s)
    summary = close_job(job, root, results, driver_wall_s, tracking, echo,
                        "FAILED" if failed else "FINISHED",
                        {"orchestration": costs, "failed_trials": failed})
    summary["report"] = make_report(root, echo) if not failed else None
    if failed:
        raise ClusterError(f"{len(failed)} trial(s) failed after retries: {', '.join(failed)}; "
                           f"see {root / 'ray'}; re-run the same command to resume")
    return summary


def orchestration_costs(results: list[dict[str, Any]], driver_wall_s: float,
                        startup_s: float) -> dict[str, float]:
    """This driver session's wall-clock vs the trials' own: what running them through Ray
    cost (trial process start-up, scheduling, reporting), Ray's own start-up apart."""
    walls = [t["ledger"]["wall_clock_s"] for t in results]
    critical = max(walls, default=0.0)
    makespan = driver_wall_s
    return {
        "ray_startup_s": round(startup_s, 3),
        "driver_wall_s": round(makespan, 3),
        "trial_wall_clock_sum_s": round(sum(walls), 3),
        "critical_path_trial_s": round(critical, 3),
        "overhead_s": round(makespan - critical, 3),
        "overhead_fraction": round((makespan - critical) / critical, 4) if critical else 0.0,
    }
