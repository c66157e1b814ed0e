"""docker/ checked without a Docker engine: the Compose schema, hadolint, secrets, GPUs, and the Kubernetes Jobs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mnist_sweep.cli import _overrides, _parser
from mnist_sweep.config import load_sweep, tomllib
from tests.compose_native import (
    COMPOSE_FILE,
    DOCKER,
    DOCKERFILE,
    InterpolationError,
    image_settings,
    k8s_documents,
    k8s_job,
    load_compose,
)
from tests.conftest import REPO

TEST_ENV = {"POSTGRES_PASSWORD": "not-a-real-one", "MNIST_DIR": "/srv/mnist"}
SWEEPS_IN_IMAGE = "/work/sweeps"


def tool(name: str) -> str:
    """A dev dependency's executable: beside this Python (the venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: pip install -e '.[dev]' (it is a dev dependency)")
    return found


def job(name: str) -> dict[str, Any]:
    return k8s_job(name)


def invocations() -> list[tuple[str, list[str]]]:
    """Every mnist-sweep command line in compose.yaml and docker/k8s/, as (where, argv)."""
    compose = load_compose(TEST_ENV)
    found = [
        (f"compose {name}", [str(a) for a in compose["services"][name]["command"]]) for name in ("worker", "finalize")
    ]
    for document in k8s_documents():
        for container in document["spec"]["template"]["spec"]["containers"]:
            found.append((f"k8s {document['metadata']['name']}", [str(a) for a in container["args"]]))
    return found


# --------------------------------------------------------------------------- lint and schema


@pytest.mark.subprocess
def test_compose_file_follows_the_compose_specification(tmp_path: Path) -> None:
    checker = [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    done = subprocess.run([*checker, str(COMPOSE_FILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    # The schema is really applied (offline, from the package): a misspelt key is refused.
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE_FILE.read_text(encoding="utf-8").replace("    healthcheck:", "    healthchek:", 1))
    refused = subprocess.run([*checker, str(broken)], capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "healthchek" in refused.stdout + refused.stderr


@pytest.mark.subprocess
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_is_the_projects_tensorflow_gpu_build_run_by_a_non_root_user() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    (pin,) = [d.removeprefix("tensorflow") for d in dependencies if re.match(r"tensorflow\W", d)]
    assert f'"tensorflow[and-cuda]{pin}"' in text, f"the image must install tensorflow[and-cuda]{pin}"
    entrypoint, workdir, env = image_settings()
    assert entrypoint == ["mnist-sweep"]
    users = re.findall(r"^USER (\S+)", text, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0].isdigit() and users[-1].split(":")[0] != "0", users
    assert env["MNIST_SWEEP_DATA"] == "/data"
    assert workdir == "/work"


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    copied = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", DOCKERFILE.read_text(encoding="utf-8"), flags=re.MULTILINE)
    for sources in copied:
        for source in sources.split():
            assert f"!{source.rstrip('/')}" in {line.rstrip("/") for line in ignore}, f"{source} is not let in"
            assert (REPO / source).exists()


# --------------------------------------------------------------------------- secrets, ports, GPUs


def test_no_password_is_committed_and_compose_refuses_to_start_without_one() -> None:
    credentials_in_uri = re.compile(r"://[^/\s:@\"']+:[^/\s@\"']+@")
    for path in [*DOCKER.rglob("*"), REPO / ".dockerignore"]:
        if path.is_file() and path.name != ".env":  # docker/.env is the user's, and git ignores it
            text = path.read_text(encoding="utf-8")
            assert not credentials_in_uri.search(text), f"{path}: a URI with a password"
            assert not re.search(r"(?<![{\w])[A-Z_]*PASSWORD\w*\s*[:=]\s*[^\s$]", text.replace("PASSWORD=\n", "")), path
    raw = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))  # before interpolation: as committed
    for name, service in raw["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if "PASSWORD" in key:
                assert str(value).startswith("${POSTGRES_PASSWORD:?"), f"{name}.{key} = {value!r}"
    assert re.search(r"^POSTGRES_PASSWORD=$", (DOCKER / ".env.example").read_text(), flags=re.MULTILINE)
    with pytest.raises(InterpolationError, match="POSTGRES_PASSWORD"):
        load_compose({"MNIST_DIR": "/srv/mnist"})
    with pytest.raises(InterpolationError, match="POSTGRES_PASSWORD"):
        load_compose({"MNIST_DIR": "/srv/mnist", "POSTGRES_PASSWORD": ""})
    assert "docker/.env" in (REPO / ".gitignore").read_text().splitlines()


def test_published_ports_are_bound_to_loopback_unless_the_user_says_otherwise() -> None:
    services = load_compose(TEST_ENV)["services"]
    published = [(name, port) for name, service in services.items() for port in service.get("ports", [])]
    assert published, "nothing published: the MLflow UI would be unreachable"
    assert all(str(port).startswith("127.0.0.1:") for _, port in published), published
    opened = load_compose({**TEST_ENV, "BIND_ADDRESS": "0.0.0.0"})["services"]
    assert all(str(port).startswith("0.0.0.0:") for s in opened.values() for port in s.get("ports", []))


def test_workers_and_finalize_reserve_one_nvidia_gpu_each() -> None:
    services = load_compose({**TEST_ENV, "WORKER_GPU": "3"})["services"]
    for name in ("worker", "finalize"):
        (device,) = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert device["device_ids"] == ["3"]
    (limits,) = [c["resources"]["limits"] for c in job("mnist-sweep-workers")["spec"]["template"]["spec"]["containers"]]
    assert limits["nvidia.com/gpu"] == 1


def test_every_training_container_has_a_cpu_limit_to_size_its_threads_to() -> None:
    services = load_compose({**TEST_ENV, "WORKER_CPUS": "2.5"})["services"]
    for name in ("worker", "finalize"):
        assert services[name]["deploy"]["resources"]["limits"]["cpus"] == "2.5", name
    assert load_compose(TEST_ENV)["services"]["worker"]["deploy"]["resources"]["limits"]["cpus"] == "4"
    assert re.search(r"^WORKER_CPUS=\d", (DOCKER / ".env.example").read_text(), flags=re.MULTILINE)
    for document in k8s_documents():
        for container in document["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert float(resources["limits"]["cpu"]) >= 1, document["metadata"]["name"]
            assert resources["requests"]["cpu"] == resources["limits"]["cpu"]  # the quota it is scheduled for


def test_the_mlflow_service_serves_artifacts_from_a_volume_on_postgres() -> None:
    service = load_compose(TEST_ENV)["services"]["mlflow"]
    command = [str(a) for a in service["command"]]
    assert service["entrypoint"] == ["mlflow"] and command[0] == "server"
    assert command[command.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert "--serve-artifacts" in command
    destination = command[command.index("--artifacts-destination") + 1]
    assert any(volume.split(":")[1] == destination for volume in service["volumes"])
    assert "/health" in " ".join(service["healthcheck"]["test"])


# --------------------------------------------------------------------------- the commands


@pytest.mark.parametrize("where, argv", invocations(), ids=[where for where, _ in invocations()])
def test_every_command_is_a_valid_mnist_sweep_invocation(where: str, argv: list[str]) -> None:
    """Parsed by the CLI's own parser, then the sweep file loaded with its overrides (the image's path mapped)."""
    args = _parser().parse_args(argv)
    assert args.command in ("worker", "run"), where
    assert args.sweep.startswith(SWEEPS_IN_IMAGE + "/"), f"{where}: the sweep file must come from the image"
    sweep = REPO / "sweeps" / args.sweep.removeprefix(SWEEPS_IN_IMAGE + "/")
    cfg = load_sweep(sweep, _overrides(args))
    assert cfg.study.storage == "postgresql://sweep@postgres:5432/optuna", where
    assert cfg.tracking.uri == "http://mlflow:5000", where


def test_the_k8s_workers_are_an_indexed_job_and_finalize_a_job() -> None:
    workers, finalize = job("mnist-sweep-workers"), job("mnist-sweep-finalize")
    assert workers["spec"]["completionMode"] == "Indexed"
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] >= 1
    for document, first in ((workers, "worker"), (finalize, "run")):
        pod = document["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
        (container,) = pod["containers"]
        assert container["args"][0] == first
        env = {e["name"]: e for e in container["env"]}
        assert "value" not in env["PGPASSWORD"] and env["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
        assert {m["mountPath"]: m.get("readOnly") for m in container["volumeMounts"]}["/data"] is True
