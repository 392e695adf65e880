"""write_batch on both dialects: idempotent replays, fencing, incidents, stats, bad content."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from storage_testlib import T0, alert, dead_letter, range_batch, table_rows

from storage import AlertStore
from storage.records import OffsetRecord, SinkBatch, StreamStatRecord

TABLES = (
    ("alerts", "id"),
    ("incidents", "id"),
    ("dead_letters", "id"),
    ("stream_stats", "pipeline, minute"),
    ("consumer_offsets", "pipeline, kafka_topic, kafka_partition"),
)


def _snapshot(store: AlertStore) -> dict[str, list[tuple]]:
    snap = {name: table_rows(store, name, order) for name, order in TABLES}
    # updated_at is the write time; everything else must be identical.
    snap["consumer_offsets"] = [r[:4] for r in snap["consumer_offsets"]]
    return snap


def test_replaying_the_same_batch_leaves_the_same_rows(store: AlertStore) -> None:
    batch = range_batch(0, 100)
    first = store.write_batch(batch)
    assert first.alerts_written == len(batch.alerts) > 0
    assert first.dead_letters_written == len(batch.dead_letters) > 0
    assert first.records_fenced == 0
    before = _snapshot(store)

    again = store.write_batch(batch)  # e.g. the Kafka commit was lost and the batch re-read
    assert again.alerts_written == 0
    assert again.dead_letters_written == 0
    assert again.incidents_opened == 0
    assert again.records_fenced == len(batch.alerts) + len(batch.dead_letters)
    assert _snapshot(store) == before


def test_replay_without_offsets_is_deduplicated_by_the_unique_position(store: AlertStore) -> None:
    batch = range_batch(0, 60)
    batch.offsets = []
    batch.stats = []
    store.write_batch(batch)
    before = _snapshot(store)
    result = store.write_batch(batch)
    assert (result.alerts_written, result.dead_letters_written, result.records_fenced) == (0, 0, 0)
    assert _snapshot(store) == before


def test_duplicate_position_inside_one_batch_is_written_once(store: AlertStore) -> None:
    batch = SinkBatch("cards", alerts=[alert(5), alert(5), alert(6)])
    assert store.write_batch(batch).alerts_written == 2
    assert len(store.list_alerts()) == 2


def test_unordered_batch_over_partitions_is_written_once_and_a_partial_replay_fills_gaps(
    store: AlertStore,
) -> None:
    # Offsets falling, two topics and partitions interleaved, a duplicate: not the in-order fast
    # path of write_batch.
    first = [alert(o, partition=o % 2) for o in (9, 7, 4, 3, 9, 2)]
    first.append(alert(5, topic="other"))
    assert store.write_batch(SinkBatch("cards", alerts=first)).alerts_written == 6
    # Stored positions in the middle of each partition's range, new ones around them.
    again = [alert(o, partition=o % 2) for o in (11, 9, 8, 6, 4, 3, 1, 0)]
    again += [alert(5, topic="other"), alert(6, topic="other")]
    assert store.write_batch(SinkBatch("cards", alerts=again)).alerts_written == 6
    positions = sorted(
        (a["kafka_topic"], a["kafka_partition"], a["kafka_offset"])
        for a in store.list_alerts(limit=None)
    )
    want = {("tx", o % 2, o) for o in (0, 1, 2, 3, 4, 6, 7, 8, 9, 11)}
    assert positions == sorted(want | {("other", 0, 5), ("other", 0, 6)})


@pytest.mark.postgres
def test_copy_and_executemany_store_the_same_rows(pg_url: str) -> None:
    """The two PostgreSQL insert paths of bench/storage.py write identical alerts, bad content
    included (the COPY path encodes JSON to bytes, executemany to text)."""

    def batch(pipeline: str) -> SinkBatch:
        odd = alert(2, pipeline=pipeline, record={"t": "a\x00\udcff", "n": float("nan")})
        odd.top_features = [{"feature": "ü\udcff", "value": None, "contribution": 1e308 * 10}]
        odd.fired_detectors = ["gan"]
        return SinkBatch(
            pipeline,
            alerts=[alert(1, pipeline=pipeline, entity=None), odd, alert(3, pipeline=pipeline)],
        )

    rows = {}
    for method in ("copy", "executemany"):
        with AlertStore(pg_url, alert_insert=method) as s:  # type: ignore[arg-type]
            s.upgrade()
            assert s.write_batch(batch(method)).alerts_written == 3
            rows[method] = [
                {k: v for k, v in a.items() if k not in ("id", "pipeline", "incident_id")}
                for a in s.list_alerts(pipeline=method, limit=None)
            ]
    assert rows["copy"] == rows["executemany"]
    odd = next(a for a in rows["copy"] if a["kafka_offset"] == 2)
    assert odd["record"] == {"t": "a\\u0000\\udcff", "n": None}
    assert odd["top_features"] == [{"feature": "ü\\udcff", "value": None, "contribution": None}]
    assert odd["fired_detectors"] == ["gan"]


def test_offsets_are_stored_and_never_move_backwards(store: AlertStore) -> None:
    store.write_batch(range_batch(0, 50, partition=0))
    store.write_batch(range_batch(0, 20, partition=1))
    assert store.load_offsets("cards", "tx") == {0: 50, 1: 20}
    assert store.load_offsets("cards", "other") == {}
    # A zombie consumer writes an older range: fenced entirely, offset unchanged.
    result = store.write_batch(range_batch(10, 30, partition=0))
    assert result.alerts_written == 0
    assert result.records_fenced > 0
    assert store.load_offsets("cards", "tx") == {0: 50, 1: 20}


def test_fencing_drops_records_below_the_stored_offset_and_their_statistics(
    store: AlertStore,
) -> None:
    store.write_batch(range_batch(0, 100))
    # Another consumer read [60, 150) before the first one's batch landed: 60..99 are fenced.
    overlap = range_batch(60, 150)
    fenced = [a for a in overlap.alerts if a.kafka_offset < 100]
    fenced_dead = [d for d in overlap.dead_letters if d.kafka_offset < 100]
    result = store.write_batch(overlap)
    assert result.records_fenced == len(fenced) + len(fenced_dead)
    assert result.alerts_written == len(overlap.alerts) - len(fenced)
    offsets = [a["kafka_offset"] for a in store.list_alerts(limit=None)]
    assert len(offsets) == len(set(offsets))
    assert sorted(offsets) == [o for o in range(150) if o % 3 == 0 and o % 10 != 0]
    (stats,) = (
        store.engine.connect()
        .exec_driver_sql("SELECT records_seen, latency_count FROM stream_stats")
        .all()
    )
    assert tuple(stats) == (150, 150)  # 100 + the 50 records that were new
    # Without first_offset a partly stale batch keeps its stats, a wholly stale one drops them.
    stale = range_batch(100, 150, with_first_offset=False)
    assert store.write_batch(stale).records_fenced == len(stale.alerts) + len(stale.dead_letters)
    (stats,) = store.engine.connect().exec_driver_sql("SELECT records_seen FROM stream_stats").all()
    assert stats[0] == 150


def test_stream_stats_add_up_and_quantiles_merge_by_count(store: AlertStore) -> None:
    minute = T0 + timedelta(seconds=17)  # truncated to the minute by the store
    a = StreamStatRecord("cards", minute, 100, 80, 2, 20, 1.0, 1.0, 2.0, 4.0, 500.0, 100, 30.0)
    b = StreamStatRecord("cards", minute, 50, 20, 1, 30, 3.0, 2.0, 4.0, 8.0, 100.0, 50, 90.0)
    c = StreamStatRecord("cards", minute, records_seen=5)  # no scores at all
    store.write_batch(SinkBatch("cards", stats=[a]))
    store.write_batch(SinkBatch("cards", stats=[b, c]))
    rows = table_rows(store, "stream_stats")
    assert len(rows) == 1
    row = dict(zip([c for c in _stat_columns()], rows[0], strict=True))
    assert row["records_seen"] == 155
    assert row["records_scored"] == 100
    assert row["records_alerted"] == 3
    assert row["records_dead_lettered"] == 50
    assert row["score_mean"] == pytest.approx((1.0 * 80 + 3.0 * 20) / 100)
    assert row["score_p50"] == pytest.approx((1.0 * 80 + 2.0 * 20) / 100)
    assert row["score_p99"] == pytest.approx((4.0 * 80 + 8.0 * 20) / 100)
    assert row["latency_ms_sum"] == pytest.approx(600.0)
    assert row["latency_count"] == 150
    assert row["latency_ms_max"] == pytest.approx(90.0)


def _stat_columns() -> list[str]:
    from storage.schema import stream_stats

    return [c.name for c in stream_stats.columns]


def test_incidents_group_alerts_of_one_entity_within_the_window(store: AlertStore) -> None:
    t = T0
    s = timedelta(seconds=1)
    batch = SinkBatch(
        "cards",
        alerts=[
            alert(1, entity="m1", event_time=t, severity="low"),
            alert(2, entity="m1", event_time=t + 300 * s, severity="critical"),
            alert(3, entity="m1", event_time=t + 800 * s, severity="medium"),  # 500 s later
            alert(4, entity="m1", event_time=t + 1500 * s, severity="low"),  # 700 s: new
            alert(5, entity="m2", event_time=t + 10 * s, severity="medium"),
            alert(6, entity=None, event_time=t + 20 * s),  # no entity: no incident
        ],
    )
    result = store.write_batch(batch)
    assert result.incidents_opened == 3
    incidents = sorted(store.list_incidents(), key=lambda r: (r["entity"], r["first_seen"]))
    summary = [
        (r["entity"], r["first_seen"], r["last_seen"], r["alert_count"], r["max_severity"])
        for r in incidents
    ]
    assert summary == [
        ("m1", t, t + 800 * s, 3, "critical"),
        ("m1", t + 1500 * s, t + 1500 * s, 1, "low"),
        ("m2", t + 10 * s, t + 10 * s, 1, "medium"),
    ]
    by_offset = {a["kafka_offset"]: a["incident_id"] for a in store.list_alerts(limit=None)}
    ids = {(r["entity"], r["first_seen"]): r["id"] for r in incidents}
    assert by_offset[1] == by_offset[2] == by_offset[3] == ids[("m1", t)]
    assert by_offset[4] == ids[("m1", t + 1500 * s)]
    assert by_offset[5] == ids[("m2", t + 10 * s)]
    assert by_offset[6] is None

    # The next batch continues the open incident of m1 (within 600 s of its last alert) ...
    later = store.write_batch(
        SinkBatch("cards", alerts=[alert(7, entity="m1", event_time=t + 2000 * s, severity="high")])
    )
    assert later.incidents_opened == 0
    (latest,) = [r for r in store.list_incidents() if r["first_seen"] == t + 1500 * s]
    assert (latest["alert_count"], latest["last_seen"], latest["max_severity"]) == (
        2,
        t + 2000 * s,
        "high",
    )
    # ... and a replay changes no incident.
    before = table_rows(store, "incidents", "id")
    store.write_batch(batch)
    assert table_rows(store, "incidents", "id") == before


def test_incident_window_is_configurable(db_url: str) -> None:
    with AlertStore(db_url, incident_window_s=30) as store:
        store.upgrade()
        alerts = [
            alert(i, entity="m1", event_time=T0 + timedelta(seconds=40 * i)) for i in range(3)
        ]
        assert store.write_batch(SinkBatch("cards", alerts=alerts)).incidents_opened == 3


def test_bad_content_is_stored_escaped_without_losing_the_batch(store: AlertStore) -> None:
    nasty = "nul\x00 lone\udcff surrogate"
    long_id = "x" * 5000
    bad = alert(
        1,
        entity="e\x00" + "y" * 2000,
        record={
            "text": nasty,
            "nan": float("nan"),
            "inf": float("inf"),
            "bytes": b"\xff\xfe",
            "key\x00": 1,
            "when": datetime(2026, 1, 1, tzinfo=UTC),
        },
    )
    bad.record_id = long_id
    bad.top_features = [{"feature": "f\udcff", "value": float("nan"), "contribution": 1.0}]
    good = alert(2)
    dl = dead_letter(3)
    dl.error_message = "bad\x00message " + "z" * 20000
    dl.error_kind = "k\udcff"
    result = store.write_batch(SinkBatch("cards", alerts=[bad, good], dead_letters=[dl]))
    assert (result.alerts_written, result.dead_letters_written) == (2, 1)

    stored = {a["kafka_offset"]: a for a in store.list_alerts()}
    rec = stored[1]["record"]
    assert rec["text"] == "nul\\u0000 lone\\udcff surrogate"
    assert (rec["nan"], rec["inf"]) == (None, None)  # JSON has no NaN: null
    assert base64.b64decode(rec["bytes"]) == b"\xff\xfe"
    assert rec["key\\u0000"] == 1
    assert datetime.fromisoformat(rec["when"]) == datetime(2026, 1, 1, tzinfo=UTC)
    assert stored[1]["top_features"][0]["feature"] == "f\\udcff"
    assert len(stored[1]["record_id"]) == 512 and "truncated 5000 chars" in stored[1]["record_id"]
    assert stored[1]["entity"].startswith("e\\u0000yyy") and len(stored[1]["entity"]) <= 512
    assert stored[2]["record"] == good.record
    ((raw, kind, message),) = (
        store.engine.connect()
        .exec_driver_sql("SELECT raw, error_kind, error_message FROM dead_letters")
        .all()
    )
    assert bytes(raw) == dl.raw  # the original bytes, untouched
    assert kind == "k\\udcff"
    assert message.startswith("bad\\u0000message zzz") and len(message) <= 8000


def test_times_come_back_as_aware_utc(store: AlertStore) -> None:
    from datetime import timezone

    cet = timezone(timedelta(hours=1))
    a = alert(1, event_time=datetime(2026, 5, 1, 13, 0, tzinfo=cet))
    store.write_batch(SinkBatch("cards", alerts=[a]))
    (row,) = store.list_alerts()
    assert row["event_time"] == datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert row["event_time"].tzinfo is not None
    assert row["event_time"].utcoffset() == timedelta(0)
    # ingest_time is 12:00:00.050 UTC; "since" compares in UTC whatever the caller's zone.
    assert store.list_alerts(since=datetime(2026, 5, 1, 13, 0, 0, 10_000, tzinfo=cet)) == [row]
    assert store.list_alerts(since=datetime(2026, 5, 1, 12, 0, 1, tzinfo=UTC)) == []


def test_an_invalid_severity_is_rejected_before_anything_is_written(store: AlertStore) -> None:
    a = alert(1, severity="urgent")
    with pytest.raises(ValueError, match="severity 'urgent'"):
        store.write_batch(
            SinkBatch("cards", alerts=[a], offsets=[OffsetRecord("cards", "tx", 0, 2)])
        )
    assert store.load_offsets("cards", "tx") == {}


def test_ack_and_list_filters(store: AlertStore) -> None:
    store.write_batch(range_batch(0, 30))
    store.write_batch(range_batch(0, 30, pipeline="machines"))
    alerts = store.list_alerts(pipeline="cards", limit=None)
    assert alerts and all(a["pipeline"] == "cards" for a in alerts)
    newest = alerts[0]
    assert newest["ingest_time"] == max(a["ingest_time"] for a in alerts)
    assert store.ack_alert(newest["id"]) is True
    assert store.ack_alert(newest["id"]) is False
    assert [a["id"] for a in store.list_alerts(status="acknowledged")] == [newest["id"]]
    from storage.errors import NotFoundError

    with pytest.raises(NotFoundError):
        store.ack_alert(10**9)
    assert len(store.list_alerts(pipeline="cards", limit=2)) == 2
    assert all(a["entity"] == "card-1" for a in store.list_alerts(entity="card-1", limit=None))


def test_clean_json_input_takes_the_fast_path_and_dirty_input_is_cleaned() -> None:
    import numpy as np

    from storage.sanitize import json_text

    clean = {"a": 1, "b": [1.5, "ü", None], "c": {"d": True}}
    assert json.loads(json_text(clean)) == clean
    dirty = {"x": np.float32(2.5), "y": np.arange(3), "z": "a\x00\udcff", "w": float("-inf")}
    assert json.loads(json_text(dirty)) == {
        "x": 2.5,
        "y": [0, 1, 2],
        "z": "a\\u0000\\udcff",
        "w": None,
    }


def test_reset_offsets_rewinds_on_purpose_and_replay_then_fills_gaps(store: AlertStore) -> None:
    store.write_batch(range_batch(0, 60))
    store.write_batch(range_batch(0, 30, partition=1))
    # An operator deletes some alerts and rewinds partition 0 to replay it.
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM alerts WHERE kafka_partition = 0 AND kafka_offset >= 30")
    assert store.reset_offsets("cards", "tx", {0: 30}) == 1
    assert store.reset_offsets("cards", "tx", {}) == 0  # no partition named: nothing changes
    assert store.load_offsets("cards", "tx") == {0: 30, 1: 30}
    replay = store.write_batch(range_batch(30, 60))
    assert replay.records_fenced == 0
    assert replay.alerts_written == len([o for o in range(30, 60) if o % 3 == 0 and o % 10])
    assert replay.dead_letters_written == 0  # those were never deleted: deduplicated
    assert store.reset_offsets("cards", "tx") == 2
    assert store.load_offsets("cards", "tx") == {}


def test_from_config_takes_url_password_file_and_incident_window(tmp_path) -> None:
    from anomaly.config import config_from_dict

    secret = tmp_path / "db-password"
    secret.write_text("s3cret\n", encoding="utf-8")
    cfg = config_from_dict(
        {
            "name": "cards",
            "schema": {"numeric": ["amount"]},
            "database": {
                "url": "postgresql://anomaly@db.example:5432/alerts",
                "password_file": str(secret),
            },
            "incidents": {"window_s": 90},
        },
        environ={},
    )
    store = AlertStore.from_config(cfg)
    try:
        assert store.url.drivername == "postgresql+psycopg"
        assert store.url.password == "s3cret"
        assert "s3cret" not in repr(store)
        assert store.incident_window == timedelta(seconds=90)
    finally:
        store.close()
