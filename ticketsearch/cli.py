"""The ``ticketsearch`` command.

Errors a user can cause (a bad spec, a missing dataset, a corrupt ticket) are printed as one
clear message without a traceback, and the command exits with status 2. A job that finished
while its tracking server was away exits with status 3 (``EXIT_UNSENT``) until ``ticketsearch
sync`` has delivered what waits in its directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2
EXIT_UNSENT = 3
MANY_TRIALS = 500  # a larger sweep runs only with --yes


def _user_errors() -> tuple[type[BaseException], ...]:
    from .cluster import ClusterError
    from .data import DatasetError
    from .hooks import CheckpointError
    from .jobdir import JobLockedError, StorageError
    from .models import ModelError
    from .report import ReportError
    from .sparsity.ticketfile import TicketFormatError
    from .spec import SpecError
    from .submit import SubmitError
    from .tracking import TrackingError
    from .usercode import UserCodeError

    return (SpecError, DatasetError, ModelError, TicketFormatError, CheckpointError,
            TrackingError, ClusterError, SubmitError, ReportError, UserCodeError,
            JobLockedError, StorageError, FileNotFoundError)


def _load_with_code(args):
    """The job spec of ``args.job`` (with ``--set`` overrides), its own code's folders put on
    the import path: the spec's folder, the current directory, ``code.py_modules``' folders.
    Returns the spec and those folders."""
    from .spec import load_job
    from .tracking import take_credentials
    from .usercode import add_import_paths, code_paths

    job = take_credentials(load_job(args.job, args.overrides))
    paths = code_paths(args.job, job.code.py_modules)
    add_import_paths(paths)
    return job, tuple(paths)


def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job spec YAML file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.epochs_per_round=1 (repeatable)",
    )


def _job_dir_arg(job: str, storage: str) -> Path:
    folder = Path(job)
    if not folder.is_dir():
        folder = Path(storage) / job
    if not (folder / "spec.yaml").exists():
        raise FileNotFoundError(f"{folder / 'spec.yaml'} not found: pass a job id from "
                                f"{storage} (a folder <job>-<hash>) or a job directory's path")
    return folder


def cmd_report(args) -> int:
    from .report import build_report, format_summary, record_from_mlflow, report_job, write_report

    if args.job:
        job_dir = _job_dir_arg(args.job, args.storage)
        out = Path(args.out) if args.out else job_dir / "report"
        report = report_job(job_dir, out, args.tolerance, log=not args.no_log)
    else:
        if not (args.experiment or args.run):
            raise FileNotFoundError("say which job: a job id / directory, --experiment NAME "
                                    "or --run PARENT_RUN_ID")
        uri = _store_uri(args)
        record = record_from_mlflow(uri, args.run, args.experiment)
        report = build_report(record, args.tolerance)
        out = Path(args.out or f"report-{record.name}")
        write_report(report, out)
        if not args.no_log:
            from .tracking import client_for

            client_for(uri).log_artifacts(record.tracking["parent_run_id"], str(out), "report")
    print(format_summary(report))
    print(f"report written to {out}")
    return 0


def cmd_resume(args) -> int:
    """Resume a job from its directory (``<storage>/<job>-<hash>``), by id or path."""
    from .cluster import run_job_on_ray
    from .spec import load_job
    from .usercode import add_import_paths, code_paths

    folder = _job_dir_arg(args.job_id, args.storage)
    job = load_job(folder / "spec.yaml")
    paths = code_paths(None)
    add_import_paths(paths)
    outcome = run_job_on_ray(job, storage=folder.parent, address=args.address,
                             track=not args.no_tracking, code_paths=tuple(paths))
    return _print_outcome(outcome)


def _print_outcome(outcome: dict) -> int:
    """The job's summary (rendered from its report) and where its results are; exit status
    3 while some of its tracking data waits for ``ticketsearch sync``."""
    from .report import format_summary

    if outcome["report"] is not None:
        print(format_summary(outcome["report"]))
    print(f"results in {outcome['job_dir']}")
    if outcome.get("unsent"):
        print(f"the tracking server did not receive everything ({', '.join(outcome['unsent'])})"
              f"; nothing is lost, it waits in the job directory: once the server is back, "
              f"send it with `ticketsearch sync {outcome['job_dir']}`", file=sys.stderr)
        return EXIT_UNSENT
    return 0


def cmd_validate(args) -> int:
    from .preflight import inspect_job, needs_preflight, summary_line

    job, _ = _load_with_code(args)
    trials = job.trials()
    checked = inspect_job(job) if args.preflight or needs_preflight(job) else None
    if args.json:
        print(json.dumps([t.model_dump(mode="json", by_alias=True) for t in trials], indent=2))
        return 0
    print(f"{args.job}: valid job {job.name!r} (spec hash {job.spec_hash()}), "
          f"{len(trials)} trials:")
    for trial in trials:
        res = trial.resources
        print(f"  {trial.trial_id:50s} {trial.name}  [cpus={res.cpus:g} gpus={res.gpus:g}]")
    if checked is not None:
        print(summary_line(checked))
    return 0


def cmd_inspect(args) -> int:
    from .preflight import format_inspection, inspect_job

    job, _ = _load_with_code(args)
    print(format_inspection(inspect_job(job)))
    return 0


def cmd_schema(args) -> int:
    from .spec import job_json_schema

    print(json.dumps(job_json_schema(), indent=2))
    return 0


def _confirm_size(job, args) -> None:
    """Refuse a sweep of more than MANY_TRIALS trials unless --yes (a typo in a sweep can ask
    for thousands of trials, runs and folders)."""
    from .spec import SpecError

    count = len(job.trials())
    if count > MANY_TRIALS and not args.yes:
        raise SpecError(f"{args.job}: this job has {count} trials (more than {MANY_TRIALS}); "
                        "each is a Ray Tune trial, an MLflow run and a folder. Check its sweeps "
                        "with `ticketsearch validate`, then pass --yes to run it")


def cmd_run(args) -> int:
    job, paths = _load_with_code(args)
    _confirm_size(job, args)
    if args.in_process:
        from .local import run_job_locally

        outcome = run_job_locally(job, storage=args.storage, track=not args.no_tracking)
    else:
        from .cluster import run_job_on_ray

        outcome = run_job_on_ray(job, storage=args.storage, address=args.address,
                                 track=not args.no_tracking,
                                 check_resources=not args.skip_resource_check,
                                 dashboard=args.dashboard, code_paths=paths)
    return _print_outcome(outcome)


def _store_uri(args) -> str:
    """The tracking URI named by --uri, else MLFLOW_TRACKING_URI, else the local store under
    --storage (default ./ticketsearch-runs)."""
    import os

    from .tracking import TrackingError

    if args.uri or os.environ.get("MLFLOW_TRACKING_URI"):
        return args.uri or os.environ["MLFLOW_TRACKING_URI"]
    db = Path(args.storage).resolve() / "mlflow.db"
    if not db.exists():
        raise TrackingError(f"no MLflow store at {db}; run a job first, or pass --storage "
                            "(the job's storage.path) or --uri")
    return f"sqlite:///{db}"


def cmd_ui(args) -> int:
    """The MLflow UI on the local store: the link to the latest job's runs (or ``--job``'s)
    printed; a port already taken is an error; SIGTERM / Ctrl-C stop the server."""
    from .tracking import TrackingError, artifact_root_for, redact_uri, ui_links

    uri = _store_uri(args)
    server = uri.startswith(("http://", "https://"))
    base = redact_uri(uri) if server else f"http://{args.host}:{args.port}"
    link, tickets = ui_links(uri, base, args.job)
    tickets_line = f"\ntickets: {tickets}" if tickets else ""
    if server:
        print(f"the tracking server is already a UI: open {link}{tickets_line}")
        return 0
    _check_port_free(args.host, args.port, TrackingError)
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    root = artifact_root_for(uri)
    if root:
        command += ["--default-artifact-root", root]
    print(f"MLflow UI: {link}{tickets_line}\n(store {uri}; all experiments at {base}); "
          "Ctrl-C stops it", flush=True)
    return _serve_until_stopped(command)


def _check_port_free(host: str, port: int, error: type[Exception]) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise error(f"port {port} on {host} is taken ({err.strerror}): is another UI "
                        "running? open it, or pass --port") from None


def _serve_until_stopped(command: list[str]) -> int:
    """Run ``command`` in its own process group until it exits or this process is told to
    stop (SIGTERM, SIGINT), which stops the whole group."""
    import os
    import signal
    import subprocess

    server = subprocess.Popen(command, start_new_session=True)

    def stop(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(server.pid, sig)
                server.wait(timeout=10)
                return
            except ProcessLookupError:
                return
            except subprocess.TimeoutExpired:
                continue

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if code in (0, -signal.SIGTERM, -signal.SIGKILL) else code


def cmd_tickets(args) -> int:
    from .tracking import list_tickets

    rows = list_tickets(_store_uri(args), job=args.job, method=args.method,
                        min_sparsity=args.min_sparsity)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    width = max([len(r["job_id"]) for r in rows] + [3])
    print(f"{'sparsity':>8}  {'test':>6}  {'val':>6}  {'method':6}  {'job':{width}}  "
          f"{'trial':40}  {'ticket':9}  run")
    for r in rows:
        test = "-" if r["test_acc"] is None else f"{r['test_acc']:.4f}"
        val = "-" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        print(f"{r['sparsity']:8.4f}  {test:>6}  {val:>6}  {r['method'] or '-':6}  "
              f"{r['job_id']:{width}}  {r['trial'][:40]:40}  {r['name'] or '-':9}  "
              f"{r['run_id']}")
    print(f"{len(rows)} tickets; a ticket's files are runs:/<run>/ticket and its trained model "
          "runs:/<run>/model (`ticketsearch register <run> --name NAME` registers it)")
    return 0


def cmd_sync(args) -> int:
    from .tracking import sync_job_dir

    outcome = sync_job_dir(Path(args.job_dir))
    left = [name for name, done in outcome.items() if not done]
    trials = [name for name in outcome if name != "parent run"]
    parent = {True: "; parent run closed with the job's summary and report",
              False: "", None: ""}[outcome.get("parent run")]
    print(f"synced {len(trials) - len(set(left) & set(trials))} trial journals{parent}"
          + (f"; still pending: {', '.join(left)} (is the tracking server up?)" if left else ""))
    return EXIT_UNSENT if left else 0


def cmd_submit(args) -> int:
    from .submit import resolve_address, submit_job

    job, _ = _load_with_code(args)
    _confirm_size(job, args)
    extra = [flag for flag, on in (("--no-tracking", args.no_tracking),
                                   ("--skip-resource-check", args.skip_resource_check),
                                   ("--yes", args.yes)) if on]
    job_id = submit_job(args.job, args.address, args.overrides, storage=args.storage,
                        extra_args=extra, ship=not args.no_ship, py_modules=args.py_modules,
                        pip=args.pip)
    address = resolve_address(args.address)
    print(job_id)
    print(_shipped(args))
    print(f"submitted to {address}; follow it with:\n"
          f"  ticketsearch logs {job_id} --address {address} --follow\n"
          f"  ticketsearch status {job_id} --address {address}\n"
          f"  ticketsearch stop {job_id} --address {address}")
    return _follow_job(args, job_id) if args.wait else 0


def _shipped(args) -> str:
    """What ``submit`` sent of the job's own code, in words."""
    from .spec import load_job
    from .submit import code_to_ship

    if args.no_ship:
        return "your code: not shipped (--no-ship); the cluster must already have it"
    code = code_to_ship(args.job, load_job(args.job, args.overrides), args.py_modules)
    names = ", ".join(f"{p.name}{'/' if p.is_dir() else ''}" for p in code)
    return f"your code: shipped {names}" if code else "your code: none found to ship"


def _follow_job(args, job_id: str) -> int:
    """Stream the job's logs until it ends: 0 if it SUCCEEDED, 1 otherwise (or on timeout)."""
    from .submit import JobWaitTimeout, follow_logs

    try:
        status = follow_logs(args.address, job_id, lambda text: print(text, end="", flush=True),
                             timeout_s=args.timeout)
    except JobWaitTimeout as err:
        print(f"timed out after {args.timeout:g}s: {err}", file=sys.stderr)
        return 1
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_status(args) -> int:
    from .submit import job_info

    info = job_info(args.address, args.job_id)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(info["status"])
    if info["message"]:
        print(info["message"])
    return 0


def cmd_logs(args) -> int:
    from .submit import job_logs

    if args.follow:
        return _follow_job(args, args.job_id)
    print(job_logs(args.address, args.job_id), end="")
    return 0


def cmd_stop(args) -> int:
    from .submit import job_status, stop_job

    if stop_job(args.address, args.job_id):
        print(f"stop requested for {args.job_id}")
    else:
        print(f"{args.job_id} was not running ({job_status(args.address, args.job_id)})")
    return 0


def cmd_ticket(args) -> int:
    from . import load_ticket
    from .tickets import is_artifact_uri

    store = _store_uri(args) if is_artifact_uri(args.path) else None
    ticket = load_ticket(args.path, tracking_uri=store)
    info = {"name": ticket.name, "sparsity": ticket.sparsity, **ticket.meta,
            "layer_densities": ticket.layer_densities()}
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_register(args) -> int:
    from .tracking import register_ticket

    version, uri = register_ticket(_store_uri(args), args.ticket, args.name)
    print(f"registered {args.name} version {version}: mlflow.pytorch.load_model({uri!r})")
    return 0


def cmd_bench(args) -> int:
    from .bench import format_bookkeeping, format_results, measure_bookkeeping, measure_overhead

    results = [measure_overhead(m, repeats=args.repeats, device=args.device)
               for m in args.models.split(",")]
    print(format_results(results))
    if args.bookkeeping:
        print()
        print(format_bookkeeping([measure_bookkeeping(), measure_bookkeeping(checkpoint_every=1)]))
    return 0


PRECISION_CONFIG_NAMES = ("fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile")


def cmd_bench_precision(args) -> int:
    from .bench import format_rows, measure_precision

    configs = tuple(c for c in args.configs.split(",") if c)
    unknown = [c for c in configs if c not in PRECISION_CONFIG_NAMES]
    if unknown:
        print(f"error: --configs: unknown {unknown}; choose from "
              f"{', '.join(PRECISION_CONFIG_NAMES)}", file=sys.stderr)
        return EXIT_USAGE
    print(format_rows(measure_precision(images=args.images, repeats=args.repeats,
                                        device=args.device, configs=configs)))
    return 0


def cmd_bench_methods(args) -> int:
    from .bench import format_rows, measure_methods

    print(format_rows(measure_methods(args.images, args.device, args.epochs, args.precision)))
    return 0


def cmd_bench_throughput(args) -> int:
    from .bench import format_bookkeeping, format_rows, measure_bookkeeping, measure_throughput

    rows = [measure_throughput(m, args.members, args.epochs, args.device, args.ray)
            for m in args.models.split(",")]
    print(format_rows(rows))
    if args.bookkeeping:
        print()
        print(format_bookkeeping([measure_bookkeeping()]))
    return 0


class _TicketMethods:
    """argparse choices: the registered methods that make tickets, read from the registry only
    when a choice is checked or listed (so the command starts without importing torch)."""

    def _names(self) -> list[str]:
        from .methods import methods

        return [m.name for m in methods() if m.makes_tickets]

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __iter__(self):
        return iter(self._names())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ticketsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) a job on Ray (local by default)")
    _add_spec_args(run)
    run.add_argument("--storage", help="storage folder (default: the spec's storage.path)")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.add_argument("--address", help="Ray cluster to run on (default: RAY_ADDRESS, else "
                     "start a local Ray)")
    run.add_argument("--in-process", action="store_true",
                     help="run the trials one after another in this process, without Ray")
    run.add_argument("--skip-resource-check", action="store_true",
                     help="do not refuse trials larger than every current node (autoscaling)")
    run.add_argument("--dashboard", action="store_true",
                     help="start the Ray dashboard with the local cluster")
    run.add_argument("--yes", action="store_true",
                     help=f"run a sweep of more than {MANY_TRIALS} trials")
    run.set_defaults(func=cmd_run)

    def store_args(p):
        p.add_argument("--uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                       "else the SQLite store under --storage)")
        p.add_argument("--storage", default="./ticketsearch-runs",
                       help="storage folder of local jobs (default ./ticketsearch-runs)")

    def address_arg(p):
        p.add_argument("--address", help="the head's dashboard, e.g. http://HEAD:8265 (default: "
                       "RAY_API_SERVER_ADDRESS, else RAY_ADDRESS)")

    def wait_args(p, flag, help_text):
        p.add_argument(flag, action="store_true", help=help_text)
        p.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                       help=f"with {flag}: give up waiting after this long (the job keeps "
                       "running)")

    submit = sub.add_parser("submit", help="submit a job to a remote Ray cluster (Job API)")
    _add_spec_args(submit)
    address_arg(submit)
    submit.add_argument("--storage", help="storage folder on the cluster, an absolute path "
                        "every node sees (default: the spec's storage.path)")
    submit.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    submit.add_argument("--skip-resource-check", action="store_true",
                        help="do not refuse trials larger than every current node (autoscaling)")
    submit.add_argument("--no-ship", action="store_true",
                        help="do not upload your code (the Python modules of the spec's folder "
                        "and the current directory, code.py_modules, --py-module)")
    submit.add_argument("--py-module", dest="py_modules", action="append", default=[],
                        metavar="PATH", help="also ship this package folder or .py file "
                        "(repeatable)")
    submit.add_argument("--yes", action="store_true",
                        help=f"submit a sweep of more than {MANY_TRIALS} trials")
    submit.add_argument("--pip", action="append", default=[], metavar="REQUIREMENT",
                        help="a pip requirement the cluster installs for the job, added to "
                        "code.pip (repeatable)")
    wait_args(submit, "--wait", "stream the logs until the job ends; exit 0 if it SUCCEEDED, "
              "else 1")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="status of a submitted job")
    status.add_argument("job_id", help="the id `ticketsearch submit` printed")
    address_arg(status)
    status.add_argument("--json", action="store_true", help="print status, message, times")
    status.set_defaults(func=cmd_status)

    logs = sub.add_parser("logs", help="logs of a submitted job")
    logs.add_argument("job_id", help="the id `ticketsearch submit` printed")
    address_arg(logs)
    wait_args(logs, "--follow", "keep printing until the job ends; exit 0 if it SUCCEEDED, "
              "else 1")
    logs.set_defaults(func=cmd_logs)

    stop = sub.add_parser("stop", help="stop a submitted job")
    stop.add_argument("job_id", help="the id `ticketsearch submit` printed")
    address_arg(stop)
    stop.set_defaults(func=cmd_stop)

    ui = sub.add_parser("ui", help="start the MLflow UI on the job store (loopback)")
    store_args(ui)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--job", help="link to this job's runs (experiment name or job id "
                    "<name>-<hash>; default: the latest job)")
    ui.set_defaults(func=cmd_ui)

    tickets = sub.add_parser("tickets", help="list tickets logged to MLflow")
    store_args(tickets)
    tickets.add_argument("--job", help="only this experiment (a job name: all its variants), or "
                         "one job by its id <name>-<spec hash>")
    tickets.add_argument("--method", choices=_TicketMethods(), metavar="METHOD",
                         help="only the tickets of this method (any registered method that makes "
                         "tickets)")
    tickets.add_argument("--min-sparsity", type=float, default=0.0)
    tickets.add_argument("--json", action="store_true")
    tickets.set_defaults(func=cmd_tickets)

    sync = sub.add_parser("sync", help="send a job's metrics that the tracking server missed")
    sync.add_argument("job_dir", help="the job directory (<storage>/<job>-<hash>)")
    sync.set_defaults(func=cmd_sync)

    report = sub.add_parser("report", help="the cost report of a job, built from MLflow")
    report.add_argument("job", nargs="?", help="job id (<job>-<hash>) or job directory")
    store_args(report)
    report.add_argument("--experiment", help="report the latest job of this experiment")
    report.add_argument("--run", help="report the job of this parent run id")
    report.add_argument("--out", help="output folder (default: <job dir>/report)")
    report.add_argument("--tolerance", type=float, default=0.01,
                        help="a ticket matches when test acc >= dense - tolerance (0.01)")
    report.add_argument("--no-log", action="store_true",
                        help="do not attach the report to the job's parent run")
    report.set_defaults(func=cmd_report)

    resume = sub.add_parser("resume", help="finish what is unfinished of a job")
    resume.add_argument("job_id", help="job id (<job>-<hash>) or job directory")
    resume.add_argument("--storage", default="./ticketsearch-runs",
                        help="storage folder holding the job (default ./ticketsearch-runs)")
    resume.add_argument("--address", help="Ray cluster (default: RAY_ADDRESS or a local Ray)")
    resume.add_argument("--no-tracking", action="store_true")
    resume.set_defaults(func=cmd_resume)

    validate = sub.add_parser("validate", help="check a job spec and list its trials")
    _add_spec_args(validate)
    validate.add_argument("--json", action="store_true", help="print the trials as JSON")
    validate.add_argument("--preflight", action="store_true",
                          help="also build the model and one batch for a built-in model on a "
                          "built-in dataset (always done for your own model or data)")
    validate.set_defaults(func=cmd_validate)

    inspect = sub.add_parser("inspect", help="build the model and one batch: every weight "
                             "layer, masked or not and why, sizes, one forward pass")
    _add_spec_args(inspect)
    inspect.set_defaults(func=cmd_inspect)

    schema = sub.add_parser("schema", help="print the job spec's JSON schema")
    schema.set_defaults(func=cmd_schema)

    ticket = sub.add_parser("ticket", help="show a ticket's metadata (verifies checksums)")
    ticket.add_argument("path", help="ticket directory, or runs:/<run id>/ticket (as "
                        "`ticketsearch tickets` lists them)")
    store_args(ticket)
    ticket.set_defaults(func=cmd_ticket)

    register = sub.add_parser("register", help="put a ticket's trained model in the MLflow "
                              "model registry")
    register.add_argument("ticket", help="the ticket: its run id, runs:/<run id>/model (as "
                          "`ticketsearch tickets` lists them) or its ticket directory")
    register.add_argument("--name", required=True, help="registered model name (a new version "
                          "is added when it exists)")
    store_args(register)
    register.set_defaults(func=cmd_register)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    overhead = bench_sub.add_parser(
        "overhead", help="CS vs dense epoch time, and our loop vs a minimal PyTorch loop")
    overhead.add_argument("--models", default="mlp,resnet20", help="comma-separated models")
    overhead.add_argument("--repeats", type=int, default=7, help="timed epochs per kind")
    overhead.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    overhead.add_argument("--no-bookkeeping", dest="bookkeeping", action="store_false",
                          help="skip the trial bookkeeping measurement (a tracked CS trial "
                          "of digits + mlp on the CPU)")
    overhead.set_defaults(func=cmd_bench)
    precision = bench_sub.add_parser(
        "precision", help="a CS epoch of resnet20 on CIFAR-shaped data under fp32, bf16, "
        "channels-last and compile, side by side")
    precision.add_argument("--images", type=int, default=2048,
                           help="training examples (45000 = CIFAR-10's training split)")
    precision.add_argument("--repeats", type=int, default=3, help="timed epochs per config")
    precision.add_argument("--configs", default=",".join(PRECISION_CONFIG_NAMES),
                           help="comma-separated configs (the first is the baseline)")
    precision.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    precision.set_defaults(func=cmd_bench_precision)
    methods = bench_sub.add_parser(
        "methods", help="epochs/s of a dense, CS, IMP and RigL trial of the paper preset, "
        "cut down (resnet20, CIFAR-shaped data, in-process, untracked)")
    methods.add_argument("--images", type=int, default=2048)
    methods.add_argument("--epochs", type=int, default=2, help="epochs per round")
    methods.add_argument("--precision", default="auto",
                         choices=["auto", "fp32", "bf16", "fp16"])
    methods.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    methods.set_defaults(func=cmd_bench_methods)
    throughput = bench_sub.add_parser(
        "throughput", help="member-epochs/s of K CS trials one after another, as concurrent "
        "Ray trials sharing the device, and as one fused group, side by side")
    throughput.add_argument("--models", default="mlp,resnet20", help="comma-separated models "
                            "(mlp on digits, resnet20 on CIFAR-shaped synthetic data)")
    throughput.add_argument("--members", type=int, default=4, help="trials (K)")
    throughput.add_argument("--epochs", type=int, default=None,
                            help="epochs per trial (default: mlp 20, resnet20 2)")
    throughput.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    throughput.add_argument("--no-ray", dest="ray", action="store_false",
                            help="skip the concurrent Ray trials")
    throughput.add_argument("--no-bookkeeping", dest="bookkeeping", action="store_false",
                            help="skip the trial bookkeeping measurement")
    throughput.set_defaults(func=cmd_bench_throughput)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as err:
        from .job import JobInterrupted

        print(err if isinstance(err, JobInterrupted) else
              "interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
