"""``anomaly dashboards push`` against a local server that answers like Grafana, and ``build``."""

from __future__ import annotations

import json

import pytest

from anomaly.cli import main
from dashboards.datasources import FOLDER_UID, POSTGRES, PROMETHEUS
from dashboards.definitions import all_dashboards
from dashboards.generate import GENERATED_DIR, PROVISIONING_DIR, dashboard_files, provisioning_files
from dashboards.push import PushError, push

UIDS = {d.uid for d in all_dashboards()}


def _push_cli(grafana, *extra):
    return main(["dashboards", "push", "--url", grafana.url, "--token", grafana.token, *extra])


def test_first_push_creates_everything_with_the_right_requests(grafana, monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_GRAFANA_DB_PASSWORD", "s3cret")
    assert _push_cli(grafana, "--db-host", "db.internal:5432", "--db-name", "prod") == 0
    writes = [(r.method, r.path) for r in grafana.writes()]
    assert writes == [
        ("POST", "/api/folders"),
        ("POST", "/api/datasources"),
        ("POST", "/api/datasources"),
        *[("POST", "/api/dashboards/db")] * 3,
    ]
    assert all(r.headers["Authorization"] == f"Bearer {grafana.token}" for r in grafana.requests)
    folder, pg, prom, *dash = (r.body for r in grafana.writes())
    assert folder == {"title": "Anomaly monitor", "uid": FOLDER_UID}
    assert pg["uid"] == POSTGRES.uid and pg["type"] == POSTGRES.type
    assert pg["user"] == "anomaly_grafana" and pg["url"] == "db.internal:5432"
    assert pg["jsonData"]["database"] == "prod"
    assert pg["secureJsonData"] == {"password": "s3cret"}
    assert prom["uid"] == PROMETHEUS.uid and prom["type"] == "prometheus"
    assert {d["dashboard"]["uid"] for d in dash} == UIDS
    for body in dash:
        assert body["folderUid"] == FOLDER_UID and body["overwrite"] is True
        assert body["dashboard"]["id"] is None
        # What is pushed is what is committed.
        committed = json.loads((GENERATED_DIR / f"{body['dashboard']['uid']}.json").read_text())
        assert {k: v for k, v in body["dashboard"].items() if k != "id"} == committed
    assert "created: folder anomaly-monitor" in capsys.readouterr().out


def test_second_push_changes_nothing(grafana, monkeypatch, capsys):
    monkeypatch.setenv("ANOMALY_GRAFANA_DB_PASSWORD", "s3cret")
    assert _push_cli(grafana) == 0
    before = len(grafana.writes())
    versions = {uid: e["dashboard"]["version"] for uid, e in grafana.dashboards.items()}
    capsys.readouterr()
    assert _push_cli(grafana) == 0
    assert len(grafana.writes()) == before
    assert {uid: e["dashboard"]["version"] for uid, e in grafana.dashboards.items()} == versions
    out = capsys.readouterr().out
    assert "created" not in out and "updated" not in out and "unchanged: folder" in out


def test_push_repairs_what_drifted(grafana):
    push(grafana.url, grafana.token)
    # Someone edits a dashboard in the UI and points a datasource elsewhere.
    grafana.dashboards["anomaly-alerts"]["dashboard"]["title"] = "edited"
    grafana.datasources[PROMETHEUS.uid]["url"] = "http://elsewhere:9090"
    start = len(grafana.requests)
    result = push(grafana.url, grafana.token)
    writes = [(r.method, r.path) for r in grafana.requests[start:] if r.method != "GET"]
    assert writes == [
        ("PUT", f"/api/datasources/uid/{PROMETHEUS.uid}"),
        ("POST", "/api/dashboards/db"),
    ]
    assert result.updated == [f"datasource {PROMETHEUS.uid}", "dashboard anomaly-alerts"]
    assert grafana.dashboards["anomaly-alerts"]["dashboard"]["version"] == 2
    assert grafana.datasources[PROMETHEUS.uid]["url"] == "http://prometheus:9090"


def test_push_without_token_fails_clearly(grafana, capsys):
    with pytest.raises(PushError, match="401"):
        push(grafana.url, "wrong-token")
    assert main(["dashboards", "push", "--url", grafana.url, "--token", "nope"]) == 2
    assert "401" in capsys.readouterr().err
    assert grafana.writes() == []


def test_regenerated_files_match_the_committed_ones_byte_for_byte():
    for name, text in dashboard_files().items():
        assert (GENERATED_DIR / name).read_text(encoding="utf-8") == text, name
    assert sorted(p.name for p in GENERATED_DIR.glob("*.json")) == sorted(dashboard_files())
    for rel, text in provisioning_files().items():
        assert (PROVISIONING_DIR / rel).read_text(encoding="utf-8") == text, rel


def test_build_command_writes_the_same_files(tmp_path):
    assert (
        main(
            [
                "dashboards",
                "build",
                "--out",
                str(tmp_path / "d"),
                "--provisioning",
                str(tmp_path / "p"),
            ]
        )
        == 0
    )
    for name in dashboard_files():
        assert (tmp_path / "d" / name).read_bytes() == (GENERATED_DIR / name).read_bytes()
    for rel in provisioning_files():
        assert (tmp_path / "p" / rel).read_bytes() == (PROVISIONING_DIR / rel).read_bytes()


def test_dashboards_are_well_formed():
    for d in all_dashboards():
        data = d.to_json()
        ids = [p["id"] for p in data["panels"]]
        assert ids == list(range(1, len(ids) + 1))
        for p in data["panels"]:
            pos = p["gridPos"]
            assert pos["x"] + pos["w"] <= 24
            for t in p.get("targets", []):
                assert t["datasource"]["uid"] in (POSTGRES.uid, PROMETHEUS.uid)
        names = {v["name"] for v in data["templating"]["list"]}
        assert "pipeline" in names
    assert {"pipeline", "detector"} <= {
        v["name"] for v in all_dashboards()[0].to_json()["templating"]["list"]
    }


def test_prometheus_queries_match_the_metrics_the_service_exposes():
    """Every series and every grouping label a PromQL panel uses is in the contract
    (docs/architecture.md) and exposed by streams.metrics.ServiceMetrics once it has data."""
    import re
    from pathlib import Path

    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from dashboards.builder import PromTarget

    root = Path(__file__).resolve().parents[2]
    contract = set(re.findall(r"`(anomaly_\w+)`", (root / "docs" / "architecture.md").read_text()))
    metrics_mod = pytest.importorskip("streams.metrics", reason="streams.metrics not built yet")
    m = metrics_mod.ServiceMetrics("fraud")
    m.consumed.inc(5)
    m.scored.inc(5)
    m.alerted("high")
    m.dead_lettered("invalid_json")
    m.batch_size.observe(5)
    for stage in m.stage.values():
        stage.observe(0.01)
    m.end_to_end.observe(0.2)
    m.set_lag("fraud.transactions", 0, 3)
    m.set_device("cpu")
    m.set_model_version("v1")
    m.database_up.set(1)
    m.set_schema_registry_up(True)
    m.set_output_topics_up(True)
    exposed: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for sample in family.samples:
            exposed.setdefault(sample.name, set()).update(sample.labels)

    checked = 0
    for d in all_dashboards():
        for _, t in d.targets():
            if not isinstance(t, PromTarget):
                continue
            groups = re.findall(r"by \(([^)]*)\)", t.expr)
            labels = {x.strip() for g in groups for x in g.split(",")} - {"le"}
            for series in re.findall(r"anomaly_\w+", t.expr):
                base = re.sub(r"_(bucket|sum|count)$", "", series)
                assert series in contract or base in contract, series
                assert series in exposed, f"{series} not exposed by streams.metrics"
                assert labels <= exposed[series] | {"le"}, (series, labels - exposed[series])
                checked += 1
    assert checked >= 15
