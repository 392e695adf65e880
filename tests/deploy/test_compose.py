"""docker-compose.yml validates with ``docker-compose config -q`` and is wired consistently:
health checks, the GPU profile, Prometheus targets, mounted files and pipeline configs."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from anomaly.config import load_config

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = shutil.which("docker-compose")
needs_compose = pytest.mark.skipif(
    COMPOSE is None,
    reason="the docker-compose binary is absent (Debian: apt-get install -y docker-compose)",
)
ONE_SHOT = {"migrate", "train"}


def _compose(*args: str, cwd: Path = ROOT, file: str = "docker-compose.yml"):
    return subprocess.run(
        [COMPOSE, "-f", file, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _resolved() -> dict:
    out = _compose("--profile", "cpu", "--profile", "gpu", "--profile", "demo", "config")
    assert out.returncode == 0, out.stderr
    return yaml.safe_load(out.stdout)


@needs_compose
def test_config_is_valid():
    out = _compose("config", "-q")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""


@needs_compose
def test_config_check_rejects_a_broken_file(tmp_path):
    # The check above can fail: the same file with a misspelt key does not validate.
    text = (ROOT / "docker-compose.yml").read_text().replace("healthcheck:", "healthchek:", 1)
    (tmp_path / "docker-compose.yml").write_text(text)
    out = _compose("config", "-q", cwd=tmp_path)
    assert out.returncode != 0
    assert "healthchek" in out.stderr


@needs_compose
def test_services_health_checks_and_profiles():
    services = _resolved()["services"]
    expected = {
        "kafka",
        "postgres",
        "migrate",
        "scorer-fraud",
        "scorer-manufacturing",
        "scorer-fraud-gpu",
        "scorer-manufacturing-gpu",
        "train",
        "replay",
        "retention",
        "prometheus",
        "alertmanager",
        "grafana",
        "schema-registry",
    }
    assert set(services) == expected
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    for name, svc in services.items():
        check = svc.get("healthcheck", {})
        if name in ONE_SHOT:
            assert svc["restart"] == "no" and check.get("test") == ["NONE"], name  # disabled
        else:
            assert check.get("test") and check["test"][0] in ("CMD", "CMD-SHELL"), name
    for name in ("scorer-fraud", "scorer-manufacturing"):
        assert services[name]["profiles"] == ["cpu"]
        assert "deploy" not in services[name]
        gpu = services[f"{name}-gpu"]
        assert gpu["profiles"] == ["gpu"]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
        assert gpu["environment"]["ANOMALY_SERVE_DEVICE"] == "cuda"
        assert gpu["networks"]["default"]["aliases"] == [name]
        for svc in (services[name], gpu):
            assert svc["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "anomaly db upgrade" in services["migrate"]["command"][0]
    # The tables grow with the traffic: a default stack prunes them daily (30 days kept).
    assert "anomaly db prune --older-than 30d" in services["retention"]["command"][0]
    assert "profiles" not in services["retention"]  # with the CPU and with the GPU scorers
    assert services["replay"]["depends_on"]["train"]["condition"] == (
        "service_completed_successfully"
    )


@needs_compose
def test_the_avro_profile_adds_a_schema_registry_on_the_broker():
    services = _resolved()["services"]
    registry = services["schema-registry"]
    assert registry["profiles"] == ["avro"]
    store = registry["environment"]["SCHEMA_REGISTRY_KAFKASTORE_BOOTSTRAP_SERVERS"]
    assert store == "PLAINTEXT://kafka:9092"
    assert store in services["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert registry["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert registry["healthcheck"]["test"][0] == "CMD-SHELL"
    # The scorers' image must be able to use it: kafka.format avro and the registry client come
    # with the package's avro extra (without it a scorer pointed at the registry exits with a
    # ConfigError naming the missing package).
    [extras] = re.findall(r'pip install "\.\[([^\]]*)\]"', (ROOT / "Dockerfile").read_text())
    assert {"postgres", "avro"} <= set(extras.split(","))


@needs_compose
def test_scorers_prometheus_and_grafana_fit_together():
    services = _resolved()["services"]
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = {
        t
        for job in prom["scrape_configs"]
        if job["job_name"] == "anomaly-scorer"
        for group in job["static_configs"]
        for t in group["targets"]
    }
    seen = set()
    for name in ("scorer-fraud", "scorer-manufacturing"):
        svc = services[name]
        config_path = svc["command"][svc["command"].index("--config") + 1]
        assert config_path.startswith("/app/examples/")
        cfg = load_config(ROOT / "examples" / Path(config_path).name)
        assert svc["environment"]["ANOMALY_SERVE_METRICS_HOST"] == "0.0.0.0"
        target = f"{name}:{cfg.serve.metrics_port}"
        assert target in targets
        assert f"127.0.0.1:{cfg.serve.metrics_port}/healthz" in " ".join(svc["healthcheck"]["test"])
        seen.add(target)
    assert seen == targets
    # Every file Grafana and Prometheus mount exists in the tree.
    for svc in ("grafana", "prometheus", "alertmanager"):
        for volume in services[svc]["volumes"]:
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("/"):
                assert Path(source).exists(), source
    mounted = " ".join(str(v) for v in services["grafana"]["volumes"])
    assert "dashboards/generated" in mounted and "dashboards/provisioning" in mounted


def test_dockerfile_copies_what_the_package_needs():
    dockerfile = (ROOT / "Dockerfile").read_text()
    for package in ("anomaly", "storage", "streams", "dashboards", "examples"):
        assert f"COPY {package} " in dockerfile, package
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored
    assert not {"anomaly", "storage", "streams", "dashboards", "examples"} & set(ignored)


def _commands(script: str) -> list[list[str]]:
    """The ``anomaly ...`` command lines of a service's shell script, as argv lists."""
    import shlex

    script = script.replace("$$", "$").replace("\\\n", " ")
    out = []
    for line in script.replace("&&", "\n").splitlines():
        words = shlex.split(line.strip().rstrip("&").replace("$p", "fraud"))
        if words and words[0] == "anomaly":
            out.append(words[1:])
    return out


@needs_compose
def test_every_anomaly_command_in_the_stack_parses():
    """Flags in the compose file exist in the CLI (a typo would only show at deploy time)."""
    import subprocess as sp

    from anomaly.cli import build_parser

    services = _resolved()["services"]
    parser = build_parser()
    checked = 0
    for name, svc in services.items():
        if not svc.get("image", "").startswith("anomaly-monitor"):
            continue
        command = svc["command"]
        if svc.get("entrypoint") == ["sh", "-c"]:
            script = command[0]
            assert sp.run(["sh", "-n", "-c", script.replace("$$", "$")]).returncode == 0, name
            argvs = _commands(script)
        else:
            argvs = [command]
        assert argvs, name
        for argv in argvs:
            args = parser.parse_args(argv)
            assert getattr(args, "handler", None) is not None, (name, argv)
            checked += 1
    assert checked >= 8


@needs_compose
def test_scorers_post_incidents_to_the_alertmanager_service():
    services = _resolved()["services"]
    am = services["alertmanager"]
    assert am["image"].startswith("prom/alertmanager:")
    assert "9093" in str(am["ports"])
    for name in ("scorer-fraud", "scorer-manufacturing"):
        url = services[name]["environment"]["ANOMALY_ALERTING_ALERTMANAGER_URL"]
        assert url == "http://alertmanager:9093"


@pytest.mark.skipif(shutil.which("amtool") is None, reason="amtool is absent")
def test_the_example_alertmanager_config_is_valid():
    out = subprocess.run(
        ["amtool", "check-config", str(ROOT / "deploy" / "alertmanager" / "alertmanager.yml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stdout + out.stderr
