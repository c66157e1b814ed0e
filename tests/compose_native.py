"""docker/compose.yaml read as Docker Compose reads it, and its services (and docker/k8s/'s Job containers)
translated to native processes.

The translation is deliberately small, so that what runs is the compose file's own command:
- `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}` and `$$` are interpolated
  from a given environment (Compose's rules; YAML merge keys are resolved by the YAML loader);
- a service's hostname in a URI (`postgres:5432`, `mlflow:5000`) becomes 127.0.0.1 and the port the native
  server listens on;
- a path inside the container (a volume's target, the image's WORKDIR) becomes a folder on this machine;
- the image's ENTRYPOINT `mnist-sweep` (or a service's `entrypoint: ["mlflow"]`) becomes `python -m ...`
  with this checkout's code; the image's ENV lines come first, the service's environment on top;
- a service's CPU limit (`deploy.resources.limits.cpus`) becomes an affinity of that many cores (rounded
  down, at least one): a cgroup quota needs privileges a test does not have, and mnist-sweep sizes its
  threads by the smaller of the two the same way (its reading of cgroup files is unit-tested on fake ones).
Nothing else of a command is changed; a test adds its own arguments only in the open (`extra`).
A Kubernetes Job's container goes the same way (`native_k8s_container`): its args after the image's
ENTRYPOINT, its env (a Secret's key given by the test), its volume mounts, its `resources.limits.cpu`.
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
K8S = DOCKER / "k8s"
COMPOSE_FILE = DOCKER / "compose.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINTS = {"mnist-sweep": [sys.executable, "-m", "mnist_sweep"], "mlflow": [sys.executable, "-m", "mlflow"]}
_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


class InterpolationError(ValueError):
    """A `${VAR:?message}` whose variable is missing: Compose refuses to start with that message."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg") or ""
        value = env.get(name)
        missing = value is None or (value == "" and op is not None and op.startswith(":"))
        if not missing:
            return str(value)
        if op in ("-", ":-"):
            return interpolate(arg, env)
        if op in ("?", ":?"):
            raise InterpolationError(f"{name}: {arg}")
        return ""

    return _VARIABLE.sub(substitute, text)


def _interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_interpolate_tree(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _interpolate_tree(value, env) for key, value in node.items()}
    return node


def load_compose(env: Mapping[str, str], path: Path = COMPOSE_FILE) -> dict[str, Any]:
    """The compose file as `docker compose config` would see it: anchors merged, variables interpolated."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return dict(_interpolate_tree(document, env))


def image_settings(dockerfile: Path = DOCKERFILE) -> tuple[list[str], str, dict[str, str]]:
    """The final ENTRYPOINT, WORKDIR and ENV of the Dockerfile (one stage, exec-form ENTRYPOINT)."""
    logical = re.sub(r"\\\n", " ", dockerfile.read_text(encoding="utf-8"))
    entrypoint: list[str] = []
    workdir, env = "/", {}
    for line in logical.splitlines():
        instruction, _, rest = line.strip().partition(" ")
        if instruction == "ENTRYPOINT":
            entrypoint = list(yaml.safe_load(rest))
        elif instruction == "WORKDIR":
            workdir = rest.strip()
        elif instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(rest))
    return entrypoint, workdir, env


def image_copies(dockerfile: Path = DOCKERFILE) -> list[tuple[str, Path]]:
    """(path in the image, folder of this checkout) for each COPY to an absolute path (the sweep files)."""
    found = []
    for line in dockerfile.read_text(encoding="utf-8").splitlines():
        words = [w for w in line.split() if not w.startswith("--")]
        if words[:1] == ["COPY"] and len(words) == 3 and words[2].startswith("/"):
            found.append((words[2], REPO / words[1]))
    return found


@dataclass
class NativeService:
    """One service's process: argv, environment and working folder on this machine."""

    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: Path
    cpu_limit: float | None = None  # the service's deploy.resources.limits.cpus

    def cores(self, index: int, available: Sequence[int]) -> list[int]:
        """The cores replica `index` runs on: `cpu_limit` of them (all without a limit), replicas side by side."""
        if self.cpu_limit is None:
            return list(available)
        count = min(len(available), max(1, math.floor(self.cpu_limit)))
        return [available[(index * count + i) % len(available)] for i in range(count)]


@dataclass
class Translation:
    """Where the compose world lies on this machine."""

    ports: dict[str, dict[int, int]]  # service -> {container port: native port}
    named_volumes: Path  # named volume NAME is the folder named_volumes/NAME
    compose_dir: Path = DOCKER  # bind-mount sources are relative to the compose file

    def rewrite_hosts(self, text: str) -> str:
        """`postgres:5432` after `//` or `@` -> `127.0.0.1:<native port>`."""
        for service, mapping in self.ports.items():
            for inside, native in mapping.items():
                text = re.sub(rf"(?<=[/@]){re.escape(service)}:{inside}\b", f"127.0.0.1:{native}", text)
        return text

    def mounts(self, service: Mapping[str, Any], workdir_folder: Path) -> list[tuple[str, Path]]:
        """(container path, native path), longest container path first."""
        found: list[tuple[str, Path]] = []
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                native = (self.compose_dir / source).resolve()
            else:
                native = self.named_volumes / source
                native.mkdir(parents=True, exist_ok=True)
            found.append((target, native))
        return sorted(found, key=lambda pair: len(pair[0]), reverse=True)

    def map_paths(self, text: str, mounts: Sequence[tuple[str, Path]]) -> str:
        """Container paths -> native paths, in one pass (a native path may itself start like a container path)."""
        natives = dict(mounts)
        inside = "|".join(re.escape(path) for path in natives)  # longest first: `mounts` is sorted
        pattern = rf"(?<![\w/.])({inside})(?=/|$|[\"'])"
        return re.sub(pattern, lambda match: str(natives[match.group(1)]), text)


def native_service(
    compose: Mapping[str, Any],
    name: str,
    translation: Translation,
    folder: Path,
    *,
    base_env: Mapping[str, str],
    server_flags: Mapping[str, str] | None = None,
    extra: Sequence[str] = (),
) -> NativeService:
    """Service `name` of `compose` as a native process working in `folder` (its WORKDIR).

    `server_flags` replaces the value after a listening flag (`--host`, `--port`) of a server's command;
    `extra` is appended to the command, visibly, by the test.
    """
    service = compose["services"][name]
    image_entrypoint, workdir, image_env = image_settings()
    folder.mkdir(parents=True, exist_ok=True)
    mounts = [*translation.mounts(service, folder), (workdir, folder)]
    mounts.sort(key=lambda pair: len(pair[0]), reverse=True)
    for inside, native in mounts:  # a volume inside WORKDIR is reached by relative paths too (reports/)
        relative = Path(inside).relative_to(workdir) if Path(inside).is_relative_to(workdir) else None
        if relative is not None and relative.parts and not (folder / relative).exists():
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            (folder / relative).symlink_to(native, target_is_directory=True)

    def translate(text: str) -> str:
        return translation.map_paths(translation.rewrite_hosts(text), mounts)

    entrypoint = service.get("entrypoint", image_entrypoint)
    command = [str(arg) for arg in service.get("command", [])]
    for flag, value in (server_flags or {}).items():
        position = command.index(flag)
        command[position + 1] = value
    argv = [*ENTRYPOINTS[entrypoint[0]], *entrypoint[1:], *(translate(arg) for arg in command), *extra]
    declared = service.get("environment") or {}
    assert isinstance(declared, dict), f"{name}: environment as a mapping, please (KEY: value)"
    environment = {**image_env, **{key: str(value) for key, value in declared.items()}}
    env = {**base_env, **{key: translate(value) for key, value in environment.items()}}
    limit = service.get("deploy", {}).get("resources", {}).get("limits", {}).get("cpus")
    return NativeService(name=name, argv=argv, env=env, cwd=folder, cpu_limit=None if limit is None else float(limit))


def k8s_documents() -> list[dict[str, Any]]:
    """Every document of docker/k8s/*.yaml."""
    documents = []
    for path in sorted(K8S.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    return documents


def k8s_job(name: str) -> dict[str, Any]:
    (found,) = [d for d in k8s_documents() if d["kind"] == "Job" and d["metadata"]["name"] == name]
    return found


def k8s_cpus(quantity: str | int | float | None) -> float | None:
    """A Kubernetes CPU quantity ("4", "1.5", "500m") in CPUs."""
    if quantity is None:
        return None
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def native_k8s_container(
    job: Mapping[str, Any],
    translation: Translation,
    folder: Path,
    *,
    base_env: Mapping[str, str],
    secrets: Mapping[str, Mapping[str, str]],
    claims: Mapping[str, Path],
    extra: Sequence[str] = (),
) -> NativeService:
    """The one container of a Job's pod as a native process working in `folder` (the image's WORKDIR).

    `secrets` holds the Secrets' keys its env refers to; `claims` the folder of each PersistentVolumeClaim.
    """
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    image_entrypoint, workdir, image_env = image_settings()
    folder.mkdir(parents=True, exist_ok=True)
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    mounts: list[tuple[str, Path]] = [(workdir, folder), *image_copies()]  # a pod sees what the image holds
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        claim = volume.get("persistentVolumeClaim")
        native = (
            claims[claim["claimName"]]
            if claim
            else translation.named_volumes / f"{job['metadata']['name']}-{mount['name']}"
        )
        native.mkdir(parents=True, exist_ok=True)
        mounts.append((mount["mountPath"], native))
    mounts.sort(key=lambda pair: len(pair[0]), reverse=True)

    def translate(text: str) -> str:
        return translation.map_paths(translation.rewrite_hosts(text), mounts)

    entrypoint = container.get("command", image_entrypoint)
    argv = [*ENTRYPOINTS[entrypoint[0]], *entrypoint[1:], *(translate(str(a)) for a in container["args"]), *extra]
    environment = dict(image_env)
    for item in container.get("env", []):
        if "value" in item:
            environment[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            environment[item["name"]] = secrets[ref["name"]][ref["key"]]
    env = {**base_env, **{key: translate(value) for key, value in environment.items()}}
    limit = k8s_cpus(container.get("resources", {}).get("limits", {}).get("cpu"))
    return NativeService(name=container["name"], argv=argv, env=env, cwd=folder, cpu_limit=limit)
