"""deploy/: Ray cluster launcher configs, KubeRay manifests, the image and the MLflow server.

The configs cannot be launched here (no cloud), so they are checked against what the
installed Ray accepts (its own JSON schema and config preparation), against each other (one
image, built FROM the installed Ray's image; one shared storage path; token auth; secrets
only referenced), and the job spec the RayJob runs is validated by ticketsearch itself.

The integration tests run the pieces that can run on one machine: the MLflow server script
the head nodes use, and a two-node Ray cluster on 127.0.0.1 (each node with its own custom
resource) that runs a submitted job whose trials land on both nodes, write into one shared
storage folder and log to the one MLflow server that the head's environment names.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import requests
import yaml
from raycluster import REPO, VENV_BIN, ray_cluster, run_cli
from servers import free_port, group_alive

from ticketsearch.spec import load_job

DEPLOY = REPO / "deploy"
LAUNCHER_CONFIGS = {"aws": DEPLOY / "aws.yaml", "gcp": DEPLOY / "gcp.yaml"}
KUBERAY = DEPLOY / "kuberay"
MLFLOW_SCRIPT = DEPLOY / "mlflow-server.sh"
RAY_VERSION = ray.__version__
BASE_IMAGE = f"rayproject/ray:{RAY_VERSION}-py311-gpu"
SHARED = "/mnt/shared"
TOKEN_PATH = "/run/secrets/ticketsearch/ray_auth_token"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands",
                "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
CREDENTIALS_IN_URL = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
SECRET_ENV_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|_URI$")


def project_image_tag() -> str:
    """``ticketsearch:<package version>-ray<Ray version>-py311-gpu``: the tag every config
    pulls and the Dockerfile's comment tells to build."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    return f"ticketsearch:{version}-ray{RAY_VERSION}-py311-gpu"


def load_yaml(path: Path) -> Any:
    """The one YAML document in ``path``."""
    return yaml.safe_load(path.read_text())


def kuberay_docs() -> list[dict[str, Any]]:
    """Every document of every KubeRay manifest."""
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """The single document of ``kind`` (fails if there are none or several)."""
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def strings(value: Any) -> Iterator[str]:
    """Every string inside a parsed YAML value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings(item)


# --------------------------------------------------------------------------- cluster launcher


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_is_valid_for_the_installed_ray(cloud):
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load_yaml(LAUNCHER_CONFIGS[cloud])
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    jsonschema.validate(config, json.loads(schema_path.read_text()))
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before launching
    validate_config(prepared)
    for key in COMMAND_KEYS:  # our commands, not the provider defaults'
        assert prepared[key] == config[key], key


def node_types(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The head node type and the worker node types of a launcher config."""
    types = dict(config["available_node_types"])
    head = types.pop(config["head_node_type"])
    return head, types


def is_spot(cloud: str, node_config: dict[str, Any]) -> bool:
    """Whether a node type's provider config asks for spot (AWS) / Spot or preemptible (GCP)."""
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    scheduling = node_config.get("scheduling", {})
    return scheduling.get("provisioningModel") == "SPOT" or scheduling.get("preemptible") is True


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_has_a_cpu_head_and_autoscaling_spot_gpu_workers(cloud):
    config = load_yaml(LAUNCHER_CONFIGS[cloud])
    head, workers = node_types(config)
    assert head["resources"] == {"CPU": 0}  # the head runs drivers and MLflow, never trials
    assert not is_spot(cloud, head["node_config"])
    assert sorted(w["resources"]["GPU"] for w in workers.values()) == [1, 8]
    for name, worker in workers.items():
        assert worker["min_workers"] == 0 and worker["max_workers"] >= 1, name
        assert worker["resources"]["CPU"] >= 8, name
        assert is_spot(cloud, worker["node_config"]), f"{name} is not spot/preemptible"
    assert config["idle_timeout_minutes"] > 0
    assert config["max_workers"] == sum(w["max_workers"] for w in workers.values())
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_config_runs_the_image_with_shared_storage_and_token_auth(cloud):
    config = load_yaml(LAUNCHER_CONFIGS[cloud])
    docker = config["docker"]
    assert docker["image"].endswith("/" + project_image_tag())
    options = docker["run_options"]
    assert f"--volume={SHARED}:{SHARED}" in options
    assert "--env=RAY_AUTH_MODE=token" in options
    assert f"--env=RAY_AUTH_TOKEN_PATH={TOKEN_PATH}" in options
    secrets_dir = str(Path(TOKEN_PATH).parent)
    assert any(o.startswith("--volume=") and o.endswith(f":{secrets_dir}:ro") for o in options)
    head, _ = node_types(config)
    fetch = "aws secretsmanager get-secret-value" if cloud == "aws" else "gcloud secrets versions access"
    for commands in (config["initialization_commands"], head["initialization_commands"]):
        text = "\n".join(commands)
        assert "mount -t nfs" in text and f" {SHARED})" in text  # every node mounts it
        assert fetch in text and "ray_auth_token" in text  # the token comes from the store
    head_options = " ".join(docker["head_run_options"])
    assert "MLFLOW_BACKEND_STORE_URI_FILE=/run/secrets/ticketsearch/" in head_options
    assert re.search(r"MLFLOW_ARTIFACTS_DESTINATION=(s3|gs)://", head_options)
    # The server listens on the head's private address (the one MLFLOW_TRACKING_URI names),
    # not on every interface (the script's own default is loopback).
    assert config["head_setup_commands"] == [
        "MLFLOW_HOST=$(hostname -I | awk '{print $1}') ticketsearch-mlflow-server --detach"]
    assert "export MLFLOW_TRACKING_URI=http://$(hostname -I" in config["head_start_ray_commands"][1]


@pytest.mark.parametrize("cloud", sorted(LAUNCHER_CONFIGS))
def test_launcher_commands_are_valid_bash(cloud):
    config = load_yaml(LAUNCHER_CONFIGS[cloud])
    commands = [c for key in COMMAND_KEYS for c in config[key]]
    for node_type in config["available_node_types"].values():
        commands += node_type.get("initialization_commands", [])
    assert commands
    for command in commands:
        checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert checked.returncode == 0, f"{command!r}: {checked.stderr}"


# --------------------------------------------------------------------------- KubeRay


def ray_cluster_specs() -> dict[str, dict[str, Any]]:
    """The RayCluster's spec and the RayJob's rayClusterSpec."""
    docs = kuberay_docs()
    return {"RayCluster": one(docs, "RayCluster")["spec"],
            "RayJob": one(docs, "RayJob")["spec"]["rayClusterSpec"]}


def pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The head's pod spec, then each worker group's."""
    return [spec["headGroupSpec"]["template"]["spec"]] + \
        [group["template"]["spec"] for group in spec["workerGroupSpecs"]]


def test_kuberay_manifests_are_ray_io_v1_for_the_installed_ray():
    docs = kuberay_docs()
    for kind in ("RayCluster", "RayJob"):
        assert one(docs, kind)["apiVersion"] == "ray.io/v1"
    for kind, spec in ray_cluster_specs().items():
        assert spec["rayVersion"] == RAY_VERSION, kind
        assert spec["enableInTreeAutoscaling"] is True, kind
        assert spec["authOptions"] == {"mode": "token", "secretName": "ticketsearch-ray-auth"}
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict) and head["rayStartParams"]["num-cpus"] == "0"
        assert head["template"]["spec"]["containers"][0]["name"] == "ray-head"


def test_kuberay_gpu_worker_group_autoscales_with_gpus_tolerations_and_shm():
    for kind, spec in ray_cluster_specs().items():
        groups = spec["workerGroupSpecs"]
        assert len(groups) >= 1, kind
        for group in groups:
            assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"], kind
            assert group["maxReplicas"] >= 1 and isinstance(group["rayStartParams"], dict)
            pod = group["template"]["spec"]
            container = pod["containers"][0]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1, kind
            assert {"key": "nvidia.com/gpu", "operator": "Exists",
                    "effect": "NoSchedule"} in pod["tolerations"]
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert len(shm) == 1, kind
            assert {"name": shm[0]["name"], "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_kuberay_pods_share_one_volume_and_one_image():
    docs = kuberay_docs()
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    images = set()
    for kind, spec in ray_cluster_specs().items():
        for pod in pod_specs(spec):
            volume = next(v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v)
            assert [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                    if v["name"] == volume] == [claim["metadata"]["name"]], kind
            container = pod["containers"][0]
            assert {"name": volume, "mountPath": SHARED} in container["volumeMounts"], kind
            images.add(container["image"])
    deployment = one(docs, "Deployment")
    images |= {c["image"] for c in deployment["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    assert images.pop().endswith("/" + project_image_tag())


def test_rayjob_runs_the_resnet20_preset_from_its_configmap(tmp_path):
    docs = kuberay_docs()
    rayjob = one(docs, "RayJob")["spec"]
    head_pod = rayjob["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    config_volume = next(v for v in head_pod["volumes"] if "configMap" in v)
    mount = next(m for m in head_pod["containers"][0]["volumeMounts"]
                 if m["name"] == config_volume["name"])
    config_map = one(docs, "ConfigMap")
    assert config_map["metadata"]["name"] == config_volume["configMap"]["name"]
    assert f"ticketsearch.cli run {mount['mountPath']}/job.yaml" in rayjob["entrypoint"]
    assert "--skip-resource-check" in rayjob["entrypoint"]  # GPU workers start at 0
    assert rayjob["shutdownAfterJobFinishes"] is True
    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(config_map["data"]["job.yaml"])
    job = load_job(spec_file)  # what the cluster will run validates here
    assert job.storage.path.startswith(SHARED + "/")
    assert job.data.root.startswith(SHARED + "/") and job.data.download is False
    assert f"'{job.data.root}'" in rayjob["entrypoint"]  # fetched once, on the head
    preset = load_job(REPO / "jobs" / "paper-resnet20-cifar10.yaml",
                      [f"data.root={job.data.root}", "data.download=false",
                       f"storage.path={job.storage.path}"])
    assert job.model_dump() == preset.model_dump()  # the preset, data and storage on the volume


def test_mlflow_deployment_uses_secrets_a_bucket_and_a_cluster_internal_service():
    docs = kuberay_docs()
    service = one(docs, "Service")
    assert service["spec"]["type"] == "ClusterIP"
    port = service["spec"]["ports"][0]["port"]
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["ticketsearch-mlflow-server"]
    env = {e["name"]: e for e in container["env"]}
    for name in ("MLFLOW_BACKEND_STORE_URI", "MLFLOW_AUTH_DATABASE_URI",
                 "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    assert re.match(r"(s3|gs)://", env["MLFLOW_ARTIFACTS_DESTINATION"]["value"])
    assert env["MLFLOW_PORT"]["value"] == str(port)
    uri = f"http://{service['metadata']['name']}:{port}"
    for kind, spec in ray_cluster_specs().items():
        head_env = {e["name"]: e for e in pod_specs(spec)[0]["containers"][0]["env"]}
        assert head_env["MLFLOW_TRACKING_URI"]["value"] == uri, kind
        for pod in pod_specs(spec):  # trials on every pod log to the server as a user
            names = {e["name"] for e in pod["containers"][0]["env"]}
            assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= names, kind


def env_entries(value: Any) -> Iterator[dict[str, Any]]:
    """Every Kubernetes env entry (a dict with ``name`` and ``value``/``valueFrom``)."""
    if isinstance(value, dict):
        if "name" in value and ("value" in value or "valueFrom" in value):
            yield value
        for item in value.values():
            yield from env_entries(item)
    elif isinstance(value, list):
        for item in value:
            yield from env_entries(item)


def test_secrets_are_only_referenced_never_written():
    docs = kuberay_docs()
    assert not [d for d in docs if d["kind"] == "Secret"]
    secret_envs = [e for e in env_entries(docs) if SECRET_ENV_NAME.search(e["name"])
                   and e["name"] != "MLFLOW_TRACKING_URI"]
    assert len(secret_envs) == 8  # MLflow's 4 secrets, the Ray pods' MLflow password x 4
    for entry in secret_envs:
        assert "value" not in entry and "secretKeyRef" in entry["valueFrom"], entry
    everything = docs + [load_yaml(path) for path in LAUNCHER_CONFIGS.values()]
    for text in strings(everything):
        assert not CREDENTIALS_IN_URL.search(text), text
        assert not re.search(r"RAY_AUTH_TOKEN=|MLFLOW_TRACKING_PASSWORD=|"
                             r"MLFLOW_AUTH_ADMIN_PASSWORD=|password=", text, re.IGNORECASE), text


# --------------------------------------------------------------------------- the image


def test_dockerfile_builds_from_the_installed_rays_image():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.findall(r"^FROM\s+(\S+)", text, re.MULTILINE) == [BASE_IMAGE]
    assert set(re.findall(r"ray\.__version__ == '([^']+)'", text)) == {RAY_VERSION}
    assert project_image_tag() in text  # the tag its build instructions give
    sources = [s for line in re.findall(r"^COPY\s+(.+)$", text, re.MULTILINE)
               for s in line.split()[:-1] if not s.startswith("--")]
    assert sorted(sources) == ["README.md", "deploy/mlflow-server.sh", "pyproject.toml",
                               "ticketsearch"]
    ignore = [line for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"  # everything but what is copied stays out of the build context
    for source in sources:
        assert f"!{source}" in ignore or f"!{source}/" in ignore, source


# --------------------------------------------------------------------------- MLflow script


def script_env(home: Path, **settings: str) -> dict[str, str]:
    """The environment of ticketsearch-mlflow-server: this venv's mlflow and python first on
    PATH, a private HOME/TMPDIR, no MLflow settings but ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    home.mkdir(parents=True, exist_ok=True)
    env.update(PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", HOME=str(home),
               TMPDIR=str(home), MLFLOW_HOST="127.0.0.1", MLFLOW_WORKERS="1", **settings)
    return env


def run_script(env: dict[str, str], *args: str, timeout: float = 120.0):
    """Run deploy/mlflow-server.sh with ``args``; the CompletedProcess."""
    return subprocess.run(["bash", str(MLFLOW_SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_mlflow_script_listens_on_loopback_unless_told_otherwise():
    text = MLFLOW_SCRIPT.read_text()
    assert '"${MLFLOW_HOST:-127.0.0.1}"' in text and "0.0.0.0}" not in text
    docs = yaml.safe_load_all((DEPLOY / "kuberay" / "mlflow.yaml").read_text())
    (deployment,) = [d for d in docs if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_HOST"] == "0.0.0.0"  # a pod serves its Service on the pod's address


def test_mlflow_script_names_missing_or_empty_settings(tmp_path):
    env = script_env(tmp_path)
    done = run_script(env, "--detach")
    assert done.returncode == 2
    assert "MLFLOW_BACKEND_STORE_URI (or MLFLOW_BACKEND_STORE_URI_FILE) is not set" in done.stderr
    empty = tmp_path / "empty-secret"
    empty.write_text("")
    env.update(MLFLOW_BACKEND_STORE_URI_FILE=str(empty))
    done = run_script(env)
    assert done.returncode == 2
    assert f"MLFLOW_BACKEND_STORE_URI_FILE={empty}: the file is missing or empty" in done.stderr
    env.update(MLFLOW_BACKEND_STORE_URI="sqlite:////nowhere.db", MLFLOW_ARTIFACTS_DESTINATION="/x",
               MLFLOW_AUTH_DATABASE_URI="sqlite:////nowhere-auth.db")
    done = run_script(env)
    assert done.returncode == 2
    assert "MLFLOW_AUTH_ADMIN_PASSWORD (or MLFLOW_AUTH_ADMIN_PASSWORD_FILE) is not set" in done.stderr
    done = run_script(env, "--port", "5000")
    assert done.returncode == 2 and "unknown argument --port" in done.stderr


class DetachedServer:
    """An MLflow server that ``ticketsearch-mlflow-server --detach`` started, as a head node's
    setup does; ``stop`` ends its process group (it runs in its own session)."""

    def __init__(self, home: Path, **settings: str):
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.env = script_env(home, MLFLOW_PORT=str(self.port), **settings)
        self.pid_file = home / "mlflow-server.pid"

    def start(self):
        return run_script(self.env, "--detach")

    def stop(self) -> None:
        if not self.pid_file.exists():
            return
        pgid = int(self.pid_file.read_text())
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 15
            while group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not group_alive(pgid):
                return


@pytest.fixture
def detached_server(tmp_path) -> Iterator[Any]:
    """A factory of DetachedServers, all stopped at teardown."""
    started: list[DetachedServer] = []

    def make(home: Path, **settings: str) -> DetachedServer:
        started.append(DetachedServer(home, **settings))
        return started[-1]

    yield make
    for server in started:
        server.stop()


@pytest.mark.integration
def test_mlflow_script_basic_auth_requires_the_admin_password(tmp_path, detached_server):
    pytest.importorskip("flask_wtf", reason="MLflow's basic auth needs mlflow[auth] (Flask-WTF)")
    password = tmp_path / "admin-password"
    password.write_text("s3cret-for-this-test\n")
    server = detached_server(
        tmp_path / "home", MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/mlflow.db",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
        MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp_path}/auth.db",
        MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(password),
        MLFLOW_FLASK_SERVER_SECRET_KEY="key-for-this-test")
    done = server.start()
    assert done.returncode == 0, done.stderr
    assert "s3cret" not in Path(f"/proc/{server.pid_file.read_text().strip()}/cmdline").read_text()
    url = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, timeout=10).status_code == 401
    assert requests.get(url, timeout=10, auth=("admin", "wrong")).status_code == 401
    assert requests.get(url, timeout=10, auth=("admin", "s3cret-for-this-test")).status_code == 200
    assert requests.get(f"{server.uri}/health", timeout=10).status_code == 200


@pytest.mark.integration
def test_credentials_in_the_tracking_uri_are_never_printed_or_stored(tmp_path, detached_server,
                                                                    monkeypatch):
    """A job whose tracking.uri carries the server's user and password runs through a real
    local Ray (its workers authenticate) and the password appears nowhere: not in the output,
    the job directory, Ray's logs, the MLflow params or the artifacts."""
    pytest.importorskip("flask_wtf", reason="MLflow's basic auth needs mlflow[auth] (Flask-WTF)")
    import tempfile

    from mlflow.tracking import MlflowClient

    secret = "s3cret-for-this-test"
    (tmp_path / "admin-password").write_text(secret + "\n")
    server = detached_server(
        tmp_path / "home", MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/mlflow.db",
        MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "artifacts"),
        MLFLOW_AUTH_DATABASE_URI=f"sqlite:///{tmp_path}/auth.db",
        MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(tmp_path / "admin-password"),
        MLFLOW_FLASK_SERVER_SECRET_KEY="key-for-this-test")
    assert server.start().returncode == 0
    job = {"name": "credentials", "data": {"dataset": "digits"},
           "model": {"name": "mlp", "mlp_hidden": [32, 16]},
           "train": {"epochs_per_round": 2, "lr_milestones": [1], "rewind_epoch": 1},
           "methods": {"cs": {"rounds": 1}, "imp": {"rounds": 1}},
           "resources": {"cpus": 1},
           "tracking": {"uri": f"http://admin:{secret}@127.0.0.1:{server.port}"}}
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps(job))
    storage = tmp_path / "runs"
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                        "MLFLOW_TRACKING_PASSWORD")}
    env.update(PYTHONPATH=str(REPO), RAY_TMPDIR=str(ray_tmp))
    done = subprocess.run([str(VENV_BIN / "python"), "-m", "ticketsearch.cli", "run", str(spec),
                           "--storage", str(storage)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert secret not in done.stdout + done.stderr
    assert f"http://127.0.0.1:{server.port}" in done.stdout
    leaks = [p for root in (storage, ray_tmp) for p in root.rglob("*")
             if p.is_file() and not p.is_symlink() and p.stat().st_size < 50_000_000
             and secret.encode() in p.read_bytes()]
    assert leaks == []
    assert any(ray_tmp.rglob("*.log")) or any(ray_tmp.rglob("*.out"))  # Ray's logs were read
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    client = MlflowClient(server.uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "credentials"]
    runs = client.search_runs([experiment.experiment_id])
    kinds = sorted(r.data.tags.get("ticketsearch.kind") for r in runs)
    assert kinds == ["job", "ticket", "ticket", "trial", "trial"]  # a ticket each for cs, imp
    assert all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        assert secret not in json.dumps(run.data.params) + json.dumps(run.data.tags)
    parent = next(r for r in runs if r.data.tags.get("ticketsearch.kind") == "job")
    for name in ("spec.yaml", "summary.json"):
        local = client.download_artifacts(parent.info.run_id, name, str(tmp_path / "dl"))
        assert secret not in Path(local).read_text(), name


# --------------------------------------------------------------------------- two nodes


JOB_YAML = """\
name: deploy-smoke
data: {dataset: digits}
model: {name: mlp, mlp_hidden: [32, 16]}
train: {epochs_per_round: 10, lr_milestones: [8], rewind_epoch: 1, device: cpu}
methods:
  cs:
    rounds: 2
    sweep: {mask_init: [0.0, -0.01]}
resources: {cpus: 1, fuse: off}  # two trials apart, one per node
"""
TRIAL_IDS = ["cs-s0=-0.01-lam=1e-08-beta=200-seed=0", "cs-s0=0-lam=1e-08-beta=200-seed=0"]
JOB_TIMEOUT_S = 150


def state_rows(address: str, token: str, resource: str) -> list[dict[str, Any]]:
    """Rows of Ray's state API (``/api/v0/<resource>``), dead actors included."""
    answer = requests.get(f"{address}/api/v0/{resource}", params={"detail": "1", "limit": "1000"},
                          headers={"Authorization": f"Bearer {token}"}, timeout=30)
    answer.raise_for_status()
    return answer.json()["data"]["result"]["result"]


def trial_nodes(address: str, token: str, pids: dict[str, int]) -> dict[str, str]:
    """trial id -> the custom resource (node_a / node_b) of the node whose Ray actor had the
    pid that the trial wrote into its ``worker.pid``."""
    node_of_pid = {row["pid"]: row["node_id"] for row in state_rows(address, token, "actors")}
    label_of_node = {row["node_id"]: next(r for r in row["resources_total"] if r.startswith("node_"))
                     for row in state_rows(address, token, "nodes")}
    return {trial: label_of_node[node_of_pid[pid]] for trial, pid in pids.items()}


@pytest.mark.integration
def test_submitted_job_spreads_trials_over_both_nodes_into_one_storage(tmp_path,
                                                                      detached_server):
    tracking = detached_server(tmp_path / "mlflow",
                               MLFLOW_BACKEND_STORE_URI=f"sqlite:///{tmp_path}/mlflow/mlflow.db",
                               MLFLOW_ARTIFACTS_DESTINATION=str(tmp_path / "mlflow" / "artifacts"))
    started = tracking.start()
    assert started.returncode == 0, started.stderr
    # As deploy/aws.yaml's head start command: only the head's Ray knows the tracking server.
    with ray_cluster({"node_a": 1}, {"node_b": 1},
                     head_env={"MLFLOW_TRACKING_URI": tracking.uri}) as cluster:
        job_file = tmp_path / "job.yaml"
        job_file.write_text(JOB_YAML)
        storage = tmp_path / "shared" / "ticketsearch-runs"  # "every node" sees this folder
        done = run_cli("submit", str(job_file), "--address", cluster.address, "--storage",
                       str(storage), "--wait", "--timeout", str(JOB_TIMEOUT_S), env=cluster.env,
                       timeout=JOB_TIMEOUT_S + 60)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        job = load_job(job_file)
        job_dir = storage / f"deploy-smoke-{job.spec_hash()}"
        pids = {t: int((job_dir / "trials" / t / "worker.pid").read_text()) for t in TRIAL_IDS}
        placed = trial_nodes(cluster.address, cluster.token(), pids)

    assert sorted(placed.values()) == ["node_a", "node_b"], placed
    summary = json.loads((job_dir / "summary.json").read_text())
    assert sorted(t["trial_id"] for t in summary["trials"]) == TRIAL_IDS
    for trial_id in TRIAL_IDS:
        result = json.loads((job_dir / "trials" / trial_id / "result.json").read_text())
        assert result["trial_id"] == trial_id
    assert summary["tracking"]["uri"] == tracking.uri
    assert not (storage / "mlflow.db").exists()  # the server, not a local store

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking.uri)
    experiment = client.get_experiment_by_name("deploy-smoke")
    runs = client.search_runs([experiment.experiment_id])
    logged = sorted(r.data.tags["trial_id"] for r in runs
                    if r.data.tags.get("ticketsearch.kind") == "trial")
    assert logged == TRIAL_IDS
