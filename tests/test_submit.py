"""Job submission (``ticketsearch submit|status|logs|stop``).

The address/token/storage rules are checked in-process. The integration tests start a real
two-node Ray cluster on 127.0.0.1 with token authentication on (a fresh token made with
``ray get-auth-token --generate``, as a user would), submit a tiny CS sweep through the
command line and check what lands in the storage folder. The cluster comes from
``raycluster.ray_cluster`` (shared with tests/test_deploy.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from raycluster import ENV_NAMES, HOST, ray_cluster, run_cli
from servers import free_port

from ticketsearch.spec import SpecError, load_job
from ticketsearch.submit import (
    SubmitError,
    build_entrypoint,
    check_storage,
    find_token,
    follow_logs,
    job_info,
    job_logs,
    job_status,
    resolve_address,
    stop_job,
    submission_id,
    submit_job,
)

JOB_TIMEOUT_S = 120.0

JOB_YAML = """\
name: submit-smoke
data: {dataset: digits}
model: {name: mlp, mlp_hidden: [32, 16]}
train:
  epochs_per_round: 3
  lr_milestones: [2]
  rewind_epoch: 1
  device: cpu
methods:
  cs:
    rounds: 2
    sweep: {mask_init: [0.0, -0.01]}
resources: {cpus: 0.5}
"""
TRIAL_IDS = ["cs-s0=0-lam=1e-08-beta=200-seed=0", "cs-s0=-0.01-lam=1e-08-beta=200-seed=0"]


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No Ray address or token settings from the caller; HOME without ~/.ray/auth_token."""
    for name in ENV_NAMES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


@pytest.fixture
def job_file(tmp_path) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(JOB_YAML)
    return path


# --------------------------------------------------------------------------- address, token


def test_address_argument_wins_over_the_environment(clean_env):
    clean_env.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")
    clean_env.setenv("RAY_ADDRESS", "http://ray:8265")
    assert resolve_address("http://head:8265/") == "http://head:8265"
    assert resolve_address(None) == "http://api:8265"
    clean_env.delenv("RAY_API_SERVER_ADDRESS")
    assert resolve_address(None) == "http://ray:8265"
    assert resolve_address("head:8265") == "http://head:8265"
    assert resolve_address("https://head.example:443") == "https://head.example:443"


def test_missing_or_client_address_is_a_clear_error(clean_env):
    with pytest.raises(SubmitError, match=r"no Ray cluster address: pass --address "
                                          r"http://HEAD:8265 .*RAY_API_SERVER_ADDRESS"):
        resolve_address(None)
    with pytest.raises(SubmitError, match=r"ray://head:10001 is a Ray Client address"):
        resolve_address("ray://head:10001")


def test_token_precedence_env_then_path_then_home_file(clean_env, tmp_path):
    assert find_token()[0] is None
    home_token = tmp_path / "home" / ".ray" / "auth_token"
    home_token.parent.mkdir(parents=True)
    home_token.write_text("home-token\n")
    assert find_token() == ("home-token", str(home_token))
    path_token = tmp_path / "token"
    path_token.write_text("  path-token  ")
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(path_token))
    assert find_token() == ("path-token", f"{path_token} (RAY_AUTH_TOKEN_PATH)")
    clean_env.setenv("RAY_AUTH_TOKEN", "env-token")
    assert find_token() == ("env-token", "the RAY_AUTH_TOKEN environment variable")
    clean_env.setenv("RAY_AUTH_MODE", "disabled")
    assert find_token() == (None, "none (RAY_AUTH_MODE=disabled)")


def test_token_path_that_is_missing_is_a_clear_error(clean_env, tmp_path):
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "absent"))
    with pytest.raises(SubmitError, match=r"RAY_AUTH_TOKEN_PATH=.*absent: the file is missing "
                                          r"or empty; .*ray get-auth-token"):
        find_token()


# --------------------------------------------------------------------------- submission parts


def test_submission_id_entrypoint_and_storage_rules(job_file):
    job = load_job(job_file)
    assert submission_id(job, now=1700000000.7) == \
        f"ticketsearch-submit-smoke-{job.spec_hash()}-1700000000"
    assert build_entrypoint() == "python -m ticketsearch.cli run job.yaml"
    assert build_entrypoint("/shared/my runs", ["--no-tracking"]) == \
        "python -m ticketsearch.cli run job.yaml --storage '/shared/my runs' --no-tracking"
    check_storage(job, "/shared/runs")
    with pytest.raises(SubmitError, match=r"--storage='s3://bucket/runs' is a URI.*buckets"):
        check_storage(job, "s3://bucket/runs")
    with pytest.raises(SubmitError, match=r"storage.path='./ticketsearch-runs' is relative.*"
                                          r"pass --storage /absolute/path"):
        check_storage(job, None)
    with pytest.raises(SubmitError, match=r"--storage='runs' is relative"):
        check_storage(job, "runs")


def test_invalid_spec_fails_before_anything_is_sent(clean_env, job_file):
    closed = f"http://{HOST}:{free_port()}"
    with pytest.raises(SpecError, match=r"train.epochs_per_round"):
        submit_job(job_file, closed, ["train.epochs_per_round=0"], storage="/tmp/x")
    with pytest.raises(SubmitError, match=r"storage.path='./ticketsearch-runs' is relative"):
        submit_job(job_file, closed)


def test_a_job_agent_not_up_yet_is_waited_for(monkeypatch):
    """A head that has just started answers 500 "No available agent ... try again later"
    until its job agent is up (seen under load in CI): the call is tried again."""
    import ticketsearch.submit as submit

    monkeypatch.setattr(submit.time, "sleep", lambda s: None)
    api = object.__new__(submit._Api)
    api.url = "http://127.0.0.1:1"
    answers = iter([RuntimeError("Request failed with status code 500: No available agent to "
                                 "submit job, please try again later.")] * 2 + ["raysubmit_1"])

    def submit_once():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert api.call("submit the job", submit_once) == "raysubmit_1"
    monkeypatch.setattr(submit, "AGENT_WAIT_S", 0.0)
    never = RuntimeError("Request failed with status code 500: No available agent to submit "
                         "job, please try again later.")
    with pytest.raises(submit.SubmitError, match="No available agent"):
        api.call("submit the job", lambda: (_ for _ in ()).throw(never))


def test_closed_port_exits_2_naming_the_address(job_file, tmp_path):
    closed = f"http://{HOST}:{free_port()}"
    env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES}
    for argv in (["status", "ticketsearch-x-1", "--address", closed],
                 ["submit", str(job_file), "--address", closed, "--storage",
                  str(tmp_path / "runs")]):
        done = run_cli(*argv, env=env)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: cannot reach the Ray job API at {closed} ")
        assert "http://HEAD:8265" in done.stderr and "Traceback" not in done.stderr
        assert done.stdout == ""


# --------------------------------------------------------------------------- a real cluster


@pytest.fixture(scope="module")
def cluster():
    """A head (dashboard on) and a worker node, 1 CPU each, on 127.0.0.1, token auth on."""
    with ray_cluster() as running:
        yield running


@pytest.mark.integration
def test_submitted_sweep_succeeds_on_a_two_node_cluster(cluster, job_file, clean_env):
    storage = cluster.root / "runs"
    done = run_cli("submit", str(job_file), "--address", cluster.address,
                   "--storage", str(storage), env=cluster.env)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.splitlines()[0]
    job = load_job(job_file)
    assert re.fullmatch(rf"ticketsearch-submit-smoke-{job.spec_hash()}-\d{{10}}", job_id)
    assert f"ticketsearch logs {job_id} --address {cluster.address} --follow" in done.stdout

    follow = run_cli("logs", job_id, "--address", cluster.address, "--follow",
                     "--timeout", str(JOB_TIMEOUT_S), env=cluster.env,
                     timeout=JOB_TIMEOUT_S + 30)
    assert follow.returncode == 0, follow.stdout[-3000:] + follow.stderr[-3000:]
    assert follow.stdout.rstrip().endswith(f"job {job_id}: SUCCEEDED")

    status = run_cli("status", job_id, "--address", cluster.address, env=cluster.env)
    assert status.returncode == 0 and status.stdout.splitlines()[0] == "SUCCEEDED"
    logs = run_cli("logs", job_id, "--address", cluster.address, env=cluster.env)
    job_dir = storage / f"submit-smoke-{job.spec_hash()}"
    assert f"results in {job_dir}" in logs.stdout
    assert logs.stdout in follow.stdout  # --follow printed the same log, then the status

    for trial_id in TRIAL_IDS:
        result = json.loads((job_dir / "trials" / trial_id / "result.json").read_text())
        assert result["trial_id"] == trial_id
    assert (storage / "mlflow.db").exists()  # tracking on: the local SQLite store
    spec_on_cluster = load_job(job_dir / "spec.yaml")
    assert spec_on_cluster.spec_hash() == job.spec_hash()

    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    info = job_info(cluster.address, job_id)
    assert info["metadata"]["ticketsearch_job"] == "submit-smoke"
    assert info["metadata"]["spec_hash"] == job.spec_hash()
    assert info["entrypoint"] == f"python -m ticketsearch.cli run job.yaml --storage {storage}"


@pytest.mark.integration
def test_token_is_required_and_checked(cluster, clean_env):
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    with pytest.raises(SubmitError, match=rf"no job ticketsearch-nope on the Ray cluster at "
                                          rf"{re.escape(cluster.address)}"):
        job_status(cluster.address, "ticketsearch-nope")
    clean_env.setenv("RAY_AUTH_TOKEN", "0" * 64)
    with pytest.raises(SubmitError, match=r"rejected the token \(token sent: the RAY_AUTH_TOKEN "
                                          r"environment variable\); copy the head's token"):
        job_status(cluster.address, "ticketsearch-nope")
    clean_env.setenv("RAY_AUTH_MODE", "disabled")
    with pytest.raises(SubmitError, match=r"requires a token \(token sent: none "
                                          r"\(RAY_AUTH_MODE=disabled\)\)"):
        job_logs(cluster.address, "ticketsearch-nope")


@pytest.mark.integration
def test_stop_ends_a_running_job(cluster, clean_env, job_file, tmp_path):
    clean_env.setenv("RAY_AUTH_TOKEN_PATH", str(cluster.token_path))
    job_id = submit_job(job_file, cluster.address, ["train.epochs_per_round=500",
                                                    "train.lr_milestones=[400]"],
                        storage=str(tmp_path / "runs"), extra_args=["--no-tracking"])
    assert stop_job(cluster.address, job_id) is True
    assert follow_logs(cluster.address, job_id, lambda _: None, timeout_s=30,
                       poll_s=0.5) == "STOPPED"
    assert stop_job(cluster.address, job_id) is False
