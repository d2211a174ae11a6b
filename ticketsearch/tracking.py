"""MLflow tracking: one experiment per job name, a parent run per job submission (with the
job's summary metrics), a child run per trial with per-epoch metrics, and under it a run per
ticket: the same metrics for every method, the ticket directory and its trained sparse model
as an ``mlflow.pytorch`` model.

``JobTracking`` is the job lifecycle's tracker (``job.py``; ``NullTracker`` there is the one for
untracked jobs). In the driver, ``start`` creates the database, the experiment, the parent run
and every trial's child run before any trial starts (concurrent first-time migrations of a
SQLite store crash), and records their ids in the job directory (``mlflow.json``) so a resumed
job continues the same runs. The tracker is a small picklable value: it travels to Ray
trials, which log through ``MlflowHooks`` with an ``MlflowClient`` bound to a run id — no
global "active run" state, safe in threads and processes (logging a ticket's model sets
MLflow's process-wide tracking URI while it runs, then puts it back; a job's trials all log to
one store).

Nothing logged is lost and nothing is logged twice: every operation is first written to the
trial's ``mlflow_pending.jsonl`` journal, then sent, then dropped from it; what the server does
not take (it is down) is sent in order once it answers again — on a later event, at the end of
the trial, or by ``ticketsearch sync JOB_DIR``. A resumed trial skips the epochs, rounds and
tickets it had already handed over (``mlflow_sent.json``), so MLflow sees every step once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
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


def ui_links(uri: str, base: str, job: str | None = None) -> tuple[str, str | None]:
    """The MLflow UI pages (under ``base``) of ``job``'s runs (an experiment name or a job id
    ``<name>-<hash>``), else of the latest job's, in the model-training view (MLflow 3 opens
    on its GenAI overview otherwise), and of its tickets: one row per ticket with its
    sparsity, accuracies, method and model (None for a job logged without that view).
    ``(base, None)`` if the store has no job."""
    parent = _latest_job_run(uri, job)
    if parent is None:
        return base, None
    experiment_id = parent.info.experiment_id
    runs = f"{base}/#/experiments/{experiment_id}/runs?{UI_VIEW}"
    key = TICKETS_VIEW + parent.data.tags["ticketsearch.spec_hash"]
    if SHARED_VIEW_TAG + key not in client_for(uri).get_experiment(experiment_id).tags:
        return runs, None
    return runs, f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={key}&{UI_VIEW}"


def _latest_job_run(uri: str, job: str | None):
    """The parent run of ``job`` (a name or id), else of the latest job; None without jobs."""
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
    if not runs and job is not None:
        raise TrackingError(f"no job {job!r} in {redact_uri(uri)}; `ticketsearch tickets` "
                            "lists the jobs with tickets")
    return runs[0] if runs else None


SHARED_VIEW_TAG = "mlflow.sharedViewState."  # how the MLflow UI stores a shared view
TICKETS_VIEW = "tickets-"
TICKET_COLUMNS = ["attributes.`Models`", "metrics.`sparsity`", "metrics.`test_acc`", "metrics.`val_acc`",
                  "metrics.`search_epochs`", "params.`method`", "params.`round`",
                  "params.`ticket`"]


def save_tickets_view(client, tracking: JobTracking, spec_hash: str) -> None:
    """Store the job's tickets view in its experiment (what ``ui_links`` points at): its ticket
    runs only, flat, sparsest first, with their metrics and method as columns."""
    state = {"searchFilter": f"tags.`ticketsearch.kind` = 'ticket' and "
                             f"tags.`ticketsearch.spec_hash` = '{spec_hash}'",
             "orderByKey": "metrics.`sparsity`", "orderByAsc": False,
             "selectedColumns": TICKET_COLUMNS,
             "runsExpanded": dict.fromkeys(tracking.trial_runs.values(), True)}
    client.set_experiment_tag(tracking.experiment_id, SHARED_VIEW_TAG + TICKETS_VIEW + spec_hash,
                              json.dumps(state))


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
    save_tickets_view(client, tracking, job.spec_hash())
    tracking.save(job_dir)
    return tracking


def log_report(job_dir: Path, report_dir: Path) -> None:
    """Attach a report folder to the job's parent run with its summary metrics (nothing for
    an untracked job)."""
    tracking = JobTracking.load(job_dir)
    if tracking is None:
        return
    client = client_for(tracking.uri)
    client.log_artifacts(tracking.parent_run_id, str(report_dir), "report")
    report_file = Path(report_dir) / "report.json"
    if report_file.exists():
        log_once(client, tracking.parent_run_id, job_metrics(json.loads(report_file.read_text())))


def job_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The parent run's summary metrics from ``report.json``: the dense baseline and, per
    method, its ticket count, search epochs (critical path and total), its best ticket (by
    validation accuracy) and its sparsest matching ticket."""
    values = {"dense_val_acc": report["dense"].get("val_acc"),
              "dense_test_acc": report["dense"].get("test_acc"),
              "makespan_s": report.get("makespan_s")}
    for name, method in report["methods"].items():
        best = max((t for t in method["tickets"] if t["val_acc"] is not None),
                   key=lambda t: (t["val_acc"], t["sparsity"]), default=None)
        matching = method["sparsest_matching"] or {}
        values |= {f"{name}.tickets": len(method["tickets"]),
                   f"{name}.critical_path_epochs": method["search_epochs"]["critical_path"],
                   f"{name}.search_epochs": method["search_epochs"]["total"],
                   f"{name}.best_sparsity": best and best["sparsity"],
                   f"{name}.best_test_acc": best and best["test_acc"],
                   f"{name}.sparsest_matching_sparsity": matching.get("sparsity"),
                   f"{name}.sparsest_matching_test_acc": matching.get("test_acc")}
    return {k: float(v) for k, v in values.items() if v is not None}


def log_once(client, run_id: str, values: dict[str, float]) -> None:
    """Log summary metrics at step 0, leaving out those the run already holds with the same
    value (a report written again adds no second point)."""
    from mlflow.entities import Metric

    held = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, 0) for k, v in values.items() if held.get(k) != v]
    if metrics:
        client.log_batch(run_id, metrics=metrics)


def finish_job_tracking(tracking: JobTracking, job_dir: Path, status: str = "FINISHED",
                        report: bool = False) -> None:
    """Attach the job summary (and, with ``report``, the report folder) to the parent run and
    close it with ``status``."""
    client = client_for(tracking.uri)
    summary = job_dir / "summary.json"
    if summary.exists():
        client.log_artifact(tracking.parent_run_id, str(summary))
    if report and (job_dir / "report").is_dir():
        log_report(job_dir, job_dir / "report")
    client.set_terminated(tracking.parent_run_id, status=status)


def _has_pending(trial_dir: Path) -> bool:
    journal = trial_dir / PENDING_FILE
    return journal.exists() and journal.stat().st_size > 0


# --- per-trial logging with a journal ---------------------------------------------------------


class RunLogger:
    """Sends operations to one MLflow run in order, through a journal (see the module
    docstring): ``submit`` appends an operation to the journal, then sends what it holds —
    right away, or, with ``background=True``, from a sender thread, so the trial never waits
    for the store (``close`` stops the thread and sends what is left).

    An operation may carry a ``mark`` — ``{"step": N}`` (epoch metrics up to step N) or
    ``{"key": K}`` (a round's or a ticket's metrics) — and ``marks`` holds every mark handed
    over so far (kept in ``mlflow_sent.json`` and in the journal), so a resumed trial can skip
    what it logged before. Sending an operation again is harmless: metrics keep their
    original timestamps (MLflow's store ignores an exact duplicate); tags, status and
    artifacts overwrite; a ticket's run is found again by its key."""

    def __init__(self, uri: str, run_id: str, journal: Path, background: bool = False):
        self.uri = uri
        self.run_id = run_id
        self.journal = Path(journal)
        self.sent_path = self.journal.with_name(SENT_FILE)
        self.client = client_for(uri)
        self._next_retry = 0.0
        self.marks = self._load_marks()
        self._file = threading.Lock()  # the journal file (appends vs the sender's rewrites)
        self._sending = threading.Lock()  # one sender at a time
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._send_in_background, daemon=True,
                                            name=f"mlflow-{run_id}")
            self._thread.start()

    def submit(self, op: dict[str, Any]) -> None:
        """Journal ``op`` and send everything waiting (at most every RETRY_INTERVAL_S while
        the server does not answer)."""
        with self._file:
            self._append(op)
        if op.get("mark"):
            self._remember(op["mark"])
        if self._thread is not None:
            self._wake.set()
        else:
            self.replay()

    def close(self) -> bool:
        """Stop the sender thread (if any) and send what is left; True when nothing is."""
        self.stop()
        return self.replay(force=True)

    def stop(self) -> None:
        """Stop the sender thread; what it had not sent stays in the journal."""
        if self._thread is not None:
            self._stopping = True
            self._wake.set()
            self._thread.join()
            self._thread = None

    def already_sent(self, mark: dict[str, Any]) -> bool:
        """True if an operation with ``mark`` (or, for a step, a later one) was handed over."""
        if "step" in mark:
            return mark["step"] <= self.marks["step"]
        return mark["key"] in self.marks["keys"]

    def replay(self, force: bool = False, background: bool = False) -> bool:
        """Try to send the journal in order; True when nothing is left waiting. Operations
        are dropped from the journal once sent (operations appended meanwhile stay). A
        ``background`` pass ends early when the sender is being stopped."""
        with self._sending:
            if not self.journal.exists():
                return True
            if not force and time.monotonic() < self._next_retry:
                return False
            with self._file:
                lines = self._lines()
            done = self._send(lines, background)
            with self._file:
                rest = self._lines()[done:]
                if rest:
                    self._rewrite(rest)
                else:
                    self.journal.unlink(missing_ok=True)
            if done < len(lines):
                self._next_retry = time.monotonic() + RETRY_INTERVAL_S
            return not rest

    def _send(self, lines: list[str], background: bool) -> int:
        """Send ``lines`` in order until one fails (or, in the background, until the sender
        is being stopped); how many were handled."""
        for index, line in enumerate(lines):
            if background and self._stopping:
                return index
            try:
                op = json.loads(line)
            except json.JSONDecodeError:  # cut short by a crash while being written
                continue
            try:
                self._apply(op)
            except Exception:
                return index
        return len(lines)

    def _send_in_background(self) -> None:
        while not self._stopping:
            self._wake.wait(max(RETRY_INTERVAL_S, 0.1))
            self._wake.clear()
            with contextlib.suppress(Exception):  # what failed stays journalled
                self.replay(background=True)

    def _lines(self) -> list[str]:
        if not self.journal.exists():
            return []
        return [line for line in self.journal.read_text().splitlines() if line.strip()]

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
        elif kind == "ticket_run":
            send_ticket_run(self.client, self.uri, self.run_id, op)
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

    Epoch metrics are batched (journalled every ``FLUSH_EVERY_S`` seconds) and always
    journalled before a checkpoint is written; a sender thread delivers the journal, so the
    trial does not wait for the store. Epochs, rounds and tickets that a resumed trial trains
    again after a crash are not sent again when an earlier attempt had handed them over.
    """

    def __init__(self, inner, uri: str, run_id: str):
        self.inner = inner
        self.logger = RunLogger(uri, run_id, Path(inner.dir) / PENDING_FILE, background=True)
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
        values = event.metrics() | {"epoch_seconds": event.seconds}
        for key in ("seconds", "round"):  # the step is the epoch; rounds are round_* steps
            values.pop(key, None)
        self.buffer.append(metrics_item(values, event.step))
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            self.flush()

    def round_end(self, event: RoundEvent) -> None:
        """A search round's sparsity and accuracy as ``round_*`` at step round + 1 (a
        retraining round's result is its ticket's, logged in the ticket's run)."""
        self.inner.round_end(event)
        self.flush()
        mark = {"key": f"round:{event.round}:"}
        if event.phase == "retrain" or self.logger.already_sent(mark):
            return
        values = {"round_sparsity": event.sparsity, "round_val_acc": event.val_acc,
                  "round_test_acc": event.test_acc}
        values = {k: v for k, v in values.items() if v is not None}
        self.logger.submit(metrics_op(values, event.round + 1) | {"mark": mark})

    def ticket_found(self, ticket: Ticket) -> None:
        self.inner.ticket_found(ticket)
        self.flush()
        mark = {"key": f"ticket:{ticket.name}"}
        if self.logger.already_sent(mark):
            return
        trial_dir = Path(self.inner.dir)
        layers = write_layer_report(ticket, trial_dir / "ticket_layers")
        self.logger.submit(ticket_run_op(ticket, trial_dir / "tickets" / ticket.name, layers)
                           | {"mark": mark})

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        self.flush()  # journalled before the checkpoint that accounts for it
        self.inner.save_checkpoint(state)

    def load_checkpoint(self) -> dict[str, Any] | None:
        return self.inner.load_checkpoint()

    def pack_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        self.flush()  # journalled before the group checkpoint that accounts for it
        return self.inner.pack_checkpoint(state)

    def unpack_checkpoint(self, state: dict[str, Any]) -> dict[str, Any]:
        return self.inner.unpack_checkpoint(state)

    def epochs_reported(self) -> int:
        return self.inner.epochs_reported()

    def attempt_started(self, start: float) -> None:
        self.inner.attempt_started(start)

    def attempt_windows(self) -> list[list[float]]:
        return self.inner.attempt_windows()

    def finish(self, result: TrialResult, status: str = "FINISHED") -> bool:
        """Log the trial's totals and close its run; True when everything reached MLflow."""
        self.flush()
        self.logger.submit(metrics_op(trial_totals(result), result.ledger.epochs()))
        result_file = Path(self.inner.dir) / "result.json"
        if result_file.exists():
            self.logger.submit({"op": "artifact", "local": str(result_file),
                                "artifact_path": None})
        self.logger.submit({"op": "terminate", "status": status})
        return self.logger.close()

    def stop(self) -> None:
        self.logger.stop()
        self.inner.stop()


EPOCH_SERIES = frozenset({"val_acc", "test_acc", "sparsity"})  # their last value is the final one


def trial_totals(result: TrialResult) -> dict[str, float]:
    """A trial run's summary metrics, logged once at its end: epochs, seconds and the
    method's final values not already the last point of an epoch series."""
    ledger = result.ledger
    values = {"epochs": ledger.epochs(), "wall_clock_s": ledger.wall_clock_s,
              "device_s": ledger.device_s}
    if ledger.recomputed_epochs:
        values["recomputed_epochs"] = ledger.recomputed_epochs
    values |= {k: v for k, v in result.final.items() if v is not None and k not in EPOCH_SERIES}
    return {k: float(v) for k, v in values.items()}


def ticket_metrics(ticket: Ticket) -> dict[str, float]:
    """A ticket run's metrics, under the same names for every method; the accuracies are
    the primary retraining recipe's, other recipes' are ``val_acc.<recipe>`` /
    ``test_acc.<recipe>``."""
    meta = ticket.meta
    values = {"sparsity": ticket.sparsity, "density": 1.0 - ticket.sparsity,
              "val_acc": meta.get("val_acc"), "test_acc": meta.get("test_acc"),
              "search_epochs": meta.get("search_epochs"),
              "retrain_epochs": meta.get("retrain_epochs"),
              "achieved_sparsity": meta.get("achieved_sparsity")}
    for recipe, result in (meta.get("recipes") or {}).items():
        if recipe != meta.get("recipe"):
            values[f"val_acc.{recipe}"] = result.get("val_acc")
            values[f"test_acc.{recipe}"] = result.get("test_acc")
    return {k: float(v) for k, v in values.items() if v is not None}


def ticket_params(ticket: Ticket) -> dict[str, str]:
    """A ticket run's params: what the ticket is and the method settings that made it."""
    meta = ticket.meta
    values = {"ticket": ticket.name, "method": meta.get("method"), "round": meta.get("round"),
              "seed": meta.get("seed"), "recipe": meta.get("recipe"),
              "target_sparsity": meta.get("target_sparsity"),
              "rewind_epoch": meta.get("rewind_epoch"), "model": meta.get("model"),
              "dataset": meta.get("dataset")}
    params = {k: str(v) for k, v in values.items() if v is not None}
    return flat_params(meta.get("settings") or {}) | params


def ticket_run_op(ticket: Ticket, ticket_dir: Path, layers: list[Path]) -> dict[str, Any]:
    """The journal operation that creates (or finds again) the ticket's run under its trial's
    run and logs its params, metrics, ticket, layer report and trained model."""
    return {"op": "ticket_run", "ticket": ticket.name, "params": ticket_params(ticket),
            "metrics": metrics_item(ticket_metrics(ticket), 0),
            "ticket_dir": str(ticket_dir), "layers": [str(p) for p in layers],
            "model": ticket.trained is not None}


TICKET_RUN_TAGS = ("ticketsearch.job", "ticketsearch.spec_hash", "method", "model", "dataset",
                   "trial_id")


def send_ticket_run(client, uri: str, trial_run_id: str, op: dict[str, Any]) -> str:
    """Apply a ``ticket_run`` operation; safe to repeat (the run and its model are found by
    their ``ticketsearch.ticket_key`` tag before anything is created). Returns the run id."""
    from mlflow.entities import Metric

    trial = client.get_run(trial_run_id)
    key = f"{trial_run_id}:{op['ticket']}"
    run_id = _ticket_run_id(client, trial, op["ticket"], key)
    _log_params(client, run_id, op["params"])
    item = op["metrics"]
    client.log_batch(run_id, metrics=[Metric(k, v, item["timestamp"], item["step"])
                                      for k, v in item["values"].items()])
    client.log_artifacts(run_id, op["ticket_dir"], "ticket")
    for path in op["layers"]:
        client.log_artifact(run_id, path, "layers")
    if op["model"]:
        log_ticket_model(client, uri, trial.info.experiment_id, run_id, key, op)
        client.set_tag(run_id, "ticketsearch.has_model", "true")
    client.set_terminated(run_id, status="FINISHED")
    return run_id


def run_by_key(client, experiment_id: str, key: str):
    """The ticket run tagged ``ticketsearch.ticket_key = key``, or None."""
    found = client.search_runs([experiment_id], f"tags.`ticketsearch.ticket_key` = '{key}'",
                               max_results=1)
    return found[0] if found else None


def model_by_key(client, experiment_id: str, key: str):
    """The logged model tagged ``ticketsearch.ticket_key = key``, or None."""
    found = client.search_logged_models(
        experiment_ids=[experiment_id], max_results=1,
        filter_string=f"tags.`ticketsearch.ticket_key` = '{key}'")
    return found[0] if found else None


def _ticket_run_id(client, trial, ticket: str, key: str) -> str:
    """The ticket's run: found by its key, else created as a child of the trial's run."""
    experiment_id = trial.info.experiment_id
    found = run_by_key(client, experiment_id, key)
    if found is not None:
        return found.info.run_id
    tags = {k: trial.data.tags[k] for k in TICKET_RUN_TAGS if k in trial.data.tags}
    tags |= {"mlflow.parentRunId": trial.info.run_id, "ticketsearch.kind": "ticket",
             "ticketsearch.ticket_key": key, "ticket": ticket,
             "ticketsearch.trial": trial.info.run_name}
    run = client.create_run(experiment_id, run_name=f"{trial.info.run_name} {ticket}", tags=tags)
    return run.info.run_id


def log_ticket_model(client, uri: str, experiment_id: str, run_id: str, key: str,
                     op: dict[str, Any]) -> str:
    """Log the ticket's trained sparse model as the run's MLflow PyTorch model ``model``
    (``runs:/<run>/model``), once: a model already logged under ``key`` is kept."""
    import logging

    import mlflow
    from mlflow.entities import LoggedModelStatus

    found = model_by_key(client, experiment_id, key)
    if found is not None and found.status == LoggedModelStatus.READY:
        return found.model_id
    if found is not None:  # an earlier try stopped half-way: its outputs may be linked
        client.delete_logged_model(found.model_id)
    model_id = client.create_logged_model(
        experiment_id, name="model", source_run_id=run_id, params=op["params"],
        tags={"ticketsearch.ticket_key": key, "ticket": op["ticket"]}).model_id
    model, example, signature = _model_with_example(Path(op["ticket_dir"]))
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # the pickle-format notice
    # log_model reads MLflow's process-wide state: one at a time (a fused group's members
    # send from threads of one process)
    with LOG_MODEL_LOCK, global_tracking_uri(uri):
        mlflow.pytorch.log_model(model, name="model", run_id=run_id, model_id=model_id,
                                 signature=signature, input_example=example,
                                 pip_requirements=model_requirements(),
                                 serialization_format="pickle")
    return model_id


LOG_MODEL_LOCK = threading.Lock()


@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """MLflow's process-wide tracking URI set to ``uri`` for the block, then put back as it
    was, ``MLFLOW_TRACKING_URI`` included (``mlflow.set_tracking_uri`` also sets it)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    env, before = os.environ.get("MLFLOW_TRACKING_URI"), getattr(utils, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _model_with_example(ticket_dir: Path):
    """The ticket's trained model (eval mode), an input example of one zero example and the
    signature of its input and output."""
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    from .tickets import load_ticket_dir

    ticket = load_ticket_dir(ticket_dir)
    model = ticket.trained_model()
    example = np.zeros((1, *ticket.meta["input_shape"]), dtype=np.float32)
    with torch.no_grad():
        output = model(torch.from_numpy(example)).numpy()
    return model, example, infer_signature(example, output)


def model_requirements() -> list[str]:
    """What loading a logged ticket model needs: torch and ticketsearch (whose model classes
    the pickled model refers to)."""
    import torch

    from . import __version__

    return [f"torch=={torch.__version__.split('+')[0]}", f"ticketsearch=={__version__}"]


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
    """The ticket logged as artifact ``uri`` (``runs:/<ticket run id>/ticket``; resolved in
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
    """Every ticket logged in the store (one run each), sparsest first; ``job`` is an
    experiment name (every job of it) or a job id ``<name>-<spec hash>`` (that job only)."""
    check_reachable(uri)
    client = client_for(uri)
    experiments = client.search_experiments()
    query = "tags.`ticketsearch.kind` = 'ticket'"
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
    rows = [ticket_row(run, experiment.name) for experiment in experiments
            for run in _all_runs(client, experiment.experiment_id, query)]
    rows = [r for r in rows if r["sparsity"] >= min_sparsity]
    return sorted(rows, key=lambda r: (-r["sparsity"], -(r["test_acc"] or 0)))


def _all_runs(client, experiment_id: str, query: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            return runs


def ticket_row(run, experiment: str) -> dict[str, Any]:
    """What ``ticketsearch tickets`` shows of a ticket run."""
    tags, metrics, run_id = run.data.tags, run.data.metrics, run.info.run_id
    return {
        "experiment": experiment,
        "job_id": f"{tags.get('ticketsearch.job')}-{tags.get('ticketsearch.spec_hash')}",
        "method": tags.get("method"), "trial": tags.get("ticketsearch.trial", ""),
        "name": tags.get("ticket"), "sparsity": metrics.get("sparsity", 0.0),
        "val_acc": metrics.get("val_acc"), "test_acc": metrics.get("test_acc"),
        "run_id": run_id, "artifact": f"runs:/{run_id}/ticket",
        "model": f"runs:/{run_id}/model" if tags.get("ticketsearch.has_model") else None,
    }


# --- the model registry ------------------------------------------------------------------------


def find_ticket_run(uri: str, what: str):
    """The ticket run named by ``what``: a ticket run's id, a ``runs:/<id>[/...]`` URI, or a
    ticket directory of a tracked job (``<job dir>/trials/<trial>/tickets/<name>``)."""
    client = client_for(uri)
    path = Path(what)
    if path.is_dir() and (path / "ticket.json").exists():
        return _run_of_ticket_dir(client, path)
    run_id = what.removeprefix("runs:/").strip("/").split("/", 1)[0]
    try:
        run = client.get_run(run_id)
    except Exception as err:
        raise TrackingError(f"no run {run_id!r} in {redact_uri(uri)}: pass a ticket run's id, "
                            "its runs:/ URI or a ticket directory (`ticketsearch tickets` lists "
                            "them)") from err
    if run.data.tags.get("ticketsearch.kind") != "ticket":
        raise TrackingError(f"run {run_id} is not a ticket's run; `ticketsearch tickets` lists "
                            "the ticket runs")
    return run


def _run_of_ticket_dir(client, path: Path):
    path = path.resolve()  # <job dir>/trials/<trial>/tickets/<name>
    job_dir, trial_id = path.parents[3], path.parents[1].name
    tracking = JobTracking.load(job_dir)
    trial_run = tracking and tracking.trial_runs.get(trial_id)
    if not trial_run:
        raise TrackingError(f"{path}: its job ({job_dir}) was not tracked in MLflow, so the "
                            "ticket has no run to register")
    experiment_id = client.get_run(trial_run).info.experiment_id
    found = run_by_key(client, experiment_id, f"{trial_run}:{path.name}")
    if found is None:
        raise TrackingError(f"{path}: no run of this ticket in MLflow yet; `ticketsearch sync "
                            f"{job_dir}` sends what the server missed")
    return found


def register_ticket(uri: str, what: str, name: str) -> tuple[str, str]:
    """Register the trained model of the ticket ``what`` (see ``find_ticket_run``) as a new
    version of registered model ``name``, tagged with the ticket's sparsity, accuracy,
    method and job; returns (version, model URI)."""
    import mlflow

    client = client_for(uri)
    run = find_ticket_run(uri, what)
    tags = run.data.tags
    if not tags.get("ticketsearch.has_model"):
        raise TrackingError(f"ticket run {run.info.run_id} has no trained model (retraining was "
                            "off, or the ticket was logged before tickets kept their models)")
    found = model_by_key(client, run.info.experiment_id, tags["ticketsearch.ticket_key"])
    model_uri = f"models:/{found.model_id}"
    metrics = run.data.metrics
    version_tags = {"ticket": tags.get("ticket"), "method": tags.get("method"),
                    "job_id": f"{tags.get('ticketsearch.job')}-{tags.get('ticketsearch.spec_hash')}",
                    "trial": tags.get("ticketsearch.trial"), "run_id": run.info.run_id,
                    **{k: f"{metrics[k]:.6g}" for k in ("sparsity", "val_acc", "test_acc")
                       if k in metrics}}
    with global_tracking_uri(uri):
        version = mlflow.register_model(model_uri, name,
                                        tags={k: v for k, v in version_tags.items() if v})
    return version.version, f"models:/{name}/{version.version}"
