"""Submitting jobs to a remote Ray cluster through its Job API (the head's dashboard, port 8265).

``submit_job`` validates the spec here, writes the normalised spec (overrides applied) as
``job.yaml`` into a fresh working directory and submits ``python -m ticketsearch.cli run
job.yaml`` with that directory and this installed ``ticketsearch`` package as the job's
runtime environment, so the cluster runs exactly this code (its Python dependencies come from
the cluster's own environment). The job's own code goes with it as Ray ``py_modules``: the
Python modules and packages of the spec's folder and the current directory (the folders a
local ``run`` imports from) and ``code.py_modules``; ``code.pip`` requirements become Ray's
``pip`` (``code_to_ship``, ``runtime_env``). ``job_status``, ``job_logs``, ``stop_job`` and
``follow_logs`` query the same API.

Addresses: the ``address`` argument, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``;
an explicit address always wins (Ray's own client would let the environment override it).
Token authentication: the token is sent as ``Authorization: Bearer <token>``, taken from
``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``;
``RAY_AUTH_MODE=disabled`` sends none. Ray is imported lazily, inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .spec import JobSpec, dump_job, load_job

ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
TOKEN_ENV_VAR = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV_VAR = "RAY_AUTH_TOKEN_PATH"
AUTH_MODE_ENV_VAR = "RAY_AUTH_MODE"
JOB_FILE = "job.yaml"
ENTRYPOINT = ["python", "-m", "ticketsearch.cli", "run", JOB_FILE]
TERMINAL_STATUSES = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
UPLOAD_EXCLUDES = ["__pycache__/", "*.pyc", ".git/"]
POLL_S = 2.0


class SubmitError(RuntimeError):
    """The job cannot be submitted or queried: no or unreachable address, a refused token,
    an unknown job id, or a storage path the cluster cannot use."""


class JobWaitTimeout(TimeoutError):
    """The job did not reach a terminal status within the time allowed."""


# --- address and token ------------------------------------------------------------------------


def resolve_address(address: str | None) -> str:
    """The Job API URL: ``address``, else ``RAY_API_SERVER_ADDRESS``, else ``RAY_ADDRESS``.

    ``HOST:PORT`` gets ``http://``; a trailing slash is dropped. Raises SubmitError when none
    is given or the address is a Ray Client (``ray://``) address.
    """
    chosen = address or next((os.environ[v] for v in ADDRESS_ENV_VARS if os.environ.get(v)),
                             None)
    if not chosen:
        raise SubmitError("no Ray cluster address: pass --address http://HEAD:8265 (the head's "
                          "dashboard) or set RAY_API_SERVER_ADDRESS (or RAY_ADDRESS)")
    chosen = chosen.strip().rstrip("/")
    if chosen.startswith("ray://"):
        raise SubmitError(f"{chosen} is a Ray Client address; jobs are submitted to the "
                          "head's dashboard: pass --address http://HEAD:8265")
    if "://" not in chosen:
        chosen = f"http://{chosen}"
    if not chosen.startswith(("http://", "https://")):
        raise SubmitError(f"{chosen}: the address must be http://HOST:PORT or https://HOST:PORT "
                          "(the head's dashboard, port 8265 by default)")
    return chosen


def find_token() -> tuple[str | None, str]:
    """The cluster token this client sends and where it came from (for error messages).

    ``RAY_AUTH_MODE=disabled`` -> none; else ``RAY_AUTH_TOKEN``, else the file named by
    ``RAY_AUTH_TOKEN_PATH`` (SubmitError if unreadable or empty), else ``~/.ray/auth_token``
    if it exists, else none.
    """
    if os.environ.get(AUTH_MODE_ENV_VAR, "").lower() == "disabled":
        return None, f"none ({AUTH_MODE_ENV_VAR}=disabled)"
    if os.environ.get(TOKEN_ENV_VAR, "").strip():
        return os.environ[TOKEN_ENV_VAR].strip(), f"the {TOKEN_ENV_VAR} environment variable"
    if os.environ.get(TOKEN_PATH_ENV_VAR):
        path = Path(os.environ[TOKEN_PATH_ENV_VAR]).expanduser()
        token = _read_token(path)
        if token is None:
            raise SubmitError(f"{TOKEN_PATH_ENV_VAR}={path}: the file is missing or empty; "
                              "put the cluster's token there (`ray get-auth-token` on the head "
                              "prints it) or unset the variable")
        return token, f"{path} ({TOKEN_PATH_ENV_VAR})"
    default = Path.home() / ".ray" / "auth_token"
    token = _read_token(default)
    if token is not None:
        return token, str(default)
    return None, f"none (no {TOKEN_ENV_VAR}, {TOKEN_PATH_ENV_VAR} or {default})"


def _read_token(path: Path) -> str | None:
    """The stripped contents of a token file, or None if it is missing, unreadable or empty."""
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return token or None


@contextlib.contextmanager
def _address_env_cleared() -> Iterator[None]:
    """Hide RAY_API_SERVER_ADDRESS / RAY_ADDRESS while Ray's client resolves its address,
    so the address we resolved (an explicit one included) is the one it uses."""
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV_VARS if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


# --- talking to the Job API -------------------------------------------------------------------


AGENT_WAIT_S = 60.0  # how long a just-started head may take to bring up its job agent


class _AgentNotReady(RuntimeError):
    """The Job API answered that no job agent is available yet ("try again later")."""


class _Api:
    """A connected ``JobSubmissionClient`` whose failures become SubmitErrors that name the
    address and what to check."""

    def __init__(self, address: str | None):
        self.url = resolve_address(address)
        self.token, self.token_source = find_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = self.call("connect", lambda: self._connect(headers))

    def _connect(self, headers: dict[str, str]):
        from ray.job_submission import JobSubmissionClient

        with _address_env_cleared():
            return JobSubmissionClient(self.url, headers=headers)

    def call(self, action: str, fn: Callable[[], Any], job_id: str | None = None) -> Any:
        """Run ``fn`` and translate connection, authentication and request failures. While
        the cluster says its job agent is not up yet (a head that has just started), try
        again for up to ``AGENT_WAIT_S`` seconds."""
        deadline = time.monotonic() + AGENT_WAIT_S
        while True:
            try:
                return self._call_once(action, fn, job_id)
            except _AgentNotReady as err:
                if time.monotonic() >= deadline:
                    raise SubmitError(f"the Ray job API at {self.url} refused to {action}: "
                                      f"{err} (for {AGENT_WAIT_S:.0f} s)") from None
                time.sleep(1.0)

    def _call_once(self, action: str, fn: Callable[[], Any], job_id: str | None) -> Any:
        import requests
        from ray.exceptions import AuthenticationError

        try:
            return fn()
        except AuthenticationError:
            raise SubmitError(self._auth_message()) from None
        except (ConnectionError, requests.RequestException) as err:
            raise SubmitError(
                f"cannot reach the Ray job API at {self.url} ({action}: {_first_line(err)}); "
                "check the address (the head's dashboard, http://HEAD:8265 by default), that "
                "the cluster is up, and that its dashboard listens on an address you can reach "
                "(ray start --head --dashboard-host 0.0.0.0)") from None
        except RuntimeError as err:
            text = str(err)
            if "No available agent" in text:
                raise _AgentNotReady(_first_line(err)) from None
            if job_id is not None and ("404" in text or "does not exist" in text):
                raise SubmitError(f"no job {job_id} on the Ray cluster at {self.url}; "
                                  f"`ray job list --address {self.url}` lists its jobs") from None
            raise SubmitError(f"the Ray job API at {self.url} refused to {action}: "
                              f"{_first_line(err)}") from None

    def _auth_message(self) -> str:
        # Which one is decided by what was sent, not by parsing the error text (a port number
        # such as 47903 contains "403").
        refused, what = ("rejected", "the token") if self.token else ("requires", "a token")
        return (f"the Ray cluster at {self.url} {refused} {what} (token sent: "
                f"{self.token_source}); copy the head's token (`ray get-auth-token` on the head "
                f"prints it) and set {TOKEN_ENV_VAR}=<token> or {TOKEN_PATH_ENV_VAR}=<file>, "
                "or put it in ~/.ray/auth_token")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# --- submission -------------------------------------------------------------------------------


def package_dir() -> Path:
    """The directory of the installed ``ticketsearch`` package (shipped as a py_module)."""
    return Path(__file__).resolve().parent


def submission_id(job: JobSpec, now: float | None = None) -> str:
    """``ticketsearch-<job name>-<spec hash>-<unix time>``."""
    stamp = int(time.time() if now is None else now)
    return f"ticketsearch-{job.name}-{job.spec_hash()}-{stamp}"


def build_entrypoint(storage: str | None = None, extra_args: Sequence[str] = ()) -> str:
    """The shell command the cluster runs in the job's working directory."""
    args = list(ENTRYPOINT)
    if storage is not None:
        args += ["--storage", storage]
    return shlex.join(args + list(extra_args))


def check_storage(job: JobSpec, storage: str | None) -> None:
    """Refuse storage the cluster cannot use: a bucket URI (the job directory must be a
    filesystem path) or a relative path (it would resolve inside the job's temporary working
    directory, which Ray deletes)."""
    path = storage if storage is not None else job.storage.path
    field = "--storage" if storage is not None else "storage.path"
    if "://" in path:
        raise SubmitError(
            f"{field}={path!r} is a URI: the job directory must be a filesystem path every node "
            "sees at the same place (e.g. an NFS/EFS/Filestore mount); buckets are not "
            "supported as job storage")
    if Path(path).is_absolute():
        return
    raise SubmitError(
        f"{field}={path!r} is relative: on the cluster it would resolve inside the job's "
        "temporary working directory; pass --storage /absolute/path (a folder every node "
        "sees at the same path, e.g. a shared file system) or set storage.path to one")


def runtime_env(working_dir: Path, code: Sequence[Path] = (),
                pip: Sequence[str] = ()) -> dict[str, Any]:
    """The job's runtime environment: the folder holding ``job.yaml`` as working_dir, this
    ticketsearch package and the job's ``code`` as py_modules, ``pip`` requirements if any."""
    env: dict[str, Any] = {"working_dir": str(working_dir),
                           "py_modules": [str(package_dir()), *map(str, code)],
                           "excludes": list(UPLOAD_EXCLUDES)}
    if pip:
        env["pip"] = list(pip)
    return env


def code_to_ship(job_path: str | Path, job: JobSpec, extra: Sequence[str] = ()) -> list[Path]:
    """The job's own code, each entry a py_module: the top-level ``*.py`` modules and packages
    (folders with an ``__init__.py``) of the spec's folder, then of the current directory
    (the first of a name wins; never one named ticketsearch, hidden or dunder names), then
    ``job.code.py_modules`` (relative to the spec's folder) and ``extra`` (relative to the
    current directory). SubmitError for an explicit path that does not exist."""
    spec_folder = Path(job_path).resolve().parent
    found: dict[str, Path] = {}
    for folder in (spec_folder, Path.cwd().resolve()):
        for entry in sorted(folder.iterdir()):
            name = entry.stem if entry.suffix == ".py" else entry.name
            if _is_module(entry) and name not in found:
                found[name] = entry
    explicit = [("code.py_modules", spec_folder / p) for p in job.code.py_modules]
    explicit += [("--py-module", Path(p).resolve()) for p in extra]
    for field, path in explicit:
        if not path.exists():
            raise SubmitError(f"{field}: {path} does not exist; name a package folder or a "
                              ".py file to ship")
        found[path.stem if path.suffix == ".py" else path.name] = path.resolve()
    return list(found.values())


def _is_module(entry: Path) -> bool:
    name = entry.stem if entry.suffix == ".py" else entry.name
    if name.startswith((".", "__")) or name == "ticketsearch" or not name.isidentifier():
        return False
    if entry.is_file():
        return entry.suffix == ".py"
    return (entry / "__init__.py").is_file()


def submit_job(job_path: str | Path, address: str | None = None, overrides: Sequence[str] = (),
               storage: str | None = None, extra_args: Sequence[str] = (), ship: bool = True,
               py_modules: Sequence[str] = (), pip: Sequence[str] = ()) -> str:
    """Validate ``job_path`` (with ``overrides``) here, then submit it to the cluster's Job API.

    The cluster runs ``python -m ticketsearch.cli run job.yaml [--storage STORAGE]
    [EXTRA_ARGS]`` on the normalised spec, with this ticketsearch package as a py_module and,
    unless ``ship`` is False, the job's own code (``code_to_ship``, plus ``py_modules``);
    ``code.pip`` and ``pip`` are installed there. Returns the submission id. Raises
    SpecError for an invalid spec and SubmitError for a relative storage path, a code path
    that does not exist, a missing/unreachable address or a refused token; nothing is sent
    unless the spec is valid.
    """
    job = load_job(job_path, overrides)
    check_storage(job, storage)
    code = code_to_ship(job_path, job, py_modules) if ship else []
    requirements = [*job.code.pip, *pip]
    api = _Api(address)
    job_id = submission_id(job)
    with tempfile.TemporaryDirectory(prefix="ticketsearch-submit-") as folder:
        (Path(folder) / JOB_FILE).write_text(dump_job(job), encoding="utf-8")
        return api.call("submit the job", lambda: api.client.submit_job(
            entrypoint=build_entrypoint(storage, extra_args),
            submission_id=job_id,
            runtime_env=runtime_env(Path(folder), code, requirements),
            metadata={"ticketsearch_job": job.name, "spec_hash": job.spec_hash()},
        ))


# --- queries ----------------------------------------------------------------------------------


def job_info(address: str | None, job_id: str) -> dict[str, Any]:
    """Status, message, entrypoint, metadata and start/end times (ms) of a submitted job."""
    api = _Api(address)
    info = api.call("read the job", lambda: api.client.get_job_info(job_id), job_id)
    return {"submission_id": job_id, "status": str(info.status.value), "message": info.message,
            "entrypoint": info.entrypoint, "metadata": dict(info.metadata or {}),
            "start_time": info.start_time, "end_time": info.end_time}


def job_status(address: str | None, job_id: str) -> str:
    """PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED."""
    return job_info(address, job_id)["status"]


def job_logs(address: str | None, job_id: str) -> str:
    """Everything the job's entrypoint has written to stdout and stderr so far."""
    api = _Api(address)
    return api.call("read the logs", lambda: api.client.get_job_logs(job_id), job_id)


def stop_job(address: str | None, job_id: str) -> bool:
    """Ask the cluster to stop the job; True if it was still running."""
    api = _Api(address)
    return bool(api.call("stop the job", lambda: api.client.stop_job(job_id), job_id))


def follow_logs(address: str | None, job_id: str, echo: Callable[[str], None],
                timeout_s: float | None = None, poll_s: float = POLL_S) -> str:
    """Pass the job's new log text to ``echo`` as it appears until the job ends; returns the
    terminal status. Raises JobWaitTimeout if ``timeout_s`` passes first."""
    api = _Api(address)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    shown = 0
    while True:
        status = _status(api, job_id)
        logs = api.call("read the logs", lambda: api.client.get_job_logs(job_id), job_id)
        if len(logs) < shown:  # the log was rotated or truncated: show it again
            shown = 0
        if len(logs) > shown:
            echo(logs[shown:])
            shown = len(logs)
        if status in TERMINAL_STATUSES:
            return status
        _sleep_or_time_out(job_id, status, deadline, poll_s)


def _status(api: _Api, job_id: str) -> str:
    info = api.call("read the job", lambda: api.client.get_job_info(job_id), job_id)
    return str(info.status.value)


def _sleep_or_time_out(job_id: str, status: str, deadline: float | None, poll_s: float) -> None:
    if deadline is not None and time.monotonic() >= deadline:
        raise JobWaitTimeout(f"job {job_id} is still {status}; it keeps running on the "
                             "cluster (`ticketsearch status` / `ticketsearch stop`)")
    wait = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
    time.sleep(wait)
