"""Every SQL panel query of the three dashboards runs on the real PostgreSQL with seeded rows.

The tables come from the storage subsystem (its migrations when present, else its SQLAlchemy
metadata), the queries run under the read-only role Grafana uses (storage/grafana_role.sql), after
the Grafana macros and variables are expanded for a time range. Rows outside the range and of a
pipeline not selected are seeded too, so the filters are exercised, and a few results are checked
against what was seeded.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest

from dashboards.builder import SQLTarget
from dashboards.definitions import all_dashboards
from dashboards.macros import MacroError, TimeRange, expand, interpolate

pytestmark = pytest.mark.postgres

END = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
RANGE = TimeRange(start=END - timedelta(hours=6), end=END, interval_s=300)
PIPELINES = ["fraud", "manufacturing"]
VARIABLES = {"pipeline": PIPELINES, "detector": "vae"}


def _create_schema(url: str) -> None:
    try:
        from storage.store import AlertStore
    except ImportError:
        AlertStore = None
    if AlertStore is not None and hasattr(AlertStore, "upgrade"):
        AlertStore(url).upgrade()
        return
    from sqlalchemy import create_engine

    from storage.schema import metadata

    engine = create_engine(url)
    metadata.create_all(engine)
    engine.dispose()


def _seed(url: str) -> dict:
    from sqlalchemy import create_engine, insert, select

    from storage import schema as s

    t0 = RANGE.start
    model_metrics = {
        "target_fpr": 0.001,
        "threshold": 7.5,
        "calibration_quantiles": {"p50": 1.0, "p90": 2.0, "p99": 4.0, "p999": 7.5},
        "evaluation": {"precision": 0.8, "recall": 0.6, "roc_auc": 0.97},
        "trained_on": "2026-03-01",
    }
    engine = create_engine(url)
    alerts = []
    for i in range(12):
        alerts.append(
            dict(
                pipeline=PIPELINES[i % 2],
                record_id=f"r{i}",
                entity=f"card-{i % 3}",
                event_time=t0 + timedelta(minutes=10 * i),
                ingest_time=t0 + timedelta(minutes=10 * i, seconds=2),
                kafka_topic="t",
                kafka_partition=i % 2,
                kafka_offset=i,
                model_version="v1" if i < 8 else "v2",
                vae_score=5.0 + i,
                vae_p=1e-4,
                flow_score=3.0,
                flow_p=0.01,
                gan_score=2.0,
                gan_p=0.2,
                ensemble_score=8.0 + i,
                ensemble_p=1e-4,
                severity=["low", "medium", "high", "critical"][i % 4],
                fired_detectors=["vae", "flow"] if i % 2 else ["vae"],
                top_features=[
                    {"feature": "amount", "value": 1234.5, "contribution": 3.21},
                    {"feature": "country", "value": "JP", "contribution": 1.5},
                    # A missing or non-finite value is stored as null (estimator.explain).
                    *([{"feature": "merchant", "value": None, "contribution": 0.7}] * (i == 11)),
                ],
                record={"id": f"r{i}", "amount": 1234.5},
                status="open",
            )
        )
    with engine.begin() as conn:
        incident = conn.execute(
            insert(s.incidents).returning(s.incidents.c.id),
            dict(
                pipeline="fraud",
                entity="card-0",
                first_seen=t0,
                last_seen=t0 + timedelta(hours=1),
                alert_count=4,
                max_severity="critical",
                status="open",
            ),
        ).scalar_one()
        conn.execute(
            insert(s.incidents),
            [
                dict(
                    pipeline="manufacturing",
                    entity="machine-1",
                    first_seen=t0,
                    last_seen=t0 + timedelta(minutes=5),
                    alert_count=1,
                    max_severity="low",
                    status="resolved",
                )
            ],
        )
        for a in alerts:
            a["incident_id"] = incident if a["entity"] == "card-0" else None
        # Outside the time range, and a pipeline that is not selected: both must be filtered out.
        outside = dict(alerts[0], record_id="old", kafka_offset=100)
        outside["ingest_time"] = t0 - timedelta(days=1)
        other = dict(alerts[0], pipeline="other", record_id="x", kafka_offset=101)
        conn.execute(insert(s.alerts), [*alerts, outside, other])
        # Analyst verdicts (record_id -> verdict): fraud v1 2 TP 1 FP of 4 alerts, fraud v2 1 TP
        # of 2, manufacturing v1 1 FP of 4, manufacturing v2 none of 2; the alert outside the
        # range and the one of pipeline "other" have verdicts that must not count.
        ids = dict(conn.execute(select(s.alerts.c.record_id, s.alerts.c.id)).all())
        verdicts = {
            "r0": "true_positive",
            "r2": "true_positive",
            "r4": "false_positive",
            "r8": "true_positive",
            "r1": "false_positive",
            "old": "true_positive",
            "x": "true_positive",
        }
        conn.execute(
            insert(s.verdicts),
            [
                dict(alert_id=ids[r], verdict=v, verdict_by="ana", verdict_at=END, note=None)
                for r, v in verdicts.items()
            ],
        )
        conn.execute(
            insert(s.dead_letters),
            [
                dict(
                    pipeline="fraud",
                    kafka_topic="t",
                    kafka_partition=0,
                    kafka_offset=1000 + i,
                    raw=b"{not json",
                    error_kind=["invalid_json", "missing_field"][i % 2],
                    error_message="field 'amount' is missing",
                    created_at=t0 + timedelta(minutes=30 * i),
                )
                for i in range(5)
            ],
        )
        conn.execute(
            insert(s.model_versions),
            [
                dict(
                    pipeline=p,
                    version="v1",
                    created_at=t0 + timedelta(minutes=1),
                    bundle_path=f"/models/{p}/v1",
                    bundle_sha256="ab" * 32,
                    metrics=model_metrics,
                    active=True,
                    activated_at=t0 + timedelta(minutes=2),
                )
                for p in PIPELINES
            ],
        )
        stats = []
        for p in PIPELINES:
            for m in range(0, 360, 1):
                stats.append(
                    dict(
                        pipeline=p,
                        minute=t0 + timedelta(minutes=m),
                        records_seen=1000,
                        records_scored=990,
                        records_alerted=2,
                        records_dead_lettered=10,
                        score_mean=1.2,
                        score_p50=1.1,
                        score_p90=2.2,
                        score_p99=4.4,
                        latency_ms_sum=500.0,
                        latency_count=10,
                        latency_ms_max=80.0,
                    )
                )
        conn.execute(insert(s.stream_stats), stats)
        if hasattr(s, "drift_windows"):  # hourly drift windows; the fourth one drifted
            conn.execute(
                insert(s.drift_windows), [_drift_row(p, h) for p in PIPELINES for h in range(6)]
            )
        conn.execute(
            insert(s.consumer_offsets),
            [
                dict(
                    pipeline="fraud",
                    kafka_topic="t",
                    kafka_partition=k,
                    next_offset=100 + k,
                    updated_at=END,
                )
                for k in range(2)
            ],
        )
    engine.dispose()
    return {"alerts_in_range": len(alerts), "stats_rows_per_pipeline": 360}


def _drift_row(pipeline: str, hour: int) -> dict:
    drifted = hour == 3
    return dict(
        pipeline=pipeline,
        model_version="v1",
        window_start=RANGE.start + timedelta(hours=hour),
        window_end=RANGE.start + timedelta(hours=hour + 1),
        records=1000,
        alerts=30 if drifted else 2,
        expected_alert_rate=0.001,
        alert_rate_p=1e-9 if drifted else 0.5,
        ks_stat=0.2 if drifted else 0.02,
        ks_p=1e-8 if drifted else 0.6,
        top_features=[
            {"feature": "amount", "psi": 0.45 if drifted else 0.01},
            {"feature": "hour", "psi": 0.005},
        ],
        drifted=drifted,
        reasons=["amount: PSI 0.450"] if drifted else [],
    )


def _grant_readonly(conn) -> None:
    from storage.grafana import grant_sql

    for statement in grant_sql("anomaly_grafana"):
        conn.execute(statement)


@pytest.fixture
def grafana_conn(pg_url):
    import psycopg

    _create_schema(pg_url)
    seeded = _seed(pg_url)
    conn = psycopg.connect(
        pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )
    _grant_readonly(conn)
    conn.execute("SET ROLE anomaly_grafana")
    conn.execute("SET default_transaction_read_only = on")
    try:
        yield conn, seeded
    finally:
        conn.close()


def _run(conn, sql: str):
    cur = conn.execute(sql)
    return [d.name for d in cur.description], cur.fetchall()


def _sql_targets():
    for dashboard in all_dashboards():
        for panel, target in dashboard.targets():
            if isinstance(target, SQLTarget):
                yield dashboard, panel, target


def test_every_time_bound_query_uses_time_filter():
    targets = list(_sql_targets())
    assert len(targets) >= 20
    for dashboard, panel, target in targets:
        if target.time_bound:
            assert "$__timeFilter(" in target.sql, f"{dashboard.uid} / {panel.title}"
        if target.format == "time_series":
            assert target.columns[0] == "time", f"{dashboard.uid} / {panel.title}"


def test_every_sql_panel_runs_and_returns_its_columns(grafana_conn):
    conn, _ = grafana_conn
    for dashboard, panel, target in _sql_targets():
        sql = expand(target.sql, RANGE, VARIABLES)
        try:
            columns, rows = _run(conn, sql)
        except Exception as exc:  # name the panel that failed
            raise AssertionError(f"{dashboard.uid} / {panel.title}: {exc}\n{sql}") from exc
        assert tuple(columns) == target.columns, f"{dashboard.uid} / {panel.title}"
        assert rows, f"{dashboard.uid} / {panel.title} returned no rows on seeded data"


def test_variable_queries_list_the_pipelines(grafana_conn):
    conn, _ = grafana_conn
    checked = 0
    for dashboard in all_dashboards():
        for var in dashboard.to_json()["templating"]["list"]:
            if var.get("datasource", {}).get("type") == "grafana-postgresql-datasource":
                _, rows = _run(conn, var["query"])
                assert [r[0] for r in rows] == PIPELINES
                checked += 1
    assert checked == 2


def _panel(uid: str, title: str):
    for dashboard in all_dashboards():
        if dashboard.uid == uid:
            for panel in dashboard.panels:
                if panel.title == title:
                    return panel
    raise KeyError(title)


def _query(conn, uid, title, variables=VARIABLES, time_range=RANGE):
    target = _panel(uid, title).targets[0]
    return _run(conn, expand(target.sql, time_range, variables))[1]


def test_panel_values_match_the_seeded_rows(grafana_conn):
    conn, seeded = grafana_conn
    # The alert outside the range and the one of pipeline "other" are not counted.
    assert _query(conn, "anomaly-alerts", "Alerts") == [(seeded["alerts_in_range"],)]
    assert _query(conn, "anomaly-alerts", "Alerts", {**VARIABLES, "pipeline": ["fraud"]}) == [(6,)]
    (rate,) = _query(conn, "anomaly-alerts", "Alert rate")[0]
    assert rate == pytest.approx(2 / 990)
    assert _query(conn, "anomaly-alerts", "Open incidents") == [(1,)]
    assert _query(conn, "anomaly-alerts", "Critical alerts") == [(3,)]
    # Observed vs expected: one observed and one expected series per pipeline.
    rows = _query(conn, "anomaly-alerts", "Observed alert rate vs expected false-positive rate")
    names = {r[1] for r in rows}
    assert names == {f"{p} {k}" for p in PIPELINES for k in ("observed", "expected (target FPR)")}
    assert {r[2] for r in rows if "expected" in r[1]} == {0.001}
    # 6 h in 5-minute buckets.
    assert len({r[0] for r in rows}) == 72
    # Buckets of $__interval: alerts per bucket add up to the count.
    rows = _query(conn, "anomaly-alerts", "Alerts by pipeline and severity")
    assert sum(r[2] for r in rows) == seeded["alerts_in_range"]
    assert all(float(r[0]) % 300 == 0 for r in rows)
    # Latest alerts: newest first, top features rendered, the chosen detector's score.
    rows = _query(conn, "anomaly-alerts", "Latest alerts")
    assert rows[0][3] == "r11" and rows[0][7] == 16.0
    assert rows[0][8] == "amount=1234.5 (3.21), country=JP (1.50), merchant=null (0.70)"
    assert rows[1][8] == "amount=1234.5 (3.21), country=JP (1.50)"
    assert rows[0][9] == "flow,vae"
    rows = _query(conn, "anomaly-alerts", "Alerts by detector that fired")
    assert rows == [("flow", 6), ("vae", 12)]
    rows = _query(conn, "anomaly-alerts", "Dead letters by reason")
    assert sum(r[2] for r in rows) == 5
    # Models: evaluation metrics flattened, drift ratios against calibration quantiles.
    rows = _query(conn, "anomaly-models", "Evaluation metrics of the active model")
    metrics = {r[2]: r[3] for r in rows if r[0] == "fraud"}
    assert metrics["evaluation.recall"] == 0.6 and metrics["target_fpr"] == 0.001
    assert metrics["calibration_quantiles.p999"] == 7.5 and "trained_on" not in metrics
    rows = _query(conn, "anomaly-models", "Score drift: live traffic vs calibration")
    ratios = {(r[0], r[1]): r[4] for r in rows}
    assert ratios[("fraud", "p50")] == pytest.approx(1.1)
    assert ratios[("manufacturing", "p99")] == pytest.approx(1.1)
    # Analyst verdicts: precision among reviewed alerts in range, per pipeline and version.
    assert _query(conn, "anomaly-alerts", "Precision from verdicts") == [(0.6,)]
    fraud = {**VARIABLES, "pipeline": ["fraud"]}
    (precision,) = _query(conn, "anomaly-alerts", "Precision from verdicts", fraud)[0]
    assert precision == pytest.approx(0.75)
    assert _query(conn, "anomaly-alerts", "Verdicts and precision by pipeline") == [
        ("fraud", 6, 4, 3, 1, 0.75),
        ("manufacturing", 6, 1, 0, 1, 0.0),
    ]
    rows = _query(conn, "anomaly-models", "Precision from verdicts by model version")
    assert [r[:6] for r in rows] == [
        ("fraud", "v1", 4, 3, 2, 1),
        ("fraud", "v2", 2, 1, 1, 0),
        ("manufacturing", "v1", 4, 1, 0, 1),
        ("manufacturing", "v2", 2, 0, 0, 0),
    ]
    assert [r[6] for r in rows[1:]] == [1.0, 0.0, None]
    assert rows[0][6] == pytest.approx(2 / 3)
    # Drift: one row per window, the top features rendered; the drifted window stands out.
    rows = _query(conn, "anomaly-models", "Drift windows")
    assert len(rows) == 12 and rows[0][0] == RANGE.start + timedelta(hours=5)
    drifted = [r for r in rows if r[8]]
    assert [r[1] for r in drifted] == PIPELINES
    assert drifted[0][9] == "amount (0.450), hour (0.005)"
    title = "Drift signals per window: KS of p-values, highest feature PSI"
    rows = _query(conn, "anomaly-models", title)
    assert max(r[3] for r in rows) == 0.45 and sum(r[4] for r in rows) == 2
    # A time range with no data gives empty panels, not errors.
    empty = TimeRange(END + timedelta(days=30), END + timedelta(days=31), 60)
    assert _query(conn, "anomaly-alerts", "Latest alerts", time_range=empty) == []


def test_sqlstring_variables_are_quoted_as_grafana_does():
    # Grafana's sqlstring format: each value in single quotes, inner quotes doubled, commas between.
    assert interpolate("CASE ${d:sqlstring}", {"d": "it's"}) == "CASE 'it''s'"
    assert interpolate("IN (${p:sqlstring})", {"p": ["a", "b'c"]}) == "IN ('a','b''c')"
    # A bare single-value variable gets no quotes from Grafana: only sqlstring is safe for text.
    assert interpolate("CASE $d", {"d": "it's"}) == "CASE it's"
    assert interpolate("IN ($p)", {"p": ["a", "b'c"]}) == "IN ('a','b''c')"
    with pytest.raises(MacroError, match="unsupported variable format"):
        interpolate("${d:csv}", {"d": "x"})


def test_every_text_variable_in_panel_sql_is_a_sqlstring():
    for dashboard, panel, target in _sql_targets():
        uses = re.findall(r"\$\{?(\w+)(:\w+)?\}?", target.sql)
        bare = [name for name, fmt in uses if not name.startswith("__") and fmt != ":sqlstring"]
        assert not bare, f"{dashboard.uid} / {panel.title}: use ${{{bare[0]}:sqlstring}}"


def test_a_quote_in_a_variable_cannot_break_out_of_the_string(grafana_conn):
    conn, _ = grafana_conn
    # Were it inserted unquoted, this would close the CASE and add a subquery of its own.
    hostile = "x' WHEN 'x' THEN (SELECT count(*) FROM model_versions) ELSE 0 END + CASE 'x"
    checked = 0
    for dashboard, panel, target in _sql_targets():
        if not re.search(r"\$\{?detector\b", target.sql):
            continue
        where = f"{dashboard.uid} / {panel.title}"
        sql = expand(target.sql, RANGE, {**VARIABLES, "detector": hostile})
        assert "'x'' WHEN ''x'' THEN" in sql, where
        # An unknown detector is the ELSE branch: the ensemble score, as for "ensemble".
        expected = _run(conn, expand(target.sql, RANGE, {**VARIABLES, "detector": "ensemble"}))
        assert _run(conn, sql) == expected, where
        checked += 1
    assert checked == 3
    # A pipeline value with a quote is one value that matches nothing, not a widened filter.
    hostile_pipeline = {**VARIABLES, "pipeline": ["fraud') OR ('1'='1"]}
    assert _query(conn, "anomaly-alerts", "Alerts", hostile_pipeline) == [(0,)]


def test_the_grafana_role_cannot_write(grafana_conn):
    import psycopg

    conn, _ = grafana_conn
    with pytest.raises(psycopg.Error):
        conn.execute("DELETE FROM alerts")


def test_check_command_runs_every_panel_and_reports_breakage(pg_url, capsys):
    import psycopg

    from anomaly.cli import main

    _create_schema(pg_url)
    _seed(pg_url)
    conninfo = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        _grant_readonly(conn)
    argv = ["dashboards", "check", "--db", pg_url, "--role", "anomaly_grafana"]
    assert main(argv) == 0
    n = len(list(_sql_targets()))
    assert f"{n} of {n} SQL panels ok" in capsys.readouterr().out
    # A schema change that breaks panels is caught, and the panels are named.
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("ALTER TABLE dead_letters RENAME COLUMN error_kind TO reason")
    assert main(argv) == 1
    out = capsys.readouterr().out
    assert "Dead letters by reason" in out and "FAILED" in out
    assert f"{n - 2} of {n} SQL panels ok" in out
