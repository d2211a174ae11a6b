"""The Ray executor: one Ray Tune trial per trial of the job (CS setting, IMP chain, dense
baseline, ...), on a local Ray or a cluster.

The driver runs the job lifecycle (``job.py``): it checks the tracking store, starts (or joins)
Ray, refuses resource requests no node can satisfy, opens the job, and runs a ``Tuner`` over
the unfinished trials, longest first. Each Tune trial receives its own ``TrialSpec`` (as JSON
in its config) and the tracker, and runs the job's single per-trial body
(``job.run_one_trial``) with one more progress sink: every epoch is reported to Tune. A trial
resumes from the checkpoint in its trial directory after a worker failure, or after a driver
failure once ``Tuner.restore`` restarts it.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .hooks import EpochEvent
from .job import JobInterrupted, JobRun, group_name, run_one_group, run_one_trial, trial_errors
from .jobdir import ERROR_FILE, read_result, read_trial_error, write_trial_error
from .spec import JobSpec

PROGRESS_EVERY_S = 10.0
REPORT_EVERY_S = 2.0  # Tune results at most this often (and at round ends)
CONNECT_TIMEOUT_S = 10.0


class ClusterError(RuntimeError):
    """The cluster cannot run the job as asked (unreachable, or resources that never fit)."""


# --- inside a trial ---------------------------------------------------------------------------


def tune_reporter(planned: int, every_s: float = REPORT_EVERY_S) -> Callable[[Any], None]:
    """A progress sink reporting epochs to Tune as results: the latest epoch at most every
    ``every_s`` seconds and at every round end (a Tune report costs about as much as a small
    model's epoch; the trial directory and MLflow still get every epoch).

    (Checkpoints stay in the trial directory, on storage every node sees, not in Tune's
    checkpoint store: Tune prunes old checkpoints while its experiment snapshot can still
    point at them, so a driver killed at the wrong moment left a snapshot it could not
    restore.)"""
    from ray import tune

    last: dict[str, Any] = {"at": float("-inf"), "event": None}

    def send(event: EpochEvent) -> None:
        tune.report({"step": event.step + 1, "epochs_planned": planned,
                     "phase": event.phase, **event.metrics()})
        last["at"], last["event"] = time.monotonic(), None

    def report(event) -> None:
        if isinstance(event, EpochEvent):
            last["event"] = event
            if time.monotonic() - last["at"] >= every_s:
                send(event)
        elif last["event"] is not None:  # a round ended: its last epoch goes out now
            send(last["event"])

    return report


def _configure_torch(trial) -> None:
    """Threads = the CPUs Ray gave the trial; a memory cap when a GPU is shared."""
    import torch

    torch.set_num_threads(max(1, int(trial.resources.cpus)))
    gpus = trial.resources.gpus
    if 0 < gpus < 1 and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(gpus)


def trial_function(config: dict[str, Any], job_dir: str, tracker, methods: dict,
                   code_paths: tuple[str, ...] = ()) -> None:
    """The Tune trainable: run (or resume) the one trial its config carries, or the fused
    group of trials (``config["trial"]["members"]``, one spec each).

    ``methods`` are the registry entries of the job's methods (unpickling them imports their
    modules here); entries this worker does not know yet are registered. ``code_paths`` (the
    driver's folders of the job's own code) go on this worker's import path, where they exist
    (on a cluster without shared folders the code comes as Ray's working_dir/py_modules)."""
    from ray import tune

    from .methods import method_names, planned_epochs, register
    from .spec import TrialSpec
    from .usercode import add_import_paths

    add_import_paths(p for p in code_paths if Path(p).is_dir())

    for method in methods.values():
        if method.name not in method_names():
            register(method)
    unit = [TrialSpec.model_validate_json(spec) for spec in config["trial"]["members"]]
    root = Path(job_dir)
    done = [read_result(root / "trials" / trial.trial_id) for trial in unit]
    if all(record is not None for record in done):  # finished by an earlier attempt
        tune.report({"step": sum(r.ledger.epochs["total"] for r in done), "done": True})
        return
    unit = [trial for trial, record in zip(unit, done) if record is None]  # never twice
    dirs = [root / "trials" / trial.trial_id for trial in unit]
    trial = unit[0]
    _configure_torch(trial)
    for folder in dirs:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "worker.pid").write_text(str(os.getpid()))
        (folder / ERROR_FILE).unlink(missing_ok=True)
    planned = planned_epochs(trial)
    try:
        if len(unit) > 1:
            records = [r for r, _ in run_one_group(unit, root, tracker,
                                                   progress=tune_reporter(planned))]
        elif trial.resources.world > 1:
            records = [run_data_parallel(trial, root, tracker, code_paths)]
        else:
            records = [run_one_trial(trial, root, tracker, progress=tune_reporter(planned))[0]]
    except trial_errors() as err:  # retrying cannot help: say why, once
        for folder in dirs:
            write_trial_error(folder, err)
        tune.report({"step": 0, "phase": "error", "done": True})
        return
    tune.report({"step": records[0].ledger.epochs["total"], "epochs_planned": planned,
                 "phase": "done", "done": True, "tickets": sum(len(r.tickets) for r in records),
                 "wall_clock_s": records[0].ledger.wall_clock_s})


def run_data_parallel(trial, root: Path, tracker, code_paths: tuple[str, ...] = ()):
    """Train a data-parallel trial: a Ray Train ``TorchTrainer`` of ``resources.world``
    workers (gloo on CPUs, NCCL on GPUs), launched from the Tune trial. A worker that dies
    restarts the group (``resources.max_failures`` times), which resumes from the trial's
    checkpoint. Returns the trial's record (written by rank 0)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    need = trial.resources
    per_worker = {"CPU": need.cpus} | ({"GPU": 1} if need.gpus else {})
    trainer = TorchTrainer(
        data_parallel_worker,
        train_loop_config={"trial": trial.model_dump_json(), "job_dir": str(root),
                           "tracker": tracker, "code_paths": list(code_paths)},
        scaling_config=ScalingConfig(num_workers=need.world, use_gpu=bool(need.gpus),
                                     resources_per_worker=per_worker),
        run_config=RunConfig(name=f"ddp-{trial.trial_id}",
                             storage_path=str(root / "ray-train"),
                             failure_config=FailureConfig(max_failures=need.max_failures)),
    )
    trainer.fit()
    return read_result(root / "trials" / trial.trial_id)


def data_parallel_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker of a data-parallel trial: rank 0 runs the trial with its hooks
    and tracker (events, checkpoints, tickets, MLflow, result.json); the others train along
    and write nothing (``TrialRun`` gives them ``parallel.FollowerHooks``)."""
    import torch.distributed as dist

    from .data import load_dataset
    from .jobdir import TrialDirHooks
    from .methods import run_trial
    from .spec import TrialSpec
    from .training import resolve_device
    from .usercode import add_import_paths

    add_import_paths(p for p in config["code_paths"] if Path(p).is_dir())
    trial = TrialSpec.model_validate_json(config["trial"])
    root = Path(config["job_dir"])
    _configure_torch(trial)
    trial_dir = root / "trials" / trial.trial_id
    (trial_dir / f"worker-{dist.get_rank()}.pid").write_text(str(os.getpid()))
    if dist.get_rank() == 0:
        run_one_trial(trial, root, config["tracker"])
        return
    data = load_dataset(trial.data, resolve_device(trial.train.device))
    run_trial(trial, data, TrialDirHooks(trial_dir))


# --- the driver -------------------------------------------------------------------------------


def init_ray(address: str | None, dashboard: bool = False) -> float:
    """Join the cluster at ``address`` (or ``RAY_ADDRESS``), else start a new local one (never
    silently join another ``ray start`` cluster of this machine); returns the seconds it took.

    A local Ray is private to this machine: its node address is loopback (``_single_machine``)
    and Ray's metrics exporter (an HTTP port that answers without the cluster's token) is off. An address that
    does not answer raises ClusterError within ``CONNECT_TIMEOUT_S``."""
    import ray

    # Checkpointing every few epochs is intended; Tune's "excessive snapshot" warning is noise,
    # and so are its configuration box and TensorBoard hint (the legacy output, silent at
    # verbose=0): the progress table is ours.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    start = time.perf_counter()
    if ray.is_initialized():
        return 0.0
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
        logging.getLogger(TOKEN_NOTICE_LOGGER).addFilter(_drop_token_notice)
        if address:
            check_cluster_reachable(address)
            ray.init(address=address, runtime_env=_credentials_env(), **quiet)
        else:
            _single_machine()
            ray.init(address="local", include_dashboard=dashboard,
                     _system_config={"enable_metrics_collection": False}, **quiet)
    except ConnectionError as err:
        raise ClusterError(f"cannot reach a Ray cluster at {address}: {err}; check the "
                           "address (ray://... or HOST:6379) and that the cluster is up") from None
    return time.perf_counter() - start


TOKEN_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def _drop_token_notice(record: logging.LogRecord) -> bool:
    """Ray's notice that token authentication is on, said at every start, is left out (its
    errors about a missing or wrong token are not)."""
    return not record.getMessage().startswith("Token authentication is enabled for this Ray")


def _single_machine() -> None:
    """Make the local Ray about to start a single-machine cluster: its node address is
    loopback (Ray's own switch for this, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read here and
    by the processes Ray starts), so its servers, among them the autoscaler's and the
    dashboard's metrics ports, answer on this machine only."""
    from ray._private import ray_constants

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _credentials_env() -> dict[str, Any] | None:
    """The tracking server's credentials (environment only) for the trials of a cluster
    joined by address, whose workers do not inherit this process's environment."""
    from .tracking import CREDENTIAL_VARS

    found = {name: os.environ[name] for name in CREDENTIAL_VARS if name in os.environ}
    return {"env_vars": found} if found else None


def cluster_endpoint(address: str) -> tuple[str, int] | None:
    """The (host, port) a Ray address connects to: ``HOST:PORT`` (the GCS) or
    ``ray://HOST[:PORT]`` (Ray Client, default port 10001); None for ``auto`` and others."""
    client = address.startswith("ray://")
    rest = address[len("ray://"):] if client else address
    host, sep, port = rest.rstrip("/").rpartition(":")
    if not sep:
        host, port = rest.rstrip("/"), ("10001" if client else "")
    if not host or not port.isdigit() or "/" in host:
        return None
    return host.strip("[]"), int(port)


def check_cluster_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ClusterError unless something accepts connections at ``address``."""
    import socket

    endpoint = cluster_endpoint(address)
    if endpoint is None:
        return
    try:
        socket.create_connection(endpoint, timeout=timeout).close()
    except OSError as err:
        raise ClusterError(
            f"cannot reach a Ray cluster at {address} ({err.strerror or type(err).__name__}); "
            "check --address / RAY_ADDRESS (HOST:6379 of the head, or ray://HOST:10001) and "
            "that the cluster is up; without an address a local Ray is started") from None


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
                 every_s: float = PROGRESS_EVERY_S, planned: dict[str, int] | None = None,
                 clock: Callable[[], float] = time.time):
        self.names = names
        self.echo = echo
        self.every_s = every_s
        self.planned = planned or {}  # epochs per trial, for the ETA
        self.clock = clock
        self.latest: dict[str, dict[str, Any]] = {}
        self.started = clock()
        self.first: float | None = None  # time of the first result: the ETA's rate from there
        self.seen_at: dict[str, int] = {}  # each trial's epochs when first seen
        self.last_print = time.monotonic()

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks into its experiment state; the output function stays
        out (``print`` pickles by reference, which fails once Ray has patched
        ``builtins.print`` in this process); a restored printer prints."""
        return {**self.__dict__, "echo": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """A printer restored with a resumed experiment times this session."""
        self.__dict__.update(state)
        self.started, self.first, self.seen_at = self.clock(), None, {}
        self.last_print = time.monotonic()

    def say(self, text: str) -> None:
        (self.echo or print)(text)

    def result(self, trial_id: str, result: dict[str, Any]) -> None:
        self.latest[trial_id] = result
        self.seen_at.setdefault(trial_id, int(result.get("step", 0)))
        if self.first is None:
            self.first = self.clock()
        if time.monotonic() - self.last_print >= self.every_s:
            self.last_print = time.monotonic()
            self.say(self.table())

    def epochs_done(self) -> int:
        return sum(int(r.get("step", 0)) for r in self.latest.values())

    def header(self) -> str:
        """Trials finished / running / pending, epochs done of planned, elapsed, ETA."""
        running = sum(r.get("phase") not in ("done", "error") for r in self.latest.values())
        finished = len(self.latest) - running
        line = (f"{finished}/{len(self.names)} trials finished, {running} running, "
                f"{len(self.names) - len(self.latest)} pending")
        now, done, planned = self.clock(), self.epochs_done(), sum(self.planned.values())
        if planned:
            line += f"; epochs {done}/{planned}"
        line += f"; elapsed {_clock(now - self.started)}"
        trained = done - sum(self.seen_at.values())  # in this session, since first seen
        if planned and self.first is not None and trained > 0:
            rate = trained / max(now - self.first, 1e-9)
            line += f", ETA {_clock(max(planned - done, 0) / rate)}"
        return line

    def table(self) -> str:
        running = {k: r for k, r in self.latest.items()
                   if r.get("phase") not in ("done", "error")}
        lines = [self.header() + "; running:",
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
        if result.get("phase") == "error":
            self.say(f"{self.names.get(trial_id, trial_id)}: stopped on an error that a retry "
                     "cannot mend (its cause is shown at the end)")
            return
        self.say(f"{self.names.get(trial_id, trial_id)}: finished, {int(result.get('step', 0))}"
                  f" epochs, {result.get('tickets', 0)} tickets, "
                  f"{result.get('wall_clock_s', 0.0):.1f}s")

    def error(self, trial_id: str) -> None:
        self.say(f"{self.names.get(trial_id, trial_id)}: FAILED (it will be retried if "
                  "resources.max_failures allows)")


def _clock(seconds: float) -> str:
    """``1:02:03`` / ``2:03``."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def make_progress(names: dict[str, str], echo: Callable[[str], None],
                  planned: dict[str, int] | None = None):
    """The Tune callback printing the job's progress. Tune pickles it into its experiment
    state (cloudpickle, by value, since the class is made here): nothing of it may close over
    ``echo`` (``print`` pickles by reference and fails once ``builtins.print`` is patched), so
    the printer, which leaves ``echo`` out of its pickled state, is passed in."""
    from ray import tune

    class _Callback(tune.Callback):
        def __init__(self, printer: ProgressPrinter):
            self.printer = printer

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.printer.result(_trial_id(trial), result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.printer.complete(_trial_id(trial), trial.last_result or {})

        def on_trial_error(self, iteration, trials, trial, **info):
            self.printer.error(_trial_id(trial))

    return _Callback(ProgressPrinter(names, echo, planned=planned))


def _trial_id(trial) -> str:
    """The job's trial id of a Tune trial (also its Tune name and folder name)."""
    return trial.config["trial"]["trial_id"]


def unit_id(unit: list) -> str:
    """The Tune trial id of a unit of work: its trial's id, or its fused group's."""
    return unit[0].trial_id if len(unit) == 1 else group_name(unit)


def unit_name(unit: list) -> str:
    if len(unit) == 1:
        return unit[0].name
    return f"fused group of {len(unit)} ({', '.join(t.trial_id for t in unit)})"


def _unit_names(run: JobRun, units: list[list]) -> dict[str, str]:
    """Readable names of this session's units and of the trials finished before it."""
    planned = {t.trial_id for unit in units for t in unit}
    names = {t.trial_id: t.name for t in run.trials if t.trial_id not in planned}
    return names | {unit_id(u): unit_name(u) for u in units}


def _tuner(run: JobRun, units: list[list], echo, code_paths: tuple[str, ...] = (),
           restore: bool = True):
    """The Tuner of the pending units (trials and fused groups): the job's Tune experiment
    restored (after a driver failure) when there is one and ``restore``, else a new one (an
    old one moved aside)."""
    from ray import tune

    from .methods import get_method, planned_epochs

    methods = {name: get_method(name) for name in run.spec.methods}
    trainable = tune.with_parameters(trial_function, job_dir=str(run.root.resolve()),
                                     tracker=run.tracker, methods=methods,
                                     code_paths=tuple(code_paths))
    resources = {t.trial_id: t.resources for t in run.trials}
    resources |= {unit_id(u): u[0].resources for u in units}  # a group asks as one trial
    trainable = tune.with_resources(trainable, _resource_request(resources,
                                                                 run.spec.resources))
    storage = str((run.root / "ray").resolve())
    path = Path(storage) / "tune"
    if tune.Tuner.can_restore(str(path)):
        if restore:
            echo(f"resuming the Ray Tune experiment in {path}")
            return tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                      resume_errored=True)
        path.rename(path.with_name(f"tune-before-{time.strftime('%Y%m%d-%H%M%S')}"))
    run_config = tune.RunConfig(
        name="tune", storage_path=storage, verbose=0,
        failure_config=tune.FailureConfig(max_failures=run.spec.resources.max_failures),
        callbacks=[make_progress(_unit_names(run, units), echo,
                                 {unit_id(u): planned_epochs(u[0]) for u in units})],
    )
    configs = [{"trial_id": unit_id(u), "members": [t.to_json() for t in u]} for u in units]
    # Reusing trial actors saves each trial's process start-up and imports (~7 s here).
    return tune.Tuner(trainable, param_space={"trial": tune.grid_search(configs)},
                      tune_config=tune.TuneConfig(num_samples=1, reuse_actors=True,
                                                  trial_name_creator=_trial_id,
                                                  trial_dirname_creator=_trial_id),
                      run_config=run_config)


DRIVER_CPUS = 0.01  # what a data-parallel trial's Tune trial holds while its workers train


def _resource_request(resources: dict[str, Any], default) -> Callable[[dict], dict]:
    """Per-unit resources as Tune's callable form; ``default`` (the job's) for a unit this
    session did not plan (a restored experiment holds the units of the session that started
    it, some of them finished since)."""

    from ray import tune

    def request(config: dict):
        spec = resources.get(config["trial"]["trial_id"], default)
        if spec.world > 1:  # its workers ask for their own; the Tune trial only waits on them
            return tune.PlacementGroupFactory([{"CPU": DRIVER_CPUS}])
        bundle = {"CPU": spec.cpus}
        if spec.gpus:
            bundle["GPU"] = spec.gpus
        return tune.PlacementGroupFactory([bundle])

    return request


def run_job_on_ray(job: JobSpec, storage: str | Path | None = None, address: str | None = None,
                   echo: Callable[[str], None] = print, track: bool = True,
                   check_resources: bool = True, dashboard: bool = False,
                   code_paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or resume) every unfinished trial of ``job`` as Ray Tune trials; returns the job
    record (as JSON, with ``job_dir`` and ``report``). ``code_paths``: folders of the job's
    own code, put on every trial worker's import path."""
    run = JobRun(job, storage, track, echo, on_ray=True)
    startup_s = init_ray(address, dashboard)
    if check_resources:
        check_resources_fit(run.trials, node_capacities())
    run.open(ray_address=address, note=f"; Ray started in {startup_s:.1f}s")
    try:
        failed = _run_trials(run, echo, code_paths)
        outcome = run.close("FAILED" if failed else "FINISHED", failed, startup_s)
    finally:
        run.release()
    if failed:
        raise ClusterError(failure_message(run, failed))
    return outcome


def failure_message(run: JobRun, failed: list[str]) -> str:
    """Why the job failed, trial by trial; the last line is a cause, not a hint."""
    lines = [f"{len(failed)} trial(s) failed; fix the cause and re-run the same command "
             "(finished trials are kept, the others resume):"]
    for trial_id in failed:
        cause = read_trial_error(run.root / "trials" / trial_id)
        cause = " ".join(cause.split()) if cause else (
            f"crashed after resources.max_failures retries; its traceback is under "
            f"{run.root / 'ray'}")
        lines.append(f"  {trial_id}: {cause}")
    return "\n".join(lines)


def _run_trials(run: JobRun, echo, code_paths: tuple[str, ...]) -> list[str]:
    """Every unfinished trial of ``run`` as a Tune trial, longest first (the serial IMP chain
    starts at once instead of after the short trials); returns the ids of failed trials."""
    from .methods import planned_epochs

    units = sorted(run.units(), key=lambda u: planned_epochs(u[0]), reverse=True)
    pending = [t for unit in units for t in unit]
    if not pending:
        return []
    # A trial that stopped on an error is finished for Tune: only a new experiment runs it.
    stopped_before = [t for t in pending if read_trial_error(run.trial_dir(t)) is not None]
    for trial in stopped_before:
        (run.trial_dir(trial) / ERROR_FILE).unlink()
    try:
        results = _tuner(run, units, echo, code_paths, restore=not stopped_before).fit()
    except KeyboardInterrupt:
        raise JobInterrupted(run.root) from None
    crashed_units = {r.config["trial"]["trial_id"] for r in results if r.error is not None}
    crashed = {t.trial_id for u in units if unit_id(u) in crashed_units for t in u}
    stopped = {t.trial_id for t in pending if read_trial_error(run.trial_dir(t)) is not None}
    failed = [t.trial_id for t in pending if t.trial_id in crashed | stopped]
    if any(read_result(run.trial_dir(t)) is None and t.trial_id not in failed for t in pending):
        raise JobInterrupted(run.root)  # Tune caught Ctrl-C and returned early
    return failed
