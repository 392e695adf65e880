"""Closing stale incidents and what the Alertmanager notifier finds due (storage.notifications),
on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta

from storage_testlib import T0, alert, table_rows

from storage import AlertStore
from storage.records import SinkBatch

RESEND = timedelta(seconds=60)


def _write(store: AlertStore, *alerts) -> None:
    store.write_batch(SinkBatch("cards", alerts=list(alerts)))


def test_incidents_close_a_window_after_their_last_alert_and_are_sent_until_resolved(
    db_url: str,
) -> None:
    with AlertStore(db_url, incident_window_s=30) as store:
        store.upgrade()
        _write(store, alert(1, entity="a", ingest_time=T0), alert(2, entity="b", ingest_time=T0))
        _write(store, alert(3, entity="a", ingest_time=T0 + timedelta(seconds=20)))
        ids = {r["entity"]: r["id"] for r in store.list_incidents("cards")}
        ia, ib = ids["a"], ids["b"]
        # b's last alert is 31 s old, a's 11 s: only b closes.
        now = T0 + timedelta(seconds=31)
        assert store.close_stale_incidents("cards", now) == [ib]
        assert store.close_stale_incidents("cards", now) == []
        assert store.close_stale_incidents("other", now + timedelta(hours=1)) == []

        due = {d.id: d for d in store.incidents_to_notify("cards", now, RESEND, T0)}
        assert set(due) == {ia, ib}  # b: closed but never sent, so it is sent (firing) first
        a = due[ia]
        assert (a.status, a.alert_count, a.started_at, a.last_alert_at) == (
            "open", 2, T0, T0 + timedelta(seconds=20)
        )  # fmt: skip
        assert a.strongest is not None and a.strongest["record_id"] == "rec-0-3"  # score 13 > 11
        assert a.strongest["model_version"] == "v1" and a.sent is None
        labels = {"entity": "a"}
        store.mark_notified([(ia, "firing", labels, 2), (ib, "firing", {"entity": "b"}, 1)], now)
        assert store.incidents_to_notify("cards", now, RESEND, T0) == []

        # A new alert makes a due again at once; b is resolved one resend after its first send.
        _write(store, alert(4, entity="a", ingest_time=now))
        later = now + timedelta(seconds=1)
        assert [d.id for d in store.incidents_to_notify("cards", later, RESEND, T0)] == [ia]
        store.mark_notified([(ia, "firing", labels, 3)], later)
        then = now + RESEND
        due = {d.id: d for d in store.incidents_to_notify("cards", then, RESEND, T0)}
        assert set(due) == {ib} and due[ib].sent["state"] == "firing"
        store.mark_notified([(ib, "resolved", {"entity": "b"}, 1)], then)
        # a is re-sent a resend interval after its last send.
        due = store.incidents_to_notify("cards", later + RESEND, RESEND, T0)
        assert [d.id for d in due] == [ia] and due[0].sent["first_sent_at"] == now

        # Pruning the incident removes its notification row.
        store.prune(T0 + timedelta(days=2))
        assert table_rows(store, "incident_notifications") == []


def test_closed_incidents_never_sent_are_caught_up_only_since_the_given_time(
    db_url: str,
) -> None:
    with AlertStore(db_url, incident_window_s=30) as store:
        store.upgrade()
        _write(store, alert(1, entity="a", ingest_time=T0))
        now = T0 + timedelta(days=3)
        assert len(store.close_stale_incidents("cards", now)) == 1
        assert store.incidents_to_notify("cards", now, RESEND, now - timedelta(days=1)) == []
        [due] = store.incidents_to_notify("cards", now, RESEND, T0)
        assert due.status == "resolved" and due.sent is None


def test_a_large_backlog_of_stale_incidents_closes_in_one_call(db_url: str) -> None:
    with AlertStore(db_url, incident_window_s=30) as store:
        store.upgrade()
        _write(store, *[alert(k, entity=f"e{k}", ingest_time=T0) for k in range(2500)])
        assert len(store.close_stale_incidents("cards", T0 + timedelta(minutes=1))) == 2500
