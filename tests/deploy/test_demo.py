"""``anomaly demo --short``: the embedded broker, both example pipelines, real training, replay,
serving into SQLite, and a summary whose numbers match the database. And Ctrl-C stops it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from tests.demo_helpers import training_workers

pytestmark = pytest.mark.kafka


def test_short_demo_runs_end_to_end(tmp_path, capsys):
    from sqlalchemy import create_engine, func, select

    from anomaly.cli import main
    from storage import schema as s

    out = tmp_path / "demo"
    assert main(["demo", "--short", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "summary" in text and "precision" in text and "recall" in text

    engine = create_engine(f"sqlite:///{out / 'anomaly.db'}")
    with engine.connect() as conn:
        alerts = dict(
            conn.execute(
                select(s.alerts.c.pipeline, func.count()).group_by(s.alerts.c.pipeline)
            ).all()
        )
        active = dict(
            conn.execute(
                select(s.model_versions.c.pipeline, s.model_versions.c.version).where(
                    s.model_versions.c.active
                )
            ).all()
        )
        scored = dict(
            conn.execute(
                select(
                    s.stream_stats.c.pipeline, func.sum(s.stream_stats.c.records_scored)
                ).group_by(s.stream_stats.c.pipeline)
            ).all()
        )
        incidents = dict(
            conn.execute(
                select(s.incidents.c.pipeline, func.count()).group_by(s.incidents.c.pipeline)
            ).all()
        )
    engine.dispose()
    assert set(active) == {"fraud", "manufacturing"}
    # Every replayed record was scored exactly once.
    assert scored == {"fraud": 1500, "manufacturing": 1500}
    # The summary's rows agree with the database.
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in ("fraud", "manufacturing") and len(parts) >= 8:
            name, records, n_scored, n_alerts, n_incidents = parts[0], *map(int, parts[1:5])
            assert (records, n_scored) == (1500, 1500)
            assert n_alerts == alerts.get(name, 0)
            assert n_incidents == incidents.get(name, 0)
    # Manufacturing anomalies are learnable even from the short run: most are found.
    mfg = next(line for line in text.splitlines() if line.startswith("manufacturing "))
    recall = float(mfg.split()[6].rstrip("%"))
    assert recall > 50.0, mfg
    for name in ("fraud", "manufacturing"):
        assert (out / "reports" / name / "report.html").exists()
        assert (out / "models" / name / "manifest.json").exists()
    assert len(list((out / "dashboards").glob("*.json"))) == 3
    assert str(out / "anomaly.db") in text


def _scoring_started(db: Path, timeout_s: float = 60.0) -> None:
    """Until a service has written its first batch (stream_stats rows in the demo's SQLite)."""
    import sqlite3

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
                if conn.execute("SELECT count(*) FROM stream_stats").fetchone()[0]:
                    return
        except sqlite3.Error:
            pass
        time.sleep(0.05)
    raise AssertionError("no batch was written")


@pytest.mark.parametrize(
    "stage",
    [
        # While both pipelines train, one worker process each: only the parent may take the
        # Ctrl-C (a worker interrupted mid-import prints its traceback), and the workers must be
        # gone with it.
        "training",
        # As the services start (a Ctrl-C then once went unnoticed: the demo ran on to its
        # summary and exited 0).
        "services-starting",
        # While they consume: they must stop first and the broker last, else every client
        # logs "connection refused" until it has stopped.
        "services-consuming",
    ],
)
def test_ctrl_c_stops_the_demo_cleanly(tmp_path, stage):
    """Ctrl-C as a terminal sends it: SIGINT to the whole foreground process group."""
    psutil = pytest.importorskip("psutil")
    from streams.demo_training import _usable_cores

    if stage == "training" and _usable_cores() < 2:
        pytest.skip("one core: the pipelines train one after the other, in the demo's process")
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "anomaly.cli", "demo", "--short", "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    lines = []
    children = []
    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if stage == "training" and line.startswith("[manufacturing] training"):
                workers = training_workers(proc.pid)
                children = psutil.Process(proc.pid).children(recursive=True)
                assert set(workers) <= set(children)
                os.killpg(proc.pid, signal.SIGINT)
                break
            if stage != "training" and line.startswith("serving both pipelines"):
                children = psutil.Process(proc.pid).children(recursive=True)
                if stage == "services-consuming":
                    _scoring_started(out / "anomaly.db")
                os.killpg(proc.pid, signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(lines)
        rest, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    output = "".join(lines) + rest
    assert children, output  # the embedded broker was running
    assert proc.returncode == 130, output
    assert output.rstrip().endswith("interrupted"), output
    assert "Traceback" not in output
    assert "refused" not in output and "brokers are down" not in output, output
    assert "summary" not in output
    # The broker (and the training workers) went down with it.
    time.sleep(0.5)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert Path(out / "anomaly.db").exists()


@pytest.mark.postgres
def test_demo_on_postgresql_feeds_every_dashboard_panel(pg_url, tmp_path):
    """The short demo into PostgreSQL; then every SQL panel runs, as the read-only Grafana
    role, on what the real service wrote, and the panels about alerts and models find rows."""
    import psycopg

    from anomaly.cli import main
    from dashboards.check import check_panels
    from storage.grafana import grant_sql

    assert main(["demo", "--short", "--out", str(tmp_path / "demo"), "--db", pg_url]) == 0
    assert not (tmp_path / "demo" / "anomaly.db").exists()
    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        for statement in grant_sql("anomaly_grafana"):
            conn.execute(statement)
    results = check_panels(pg_url, hours=1, role="anomaly_grafana")
    failed = [(r.dashboard, r.panel, r.error) for r in results if not r.ok]
    assert not failed
    rows = {(r.dashboard, r.panel): r.rows for r in results}
    for key in [
        ("anomaly-alerts", "Alerts by pipeline and severity"),
        ("anomaly-alerts", "Observed alert rate vs expected false-positive rate"),
        ("anomaly-alerts", "Ensemble score quantiles and alert threshold"),
        ("anomaly-alerts", "Latest alerts"),
        ("anomaly-alerts", "Top entities"),
        ("anomaly-models", "Active model per pipeline"),
        ("anomaly-models", "Evaluation metrics of the active model"),
        ("anomaly-models", "Score drift: live traffic vs calibration"),
        ("anomaly-service", "Records per second (stream_stats)"),
        ("anomaly-service", "Committed offsets"),
    ]:
        assert rows[key] > 0, key
