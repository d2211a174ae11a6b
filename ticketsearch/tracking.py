"""MLflow tracking: one experiment per job name, a parent run per job submission, a child run
per trial with per-epoch metrics, and tickets as artifacts.

``JobTracking`` is the job lifecycle's tracker (``job.py``; ``NullTracker`` there is the one for
untracked jobs). In the driver, ``start`` creates the database, the experiment, the parent run
and every trial's child run before any trial starts (concurrent first-time migrations of a
SQLite store crash), and records their ids in the job directory (``mlflow.json``) so a resumed
job continues the same runs. The tracker is a small picklable value: it travels to Ray
trials, which log through ``MlflowHooks`` with an ``MlflowClient`` bound to a run id — no
global "active run" state, safe in threads and processes.

Nothing logged is lost and nothing is logged twice: every operation is first written to the
trial's ``mlflow_pending.jsonl`` journal, then sent, then dropped from it; what the server does
not take (it is down) is sent in order once it answers again — on a later event, at the end of
the trial, or by ``ticketsearch sync JOB_DIR``. A resumed trial skips the epochs, rounds and
tickets it had already handed over (``mlflow_sent.json``), so MLflow sees every step once.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .hooks import EpochEvent, Hooks, RoundEvent, TrialResult
from .tickets import Ticket

STATE_FILE = "mlflow.json"
PENDING_FILE = "mlflow_pending.jsonl"
SENT_FILE = "mlflow_sent.json"
RETRY_INTERVAL_S = 5.0
FLUSH_EVERY_S = 5.0  # epoch metrics are sent in batches at most this old
BATCH_LIMIT = 1000  # MLflow's limit of metrics per log_batch
PARAM_VALUE_LIMIT = 500
RUNS_PROGRESS_EVERY = 50  # a job creating many MLflow runs says how far it got


CREDENTIAL_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
UI_VIEW = "workflowType=machine_learning"  # the MLflow UI's model-training view (not GenAI)


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable server, bad URI)."""


def redact_uri(uri: str | None) -> str | None:
    """``uri`` without the ``user:password@`` of its address: what may be printed or stored."""
    if not uri or "@" not in uri:
        return uri
    parts = urllib.parse.urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def credentials_to_env(uri: str) -> str:
    """For ``http(s)://user:password@host``: put user and password into this process's
    ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` (MLflow's own way; processes
    started from here, such as a local Ray, inherit them) and return the URI without them."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.username is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return redact_uri(uri)


def take_credentials(job):
    """``job`` with no credentials in ``tracking.uri``: a server's user and password move to
    the environment (``credentials_to_env``); a database URI with a password is refused, since
    the spec is stored with the job (give it as MLFLOW_TRACKING_URI, or put an `mlflow
    server` in front of the database)."""
    from .spec import SpecError

    uri = job.tracking.uri
    if not uri or redact_uri(uri) == uri:
        return job
    clean = credentials_to_env(uri)
    if clean == uri:
        raise SpecError(f"tracking.uri: {redact_uri(uri)} carries a password, which would be "
                        "stored with the job (spec.yaml, MLflow params); give this URI in the "
                        "environment as MLFLOW_TRACKING_URI instead, or run an `mlflow server` "
                        "in front of the database and use its http:// address")
    return job.model_copy(update={"tracking": job.tracking.model_copy(update={"uri": clean})})


def _quiet_client_env() -> None:
    """Fail fast instead of retrying for minutes (the journal does the retrying); no notes
    about creating a new local store's tables."""
    import logging

    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)


def client_for(uri: str):
    from mlflow.tracking import MlflowClient

    _quiet_client_env()
    return MlflowClient(tracking_uri=uri)


def tracking_uri_for(job, storage: str | Path | None = None) -> str:
    """The spec's ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the
    storage folder (``<storage>/mlflow.db``)."""
    explicit = job.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if explicit:
        return explicit
    root = Path(storage or job.storage.path).resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


def _make_store_folder(uri: str) -> None:
    """Create the folder of a local SQLite store (a server's store is the server's)."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)


def artifact_root_for(uri: str) -> str | None:
    """Where a local store keeps artifacts (``mlartifacts`` beside the database); None for a
    server, whose own (proxied) artifact root applies."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    return None


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingError unless an HTTP tracking server answers its health check."""
    if not uri.startswith(("http://", "https://")):
        return
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
        response.raise_for_status()
    except requests.RequestException as err:
        raise TrackingError(
            f"tracking server {uri} is unreachable ({type(err).__name__}); start it "
            "(e.g. `mlflow server --host 127.0.0.1 --port 5000`), or point tracking.uri / "
            "MLFLOW_TRACKING_URI at a running one, or unset both to use a local SQLite store"
        ) from None


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), item, out)
    else:
        text = json.dumps(value) if isinstance(value, list | tuple) else str(value)
        out[prefix] = text[:PARAM_VALUE_LIMIT]


def flat_params(data: dict[str, Any]) -> dict[str, str]:
    """Nested spec dict -> ``{"train.lr": "0.1", ...}`` (values cut to MLflow's limit)."""
    out: dict[str, str] = {}
    _flatten("", data, out)
    return out


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=Path(__file__).parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def _log_params(client, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start:start + 100])


def trial_params(trial) -> dict[str, str]:
    """Every knob of a trial as flat MLflow params."""
    data = trial.model_dump(mode="json", by_alias=True)
    data.pop("job_name", None)
    return flat_params(data)


@dataclass
class JobTracking:
    """Where a job's runs live; persisted as ``mlflow.json`` in the job directory. The
    tracker of a tracked job (see ``job.NullTracker`` for the interface)."""

    uri: str
    experiment_id: str = ""
    parent_run_id: str = ""
    trial_runs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def for_job(cls, job, storage: str | Path | None = None) -> JobTracking:
        """The tracker of ``job``'s store, checked to answer; nothing is written yet."""
        uri = credentials_to_env(tracking_uri_for(job, storage))
        check_reachable(uri)
        return cls(uri)

    def start(self, job, job_dir: Path, trials, ray_address: str | None = None,
              echo=None) -> str:
        """Create (or find again) the job's runs; returns a line saying where they are.
        ``echo`` hears how far the creation of many runs has got."""
        started = setup_job_tracking(job, job_dir, self.uri, trials, ray_address, echo)
        self.__dict__.update(started.__dict__)
        return (f"tracking: {redact_uri(self.uri)} (experiment "
                f"{job.tracking.experiment or job.name}, parent run {self.parent_run_id})")

    def trial_hooks(self, inner, trial_id: str) -> MlflowHooks:
        return MlflowHooks(inner, self.uri, self.trial_runs[trial_id])

    def run_id(self, trial_id: str) -> str | None:
        return self.trial_runs.get(trial_id)

    def finish_trial(self, hooks: MlflowHooks, result: TrialResult) -> bool:
        """Log the trial's totals and close its run; False if some of it is still waiting
        in the trial's journal (the tracking server is unreachable)."""
        return hooks.finish(result)

    def close(self, job_dir: Path, status: str) -> None:
        finish_job_tracking(self, job_dir, status)

    def unsent(self, job_dir: Path, trials) -> list[str]:
        """The trials whose journal still holds operations the server has not taken."""
        return [t.trial_id for t in trials if _has_pending(Path(job_dir) / "trials" / t.trial_id)]

    def describe(self) -> dict[str, str]:
        return {"uri": redact_uri(self.uri), "experiment_id": self.experiment_id,
                "parent_run_id": self.parent_run_id}

    def save(self, job_dir: Path) -> None:
        """Write ``mlflow.json`` (the URI without credentials, which stay in memory)."""
        from .jobdir import write_json_atomic

        write_json_atomic(job_dir / STATE_FILE, self.__dict__ | {"uri": redact_uri(self.uri)})

    @classmethod
    def load(cls, job_dir: Path) -> JobTracking | None:
        path = Path(job_dir) / STATE_FILE
        return cls(**json.loads(path.read_text())) if path.exists() else None


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root_for(uri))
    except Exception:  # another driver created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def ui_link(uri: str, base: str, job: str | None = None) -> str:
    """The MLflow UI page (under ``base``) of ``job``'s runs (an experiment name or a job id
    ``<name>-<hash>``), else of the latest job's, in the model-training view (MLflow 3 opens
    on its GenAI overview otherwise); ``base`` itself if the store has no job."""
    client = client_for(uri)
    query = "tags.`ticketsearch.kind` = 'job'"
    if job is not None:
        name, _, spec_hash = job.rpartition("-")
        query += (f" and tags.`ticketsearch.spec_hash` = '{spec_hash}'"
                  if re.fullmatch(r"[0-9a-f]{12}", spec_hash) else
                  f" and tags.`ticketsearch.job` = '{job}'")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, query, max_results=1, order_by=["attributes.start_time DESC"]) \
        if ids else []
    if not runs:
        if job is not None:
            raise TrackingError(f"no job {job!r} in {redact_uri(uri)}; `ticketsearch tickets` "
                                "lists the jobs with tickets")
        return base
    return f"{base}/#/experiments/{runs[0].info.experiment_id}/runs?{UI_VIEW}"


def _start_parent(client, experiment_id: str, job, job_dir: Path,
                  ray_address: str | None) -> str:
    from . import __version__

    tags = {"ticketsearch.job": job.name, "ticketsearch.spec_hash": job.spec_hash(),
            "ticketsearch.version": __version__, "ticketsearch.job_dir": str(job_dir),
            "ticketsearch.kind": "job"}
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if ray_address:
        tags["ticketsearch.ray_address"] = ray_address
    run = client.create_run(experiment_id, run_name=f"{job.name} {job.spec_hash()}", tags=tags)
    run_id = run.info.run_id
    _log_params(client, run_id, flat_params(job.model_dump(mode="json", by_alias=True)))
    spec = job_dir / "spec.yaml"
    if spec.exists():
        client.log_artifact(run_id, str(spec))
    return run_id


def _start_child(client, tracking: JobTracking, job, trial) -> str:
    tags = {
        "mlflow.parentRunId": tracking.parent_run_id,
        "method": trial.method, "model": trial.model.label(), "dataset": trial.data.label(),
        "trial_id": trial.trial_id, "ticketsearch.job": job.name,
        "ticketsearch.spec_hash": job.spec_hash(), "ticketsearch.kind": "trial",
    }
    run = client.create_run(tracking.experiment_id, run_name=trial.name, tags=tags)
    _log_params(client, run.info.run_id, trial_params(trial))
    return run.info.run_id


def setup_job_tracking(job, job_dir: Path, uri: str, trials, ray_address: str | None = None,
                       echo=None) -> JobTracking:
    """Create (or find again, for a resumed job) the experiment, parent and child runs;
    ``echo`` (optional) hears every ``RUNS_PROGRESS_EVERY`` runs created."""
    check_reachable(uri)
    _make_store_folder(uri)
    client = client_for(uri)
    tracking = JobTracking.load(job_dir)
    if tracking is None or tracking.uri != redact_uri(uri):
        experiment_id = _experiment_id(client, job.tracking.experiment or job.name, uri)
        parent = _start_parent(client, experiment_id, job, job_dir, ray_address)
        tracking = JobTracking(uri, experiment_id, parent)
    else:
        tracking.uri = uri
        client.update_run(tracking.parent_run_id, status="RUNNING")
    missing = [t for t in trials if t.trial_id not in tracking.trial_runs]
    for count, trial in enumerate(missing, 1):
        tracking.trial_runs[trial.trial_id] = _start_child(client, tracking, job, trial)
        if echo and len(missing) > RUNS_PROGRESS_EVERY and (
                count % RUNS_PROGRESS_EVERY == 0 or count == len(missing)):
            echo(f"tracking: created {count}/{len(missing)} trial runs")
    tracking.save(job_dir)
    return tracking


def log_report(job_dir: Path, report_dir: Path) -> None:
    """Attach a report folder to the job's parent run (nothing for an untracked job)."""
    tracking = JobTracking.load(job_dir)
    if tracking is not None:
        client_for(tracking.uri).log_artifacts(tracking.parent_run_id, str(report_dir), "report")


def finish_job_tracking(tracking: JobTracking, job_dir: Path, status: str = "FINISHED",
                        report: bool = False) -> None:
    """Attach the job summary (and, with ``report``, the report folder) to the parent run and
    close it with ``status``."""
    client = client_for(tracking.uri)
    summary = job_dir / "summary.json"
    if summary.exists():
        client.log_artifact(tracking.parent_run_id, str(summary))
    if report and (job_dir / "report").is_dir():
        client.log_artifacts(tracking.parent_run_id, str(job_dir / "report"), "report")
    client.set_terminated(tracking.parent_run_id, status=status)


def _has_pending(trial_dir: Path) -> bool:
    journal = trial_dir / PENDING_FILE
    return journal.exists() and journal.stat().st_size > 0


# --- per-trial logging with a journal ---------------------------------------------------------


class RunLogger:
    """Sends operations to one MLflow run in order, through a journal (see the module
    docstring): ``submit`` appends an operation to the journal, then sends what it holds.

    An operation may carry a ``mark`` — ``{"step": N}`` (epoch metrics up to step N) or
    ``{"key": K}`` (a round's or a ticket's metrics) — and ``marks`` holds every mark handed
    over so far (kept in ``mlflow_sent.json`` and in the journal), so a resumed trial can skip
    what it logged before. Sending an operation again is harmless: metrics keep their
    original timestamps (MLflow's store ignores an exact duplicate); tags, status and
    artifacts overwrite."""

    def __init__(self, uri: str, run_id: str, journal: Path):
        self.uri = uri
        self.run_id = run_id
        self.journal = Path(journal)
        self.sent_path = self.journal.with_name(SENT_FILE)
        self.client = client_for(uri)
        self._next_retry = 0.0
        self.marks = self._load_marks()

    def submit(self, op: dict[str, Any]) -> None:
        """Journal ``op`` and send everything waiting (at most every RETRY_INTERVAL_S while
        the server does not answer)."""
        self._append(op)
        if op.get("mark"):
            self._remember(op["mark"])
        self.replay()

    def already_sent(self, mark: dict[str, Any]) -> bool:
        """True if an operation with ``mark`` (or, for a step, a later one) was handed over."""
        if "step" in mark:
            return mark["step"] <= self.marks["step"]
        return mark["key"] in self.marks["keys"]

    def replay(self, force: bool = False) -> bool:
        """Try to send the journal in order; True when nothing is left waiting."""
        if not self.journal.exists():
            return True
        if not force and time.monotonic() < self._next_retry:
            return False
        lines = [line for line in self.journal.read_text().splitlines() if line.strip()]
        for index, line in enumerate(lines):
            try:
                op = json.loads(line)
            except json.JSONDecodeError:  # cut short by a crash while being written
                continue
            try:
                self._apply(op)
            except Exception:
                self._rewrite(lines[index:])
                self._next_retry = time.monotonic() + RETRY_INTERVAL_S
                return False
        self.journal.unlink(missing_ok=True)
        return True

    def _load_marks(self) -> dict[str, Any]:
        marks = {"step": -1, "keys": set()}
        if self.sent_path.exists():
            saved = json.loads(self.sent_path.read_text())
            marks = {"step": saved["step"], "keys": set(saved["keys"])}
        from .jobdir import read_jsonl

        for op in read_jsonl(self.journal):  # handed over, maybe not yet sent
            self._merge(marks, op.get("mark"))
        return marks

    @staticmethod
    def _merge(marks: dict[str, Any], mark: dict[str, Any] | None) -> None:
        if mark and "step" in mark:
            marks["step"] = max(marks["step"], mark["step"])
        elif mark:
            marks["keys"].add(mark["key"])

    def _remember(self, mark: dict[str, Any]) -> None:
        from .jobdir import write_json_atomic

        self._merge(self.marks, mark)
        write_json_atomic(self.sent_path, {"step": self.marks["step"],
                                           "keys": sorted(self.marks["keys"])})

    def _append(self, op: dict[str, Any]) -> None:
        with self.journal.open("a") as f:
            f.write(json.dumps(op) + "\n")

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.journal.with_name(self.journal.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        os.replace(tmp, self.journal)

    def _apply(self, op: dict[str, Any]) -> None:
        from mlflow.entities import Metric, RunTag

        kind = op["op"]
        if kind == "metrics":
            metrics = [Metric(k, v, item["timestamp"], item["step"])
                       for item in op["items"] for k, v in item["values"].items()]
            for start in range(0, len(metrics), BATCH_LIMIT):
                self.client.log_batch(self.run_id, metrics=metrics[start:start + BATCH_LIMIT])
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "artifacts":
            self.client.log_artifacts(self.run_id, op["local"], op["artifact_path"])
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, op["local"], op.get("artifact_path"))
        elif kind == "status":
            self.client.update_run(self.run_id, status=op["status"])
        elif kind == "terminate":
            self.client.set_terminated(self.run_id, status=op["status"])
        elif kind == "batch":
            for item in op["ops"]:
                self._apply(item)
        else:
            raise ValueError(f"unknown journal operation {kind!r}")


def metrics_item(values: dict[str, float], step: int) -> dict[str, Any]:
    return {"values": values, "step": step, "timestamp": int(time.time() * 1000)}


def metrics_op(values: dict[str, float], step: int) -> dict[str, Any]:
    """One journal operation logging ``values`` at ``step``."""
    return {"op": "metrics", "items": [metrics_item(values, step)]}


class MlflowHooks(Hooks):
    """Logs a trial to its MLflow run and delegates persistence to ``inner`` (the trial
    directory hooks, which own checkpoints and ticket files).

    Epoch metrics are batched (sent every ``FLUSH_EVERY_S`` seconds) and always flushed before
    a checkpoint is written. Epochs, rounds and tickets that a resumed trial trains again
    after a crash are not sent again when an earlier attempt had handed them over.
    """

    def __init__(self, inner, uri: str, run_id: str):
        self.inner = inner
        self.logger = RunLogger(uri, run_id, Path(inner.dir) / PENDING_FILE)
        self.buffer: list[dict[str, Any]] = []
        self.last_flush = time.monotonic()
        self.logger.submit({"op": "status", "status": "RUNNING"})

    def flush(self) -> None:
        """Send the buffered epoch metrics as one operation."""
        if self.buffer:
            self.logger.submit({"op": "metrics", "items": self.buffer,
                                "mark": {"step": self.buffer[-1]["step"]}})
            self.buffer = []
        self.last_flush = time.monotonic()

    def epoch_end(self, event: EpochEvent) -> None:
        self.inner.epoch_end(event)
        if self.logger.already_sent({"step": event.step}):
            return
        values = event.metrics() | {"epoch_seconds": event.seconds, "epoch": event.epoch}
        values.pop("seconds", None)
        self.buffer.append(metrics_item(values, event.step))
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()

    def round_end(self, event: RoundEvent) -> None:
        self.inner.round_end(event)
        self.flush()
        prefix = "retrain" if event.phase == "retrain" else "round"
        mark = {"key": f"{prefix}:{event.round}:{event.recipe or ''}"}
        if self.logger.already_sent(mark):
            return
        values = {f"{prefix}_sparsity": event.sparsity}
        if event.val_acc is not None:
            values[f"{prefix}_val_acc"] = event.val_acc
        if event.test_acc is not None:
            values[f"{prefix}_test_acc"] = event.test_acc
        self.logger.submit(metrics_op(values, event.round) | {"mark": mark})

    def ticket_found(self, ticket: Ticket) -> None:
        self.inner.ticket_found(ticket)
        self.flush()
        mark = {"key": f"ticket:{ticket.name}"}
        if self.logger.already_sent(mark):
            return
        local = Path(self.inner.dir) / "tickets" / ticket.name
        layers = write_layer_report(ticket, Path(self.inner.dir) / "ticket_layers")
        step = int(ticket.meta.get("round") or 0)
        values = {"ticket_sparsity": ticket.sparsity,
                  "search_epochs": ticket.meta.get("search_epochs", 0),
                  "retrain_epochs": ticket.meta.get("retrain_epochs", 0)}
        for key in ("val_acc", "test_acc"):
            if ticket.meta.get(key) is not None:
                values[f"ticket_{key}"] = ticket.meta[key]
        ops = [{"op": "artifacts", "local": str(local), "artifact_path": f"tickets/{ticket.name}"}]
        ops += [{"op": "artifact", "local": str(path), "artifact_path": "ticket_layers"}
                for path in layers]
        ops += [metrics_op(values, step),
                {"op": "tags", "tags": {"has_ticket": "true", f"ticket_name.{step}": ticket.name}}]
        self.logger.submit({"op": "batch", "ops": ops, "mark": mark})

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self.flush()
        self.inner.save_checkpoint(state)
        self.logger.replay()

    def load_checkpoint(self) -> dict[str, Any] | None:
        return self.inner.load_checkpoint()

    def epochs_reported(self) -> int:
        return self.inner.epochs_reported()

    def attempt_started(self, start: float) -> None:
        self.inner.attempt_started(start)

    def attempt_windows(self) -> list[list[float]]:
        return self.inner.attempt_windows()

    def finish(self, result: TrialResult, status: str = "FINISHED") -> bool:
        """Log the trial's totals and close its run; True when everything reached MLflow."""
        self.flush()
        ledger = result.ledger
        values = {"wall_clock_s": ledger.wall_clock_s, "device_s": ledger.device_s,
                  "recomputed_epochs": ledger.recomputed_epochs,
                  "search_epochs_total": ledger.epochs("search"),
                  "retrain_epochs_total": ledger.epochs("retrain"),
                  "dense_epochs_total": ledger.epochs("dense"),
                  "train_epochs_total": ledger.epochs("train")}
        values |= {f"final_{k}": v for k, v in result.final.items() if v is not None}
        self.logger.submit(metrics_op(values, ledger.epochs()))
        result_file = Path(self.inner.dir) / "result.json"
        if result_file.exists():
            self.logger.submit({"op": "artifact", "local": str(result_file),
                                "artifact_path": None})
        self.logger.submit({"op": "terminate", "status": status})
        return self.logger.replay(force=True)


def write_layer_report(ticket: Ticket, folder: Path) -> list[Path]:
    """Per-layer density of a ticket as JSON and as a bar chart PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    densities = ticket.layer_densities()
    json_path = folder / f"{ticket.name}.json"
    json_path.write_text(json.dumps({"ticket": ticket.name, "sparsity": ticket.sparsity,
                                     "layer_density": densities}, indent=2))
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(densities) + 2), 3.2))
    ax.bar(range(len(densities)), list(densities.values()), color="#3b75af")
    ax.set_xticks(range(len(densities)), list(densities), rotation=70, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("density (kept fraction)")
    ax.set_title(f"{ticket.name}: sparsity {ticket.sparsity:.3f}")
    fig.tight_layout()
    png_path = folder / f"{ticket.name}.png"
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return [json_path, png_path]


def sync_job_dir(job_dir: Path) -> dict[str, bool]:
    """Send every trial's pending journal of a job directory, then — once the job has ended
    (``summary.json``) and nothing is left waiting — attach its summary and report to the
    parent run and close it with the job's status. Returns, per trial with a journal and for
    ``"parent run"``: was everything sent? Refused while another process runs the job."""
    from .jobdir import JobLock
    from .records import JobRecord, read_record

    job_dir = Path(job_dir)
    tracking = JobTracking.load(job_dir)
    if tracking is None:
        raise TrackingError(f"{job_dir}: no {STATE_FILE} here; is this a job directory of a "
                            "tracked job?")
    JobLock(job_dir).check_free("sync it")
    check_reachable(tracking.uri)
    outcome = {}
    for trial_id, run_id in tracking.trial_runs.items():
        journal = job_dir / "trials" / trial_id / PENDING_FILE
        if journal.exists():
            outcome[trial_id] = RunLogger(tracking.uri, run_id, journal).replay(force=True)
    record = read_record(job_dir / "summary.json", JobRecord)
    if record is not None and all(outcome.values()):
        try:
            finish_job_tracking(tracking, job_dir, record.status, report=True)
            outcome["parent run"] = True
        except Exception:
            outcome["parent run"] = False
    return outcome


# --- reading back ------------------------------------------------------------------------------


def load_ticket_artifact(uri: str, tracking_uri: str | None = None) -> Ticket:
    """The ticket logged as artifact ``uri`` (``runs:/<run_id>/tickets/<name>``; resolved in
    ``tracking_uri``, default ``MLFLOW_TRACKING_URI``): downloaded into a temporary directory,
    loaded into memory (checksums verified) and the directory removed, also on failure. A URI
    with no ticket, or any problem with it, raises TicketFormatError naming ``uri``."""
    import tempfile

    from .sparsity.ticketfile import TicketFormatError
    from .tickets import load_ticket_dir

    with tempfile.TemporaryDirectory(prefix="ticket-") as tmp:
        local = _download(uri, tmp, tracking_uri)
        try:
            return load_ticket_dir(local, name=uri.rstrip("/").rsplit("/", 1)[-1])
        except TicketFormatError as err:
            message = str(err).replace(f"ticket {local}:", f"ticket {uri}:")
            if not local.is_dir():
                message = _no_ticket(uri, "it is not a directory")
            raise TicketFormatError(message) from err


def _download(uri: str, dst: str, tracking_uri: str | None) -> Path:
    """``mlflow.artifacts.download_artifacts`` of ``uri`` into ``dst``; a failure (no such
    run or artifact, store unreachable) raises TicketFormatError naming ``uri``."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from .sparsity.ticketfile import TicketFormatError

    _quiet_client_env()
    try:
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=uri, dst_path=dst, tracking_uri=tracking_uri))
    except (MlflowException, OSError) as err:
        raise TicketFormatError(_no_ticket(uri, str(err).strip())) from err


def _no_ticket(uri: str, reason: str) -> str:
    """The message for an artifact URI that holds no ticket, saying how to find one."""
    return (f"no ticket at {uri} ({reason}); check the run id and ticket name: "
            "`ticketsearch tickets` lists the logged tickets with their URIs (runs:/ URIs are "
            "resolved in the store MLFLOW_TRACKING_URI names)")



def list_tickets(uri: str, job: str | None = None, method: str | None = None,
                 min_sparsity: float = 0.0) -> list[dict[str, Any]]:
    """Every ticket logged in the store, sparsest first; ``job`` is an experiment name (every
    job of it) or a job id ``<name>-<spec hash>`` (that job only)."""
    check_reachable(uri)
    client = client_for(uri)
    experiments = client.search_experiments()
    query = "tags.has_ticket = 'true'"
    if job is not None:
        named = [e for e in experiments if e.name == job]
        name, _, spec_hash = job.rpartition("-")
        if not named and re.fullmatch(r"[0-9a-f]{12}", spec_hash):
            named = experiments  # a job id: its runs are tagged with its spec hash
            query += f" and tags.`ticketsearch.spec_hash` = '{spec_hash}'"
        if not named:
            raise TrackingError(f"no experiment named {job!r} and no job with that id in "
                                f"{redact_uri(uri)}; `ticketsearch tickets` lists every job's")
        experiments = named
    if method:
        query += f" and tags.method = '{method}'"
    rows = []
    for experiment in experiments:
        for run in client.search_runs([experiment.experiment_id], query, max_results=5000):
            rows += _ticket_rows(client, run, experiment.name)
    rows = [r for r in rows if r["sparsity"] >= min_sparsity]
    return sorted(rows, key=lambda r: (-r["sparsity"], -(r["test_acc"] or 0)))


def _ticket_rows(client, run, experiment: str) -> list[dict[str, Any]]:
    def history(key):
        return {m.step: m.value for m in client.get_metric_history(run.info.run_id, key)}

    sparsity, test, val = (history(k) for k in
                           ("ticket_sparsity", "ticket_test_acc", "ticket_val_acc"))
    rows = []
    for step, value in sorted(sparsity.items()):
        name = run.data.tags.get(f"ticket_name.{step}", f"step-{step}")
        tags = run.data.tags
        rows.append({
            "experiment": experiment,
            "job_id": f"{tags.get('ticketsearch.job')}-{tags.get('ticketsearch.spec_hash')}",
            "method": tags.get("method"),
            "trial": run.info.run_name, "name": name, "sparsity": value,
            "val_acc": val.get(step), "test_acc": test.get(step), "run_id": run.info.run_id,
            "artifact": f"runs:/{run.info.run_id}/tickets/{name}",
        })
    return rows
