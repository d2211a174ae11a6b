"""The ``ticketsearch`` command.

Errors a user can cause (a bad spec, a missing dataset, a corrupt ticket) are printed as one
clear message without a traceback, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

EXIT_USAGE = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DatasetError
    from .methods import CheckpointError
    from .models import ModelError
    from .sparsity.ticketfile import TicketFormatError
    from .spec import SpecError
    from .tracking import TrackingError

    return (SpecError, DatasetError, ModelError, TicketFormatError, CheckpointError,
            TrackingError, FileNotFoundError)


def _add_spec_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", help="job spec YAML file")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a spec field, e.g. --set train.epochs_per_round=1 (repeatable)",
    )


def cmd_validate(args) -> int:
    from .spec import load_job

    job = load_job(args.job, args.overrides)
    trials = job.trials()
    if args.json:
        print(json.dumps([t.model_dump(mode="json", by_alias=True) for t in trials], indent=2))
        return 0
    print(f"{args.job}: valid job {job.name!r} (spec hash {job.spec_hash()}), "
          f"{len(trials)} trials:")
    for trial in trials:
        res = trial.resources
        print(f"  {trial.trial_id:50s} {trial.name}  [cpus={res.cpus:g} gpus={res.gpus:g}]")
    return 0


def cmd_schema(args) -> int:
    from .spec import job_json_schema

    print(json.dumps(job_json_schema(), indent=2))
    return 0


def cmd_run(args) -> int:
    from .local import format_summary, run_job_locally
    from .spec import load_job

    job = load_job(args.job, args.overrides)
    summary = run_job_locally(job, storage=args.storage, track=not args.no_tracking)
    print(format_summary(summary))
    print(f"results in {summary['job_dir']}")
    return 0


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
    import subprocess

    from .tracking import artifact_root_for

    uri = _store_uri(args)
    if uri.startswith(("http://", "https://")):
        print(f"the tracking server is already a UI: open {uri}")
        return 0
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
               "--host", args.host, "--port", str(args.port)]
    root = artifact_root_for(uri)
    if root:
        command += ["--default-artifact-root", root]
    print(f"MLflow UI on http://{args.host}:{args.port} (store {uri}); Ctrl-C stops it")
    return subprocess.call(command)


def cmd_tickets(args) -> int:
    from .tracking import list_tickets

    rows = list_tickets(_store_uri(args), job=args.job, method=args.method,
                        min_sparsity=args.min_sparsity)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'sparsity':>8}  {'test':>6}  {'val':>6}  {'method':6}  {'trial':40}  artifact")
    for r in rows:
        test = "-" if r["test_acc"] is None else f"{r['test_acc']:.4f}"
        val = "-" if r["val_acc"] is None else f"{r['val_acc']:.4f}"
        print(f"{r['sparsity']:8.4f}  {test:>6}  {val:>6}  {r['method'] or '-':6}  "
              f"{r['trial'][:40]:40}  {r['artifact']}")
    print(f"{len(rows)} tickets")
    return 0


def cmd_sync(args) -> int:
    from .tracking import sync_job_dir

    outcome = sync_job_dir(Path(args.job_dir))
    left = [trial for trial, done in outcome.items() if not done]
    print(f"synced {len(outcome) - len(left)} trial journals"
          + (f"; still pending: {', '.join(left)}" if left else ""))
    return 1 if left else 0


def cmd_ticket(args) -> int:
    from .tickets import load_ticket

    ticket = load_ticket(args.path)
    info = {"name": ticket.name, "sparsity": ticket.sparsity, **ticket.meta,
            "layer_densities": ticket.layer_densities()}
    print(json.dumps(info, indent=2, default=str))
    return 0


def cmd_bench(args) -> int:
    from .bench import format_results, measure_overhead

    results = [measure_overhead(m, repeats=args.repeats, device=args.device)
               for m in args.models.split(",")]
    print(format_results(results))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ticketsearch", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a job (trials one after another, in this process)")
    _add_spec_args(run)
    run.add_argument("--storage", help="storage folder (default: the spec's storage.path)")
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.set_defaults(func=cmd_run)

    def store_args(p):
        p.add_argument("--uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, "
                       "else the SQLite store under --storage)")
        p.add_argument("--storage", default="./ticketsearch-runs",
                       help="storage folder of local jobs (default ./ticketsearch-runs)")

    ui = sub.add_parser("ui", help="start the MLflow UI on the job store (loopback)")
    store_args(ui)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=5000)
    ui.set_defaults(func=cmd_ui)

    tickets = sub.add_parser("tickets", help="list tickets logged to MLflow")
    store_args(tickets)
    tickets.add_argument("--job", help="only this job (experiment name)")
    tickets.add_argument("--method", choices=["cs", "imp"], help="only this method")
    tickets.add_argument("--min-sparsity", type=float, default=0.0)
    tickets.add_argument("--json", action="store_true")
    tickets.set_defaults(func=cmd_tickets)

    sync = sub.add_parser("sync", help="send a job's metrics that the tracking server missed")
    sync.add_argument("job_dir", help="the job directory (<storage>/<job>-<hash>)")
    sync.set_defaults(func=cmd_sync)

    validate = sub.add_parser("validate", help="check a job spec and list its trials")
    _add_spec_args(validate)
    validate.add_argument("--json", action="store_true", help="print the trials as JSON")
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the job spec's JSON schema")
    schema.set_defaults(func=cmd_schema)

    ticket = sub.add_parser("ticket", help="show a ticket's metadata (verifies checksums)")
    ticket.add_argument("path", help="ticket directory")
    ticket.set_defaults(func=cmd_ticket)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    overhead = bench_sub.add_parser(
        "overhead", help="CS vs dense epoch time, and our loop vs a minimal PyTorch loop")
    overhead.add_argument("--models", default="mlp,resnet20", help="comma-separated models")
    overhead.add_argument("--repeats", type=int, default=7, help="timed epochs per kind")
    overhead.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    overhead.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
