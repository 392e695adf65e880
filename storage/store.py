"""``AlertStore``: the alert sink of the service loop and the queries of the CLI.

``write_batch`` writes one micro-batch in ONE transaction:

1. offset fencing: the ``consumer_offsets`` rows of the batch's partitions (``batch.offsets``) are
   created if missing and locked (``SELECT ... FOR UPDATE`` on PostgreSQL; the database write lock
   of ``BEGIN IMMEDIATE`` on SQLite). Alerts and dead letters whose offset is below the stored next
   offset were written by another consumer already and are dropped (``records_fenced``).
2. alerts: ``INSERT ... ON CONFLICT DO NOTHING`` on (pipeline, topic, partition, offset), so a
   replayed record never makes a second alert. Positions already stored are skipped before the
   insert; on PostgreSQL the rest go in by binary COPY (faster, see bench/storage.py; a unique-key
   race with a concurrent writer rolls back and retries), on SQLite a multi-row insert.
3. incidents: the new alerts of each (pipeline, entity) join the open incident whose time span
   they fall into, widened by ``incident_window_s`` on both sides, or open a new one.
4. dead letters: ``ON CONFLICT DO NOTHING`` on the source position.
5. stream statistics: additive upsert per (pipeline, minute).
6. consumer offsets: upsert, never moving an offset backwards.

Any failure rolls the whole transaction back. A lost connection, a deadlock or a busy SQLite file
raises ``RetryableStorageError``: repeat the same call. Nothing was written, except when the
connection was lost while committing: then the server may have stored the batch, and the repeated
call finds its positions and offsets already stored and adds nothing (the message says which).

``AlertStore`` is a thin front; the work is done per concern in

- ``engine``: URL, engine, SQLite transaction settings, ``Database.transaction`` and the
  translation of driver errors (retryable or not);
- ``writes`` (the hot path) with ``alert_rows``, ``incidents``, ``offsets`` and ``stats``:
  ``write_batch``;
- ``migrate``: ``upgrade_database``, ``downgrade_database``, ``database_revision``;
- ``registry``: model versions;
- ``drift``: drift windows (one row per closed window, outside the batch transaction);
- ``queries``: listing alerts and incidents, pruning, Grafana's role.
- ``verdicts``: acknowledging alerts, with or without analyst verdicts, reading reviewed alerts
  back.
- ``reservoir``: the retraining sample, written in the batch transaction, read by ``retrain``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import URL

from storage import drift, notifications, queries, registry, reservoir, verdicts
from storage.engine import STALLED_TRANSACTION_TIMEOUT_S, Database, config_database_url
from storage.offsets import load_offsets, reset_offsets
from storage.queries import PruneResult
from storage.records import ModelVersionRecord, SinkBatch, WriteResult
from storage.writes import AlertInsert, AlertWriter


class AlertStore:
    """The SQL store of one or more pipelines (SQLite file or PostgreSQL database).

    Parameters
    ----------
    url:
        SQLAlchemy URL: ``sqlite:///path/anomaly.db`` or ``postgresql+psycopg://user@host/db``
        (plain ``postgresql://`` is taken to mean psycopg 3).
    incident_window_s:
        Alerts of the same entity closer together than this (by event time, else ingest time)
        are one incident.
    alert_insert:
        How alerts are inserted on PostgreSQL: ``"copy"`` (binary COPY of the positions not yet
        stored, see ``writes._copy_alerts``), ``"executemany"`` (SQLAlchemy Core multi-row
        VALUES with ON CONFLICT DO NOTHING) or ``"auto"`` (COPY, the faster in
        bench/storage.py). SQLite always uses executemany.
    create:
        False: a SQLite file that does not exist raises ``SchemaMissingError`` here instead of
        being created empty by the first connection (for commands that use an existing
        database; only a migration should create one).
    stalled_transaction_timeout_s:
        PostgreSQL ends a session of this store whose transaction sits idle this long, so a
        writer stalled mid-batch cannot hold other writers' locks (``storage.engine``,
        ``STALLED_TRANSACTION_TIMEOUT_S``); 0 leaves the server's setting.
    """

    def __init__(
        self,
        url: str | URL,
        incident_window_s: float = 600.0,
        *,
        alert_insert: AlertInsert = "auto",
        create: bool = True,
        stalled_transaction_timeout_s: float = STALLED_TRANSACTION_TIMEOUT_S,
    ) -> None:
        if incident_window_s < 0:
            raise ValueError(f"incident_window_s must be >= 0, got {incident_window_s}")
        if alert_insert not in ("auto", "copy", "executemany"):
            raise ValueError(f"alert_insert must be auto, copy or executemany: {alert_insert!r}")
        self._db = Database(
            url, create=create, stalled_transaction_timeout_s=stalled_transaction_timeout_s
        )
        self.incident_window = timedelta(seconds=incident_window_s)
        if alert_insert == "auto" or self.dialect != "postgresql":
            alert_insert = "copy" if self.dialect == "postgresql" else "executemany"
        self.alert_insert = alert_insert
        self._writer = AlertWriter(self._db, self.incident_window, alert_insert)

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> AlertStore:
        """A store for a ``PipelineConfig``: its database URL (password from
        ``database.password_file`` when set) and its incident window."""
        return cls(
            config_database_url(cfg),
            incident_window_s=cfg.incidents.window_s,
            stalled_transaction_timeout_s=cfg.database.stalled_transaction_timeout_s,
            **kwargs,
        )

    @property
    def url(self) -> URL:
        return self._db.url

    @property
    def engine(self) -> Engine:
        return self._db.engine

    @property
    def dialect(self) -> str:
        return self._db.dialect

    def __repr__(self) -> str:
        return f"AlertStore({self._db.where()!r})"

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ schema (storage.migrate)

    def upgrade(self, revision: str = "head") -> None:
        """Run the Alembic migrations up to ``revision`` (concurrent callers serialize)."""
        from storage import migrate  # imports Alembic: only for the commands that migrate

        migrate.upgrade_database(self._db, revision)

    def downgrade(self, revision: str) -> None:
        from storage import migrate

        migrate.downgrade_database(self._db, revision)

    def current_revision(self) -> str | None:
        from storage import migrate

        return migrate.database_revision(self._db)

    # ------------------------------------------------------------------ the sink (storage.writes)

    def write_batch(self, batch: SinkBatch) -> WriteResult:
        """Write one micro-batch in one transaction (see the module docstring)."""
        return self._writer.write_batch(batch)

    def load_offsets(self, pipeline: str, topic: str) -> dict[int, int]:
        """partition -> next offset to read, as committed with the last written batches."""
        return load_offsets(self._db, pipeline, topic)

    def reset_offsets(
        self, pipeline: str, topic: str, offsets: dict[int, int] | None = None
    ) -> int:
        """Rewind or forget stored offsets (e.g. to replay a topic on purpose).

        ``offsets=None`` deletes the topic's rows (the consumer then starts where Kafka's
        ``auto.offset.reset`` says); otherwise sets each partition's next offset exactly."""
        return reset_offsets(self._db, pipeline, topic, offsets)

    # ------------------------------------------------------------------ model versions (registry)

    def register_model_version(
        self, rec: ModelVersionRecord, activate: bool = True
    ) -> ModelVersionRecord:
        """Record a model bundle; idempotent for the same (pipeline, version, sha256).

        Raises ``ModelVersionConflict`` when the version exists with another bundle hash."""
        return registry.register(self._db, rec, activate)

    def activate_model_version(self, pipeline: str, version: str) -> ModelVersionRecord:
        """Make ``version`` the pipeline's one active model (the service polls for it)."""
        return registry.activate(self._db, pipeline, version)

    def active_model_version(self, pipeline: str) -> ModelVersionRecord | None:
        return registry.active(self._db, pipeline)

    def list_model_versions(self, pipeline: str | None = None) -> list[ModelVersionRecord]:
        return registry.versions(self._db, pipeline=pipeline)

    # ------------------------------------------------------------------ queries and upkeep

    def list_alerts(
        self,
        pipeline: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str | None = None,
        entity: str | None = None,
        limit: int | None = 100,
    ) -> list[dict[str, Any]]:
        """Alerts, newest (by ingest time) first, as dicts of the table's columns."""
        return queries.list_alerts(self._db, pipeline, since, until, status, entity, limit)

    def list_incidents(
        self, pipeline: str | None = None, limit: int | None = 100
    ) -> list[dict[str, Any]]:
        return queries.list_incidents(self._db, pipeline, limit)

    def ack_alert(self, alert_id: int) -> bool:
        """Acknowledge an open alert. True if its status changed, False if it was already
        acknowledged or resolved; ``NotFoundError`` if there is no such alert."""
        return bool(verdicts.ack(self._db, alert_id).acknowledged)

    def ack(
        self,
        alert_id: int | None = None,
        *,
        incident_id: int | None = None,
        verdict: str | None = None,
        by: str | None = None,
        note: str | None = None,
        at: datetime | None = None,
    ) -> verdicts.AckResult:
        """Acknowledge one alert, or every alert of ``incident_id``, and with ``verdict``
        (``true_positive``/``false_positive``) record the analyst's verdict on each: ``by`` whom,
        ``at`` when (default now), with an optional ``note``. Open alerts become acknowledged;
        a verdict given again replaces the earlier one. ``NotFoundError`` for an unknown id,
        ``InvalidArgumentError`` naming the field for a bad verdict."""
        return verdicts.ack(self._db, alert_id, incident_id, verdict, by, note, at)

    def reviewed_alerts(
        self,
        pipeline: str | None = None,
        model_version: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Alerts with a verdict (the alert's record and scores, and the verdict), oldest
        first."""
        return verdicts.reviewed_alerts(self._db, pipeline, model_version, since, until)

    def alert_counts(
        self,
        pipeline: str | None = None,
        model_version: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> dict[tuple[str, str], int]:
        """All alerts, reviewed or not, per (pipeline, model version)."""
        return verdicts.alert_counts(self._db, pipeline, model_version, since, until)

    def prune(self, older_than: timedelta | datetime, pipeline: str | None = None) -> PruneResult:
        """Delete alerts (by ingest time), dead letters (by created_at) and statistics (by minute)
        older than the cutoff, and incidents whose last alert is older and that no remaining
        alert refers to. Model versions and consumer offsets are kept."""
        return queries.prune(self._db, older_than, pipeline)

    def write_drift_window(self, report: Any) -> None:
        """Store one closed drift window (an ``anomaly.monitoring.drift.DriftReport``)."""
        drift.write_window(self._db, report)

    def list_drift_windows(
        self, pipeline: str | None = None, since: datetime | None = None, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Drift windows started at or after ``since``, oldest first."""
        return drift.list_windows(self._db, pipeline, since, limit)

    def reservoir_rows(self, pipeline: str, since: datetime | None = None) -> list[dict[str, Any]]:
        """The retraining reservoir's rows (storage.reservoir), less confirmed anomalies."""
        return reservoir.reservoir_rows(self._db, pipeline, since)

    def reservoir_count(self, pipeline: str) -> int:
        return reservoir.reservoir_count(self._db, pipeline)

    def grant_read_only(self, role: str = "anomaly_grafana", password: str | None = None) -> None:
        """PostgreSQL: create (if missing) a role that can only SELECT the tables, for Grafana.

        Runs ``storage/grafana_role.sql``; with a password the role can log in."""
        queries.grant_read_only(self._db, role, password)

    # ------------------------------------------------------------------ incident notifications

    def close_stale_incidents(self, pipeline: str, now: datetime) -> list[int]:
        """Close open incidents no alert joined for the incident window (by ingest time)."""
        return notifications.close_stale(self._db, pipeline, now, self.incident_window)

    def incidents_to_notify(
        self, pipeline: str, now: datetime, resend: timedelta, since: datetime, limit: int = 500
    ) -> list[notifications.DueIncident]:
        """What the Alertmanager notifier sends now, at most ``limit`` (``notifications.due``)."""
        return notifications.due(self._db, pipeline, now, resend, since, limit)

    def mark_notified(
        self, sent: list[tuple[int, str, dict[str, str], int]], now: datetime
    ) -> None:
        notifications.mark_sent(self._db, sent, now)
