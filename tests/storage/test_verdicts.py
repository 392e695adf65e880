"""Analyst verdicts through ``anomaly alerts ack``, on both dialects."""

from __future__ import annotations

import getpass
from datetime import UTC, datetime, timedelta

import pytest
from storage_testlib import alert

from anomaly.cli import main
from storage import AlertStore
from storage.records import SinkBatch

NOW = datetime.now(UTC)


@pytest.fixture
def seeded(store: AlertStore, db_url: str) -> str:
    # Three alerts of card-1 (one incident), one of card-2 (another), one without an entity.
    rows = [alert(i, ingest_time=NOW - timedelta(minutes=30 - i)) for i in range(3)]
    rows.append(alert(3, entity="card-2", ingest_time=NOW - timedelta(minutes=20)))
    rows.append(alert(4, entity=None, ingest_time=NOW - timedelta(minutes=10)))
    store.write_batch(SinkBatch("cards", alerts=rows))
    return db_url


def _alerts(store: AlertStore) -> dict[int, dict]:
    """kafka_offset -> alert row"""
    return {a["kafka_offset"]: a for a in store.list_alerts(limit=None)}


def _verdicts(store: AlertStore) -> dict[int, dict]:
    """kafka_offset -> reviewed-alert row"""
    offsets = {a["id"]: off for off, a in _alerts(store).items()}
    return {offsets[r["id"]]: r for r in store.reviewed_alerts()}


def test_ack_with_a_verdict_stores_who_and_when(
    store: AlertStore, seeded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = {off: a["id"] for off, a in _alerts(store).items()}
    before = datetime.now(UTC)
    argv = ["alerts", "ack", str(ids[3]), "--db", seeded, "--verdict", "true_positive"]
    assert main([*argv, "--by", "ana", "--note", "card reported stolen"]) == 0
    out = capsys.readouterr().out
    assert f"alert {ids[3]}: 1 alert(s), 1 acknowledged; verdict true_positive by ana" in out
    v = _verdicts(store)
    assert list(v) == [3]
    assert (v[3]["verdict"], v[3]["verdict_by"], v[3]["note"]) == (
        "true_positive",
        "ana",
        "card reported stolen",
    )
    assert before - timedelta(seconds=1) <= v[3]["verdict_at"] <= datetime.now(UTC)
    assert v[3]["verdict_at"].tzinfo is not None
    assert v[3]["record"] == {"id": "rec-3", "amount": 999.0}
    assert _alerts(store)[3]["status"] == "acknowledged"

    # Changing one's mind replaces the verdict (the alert is already acknowledged); --by
    # defaults to the OS user.
    assert main(["alerts", "ack", str(ids[3]), "--db", seeded, "--verdict", "false_positive"]) == 0
    assert "1 alert(s), 0 acknowledged; verdict false_positive" in capsys.readouterr().out
    v = _verdicts(store)
    assert (v[3]["verdict"], v[3]["verdict_by"], v[3]["note"]) == (
        "false_positive",
        getpass.getuser(),
        None,
    )


def test_ack_an_incident_with_a_verdict_covers_all_its_alerts(
    store: AlertStore, seeded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _alerts(store)
    incident = rows[0]["incident_id"]
    assert incident is not None and {rows[i]["incident_id"] for i in (1, 2)} == {incident}
    # One of its alerts was acknowledged already: it keeps its status and gets the verdict.
    assert main(["alerts", "ack", str(rows[1]["id"]), "--db", seeded]) == 0
    argv = ["alerts", "ack", "--incident", str(incident), "--db", seeded]
    assert main([*argv, "--verdict", "false_positive", "--by", "bo"]) == 0
    assert (
        f"incident {incident}: 3 alert(s), 2 acknowledged"
        in capsys.readouterr().out.split("\n")[-2]
    )
    v = _verdicts(store)
    assert sorted(v) == [0, 1, 2]
    assert {r["verdict"] for r in v.values()} == {"false_positive"}
    assert {r["verdict_by"] for r in v.values()} == {"bo"}
    assert len({r["verdict_at"] for r in v.values()}) == 1  # one decision, one time
    assert {o: a["status"] for o, a in _alerts(store).items()} == {
        0: "acknowledged",
        1: "acknowledged",
        2: "acknowledged",
        3: "open",
        4: "open",
    }


def test_ack_without_a_verdict_behaves_as_before(
    store: AlertStore, seeded: str, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = _alerts(store)
    assert main(["alerts", "ack", str(rows[4]["id"]), "--db", seeded]) == 0
    assert capsys.readouterr().out == f"alert {rows[4]['id']} acknowledged\n"
    assert main(["alerts", "ack", str(rows[4]["id"]), "--db", seeded]) == 0
    assert "was not open (unchanged)" in capsys.readouterr().out
    # An incident without a verdict: acknowledged, no verdicts recorded.
    assert main(["alerts", "ack", "--incident", str(rows[3]["incident_id"]), "--db", seeded]) == 0
    assert "1 alert(s), 1 acknowledged" in capsys.readouterr().out
    assert _verdicts(store) == {}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--verdict", "maybe"], "error: --verdict 'maybe': expected one of true_positive, "),
        (["--verdict", "TP"], "error: --verdict 'TP': expected one of"),
        (["--verdict", "true_positive", "--by", " "], "error: --by: "),
        (["--verdict", "true_positive", "--note", "x" * 2001], "error: --note: longer than"),
        (["--note", "why"], "error: --note and --by: only with --verdict"),
    ],
)
def test_a_bad_verdict_is_a_one_line_error_naming_the_field(
    store: AlertStore,
    seeded: str,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    alert_id = _alerts(store)[0]["id"]
    assert main(["alerts", "ack", str(alert_id), "--db", seeded, *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert _verdicts(store) == {} and _alerts(store)[0]["status"] == "open"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["999999", "--verdict", "true_positive"], "error: no alert with id 999999\n"),
        (["--incident", "999999", "--verdict", "true_positive"], "error: no incident with id "),
        (["--verdict", "true_positive"], "error: alerts ack: give an alert ID or --incident"),
        (["1", "--incident", "1"], "error: alerts ack: give an alert ID or --incident"),
    ],
)
def test_an_unknown_or_missing_id_is_a_one_line_error(
    store: AlertStore,
    seeded: str,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    message: str,
) -> None:
    assert main(["alerts", "ack", *argv, "--db", seeded]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert _verdicts(store) == {}


def test_reviewed_alerts_and_counts_are_scoped(store: AlertStore, seeded: str) -> None:
    rows = _alerts(store)
    at = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)
    store.ack(rows[0]["id"], verdict="true_positive", by="ana", at=at)
    store.ack(rows[3]["id"], verdict="false_positive", by="ana", at=at)
    assert [r["id"] for r in store.reviewed_alerts(pipeline="cards")] == [
        rows[0]["id"],
        rows[3]["id"],
    ]
    assert store.reviewed_alerts(pipeline="other") == []
    assert store.reviewed_alerts(model_version="v2") == []
    assert [r["verdict_at"] for r in store.reviewed_alerts()] == [at, at]
    since = rows[3]["ingest_time"]
    assert [r["verdict"] for r in store.reviewed_alerts(since=since)] == ["false_positive"]
    assert store.alert_counts() == {("cards", "v1"): 5}
    assert store.alert_counts(since=since) == {("cards", "v1"): 2}


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory: pytest.TempPathFactory) -> str:
    import numpy as np
    import pandas as pd

    from anomaly.config import SchemaConfig
    from anomaly.estimator.model import AnomalyModel

    rng = np.random.default_rng(0)
    features = ["amount", "n_tx", "hour"]
    frame = pd.DataFrame(rng.normal(size=(300, 3)), columns=features)
    frame.insert(0, "id", [f"t{i}" for i in range(len(frame))])
    schema = SchemaConfig(id_field="id", time_field=None, numeric=features)
    model = AnomalyModel(
        target_fpr=0.05,
        seed=0,
        device="cpu",
        detectors=["vae"],
        max_epochs=1,
        min_steps=0,
        schema=schema,
    )
    model.fit(frame)
    bundle = tmp_path_factory.mktemp("verdicts") / "bundle"
    model.save(bundle)
    return str(bundle)


def test_evaluate_from_db_reports_precision_among_reviewed_alerts(
    store: AlertStore,
    db_url: str,
    small_bundle: str,
    tmp_path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import dataclasses
    import json

    # Records replayed from a labelled file keep its label columns, which the rescoring ignores
    # (two of them: the report once took such a list for a confidence interval and crashed).
    labels = {"is_anomaly": 0, "anomaly_kind": "none"}
    far = {"amount": 9.0, "n_tx": 8.0, "hour": 7.0, **labels}
    near = {"amount": 0.1, "n_tx": -0.2, "hour": 0.0, **labels}
    rows = [
        alert(i, record={"id": f"r{i}", **(far if i < 3 else near)}, ingest_time=NOW)
        for i in range(6)
    ]
    rows.append(dataclasses.replace(alert(6, record={"id": "r6", **far}), model_version="v2"))
    store.write_batch(SinkBatch("cards", alerts=rows))
    store.write_batch(SinkBatch("machines", alerts=[alert(7, pipeline="machines")]))
    ids = {a["kafka_offset"]: a["id"] for a in store.list_alerts(limit=None)}
    for i in (0, 1, 2):
        store.ack(ids[i], verdict="true_positive", by="ana")
    for i in (3, 4):  # alert 5 is not reviewed
        store.ack(ids[i], verdict="false_positive", by="ana")
    store.ack(ids[6], verdict="true_positive", by="ana")
    store.ack(ids[7], verdict="false_positive", by="bo")

    out = tmp_path / "report"
    argv = ["evaluate", "--from-db", db_url, "--report", str(out)]
    # Verdicts of two pipelines: which one is asked.
    assert main(argv) == 2
    assert "--pipeline: verdicts of several pipelines in scope (cards, machines)" in (
        capsys.readouterr().err
    )
    assert main([*argv, "--pipeline", "cards"]) == 0
    text = capsys.readouterr().out
    assert "precision among reviewed alerts only, no recall" in text
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "verdicts" and report["rescored"] is None
    assert set(report["cannot_measure"]) == {
        "recall",
        "false_positive_rate",
        "auroc_auprc_over_all_records",
    }
    by_version = {r["model_version"]: r for r in report["as_alerted"]}
    v1 = by_version["v1"]
    assert (v1["alerts"], v1["reviewed"], v1["true_positives"], v1["false_positives"]) == (
        6,
        5,
        3,
        2,
    )
    assert v1["precision"] == pytest.approx(0.6) and v1["review_coverage"] == pytest.approx(5 / 6)
    low, high = v1["precision_95ci"]
    assert low < 0.6 < high
    assert by_version["v2"]["precision"] == 1.0
    assert by_version["all"]["reviewed"] == 6 and by_version["all"]["precision"] == 4 / 6
    page = (out / "report.html").read_text()
    assert "precision among reviewed alerts" in page and "recall" in page

    # With a model: the reviewed alerts re-scored; one pipeline's version only.
    argv = [*argv, "--pipeline", "cards", "--model-version", "v1", "--model", small_bundle]
    assert main(argv) == 0
    rescored = json.loads((out / "report.json").read_text())["rescored"]
    assert rescored["flagged_true_positives"] == 3 and rescored["flagged_false_positives"] == 0
    assert rescored["confirmed_still_flagged"] == 1.0
    assert sorted(rescored["ignored_columns"]) == ["anomaly_kind", "is_anomaly"]
    assert "is_anomaly, anomaly_kind" in (out / "report.html").read_text()
    assert rescored["auroc_among_reviewed_alerts"] == 1.0
    assert [
        r["model_version"] for r in json.loads((out / "report.json").read_text())["as_alerted"]
    ] == ["v1", "all"]

    # Nothing reviewed in scope, and labels that are not verdicts: one-line errors.
    assert main([*argv[:5], "--pipeline", "nobody"]) == 2
    assert capsys.readouterr().err.startswith("error: no reviewed alerts in scope")
    assert main([*argv, "--data", "x.csv"]) == 2
    assert "error: --data: not with --from-db" in capsys.readouterr().err


def test_evaluate_without_from_db_still_needs_model_data_and_label(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--report", str(tmp_path), "--data", "x.csv"]) == 2
    assert capsys.readouterr().err == "error: evaluate: --model, --label required\n"


def test_evaluate_from_db_on_a_missing_sqlite_file_creates_nothing(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "typo.db"
    argv = ["evaluate", "--from-db", f"sqlite:///{missing}", "--report", str(tmp_path / "r")]
    assert main([*argv, "--pipeline", "cards"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no database at sqlite:///{missing}") and err.count("\n") == 1
    assert "`anomaly db upgrade` creates it" in err
    assert not missing.exists()


def test_ack_an_incident_with_more_alerts_than_one_statement_takes(store: AlertStore) -> None:
    """One bound parameter per alert id, and psycopg takes at most 65,535 per statement: an
    incident of 70,000 alerts is acknowledged in blocks, not refused as 'retry later'."""
    n = 70_000
    rows = [alert(i, ingest_time=NOW - timedelta(seconds=n - i)) for i in range(n)]
    store.write_batch(SinkBatch("cards", alerts=rows))
    [incident] = store.list_incidents(limit=None)
    result = store.ack(incident_id=incident["id"], verdict="false_positive", by="bo")
    assert len(result.alert_ids) == len(result.acknowledged) == n
    assert len(store.reviewed_alerts()) == n
