"""The ``ticketsearch`` command.

Errors a user can cause (a bad spec, a missing dataset, a corrupt ticket) are printed as one
clear message without a traceback, and the command exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

EXIT_USAGE = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DatasetError
    from .methods import CheckpointError
    from .models import ModelError
    from .sparsity.ticketfile import TicketFormatError
    from .spec import SpecError

    return (SpecError, DatasetError, ModelError, TicketFormatError, CheckpointError,
            FileNotFoundError)


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
    summary = run_job_locally(job, storage=args.storage)
    print(format_summary(summary))
    print(f"results in {summary['job_dir']}")
    return 0


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
    run.set_defaults(func=cmd_run)

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
