"""The deployment files (Dockerfile, deploy/compose/, deploy/k8s/) stay consistent with each
other and with the pipeline itself: every YAML parses, the compose stack has its services, mounts
that exist and a consistent KRaft quorum, the configuration files load with the project's own
loader and define what the Prometheus scrape targets, probes and KEDA triggers expect, and the
Kubernetes manifests carry probes, resources, a non-root security context, PDBs and scalers that
match the configuration. No Docker engine or cluster is needed; `kubectl kustomize` (kubectl is on
this machine's PATH) renders the base and the overlay."""

from __future__ import annotations

import fnmatch
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.config import Settings, load_config
from pipeline.worker.health import HealthServer

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yaml"
COMPOSE_CONFIG = COMPOSE_DIR / "pipeline.yaml"
OTEL_CONFIG = COMPOSE_DIR / "otel-collector.yaml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
K8S_BASE = DEPLOY / "k8s" / "base"
K8S_OVERLAY = DEPLOY / "k8s" / "overlays" / "example"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

WORKERS = ("wms", "crm", "bi")
HEALTH_PORT = 9000
CONFIG_MAP = "pipeline-config"
PREFIX_ANNOTATION = "erp-pipeline.io/topics-prefix"


# -- helpers ----------------------------------------------------------------------------------


def load_docs(path: Path) -> list[Any]:
    """Every document of a (multi-document) YAML file, empty ones left out."""
    with path.open() as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_one(path: Path) -> dict[str, Any]:
    docs = load_docs(path)
    assert len(docs) == 1, f"{path}: expected one YAML document, got {len(docs)}"
    assert isinstance(docs[0], dict), f"{path}: not a mapping"
    return docs[0]


@pytest.fixture(autouse=True)
def _no_pipeline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """PIPELINE_* variables of the machine would override the files under test."""
    for name in list(os.environ):
        if name.startswith("PIPELINE_"):
            monkeypatch.delenv(name)


def settings_from_text(text: str, tmp_path: Path, name: str = "pipeline.yaml") -> Settings:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path)


def env_dict(env: Any) -> dict[str, str]:
    """A compose `environment` (mapping or list of NAME=value) as a mapping."""
    if env is None:
        return {}
    if isinstance(env, dict):
        return {k: "" if v is None else str(v) for k, v in env.items()}
    out = {}
    for item in env:
        name, _, value = str(item).partition("=")
        out[name] = value
    return out


def as_argv(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(v) for v in value]


def parse_quantity(q: Any) -> float:
    """A Kubernetes quantity (cpu "250m", "2"; memory "512Mi", "1Gi") as a number."""
    s = str(q)
    suffixes = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
                "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * suffixes[suffix]
    return float(s)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- every YAML file --------------------------------------------------------------------------

YAML_FILES = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def test_the_deploy_tree_has_its_files() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    for required in ("compose/docker-compose.yaml", "compose/pipeline.yaml",
                     "compose/otel-collector.yaml", "k8s/base/kustomization.yaml",
                     "k8s/overlays/example/kustomization.yaml", "prometheus/prometheus.yml"):
        assert required in names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_yaml_file_parses(path: Path) -> None:
    docs = load_docs(path)
    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"


# -- docker compose ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_one(COMPOSE_FILE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svcs: dict[str, dict[str, Any]] = compose["services"]
    return svcs


def kafka_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith("apache/kafka")}


def pipeline_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Services that run the `pipeline` command: built from the repository, entrypoint kept."""
    return {n: s for n, s in services.items() if "build" in s and "entrypoint" not in s}


def test_compose_has_the_required_services(services: dict[str, dict[str, Any]]) -> None:
    assert len(kafka_services(services)) == 3
    assert "confluentinc/cp-schema-registry" in str(services["schema-registry"]["image"])
    assert str(services["postgres"]["image"]).startswith("postgres:16")
    assert "opentelemetry-collector" in str(services["otel-collector"]["image"])
    assert "prometheus" in str(services["prometheus"]["image"])
    assert "grafana" in str(services["grafana"]["image"])
    for name in ("relay", "worker-wms", "worker-crm", "worker-bi", "wms", "crm",
                 "outbox-install", "topics-apply"):
        assert name in services, name


def test_compose_postgres_has_logical_wal_level(services: dict[str, dict[str, Any]]) -> None:
    argv = as_argv(services["postgres"].get("command"))
    settings = {argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "-c"}
    assert "wal_level=logical" in settings, argv


def test_compose_relay_runs_two_replicas(services: dict[str, dict[str, Any]]) -> None:
    relay = services["relay"]
    assert relay["deploy"]["replicas"] == 2
    assert "container_name" not in relay  # two replicas cannot share a name
    assert not relay.get("ports")  # nor a host port
    assert as_argv(relay["command"]) == ["relay"]


def test_compose_commands(services: dict[str, dict[str, Any]]) -> None:
    for name in WORKERS:
        assert as_argv(services[f"worker-{name}"]["command"]) == ["worker", name]
    assert as_argv(services["outbox-install"]["command"]) == ["outbox", "install"]
    assert as_argv(services["topics-apply"]["command"]) == ["topics", "apply"]


def test_compose_builds_use_the_repository_dockerfile(services: dict[str, dict[str, Any]]) -> None:
    building = {n: s["build"] for n, s in services.items() if "build" in s}
    assert set(pipeline_services(services)) <= set(building)
    for name, build in building.items():
        context = build if isinstance(build, str) else build["context"]
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile",
                                                                            "Dockerfile")
        assert (COMPOSE_DIR / context).resolve() == ROOT, name
        assert ((COMPOSE_DIR / context).resolve() / dockerfile) == DOCKERFILE, name


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(source, target) of a service's bind mounts, short and long syntax."""
    mounts = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) >= 2 and parts[0].startswith((".", "/", "~")):
                mounts.append((parts[0], parts[1]))
        elif v.get("type") == "bind":
            mounts.append((v["source"], v["target"]))
    return mounts


def test_compose_bind_mounts_exist(compose: dict[str, Any],
                                   services: dict[str, dict[str, Any]]) -> None:
    seen = 0
    for name, service in services.items():
        for source, _ in bind_mounts(service):
            assert (COMPOSE_DIR / source).exists(), f"{name}: {source} does not exist"
            seen += 1
        for v in service.get("volumes") or []:  # named volumes are declared
            if isinstance(v, str) and not v.startswith((".", "/", "~")) and ":" in v:
                assert v.split(":")[0] in (compose.get("volumes") or {}), f"{name}: {v}"
    assert seen >= 6


def test_compose_healthy_dependencies_have_healthchecks(
        services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = spec["condition"]
            target = services[dep]
            if condition == "service_healthy":
                check = target.get("healthcheck") or {}
                # pipeline images carry the Dockerfile's HEALTHCHECK unless disabled
                assert not check.get("disable"), f"{name} waits for {dep}, whose check is off"
                assert check.get("test") or dep in pipeline_services(services), (name, dep)
            elif condition == "service_completed_successfully":
                assert target.get("restart", "no") == "no", f"{dep} must be one-shot"


def test_compose_pipeline_services_wait_for_the_setup(services: dict[str, dict[str, Any]]) -> None:
    for name in ("relay", "worker-wms", "worker-crm", "worker-bi"):
        deps = services[name]["depends_on"]
        for init in ("outbox-install", "topics-apply"):
            assert deps[init]["condition"] == "service_completed_successfully", (name, init)


def test_compose_pipeline_services_mount_the_config(services: dict[str, dict[str, Any]]) -> None:
    runners = pipeline_services(services)
    assert {"relay", "worker-wms", "worker-crm", "worker-bi", "outbox-install",
            "topics-apply"} <= set(runners)
    for name, service in runners.items():
        env = env_dict(service.get("environment"))
        assert "PIPELINE_CONFIG" in env, name
        targets = {t: (COMPOSE_DIR / s).resolve() for s, t in bind_mounts(service)}
        assert targets.get(env["PIPELINE_CONFIG"]) == COMPOSE_CONFIG.resolve(), name
        assert env.get("PIPELINE_DATABASE__URL", "").startswith("postgresql://"), name


def test_compose_kraft_quorum_is_consistent(services: dict[str, dict[str, Any]]) -> None:
    brokers = kafka_services(services)
    envs = {n: env_dict(s["environment"]) for n, s in brokers.items()}
    ids = {n: int(e["KAFKA_NODE_ID"]) for n, e in envs.items()}
    assert len(set(ids.values())) == 3, ids
    assert len({e["CLUSTER_ID"] for e in envs.values()}) == 1
    voters = {e["KAFKA_CONTROLLER_QUORUM_VOTERS"] for e in envs.values()}
    assert len(voters) == 1, "every node needs the same quorum voters"
    parsed = {}
    for voter in voters.pop().split(","):
        node_id, _, address = voter.partition("@")
        host, _, port = address.rpartition(":")
        parsed[int(node_id)] = (host, port)
    for name, env in envs.items():
        hostname = brokers[name].get("hostname", name)
        assert parsed[ids[name]][0] in (name, hostname), f"voter of node {ids[name]}"
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
        controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
        listeners = dict(
            (lst.split("://")[0], lst.split(":")[-1]) for lst in env["KAFKA_LISTENERS"].split(","))
        assert listeners[controller] == parsed[ids[name]][1], "quorum port = controller listener"
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2
        advertised = dict(
            (a.split("://")[0], a.split("://")[1]) for a in
            env["KAFKA_ADVERTISED_LISTENERS"].split(","))
        assert advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"]].split(":")[0] in (name,
                                                                                    hostname)
    assert set(parsed) == set(ids.values()), "the quorum lists all three controllers"


def test_compose_config_loads_and_matches_the_stack(services: dict[str, dict[str, Any]]) -> None:
    s = load_config(COMPOSE_CONFIG)
    assert set(s.workers) == set(WORKERS)
    assert s.relay.health_port == HEALTH_PORT
    for name in WORKERS:
        assert s.workers[name].health_port == HEALTH_PORT, name
    assert s.topics.replication_factor <= len(kafka_services(services))
    # the bootstrap servers are the brokers' PLAINTEXT listeners
    assert s.kafka.bootstrap_servers
    for server in s.kafka.bootstrap_servers.split(","):
        host, _, port = server.rpartition(":")
        env = env_dict(services[host]["environment"])
        assert f"PLAINTEXT://{host}:{port}" in env["KAFKA_ADVERTISED_LISTENERS"], server
    assert s.schema_registry.url
    assert urlsplit(s.schema_registry.url).hostname in services
    # the REST workers call the reference servers of the stack, on the port they listen on
    for name in ("wms", "crm"):
        url = urlsplit(s.workers[name].options["base_url"])
        argv = as_argv(services[url.hostname]["command"])
        assert argv[argv.index("--port") + 1] == str(url.port), name
        assert argv[argv.index("--host") + 1] == "0.0.0.0", name


def test_config_connectors_import() -> None:
    for path in (COMPOSE_CONFIG, K8S_BASE / "pipeline.yaml"):
        for name, wc in load_config(path).workers.items():
            module, _, attr = wc.connector.partition(":")
            assert getattr(importlib.import_module(module), attr), (path, name)


def test_prometheus_targets_are_the_compose_services(services: dict[str, dict[str, Any]]) -> None:
    s = load_config(COMPOSE_CONFIG)
    targets = {t for job in load_one(PROMETHEUS_YML)["scrape_configs"]
               for sc in job.get("static_configs", []) for t in sc["targets"]}
    expected_ports = {"relay": s.relay.health_port,
                      **{f"worker-{n}": s.workers[n].health_port for n in WORKERS}}
    assert {t.split(":")[0] for t in targets} == set(expected_ports)
    for target in targets:
        host, _, port = target.partition(":")
        assert host in services, target
        assert int(port) == expected_ports[host], target


def test_compose_prometheus_mounts_its_config_and_rules(
        services: dict[str, dict[str, Any]]) -> None:
    prometheus = services["prometheus"]
    mounts = {t: (COMPOSE_DIR / s).resolve() for s, t in bind_mounts(prometheus)}
    flags = dict(a.split("=", 1) for a in as_argv(prometheus["command"]) if "=" in a)
    config_path = flags.get("--config.file", "/etc/prometheus/prometheus.yml")
    assert mounts[config_path] == PROMETHEUS_YML.resolve()
    for rule_file in load_one(PROMETHEUS_YML).get("rule_files", []):
        in_container = str(PurePosixPath(config_path).parent / rule_file)
        assert mounts[in_container] == (PROMETHEUS_YML.parent / rule_file).resolve()


def test_compose_grafana_provisions_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = {t: (COMPOSE_DIR / s).resolve() for s, t in bind_mounts(grafana)}
    dashboard = (DEPLOY / "grafana" / "erp-pipeline-dashboard.json").resolve()
    dashboard_target = next(t for t, s in mounts.items() if s == dashboard)
    json.loads(dashboard.read_text())

    def provisioned(kind: str) -> list[dict[str, Any]]:
        folder = mounts[f"/etc/grafana/provisioning/{kind}"]
        return [load_one(p) for p in sorted(folder.glob("*.yaml"))]

    providers = [p for doc in provisioned("dashboards") for p in doc["providers"]]
    assert any(str(PurePosixPath(dashboard_target).parent) == p["options"]["path"]
               for p in providers)
    datasources = [d for doc in provisioned("datasources") for d in doc["datasources"]]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus and urlsplit(prometheus[0]["url"]).hostname == "prometheus"


def test_compose_otel_collector_config(services: dict[str, dict[str, Any]]) -> None:
    config = load_one(OTEL_CONFIG)
    protocols = config["receivers"]["otlp"]["protocols"]
    assert {"grpc", "http"} <= set(protocols)
    assert {"debug", "prometheus"} <= set(config["exporters"])
    pipelines = config["service"]["pipelines"]
    assert {"traces", "metrics"} <= set(pipelines)
    for name, p in pipelines.items():
        for kind in ("receivers", "processors", "exporters"):
            for component in p.get(kind, []):
                assert component in config[kind], f"{name}: {component} is not defined"
    assert "prometheus" in pipelines["metrics"]["exporters"]
    collector = services["otel-collector"]
    mounts = {(COMPOSE_DIR / s).resolve(): t for s, t in bind_mounts(collector)}
    target = mounts[OTEL_CONFIG.resolve()]
    assert any(target in a for a in as_argv(collector.get("command")))
    http_port = protocols["http"]["endpoint"].rpartition(":")[2]
    for name, service in pipeline_services(services).items():
        endpoint = urlsplit(env_dict(service["environment"])["OTEL_EXPORTER_OTLP_ENDPOINT"])
        assert (endpoint.hostname, str(endpoint.port)) == ("otel-collector", http_port), name


def healthcheck_code(test: list[str]) -> str:
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


@pytest.mark.parametrize("name", ["wms", "crm"])
def test_compose_reference_server_healthchecks_work(
        services: dict[str, dict[str, Any]], name: str) -> None:
    service = services[name]
    assert as_argv(service["entrypoint"]) == ["python", "-m", f"connectors.{name}.server"]
    argv = as_argv(service["command"])
    port = argv[argv.index("--port") + 1]
    code = healthcheck_code(service["healthcheck"]["test"])
    assert f":{port}/" in code
    module = importlib.import_module(f"connectors.{name}.server")
    server_cls = getattr(module, f"{name.capitalize()}Server")
    with server_cls(0, "127.0.0.1") as server:
        probe = code.replace(f":{port}/", f":{server.port}/")
        done = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr.decode()


# -- Dockerfile and .dockerignore -------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), line continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, rest = buf.strip().partition(" ")
        out.append((op.upper(), rest.strip()))
        buf = ""
    return out


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for op, args in dockerfile_instructions():
        if op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((op, args))
    return stages


def test_dockerfile_is_multi_stage_with_a_slim_python_runtime() -> None:
    stages = dockerfile_stages()
    assert len(stages) >= 2
    names = [a.split()[-1] for _, a in (s[0] for s in stages) if " AS " in a.upper()]
    final = stages[-1]
    assert final[0][1].split()[0] == "python:3.11-slim"
    copies_from = [a for op, a in final if op == "COPY" and a.startswith("--from=")]
    assert copies_from, "the runtime stage takes the build from an earlier stage"
    for args in copies_from:
        assert args.split()[0].removeprefix("--from=") in names[:-1]


def test_dockerfile_runtime_stage() -> None:
    final = dockerfile_stages()[-1]
    ops: dict[str, list[str]] = {}
    for op, args in final:
        ops.setdefault(op, []).append(args)
    user = ops["USER"][-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit() and int(user) >= 10000
    assert json.loads(ops["ENTRYPOINT"][-1]) == ["pipeline"]
    assert json.loads(ops["CMD"][-1]) == ["--help"]
    assert str(HEALTH_PORT) in " ".join(ops["EXPOSE"]).split()
    assert any(re.search(r"\bPYTHONUNBUFFERED=1\b", env) for env in ops["ENV"])
    healthcheck = ops["HEALTHCHECK"][-1]
    assert f":{HEALTH_PORT}/healthz" in healthcheck and "urllib" in healthcheck
    assert "curl" not in healthcheck


def test_dockerfile_installs_the_parquet_extra_from_a_wheel() -> None:
    runs = " ".join(a for op, a in dockerfile_instructions() if op == "RUN")
    assert re.search(r"pip wheel|-m build", runs)
    assert "[parquet]" in runs


def test_dockerfile_healthcheck_calls_healthz() -> None:
    healthcheck = next(a for op, a in dockerfile_stages()[-1] if op == "HEALTHCHECK")
    argv = json.loads(healthcheck[healthcheck.index("CMD") + 3:].strip())
    code = healthcheck_code(["CMD", *argv])
    state = {"ok": True}
    server = HealthServer(0, lambda: (state["ok"], {}), lambda: (True, {}), host="127.0.0.1")
    server.start()
    try:
        probe = code.replace(f":{HEALTH_PORT}/", f":{server.port}/")
        healthy = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
        state["ok"] = False
        unhealthy = subprocess.run([sys.executable, "-c", probe], capture_output=True, timeout=30)
    finally:
        server.stop()
    assert healthy.returncode == 0, healthy.stderr.decode()
    assert unhealthy.returncode != 0


def dockerignore_patterns() -> list[str]:
    lines = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    return [ln.lstrip("/") for ln in lines if ln and not ln.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        p = pattern.lstrip("!")
        parts = PurePosixPath(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(pre, p) or fnmatch.fnmatch(pre, p.replace("**/", ""))
               for pre in prefixes):
            result = not negate
    return result


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    patterns = dockerignore_patterns()
    for path in (".venv", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache",
                 "pipeline/__pycache__/x.pyc", "tests/unit/test_config.py"):
        assert ignored(path, patterns), path
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wheel = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = ["pyproject.toml", pyproject["project"]["readme"], *wheel["packages"],
              *wheel.get("force-include", {})]
    builder = dockerfile_stages()[0]
    copied = [src for op, a in builder if op == "COPY" and not a.startswith("--from=")
              for src in a.split()[:-1]]
    for item in needed:
        assert (ROOT / item).exists(), item
        assert not ignored(item, patterns), f".dockerignore drops {item}"
        assert any(item == c.rstrip("/") or item.startswith(c.rstrip("/") + "/") or c == "."
                   for c in copied), f"the builder stage does not COPY {item}"


# -- Kubernetes: kustomize layout -------------------------------------------------------------


def kustomization(folder: Path) -> dict[str, Any]:
    return load_one(folder / "kustomization.yaml")


@pytest.mark.parametrize("folder", [K8S_BASE, K8S_OVERLAY], ids=["base", "overlay"])
def test_kustomization_files_exist(folder: Path) -> None:
    k = kustomization(folder)
    assert k["resources"]
    for resource in k["resources"]:
        path = folder / resource
        assert path.is_file() or (path / "kustomization.yaml").is_file(), resource
    for patch in k.get("patches", []):
        assert (folder / patch["path"]).is_file(), patch
        for doc in load_docs(folder / patch["path"]):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), patch
    for generator in k.get("configMapGenerator", []):
        for file in generator.get("files", []):
            assert (folder / file.split("=")[-1]).is_file(), file


def test_base_is_namespace_agnostic() -> None:
    assert "namespace" not in kustomization(K8S_BASE)
    for doc in base_docs():
        assert "namespace" not in doc["metadata"], doc["metadata"]["name"]


def base_docs() -> list[dict[str, Any]]:
    return [d for r in kustomization(K8S_BASE)["resources"] for d in load_docs(K8S_BASE / r)]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def base_config_path() -> Path:
    (generator,) = [g for g in kustomization(K8S_BASE)["configMapGenerator"]
                    if g["name"] == CONFIG_MAP]
    (file,) = generator["files"]
    key, _, source = file.rpartition("=")
    assert (key or source) == "pipeline.yaml"
    return K8S_BASE / source


@pytest.fixture(scope="module")
def base_settings() -> Settings:
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("PIPELINE_")}
    try:
        return load_config(base_config_path())
    finally:
        os.environ.update(saved)


def test_base_config_defines_the_workers(base_settings: Settings) -> None:
    assert set(base_settings.workers) == set(WORKERS)
    assert base_settings.relay.health_port == HEALTH_PORT
    for wc in base_settings.workers.values():
        assert wc.health_port == HEALTH_PORT
    assert base_settings.database.url is None, "the database URL belongs in the Secret"


def test_secret_keys_are_configuration_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = of_kind(base_docs(), "Secret")
    (secret,) = secrets.values()
    data = secret["stringData"]
    assert "PIPELINE_DATABASE__URL" in data
    for key, value in data.items():
        assert key.startswith("PIPELINE_"), key
        section = key.removeprefix("PIPELINE_").split("__")[0].lower()
        assert section in Settings.model_fields, f"{key}: no section {section}"
        monkeypatch.setenv(key, str(value))
    s = load_config(base_config_path())  # unknown nested keys would be errors
    assert s.database.url is not None
    for name in ("wms", "crm"):
        key = f"PIPELINE_WORKERS__{name.upper()}__OPTIONS__BEARER_TOKEN"
        if key in data:
            assert s.workers[name].options["bearer_token"] == data[key]


# -- Kubernetes: workloads (checked on the base, and on the rendered overlay below) -----------


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container_port(container: dict[str, Any], port: Any) -> int:
    if isinstance(port, int):
        return port
    (match,) = [p for p in container.get("ports", []) if p.get("name") == port]
    return int(match["containerPort"])


def check_container_security(pod: dict[str, Any], container: dict[str, Any], what: str) -> None:
    pod_sc = pod.get("securityContext", {})
    sc = container.get("securityContext", {})
    assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, what
    uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
    assert uid is None or uid != 0, what
    assert sc.get("readOnlyRootFilesystem") is True, what
    assert sc.get("allowPrivilegeEscalation") is False, what
    assert "ALL" in sc.get("capabilities", {}).get("drop", []), what
    resources = container.get("resources", {})
    for bound in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{what}: {bound}"
        for res in ("cpu", "memory"):
            parse_quantity(resources[bound][res])
    for res in ("cpu", "memory"):
        assert (parse_quantity(resources["requests"][res])
                <= parse_quantity(resources["limits"][res])), f"{what}: {res}"


def check_config_mount(pod: dict[str, Any], container: dict[str, Any], config_map: str,
                       secret: str, what: str) -> None:
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config_path = PurePosixPath(env["PIPELINE_CONFIG"])
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
    mount = mounts[str(config_path.parent)]
    volume = volumes[mount["name"]]
    assert volume["configMap"]["name"] == config_map, what
    items = volume["configMap"].get("items")
    assert items is None or any(i["path"] == config_path.name for i in items), what
    assert config_path.name == "pipeline.yaml", what
    refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
    assert secret in refs, what
    if container.get("securityContext", {}).get("readOnlyRootFilesystem"):
        assert "/tmp" in mounts, f"{what}: a writable /tmp"


def base_secret_name() -> str:
    (secret,) = of_kind(base_docs(), "Secret")
    return secret


def check_workloads(docs: list[dict[str, Any]], settings: Settings, config_map: str,
                    image: str) -> None:
    """What holds for the base and for any rendering of it: probes, resources, security,
    config mount, commands that the configuration knows, PDBs, ScaledObjects, Services and the
    ServiceMonitor."""
    deployments = of_kind(docs, "Deployment")
    secret = base_secret_name()
    workers_seen = []
    for name, deployment in deployments.items():
        pod = pod_spec(deployment)
        (container,) = pod["containers"]
        what = f"Deployment {name}"
        assert container["image"].rpartition(":")[0] == image or container["image"] == image, what
        args = container.get("args") or container.get("command")
        assert args[0] in ("relay", "worker"), what
        if args[0] == "relay":
            assert args[1:] == [] or (args[1] == "--shard"
                                      and 0 <= int(args[2]) < settings.relay.shards), what
            port = settings.relay.health_port
        else:
            (worker,) = args[1:]
            assert worker in settings.workers, f"{what}: worker {worker} is not configured"
            workers_seen.append(worker)
            port = settings.workers[worker].health_port
        assert port == HEALTH_PORT
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, f"{what}: {probe}"
            assert container_port(container, get["port"]) == port, f"{what}: {probe}"
        check_container_security(pod, container, what)
        check_config_mount(pod, container, config_map, secret, what)
    assert sorted(workers_seen) == sorted(settings.workers), "one Deployment per worker"

    pdbs = list(of_kind(docs, "PodDisruptionBudget").values())

    def pdb_of(deployment: dict[str, Any]) -> dict[str, Any]:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        (pdb,) = [p for p in pdbs if labels_match(p["spec"]["selector"]["matchLabels"], labels)]
        return pdb

    relay = deployments["relay"]
    assert relay["spec"]["replicas"] == 2
    assert pdb_of(relay)["spec"]["minAvailable"] == 1

    scaled = of_kind(docs, "ScaledObject")
    for name, deployment in deployments.items():
        args = pod_spec(deployment)["containers"][0]["args"]
        if args[0] != "worker":
            continue
        worker = args[1]
        wc = settings.workers[worker]
        assert pdb_of(deployment)["spec"]["maxUnavailable"] == 1, name
        assert "replicas" not in deployment["spec"], f"{name}: KEDA sets the replicas"
        (so,) = [s for s in scaled.values() if s["spec"]["scaleTargetRef"]["name"] == name]
        spec = so["spec"]
        types = wc.aggregate_types or settings.topics.aggregate_types
        partitions = min(
            (settings.topics.overrides[t].partitions if t in settings.topics.overrides
             and settings.topics.overrides[t].partitions else settings.topics.partitions)
            for t in types)
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions, name
        topics = set()
        for trigger in spec["triggers"]:
            assert trigger["type"] == "kafka", name
            meta = trigger["metadata"]
            assert all(isinstance(v, str) for v in meta.values()), f"{name}: strings only"
            assert meta["consumerGroup"] == f"{settings.topics.prefix}.{wc.group or worker}"
            assert meta["bootstrapServers"] == settings.kafka.bootstrap_servers, name
            assert int(meta["lagThreshold"]) > 0, name
            topics.add(meta["topic"])
        assert topics == set(settings.event_topics(wc)), name

    services = of_kind(docs, "Service")
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        matching = [s for s in services.values() if labels_match(s["spec"]["selector"], labels)]
        assert len(matching) == 1, f"one Service for {name}"
        (port,) = [p for p in matching[0]["spec"]["ports"]
                   if p["port"] == HEALTH_PORT]
        container = pod_spec(deployment)["containers"][0]
        assert container_port(container, port.get("targetPort", port["port"])) == HEALTH_PORT
    (monitor,) = of_kind(docs, "ServiceMonitor").values()
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    endpoint_ports = {e["port"] for e in monitor["spec"]["endpoints"]}
    assert {e.get("path", "/metrics") for e in monitor["spec"]["endpoints"]} == {"/metrics"}
    for name, service in services.items():
        assert labels_match(selector["matchLabels"], service["metadata"]["labels"]), name
        names = {p.get("name") for p in service["spec"]["ports"]}
        assert endpoint_ports <= names, f"Service {name} lacks the monitored port"

    (job,) = of_kind(docs, "Job").values()
    pod = pod_spec(job)
    steps = [c.get("args") for c in pod.get("initContainers", []) + pod["containers"]]
    assert steps.index(["outbox", "install"]) < steps.index(["topics", "apply"])
    assert pod["restartPolicy"] in ("OnFailure", "Never")
    for c in pod.get("initContainers", []) + pod["containers"]:
        check_container_security(pod, c, f"Job container {c['name']}")
        check_config_mount(pod, c, config_map, secret, f"Job container {c['name']}")


def overlay_image_name() -> str:
    (image,) = kustomization(K8S_OVERLAY)["images"]
    assert image.get("newName") or image.get("newTag")
    name: str = image["name"]
    return name


def test_base_workloads(base_settings: Settings) -> None:
    check_workloads(base_docs(), base_settings, CONFIG_MAP, overlay_image_name())


# -- Kubernetes: the example overlay ----------------------------------------------------------


def overlay_config_path() -> Path:
    (generator,) = [g for g in kustomization(K8S_OVERLAY).get("configMapGenerator", [])
                    if g["name"] == CONFIG_MAP]
    assert generator["behavior"] == "replace"
    (file,) = generator["files"]
    return K8S_OVERLAY / file.rpartition("=")[2]


def test_overlay_settings() -> None:
    k = kustomization(K8S_OVERLAY)
    assert k["namespace"]
    assert "../../base" in k["resources"]
    (image,) = k["images"]
    assert image["newName"] and image["newTag"]
    overlay = load_config(overlay_config_path())
    base = load_config(base_config_path())
    assert overlay.topics.prefix != base.topics.prefix
    assert set(overlay.workers) == set(base.workers)
    (generator,) = k["configMapGenerator"]
    # the ScaledObjects follow the prefix by a replacement of their first dot-separated part
    assert generator["options"]["annotations"][PREFIX_ANNOTATION] == overlay.topics.prefix
    assert "." not in overlay.topics.prefix
    (replacement,) = k["replacements"]
    assert replacement["source"]["name"] == CONFIG_MAP
    assert PREFIX_ANNOTATION in replacement["source"]["fieldPath"]
    (target,) = replacement["targets"]
    assert target["select"]["kind"] == "ScaledObject"
    assert set(target["fieldPaths"]) == {"spec.triggers.*.metadata.consumerGroup",
                                         "spec.triggers.*.metadata.topic"}
    assert target["options"] == {"delimiter": ".", "index": 0}


def test_overlay_leaves_out_the_placeholder_secret() -> None:
    """Applying the overlay must not overwrite the real Secret with the base's placeholders."""
    k = kustomization(K8S_OVERLAY)
    deletes = [load_one(K8S_OVERLAY / p["path"]) for p in k["patches"]]
    deleted = {(d["kind"], d["metadata"]["name"]) for d in deletes if d.get("$patch") == "delete"}
    assert ("Secret", base_secret_name()) in deleted
    assert "secretGenerator" not in k


def test_overlay_patch_raises_the_relay_resources() -> None:
    k = kustomization(K8S_OVERLAY)
    base_relay = of_kind(base_docs(), "Deployment")["relay"]
    patches = [load_one(K8S_OVERLAY / p["path"]) for p in k["patches"]]
    (patch,) = [p for p in patches if p["kind"] == "Deployment"
                and p["metadata"]["name"] == "relay"]
    (patched,) = pod_spec(patch)["containers"]
    (original,) = pod_spec(base_relay)["containers"]
    assert patched["name"] == original["name"]
    for bound in ("requests", "limits"):
        for res in ("cpu", "memory"):
            assert (parse_quantity(patched["resources"][bound][res])
                    > parse_quantity(original["resources"][bound][res])), (bound, res)


def kustomize(folder: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not on PATH"
    done = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def rendered_settings(docs: list[dict[str, Any]], tmp_path: Path) -> tuple[Settings, str]:
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"
                     and d["metadata"]["name"].startswith(CONFIG_MAP)]
    settings = settings_from_text(config_map["data"]["pipeline.yaml"], tmp_path)
    return settings, config_map["metadata"]["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl is not installed: the other tests check the manifests one "
                           "by one; this one checks what kustomize renders from them")
def test_kubectl_kustomize_renders_the_overlay(tmp_path: Path) -> None:
    docs = kustomize(K8S_OVERLAY)
    k = kustomization(K8S_OVERLAY)
    settings, config_map = rendered_settings(docs, tmp_path)
    assert settings.topics.prefix == load_config(overlay_config_path()).topics.prefix
    (image,) = k["images"]
    image_ref = f"{image['newName']}:{image['newTag']}"
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == k["namespace"], doc["metadata"]["name"]
        if doc["kind"] in ("Deployment", "Job"):
            pod = pod_spec(doc)
            for c in pod.get("initContainers", []) + pod["containers"]:
                assert c["image"] == image_ref, doc["metadata"]["name"]
    assert not [d for d in docs if d["kind"] == "Secret"], "the placeholder Secret is left out"
    check_workloads(docs, settings, config_map, image["newName"])
    relay = of_kind(docs, "Deployment")["relay"]
    patch = load_one(K8S_OVERLAY / "relay-resources.yaml")
    assert (pod_spec(relay)["containers"][0]["resources"]
            == pod_spec(patch)["containers"][0]["resources"])


@pytest.mark.skipif(shutil.which("kubectl") is None,
                    reason="kubectl is not installed: the other tests check the manifests one "
                           "by one; this one checks what kustomize renders from them")
def test_kubectl_kustomize_renders_the_base(tmp_path: Path, base_settings: Settings) -> None:
    docs = kustomize(K8S_BASE)
    settings, config_map = rendered_settings(docs, tmp_path)
    assert settings == base_settings
    check_workloads(docs, settings, config_map, overlay_image_name())
