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
"""

from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import (
    Connection,
    Engine,
    bindparam,
    case,
    create_engine,
    delete,
    event,
    exists,
    func,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from storage import schema as s
from storage.errors import (
    DatabaseAccessError,
    DatabaseURLError,
    InvalidArgumentError,
    ModelVersionConflict,
    NotFoundError,
    RetryableStorageError,
    SchemaMissingError,
    StorageError,
)
from storage.records import (
    SEVERITIES,
    AlertRecord,
    DeadLetterRecord,
    ModelVersionRecord,
    OffsetRecord,
    SinkBatch,
    StreamStatRecord,
    WriteResult,
)
from storage.sanitize import clean_json, clean_text, dumps, json_bytes, json_text

log = logging.getLogger(__name__)

_SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}
# Columns of an alert row as the store writes them (id and incident_id are set by the database).
ALERT_COLUMNS = (
    "pipeline",
    "record_id",
    "entity",
    "event_time",
    "ingest_time",
    "kafka_topic",
    "kafka_partition",
    "kafka_offset",
    "model_version",
    "vae_score",
    "vae_p",
    "flow_score",
    "flow_p",
    "gan_score",
    "gan_p",
    "ensemble_score",
    "ensemble_p",
    "severity",
    "fired_detectors",
    "top_features",
    "record",
    "status",
    "incident_id",
)
# An alert row is a list in ALERT_COLUMNS order (no dict per alert on the hot path), with the JSON
# columns still as Python values: they are encoded while the row is written (see _json_values).
_COLUMN = {name: i for i, name in enumerate(ALERT_COLUMNS)}
_PIPELINE, _ENTITY, _TOPIC = _COLUMN["pipeline"], _COLUMN["entity"], _COLUMN["kafka_topic"]
_PARTITION, _OFFSET, _SEVERITY = (
    _COLUMN["kafka_partition"],
    _COLUMN["kafka_offset"],
    _COLUMN["severity"],
)
_EVENT_TIME, _INGEST_TIME = _COLUMN["event_time"], _COLUMN["ingest_time"]
_FIRED, _TOP_FEATURES, _RECORD = (
    _COLUMN["fired_detectors"],
    _COLUMN["top_features"],
    _COLUMN["record"],
)
_INCIDENT_ID = _COLUMN["incident_id"]
_time_and_index = itemgetter(0, 1)
# PostgreSQL COPY path (see AlertStore._copy_alerts). The JSON columns are ``json`` there (text
# stored as is, migration 0002), so their binary COPY form is the UTF-8 bytes msgspec produces:
# declared as bytea, psycopg passes them through untouched.
_COPY_TYPES = [
    *("text", "text", "text", "timestamptz", "timestamptz", "text", "int4", "int8", "text"),
    *("float8",) * 8,
    "text",
    *("bytea",) * 3,
    "text",
    "int8",
]
_ALERT_COPY = f"COPY alerts ({', '.join(ALERT_COLUMNS)}) FROM STDIN (FORMAT BINARY)"
_IN_CHUNK = 5000  # ids/entities per IN (...) list; SQLite allows 32766 variables

AlertInsert = Literal["auto", "copy", "executemany"]


def utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already."""
    tz = value.tzinfo
    if tz is UTC:
        return value
    return value.replace(tzinfo=UTC) if tz is None else value.astimezone(UTC)


def normalize_url(url: str | URL) -> URL:
    """A SQLAlchemy URL; plain ``postgresql://`` means psycopg 3 (the driver we install)."""
    try:
        u = make_url(url)
    except Exception as exc:  # sqlalchemy.exc.ArgumentError
        raise DatabaseURLError(f"not a database URL: {url!r} ({exc})") from exc
    if u.drivername in ("postgresql", "postgres"):
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() not in ("postgresql", "sqlite"):
        raise DatabaseURLError(
            f"unsupported database {u.get_backend_name()!r} in {u.render_as_string()}: "
            "use postgresql+psycopg://... or sqlite:///path"
        )
    return u


def make_engine(url: str | URL) -> Engine:
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        engine = create_engine(
            u, connect_args={"timeout": 30.0}, json_serializer=dumps, pool_pre_ping=True
        )
        _sqlite_transactions(engine, memory=u.database in (None, "", ":memory:"))
        return engine
    return create_engine(
        u,
        json_serializer=dumps,
        pool_pre_ping=True,  # a connection killed while idle is replaced, not reported
        pool_size=2,
        max_overflow=4,
        # A server or network that silently stops answering must surface as a retryable error
        # in seconds, not after the kernel's ~15 min retransmission timeout: TCP keepalives for
        # idle connections and tcp_user_timeout for unacknowledged writes.
        connect_args={
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            "tcp_user_timeout": 30_000,
        },
    )


def _sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _require_sqlite_file(url: URL) -> None:
    """SchemaMissingError if ``url`` is a SQLite file that does not exist (SQLite would create
    it empty on the first connection, and the command then fail on the missing tables)."""
    path = _sqlite_file(url)
    if path is not None and not path.exists():
        raise SchemaMissingError(
            f"no database at {url.render_as_string(hide_password=True)}: {path} does not exist "
            "(`anomaly db upgrade` creates it)"
        )


def _remove_if_no_tables(path: Path) -> None:
    """Delete a SQLite file (and its WAL files) that holds no table; one that another process
    has migrated meanwhile, or that cannot be read, stays."""
    import sqlite3
    from contextlib import closing

    try:
        with closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as conn:
            (objects,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    except sqlite3.Error:
        return
    if objects:
        return
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with suppress(OSError):
            p.unlink(missing_ok=True)


def _sqlite_transactions(engine: Engine, memory: bool) -> None:
    """Let SQLAlchemy, not pysqlite, issue BEGIN, so writers can take the write lock up front.

    ``BEGIN IMMEDIATE`` (connections with the ``sqlite_immediate`` execution option) acquires the
    database's write lock when the transaction starts: two writers serialize at BEGIN (waiting up to
    the 30 s busy timeout) instead of deadlocking when a reader upgrades to a writer.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cur = dbapi_connection.cursor()
        try:
            cur.execute("PRAGMA foreign_keys=ON")
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the writer
                cur.execute("PRAGMA synchronous=NORMAL")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


# What the server or SQLite says when a table is missing: the schema was never migrated (or is
# older than this code). SQLite reports it as an OperationalError, which would read as "retry".
_NO_SUCH_TABLE = re.compile(r'no such table: ([\w.]+)|relation "([\w.]+)" does not exist')
# Connection refusals that retrying cannot fix (PostgreSQL gives no SQLSTATE for them, only the
# server's message). Without these, a typo in the URL's role or database read as "unreachable".
_NO_SUCH_ROLE = re.compile(r'FATAL:\s+role "([^"]*)" does not exist')
_NO_SUCH_DATABASE = re.compile(r'FATAL:\s+database "([^"]*)" does not exist')


def _not_retryable(orig: BaseException, what: str, where: str) -> StorageError | None:
    """The error for a failure that retrying cannot fix, whatever its driver class, or None."""
    reason = " ".join(str(orig).split())
    # PostgreSQL's undefined_table SQLSTATE; SQLite has only its message.
    no_table = getattr(orig, "sqlstate", None) == "42P01" or reason.startswith("no such table")
    if no_table and (match := _NO_SUCH_TABLE.search(reason)):
        table = match.group(1) or match.group(2)
        return SchemaMissingError(
            f"{what} on {where} failed: the database has no {table} table (not migrated, or "
            "migrated by an older version): run `anomaly db upgrade` first"
        )
    if match := _NO_SUCH_ROLE.search(reason):
        return DatabaseAccessError(
            f"{what} on {where} failed: no such role {match.group(1)!r} on the server "
            "(the user in the database URL)"
        )
    if match := _NO_SUCH_DATABASE.search(reason):
        return DatabaseAccessError(
            f"{what} on {where} failed: no such database {match.group(1)!r} on the server "
            "(create it, or fix the database name in the URL)"
        )
    return None


def _is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - SQLite-only install
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


@contextmanager
def _revision_errors(action: str, revision: str) -> Iterator[None]:
    """Alembic's CommandError (an unknown or ambiguous revision, a downgrade target above the
    current one) as an InvalidArgumentError naming the revisions there are; raised inside the
    transaction, so nothing is migrated."""
    from alembic.util import CommandError

    try:
        yield
    except CommandError as exc:
        from storage import migrate

        known = ", ".join(migrate.revisions())
        raise InvalidArgumentError(
            f"database {action} to {revision!r}: {exc} (revisions: {known}; or head, base)"
        ) from None


class _LostRace(Exception):
    """A concurrent transaction inserted alert positions this batch was about to insert."""


@dataclass(slots=True)
class PruneResult:
    alerts: int
    incidents: int
    dead_letters: int
    stream_stats: int


@dataclass(slots=True)
class _Incident:
    id: int | None
    pipeline: str
    entity: str
    first_seen: datetime
    last_seen: datetime
    alert_count: int
    max_severity: str
    dirty: bool = False


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
        stored, see ``_copy_alerts``), ``"executemany"`` (SQLAlchemy Core multi-row VALUES with
        ON CONFLICT DO NOTHING) or ``"auto"`` (COPY, the faster in bench/storage.py). SQLite
        always uses executemany.
    create:
        False: a SQLite file that does not exist raises ``SchemaMissingError`` here instead of
        being created empty by the first connection (for commands that use an existing
        database; only a migration should create one).
    """

    def __init__(
        self,
        url: str | URL,
        incident_window_s: float = 600.0,
        *,
        alert_insert: AlertInsert = "auto",
        create: bool = True,
    ) -> None:
        if incident_window_s < 0:
            raise ValueError(f"incident_window_s must be >= 0, got {incident_window_s}")
        if alert_insert not in ("auto", "copy", "executemany"):
            raise ValueError(f"alert_insert must be auto, copy or executemany: {alert_insert!r}")
        self.url = normalize_url(url)
        if not create:
            _require_sqlite_file(self.url)
        self.incident_window = timedelta(seconds=incident_window_s)
        self.engine = make_engine(self.url)
        self.dialect = self.engine.dialect.name
        if alert_insert == "auto":
            alert_insert = "copy" if self.dialect == "postgresql" else "executemany"
        if self.dialect != "postgresql":
            alert_insert = "executemany"
        self.alert_insert = alert_insert
        self._stats_upsert: Any = None

    @classmethod
    def from_config(cls, cfg: Any, **kwargs: Any) -> AlertStore:
        """A store for a ``PipelineConfig``: its database URL (password from
        ``database.password_file`` when set) and its incident window."""
        return cls(
            config_database_url(cfg),
            incident_window_s=cfg.incidents.window_s,
            **kwargs,
        )

    def __repr__(self) -> str:
        return f"AlertStore({self.url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> AlertStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ transactions and errors

    def _insert(self, table: Any) -> Any:
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def _greatest(self, a: Any, b: Any) -> Any:
        return func.greatest(a, b) if self.dialect == "postgresql" else func.max(a, b)

    @contextmanager
    def _transaction(self, what: str, write: bool = True) -> Iterator[Connection]:
        """One transaction; database failures become ``RetryableStorageError`` or
        ``StorageError`` naming ``what`` was being done."""
        committing = False
        try:
            with self.engine.connect() as conn:
                if write and self.dialect == "sqlite":
                    conn = conn.execution_options(sqlite_immediate=True)
                try:
                    with conn.begin():
                        yield conn
                        # Past this point a failure may come after the server committed (a lost
                        # COMMIT reply): the outcome is unknown, not "nothing written".
                        committing = True
                except BaseException as exc:
                    # An error raised by the raw psycopg connection (COPY) bypasses SQLAlchemy's
                    # disconnect detection: make sure a broken connection is not pooled again.
                    if _is_retryable(exc) and not conn.invalidated:
                        with suppress(Exception):  # best effort
                            conn.invalidate()
                    raise
        except (sa_exc.DBAPIError, sa_exc.InterfaceError) as exc:
            raise self._translate(exc, what, committing) from exc
        except StorageError:
            raise
        except Exception as exc:
            if _is_retryable(exc):
                raise self._translate(exc, what, committing) from exc
            raise

    def _translate(self, exc: BaseException, what: str, committing: bool = False) -> StorageError:
        orig = getattr(exc, "orig", None) or exc
        reason = " ".join(str(orig).split()) or type(orig).__name__
        where = self.url.render_as_string(hide_password=True)
        unfixable = _not_retryable(orig, what, where)
        if unfixable is not None:
            return unfixable
        if _is_retryable(exc) and committing:
            return RetryableStorageError(
                f"{what} on {where} failed while committing ({type(orig).__name__}: {reason}): "
                "the server may or may not have stored it; retry the same call once the "
                "database is reachable (positions already stored are skipped, so a retry "
                "never duplicates)"
            )
        if _is_retryable(exc):
            return RetryableStorageError(
                f"{what} on {where} failed and was rolled back, nothing was written "
                f"({type(orig).__name__}: {reason}); retry once the database is reachable"
            )
        return StorageError(f"{what} on {where} failed: {type(orig).__name__}: {reason}")

    # ------------------------------------------------------------------ schema

    def upgrade(self, revision: str = "head") -> None:
        """Run the Alembic migrations up to ``revision`` (concurrent callers serialize)."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext

        from storage import migrate

        # An unknown name fails here, before the first connection creates a SQLite file.
        with _revision_errors("upgrade", revision):
            migrate.check_revision(revision)
        path = _sqlite_file(self.url)
        new_file = path if path is not None and not path.exists() else None
        try:
            with (
                self._transaction("database upgrade") as conn,
                _revision_errors("upgrade", revision),
            ):
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(7301240591)"))
                before = MigrationContext.configure(conn).get_current_heads()
                command.upgrade(migrate.alembic_config(conn), revision)
                after = MigrationContext.configure(conn).get_current_heads()
        except BaseException:
            # Nothing was migrated (one transaction), so the file this call created holds no
            # table: leave no empty database behind.
            if new_file is not None:
                self.engine.dispose()
                _remove_if_no_tables(new_file)
            raise
        if after != before:  # Alembic's own step-by-step lines are INFO of logger "alembic"
            old, new = ",".join(before) or "base", ",".join(after) or "base"
            log.info(
                "database migrated from %s to %s",
                old,
                new,
                extra={"fields": {"from_revision": old, "to_revision": new}},
            )

    def downgrade(self, revision: str) -> None:
        from alembic import command

        from storage import migrate

        with (
            self._transaction("database downgrade") as conn,
            _revision_errors("downgrade", revision),
        ):
            command.downgrade(migrate.alembic_config(conn), revision)

    def current_revision(self) -> str | None:
        from alembic.runtime.migration import MigrationContext

        with self._transaction("reading the schema revision", write=False) as conn:
            return MigrationContext.configure(conn).get_current_revision()

    # ------------------------------------------------------------------ the sink

    def write_batch(self, batch: SinkBatch) -> WriteResult:
        """Write one micro-batch in one transaction (see the module docstring)."""
        alert_rows = [_alert_row(a) for a in batch.alerts]
        dead_rows = [_dead_letter_row(d) for d in batch.dead_letters]
        what = (
            f"writing a batch of pipeline {batch.pipeline!r} "
            f"({len(alert_rows)} alerts, {len(dead_rows)} dead letters)"
        )
        for _attempt in range(5):
            try:
                with self._transaction(what) as conn:
                    return self._write(conn, batch, alert_rows, dead_rows)
            except _LostRace:
                # Another transaction inserted some of these alert positions between our check
                # and our insert (only possible for partitions without offsets in the batch);
                # it has committed by now, so the next attempt sees its rows.
                continue
        raise RetryableStorageError(f"{what}: concurrent writers kept inserting the same alerts")

    def _write(
        self,
        conn: Connection,
        batch: SinkBatch,
        alert_rows: list[list[Any]],
        dead_rows: list[dict[str, Any]],
    ) -> WriteResult:
        offsets = _merge_offsets(batch.offsets)
        stored = self._lock_offsets(conn, offsets)

        def fenced(row: dict[str, Any]) -> bool:
            key = (row["pipeline"], row["kafka_topic"], row["kafka_partition"])
            return key in stored and row["kafka_offset"] < stored[key]

        def alert_fenced(row: list[Any]) -> bool:
            next_offset = stored.get((row[_PIPELINE], row[_TOPIC], row[_PARTITION]))
            return next_offset is not None and row[_OFFSET] < next_offset

        n_alerts, n_dead = len(alert_rows), len(dead_rows)
        if stored:
            alert_rows = [r for r in alert_rows if not alert_fenced(r)]
            dead_rows = [r for r in dead_rows if not fenced(r)]
        records_fenced = (n_alerts - len(alert_rows)) + (n_dead - len(dead_rows))

        # Alerts already stored (a replay) or twice in this batch are skipped before the incident
        # grouping, so incidents count every alert once; the insert below still says
        # ON CONFLICT DO NOTHING and a count mismatch means a concurrent writer won a race.
        new_rows = self._new_alert_rows(conn, alert_rows) if alert_rows else []
        incidents_opened = self._assign_incidents(conn, new_rows) if new_rows else 0
        if new_rows and self._insert_alerts(conn, new_rows) != len(new_rows):
            raise _LostRace
        dead_written = self._insert_dead_letters(conn, dead_rows) if dead_rows else 0

        stats = _fence_stats(batch.stats, offsets, stored)
        if stats:
            self._upsert_stats(conn, stats)
        if offsets:
            self._upsert_offsets(conn, offsets)
        return WriteResult(
            alerts_written=len(new_rows),
            dead_letters_written=dead_written,
            incidents_opened=incidents_opened,
            records_fenced=records_fenced,
        )

    def _lock_offsets(
        self, conn: Connection, offsets: list[OffsetRecord]
    ) -> dict[tuple[str, str, int], int]:
        """Create (if missing) and lock the batch's offset rows; their stored next offsets.

        The placeholder row (next offset 0) makes a concurrent writer of a partition seen for
        the first time wait on the unique key instead of racing past the lock; it is replaced by
        the batch's own offset before the transaction commits.
        """
        if not offsets:
            return {}
        t = s.consumer_offsets
        now = datetime.now(UTC)
        keys = [(o.pipeline, o.kafka_topic, o.kafka_partition) for o in offsets]  # sorted
        conn.execute(
            self._insert(t).on_conflict_do_nothing(),
            [
                {
                    "pipeline": p,
                    "kafka_topic": topic,
                    "kafka_partition": part,
                    "next_offset": 0,
                    "updated_at": now,
                }
                for p, topic, part in keys
            ],
        )
        query = (
            select(t.c.pipeline, t.c.kafka_topic, t.c.kafka_partition, t.c.next_offset)
            .where(tuple_(t.c.pipeline, t.c.kafka_topic, t.c.kafka_partition).in_(keys))
            .order_by(t.c.pipeline, t.c.kafka_topic, t.c.kafka_partition)
        )
        if self.dialect == "postgresql":
            query = query.with_for_update()
        return {(r[0], r[1], r[2]): r[3] for r in conn.execute(query)}

    def _new_alert_rows(self, conn: Connection, rows: list[list[Any]]) -> list[list[Any]]:
        """The rows whose position is neither stored yet nor earlier in the same batch, sorted by
        position: concurrent writers of the same positions then insert them in one order (a wait
        and a retry, never a deadlock)."""
        ranges: dict[tuple[str, str, int], list[int]] = {}
        if _in_order(rows):  # the usual batch: one partition, offsets rising, no duplicates
            first, last = rows[0], rows[-1]
            ranges[(first[_PIPELINE], first[_TOPIC], first[_PARTITION])] = [
                first[_OFFSET],
                last[_OFFSET],
            ]
        else:
            unique: dict[tuple[str, str, int, int], list[Any]] = {}
            for row in rows:
                unique.setdefault((row[_PIPELINE], row[_TOPIC], row[_PARTITION], row[_OFFSET]), row)
            rows = [unique[key] for key in sorted(unique)]
            for row in rows:  # sorted: the first row of a partition has its lowest offset
                key3, offset = (row[_PIPELINE], row[_TOPIC], row[_PARTITION]), row[_OFFSET]
                if key3 in ranges:
                    ranges[key3][1] = offset
                else:
                    ranges[key3] = [offset, offset]
        t = s.alerts
        stored: set[tuple[str, str, int, int]] = set()
        for (p, topic, part), (lo, hi) in ranges.items():  # one range scan of the unique index
            found = conn.execute(
                select(t.c.kafka_offset).where(
                    t.c.pipeline == p,
                    t.c.kafka_topic == topic,
                    t.c.kafka_partition == part,
                    t.c.kafka_offset.between(lo, hi),
                )
            ).scalars()
            stored.update((p, topic, part, o) for o in found)
        if not stored:
            return rows
        return [
            row
            for row in rows
            if (row[_PIPELINE], row[_TOPIC], row[_PARTITION], row[_OFFSET]) not in stored
        ]

    def _insert_alerts(self, conn: Connection, rows: list[list[Any]]) -> int:
        """Insert the rows; the number of rows actually inserted (executemany: with ON CONFLICT
        DO NOTHING; COPY: all of them or an error, see ``_copy_alerts``)."""
        if self.alert_insert == "copy":
            return self._copy_alerts(conn, rows)
        t = s.alerts
        stmt = (
            self._insert(t)
            .on_conflict_do_nothing(
                index_elements=["pipeline", "kafka_topic", "kafka_partition", "kafka_offset"]
            )
            .returning(t.c.id)
        )
        params = [
            dict(zip(ALERT_COLUMNS, _json_values(row, json_text), strict=True)) for row in rows
        ]
        return len(conn.execute(stmt, params).all())

    def _copy_alerts(self, conn: Connection, rows: list[list[Any]]) -> int:
        """PostgreSQL: binary COPY straight into ``alerts``.

        COPY has no ON CONFLICT, and needs none here: ``_new_alert_rows`` dropped the positions
        already stored, under the batch's offset locks. A concurrent writer of a partition
        without offsets in the batch can still insert one of these positions first; the unique
        key then fails the COPY, the transaction rolls back and ``write_batch`` retries (as for
        a lost ``ON CONFLICT`` race). Rows come sorted by position, so two such writers wait on
        each other in one order instead of deadlocking. This saves the staging table and the
        ``INSERT ... SELECT ... ON CONFLICT``, about a quarter of the server's work per row.

        The JSON columns are encoded here, row by row, while psycopg streams the rows already
        written: the server parses and inserts them meanwhile, on the other core."""
        import psycopg
        from psycopg.types.string import BytesBinaryDumper

        raw = conn.connection.driver_connection
        try:
            with raw.cursor() as cur:
                # For the bytea type psycopg picks the dumper of its DB-API ``Binary`` wrapper,
                # written in Python; the C one for plain bytes halves psycopg's cost per row.
                cur.adapters.register_dumper(bytes, BytesBinaryDumper)  # this cursor only
                with cur.copy(_ALERT_COPY) as copy:
                    copy.set_types(_COPY_TYPES)
                    write_row = copy.write_row
                    # Times are aware UTC already and texts are clean (see _alert_row).
                    for row in rows:
                        write_row(_json_values(row, json_bytes))
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name == "uq_alerts_position":
                raise _LostRace from exc
            raise
        return len(rows)

    def _assign_incidents(self, conn: Connection, rows: list[list[Any]]) -> int:
        """Group new alerts into incidents per (pipeline, entity); sets each row's
        ``incident_id``; returns the number of incidents opened."""
        by_entity: dict[tuple[str, str], list[tuple[datetime, int, list[Any]]]] = defaultdict(list)
        for i, row in enumerate(rows):
            row[_INCIDENT_ID] = None
            entity = row[_ENTITY]
            if entity is None:
                continue  # no entity: nothing to group by
            when = row[_EVENT_TIME] or row[_INGEST_TIME]
            by_entity[(row[_PIPELINE], entity)].append((when, i, row))
        if not by_entity:
            return 0
        keys = sorted(by_entity)
        if self.dialect == "postgresql":
            # Writers of the same entity (e.g. two consumers after a rebalance) take turns; the
            # locks are taken in one sorted order, so two batches cannot deadlock on them.
            conn.execute(
                text(
                    "SELECT pg_advisory_xact_lock(k) FROM (SELECT DISTINCT "
                    "hashtextextended(x, 7301) AS k FROM unnest(CAST(:keys AS text[])) AS x "
                    "ORDER BY 1) AS locks"
                ),
                {"keys": [f"{p}\x1f{e}" for p, e in keys]},
            )
        window = self.incident_window
        earliest = min(item[0] for items in by_entity.values() for item in items)
        candidates: dict[tuple[str, str], list[_Incident]] = defaultdict(list)
        t = s.incidents
        by_pipeline: dict[str, list[str]] = defaultdict(list)
        for p, e in keys:
            by_pipeline[p].append(e)
        for pipeline, entities in by_pipeline.items():
            for chunk in _chunks(entities, _IN_CHUNK):
                query = select(
                    t.c.id,
                    t.c.entity,
                    t.c.first_seen,
                    t.c.last_seen,
                    t.c.alert_count,
                    t.c.max_severity,
                ).where(
                    t.c.pipeline == pipeline,
                    t.c.entity.in_(chunk),
                    t.c.status == "open",
                    t.c.last_seen >= earliest - window,
                )
                for r in conn.execute(query):
                    candidates[(pipeline, r[1])].append(_Incident(r[0], pipeline, *r[1:]))

        new: list[_Incident] = []
        assignment: list[tuple[list[Any], _Incident]] = []
        for key in keys:
            pool = candidates[key]
            for when, _i, row in sorted(by_entity[key], key=_time_and_index):
                severity = row[_SEVERITY]
                match = None
                for inc in pool:  # the latest incident whose widened span holds this alert
                    if inc.first_seen - window <= when <= inc.last_seen + window and (
                        match is None or inc.last_seen > match.last_seen
                    ):
                        match = inc
                if match is None:
                    match = _Incident(None, key[0], key[1], when, when, 0, severity)
                    pool.append(match)
                    new.append(match)
                else:
                    match.dirty = match.id is not None
                match.first_seen = min(match.first_seen, when)
                match.last_seen = max(match.last_seen, when)
                match.alert_count += 1
                if _SEVERITY_RANK[severity] > _SEVERITY_RANK[match.max_severity]:
                    match.max_severity = severity
                assignment.append((row, match))

        if new:
            self._insert_incidents(conn, new)
        dirty = [inc for pool in candidates.values() for inc in pool if inc.dirty]
        if dirty:
            self._update_incidents(conn, dirty)
        for row, inc in assignment:
            row[_INCIDENT_ID] = inc.id
        return len(new)

    def _insert_incidents(self, conn: Connection, new: list[_Incident]) -> None:
        """Insert new incidents and set their ids (matched back on pipeline, entity and
        first_seen, which are unique among the incidents one batch opens)."""
        t = s.incidents
        if self.dialect == "postgresql":
            returned = conn.execute(
                text(
                    "INSERT INTO incidents (pipeline, entity, first_seen, last_seen, "
                    "alert_count, max_severity) SELECT * FROM unnest(CAST(:p AS text[]), "
                    "CAST(:e AS text[]), CAST(:f AS timestamptz[]), CAST(:l AS timestamptz[]), "
                    "CAST(:c AS int[]), CAST(:s AS text[])) "
                    "RETURNING id, pipeline, entity, first_seen"
                ),
                {
                    "p": [i.pipeline for i in new],
                    "e": [i.entity for i in new],
                    "f": [i.first_seen for i in new],
                    "l": [i.last_seen for i in new],
                    "c": [i.alert_count for i in new],
                    "s": [i.max_severity for i in new],
                },
            ).all()
        else:
            returned = conn.execute(
                self._insert(t).returning(t.c.id, t.c.pipeline, t.c.entity, t.c.first_seen),
                [
                    {
                        "pipeline": i.pipeline,
                        "entity": i.entity,
                        "first_seen": i.first_seen,
                        "last_seen": i.last_seen,
                        "alert_count": i.alert_count,
                        "max_severity": i.max_severity,
                        "status": "open",
                    }
                    for i in new
                ],
            ).all()
        ids = {(p, e, utc(f)): new_id for new_id, p, e, f in returned}
        for inc in new:
            inc.id = ids[(inc.pipeline, inc.entity, inc.first_seen)]

    def _update_incidents(self, conn: Connection, dirty: list[_Incident]) -> None:
        t = s.incidents
        if self.dialect == "postgresql":
            conn.execute(
                text(
                    "UPDATE incidents SET first_seen = v.f, last_seen = v.l, alert_count = v.c, "
                    "max_severity = v.s FROM unnest(CAST(:id AS bigint[]), "
                    "CAST(:f AS timestamptz[]), CAST(:l AS timestamptz[]), CAST(:c AS int[]), "
                    "CAST(:s AS text[])) AS v(id, f, l, c, s) WHERE incidents.id = v.id"
                ),
                {
                    "id": [i.id for i in dirty],
                    "f": [i.first_seen for i in dirty],
                    "l": [i.last_seen for i in dirty],
                    "c": [i.alert_count for i in dirty],
                    "s": [i.max_severity for i in dirty],
                },
            )
            return
        conn.execute(
            update(t)
            .where(t.c.id == bindparam("b_id"))
            .values(
                first_seen=bindparam("b_first"),
                last_seen=bindparam("b_last"),
                alert_count=bindparam("b_count"),
                max_severity=bindparam("b_severity"),
            ),
            [
                {
                    "b_id": i.id,
                    "b_first": i.first_seen,
                    "b_last": i.last_seen,
                    "b_count": i.alert_count,
                    "b_severity": i.max_severity,
                }
                for i in dirty
            ],
        )

    def _insert_dead_letters(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        t = s.dead_letters
        stmt = (
            self._insert(t)
            .on_conflict_do_nothing(
                index_elements=["pipeline", "kafka_topic", "kafka_partition", "kafka_offset"]
            )
            .returning(t.c.id)
        )
        return len(conn.execute(stmt, rows).all())

    def _upsert_stats(self, conn: Connection, stats: list[StreamStatRecord]) -> None:
        rows = [
            {
                "pipeline": st.pipeline,
                "minute": st.minute,
                "records_seen": st.records_seen,
                "records_scored": st.records_scored,
                "records_alerted": st.records_alerted,
                "records_dead_lettered": st.records_dead_lettered,
                "score_mean": st.score_mean,
                "score_p50": st.score_p50,
                "score_p90": st.score_p90,
                "score_p99": st.score_p99,
                "latency_ms_sum": st.latency_ms_sum,
                "latency_count": st.latency_count,
                "latency_ms_max": st.latency_ms_max,
            }
            for st in stats
        ]
        if self._stats_upsert is None:
            # Built once per store: constructing it costs ~1 ms, as much as running it.
            self._stats_upsert = self._build_stats_upsert()
        conn.execute(self._stats_upsert, rows)

    def _build_stats_upsert(self) -> Any:
        t = s.stream_stats
        ins = self._insert(t)
        new = ins.excluded
        n_old, n_new = t.c.records_scored, new.records_scored

        def weighted(col: str) -> Any:
            old, add = t.c[col], new[col]
            mean = (old * n_old + add * n_new) / func.nullif(n_old + n_new, 0)
            return case((add.is_(None), old), (old.is_(None), add), else_=func.coalesce(mean, add))

        def added(col: str) -> Any:
            return t.c[col] + new[col]

        max_old, max_new = t.c.latency_ms_max, new.latency_ms_max
        return ins.on_conflict_do_update(
            index_elements=["pipeline", "minute"],
            set_={
                **{
                    c: added(c)
                    for c in (
                        "records_seen",
                        "records_scored",
                        "records_alerted",
                        "records_dead_lettered",
                        "latency_ms_sum",
                        "latency_count",
                    )
                },
                **{c: weighted(c) for c in ("score_mean", "score_p50", "score_p90", "score_p99")},
                "latency_ms_max": case(
                    (max_new.is_(None), max_old),
                    (max_old.is_(None), max_new),
                    (max_new > max_old, max_new),
                    else_=max_old,
                ),
            },
        )

    def _upsert_offsets(self, conn: Connection, offsets: list[OffsetRecord]) -> None:
        t = s.consumer_offsets
        ins = self._insert(t)
        now = datetime.now(UTC)
        stmt = ins.on_conflict_do_update(
            index_elements=["pipeline", "kafka_topic", "kafka_partition"],
            set_={
                # Never backwards: a zombie consumer's late batch cannot rewind the stream.
                "next_offset": self._greatest(t.c.next_offset, ins.excluded.next_offset),
                "updated_at": ins.excluded.updated_at,
            },
        )
        conn.execute(
            stmt,
            [
                {
                    "pipeline": o.pipeline,
                    "kafka_topic": o.kafka_topic,
                    "kafka_partition": o.kafka_partition,
                    "next_offset": o.next_offset,
                    "updated_at": now,
                }
                for o in offsets
            ],
        )

    def load_offsets(self, pipeline: str, topic: str) -> dict[int, int]:
        """partition -> next offset to read, as committed with the last written batches."""
        t = s.consumer_offsets
        with self._transaction("loading consumer offsets", write=False) as conn:
            rows = conn.execute(
                select(t.c.kafka_partition, t.c.next_offset).where(
                    t.c.pipeline == pipeline, t.c.kafka_topic == topic
                )
            )
            return {int(p): int(o) for p, o in rows}

    def reset_offsets(
        self, pipeline: str, topic: str, offsets: dict[int, int] | None = None
    ) -> int:
        """Rewind or forget stored offsets (e.g. to replay a topic on purpose).

        ``offsets=None`` deletes the topic's rows (the consumer then starts where Kafka's
        ``auto.offset.reset`` says); otherwise sets each partition's next offset exactly."""
        t = s.consumer_offsets
        with self._transaction("resetting consumer offsets") as conn:
            where = (t.c.pipeline == pipeline) & (t.c.kafka_topic == topic)
            if offsets is None:
                return conn.execute(delete(t).where(where)).rowcount
            conn.execute(delete(t).where(where & t.c.kafka_partition.in_(list(offsets))))
            now = datetime.now(UTC)
            conn.execute(
                t.insert(),
                [
                    {
                        "pipeline": pipeline,
                        "kafka_topic": topic,
                        "kafka_partition": p,
                        "next_offset": o,
                        "updated_at": now,
                    }
                    for p, o in offsets.items()
                ],
            )
            return len(offsets)

    # ------------------------------------------------------------------ model versions

    def register_model_version(
        self, rec: ModelVersionRecord, activate: bool = True
    ) -> ModelVersionRecord:
        """Record a model bundle; idempotent for the same (pipeline, version, sha256).

        Raises ``ModelVersionConflict`` when the version exists with another bundle hash."""
        t = s.model_versions
        created = utc(rec.created_at) if rec.created_at else datetime.now(UTC)
        with self._transaction(f"registering model version {rec.version!r}") as conn:
            existing = conn.execute(
                select(t.c.bundle_sha256).where(
                    t.c.pipeline == rec.pipeline, t.c.version == rec.version
                )
            ).first()
            if existing is not None and existing[0] != rec.bundle_sha256:
                raise ModelVersionConflict(
                    f"model version {rec.version!r} of pipeline {rec.pipeline!r} is already "
                    f"registered with bundle sha256 {existing[0]}, not {rec.bundle_sha256}"
                )
            if existing is None:
                conn.execute(
                    t.insert().values(
                        pipeline=clean_text(rec.pipeline, s.PIPELINE_LEN),
                        version=clean_text(rec.version, s.MODEL_VERSION_LEN),
                        created_at=created,
                        bundle_path=clean_text(rec.bundle_path, s.BUNDLE_PATH_LEN),
                        bundle_sha256=rec.bundle_sha256,
                        metrics=clean_json(rec.metrics),
                        active=False,
                    )
                )
            if activate:
                self._activate(conn, rec.pipeline, rec.version)
        found = self._model_version(rec.pipeline, rec.version)
        assert found is not None
        return found

    def activate_model_version(self, pipeline: str, version: str) -> ModelVersionRecord:
        """Make ``version`` the pipeline's one active model (the service polls for it)."""
        with self._transaction(f"activating model version {version!r}") as conn:
            self._activate(conn, pipeline, version)
        found = self._model_version(pipeline, version)
        assert found is not None
        return found

    def _activate(self, conn: Connection, pipeline: str, version: str) -> None:
        t = s.model_versions
        query = select(t.c.version, t.c.active).where(t.c.pipeline == pipeline)
        if self.dialect == "postgresql":
            query = query.with_for_update()
        rows = {v: a for v, a in conn.execute(query)}
        if version not in rows:
            known = ", ".join(sorted(rows)) or "none"
            raise NotFoundError(
                f"no model version {version!r} for pipeline {pipeline!r} (registered: {known})"
            )
        if rows[version]:
            return
        conn.execute(update(t).where(t.c.pipeline == pipeline, t.c.active).values(active=False))
        conn.execute(
            update(t)
            .where(t.c.pipeline == pipeline, t.c.version == version)
            .values(active=True, activated_at=datetime.now(UTC))
        )

    def active_model_version(self, pipeline: str) -> ModelVersionRecord | None:
        t = s.model_versions
        found = self._model_versions((t.c.pipeline == pipeline) & t.c.active)
        return found[0] if found else None

    def list_model_versions(self, pipeline: str | None = None) -> list[ModelVersionRecord]:
        t = s.model_versions
        return self._model_versions(None if pipeline is None else t.c.pipeline == pipeline)

    def _model_version(self, pipeline: str, version: str) -> ModelVersionRecord | None:
        t = s.model_versions
        found = self._model_versions((t.c.pipeline == pipeline) & (t.c.version == version))
        return found[0] if found else None

    def _model_versions(self, where: Any) -> list[ModelVersionRecord]:
        t = s.model_versions
        query = select(t).order_by(t.c.pipeline, t.c.created_at, t.c.id)
        if where is not None:
            query = query.where(where)
        with self._transaction("reading model versions", write=False) as conn:
            return [
                ModelVersionRecord(
                    pipeline=r["pipeline"],
                    version=r["version"],
                    bundle_path=r["bundle_path"],
                    bundle_sha256=r["bundle_sha256"],
                    metrics=r["metrics"],
                    created_at=r["created_at"],
                    active=bool(r["active"]),
                    activated_at=r["activated_at"],
                )
                for r in conn.execute(query).mappings()
            ]

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
        t = s.alerts
        query = select(t).order_by(t.c.ingest_time.desc(), t.c.id.desc())
        if pipeline is not None:
            query = query.where(t.c.pipeline == pipeline)
        if since is not None:
            query = query.where(t.c.ingest_time >= utc(since))
        if until is not None:
            query = query.where(t.c.ingest_time < utc(until))
        if status is not None:
            query = query.where(t.c.status == status)
        if entity is not None:
            query = query.where(t.c.entity == entity)
        if limit is not None:
            query = query.limit(limit)
        with self._transaction("listing alerts", write=False) as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def list_incidents(
        self, pipeline: str | None = None, limit: int | None = 100
    ) -> list[dict[str, Any]]:
        t = s.incidents
        query = select(t).order_by(t.c.last_seen.desc(), t.c.id.desc())
        if pipeline is not None:
            query = query.where(t.c.pipeline == pipeline)
        if limit is not None:
            query = query.limit(limit)
        with self._transaction("listing incidents", write=False) as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def ack_alert(self, alert_id: int) -> bool:
        """Acknowledge an open alert. True if its status changed, False if it was already
        acknowledged or resolved; ``NotFoundError`` if there is no such alert."""
        t = s.alerts
        with self._transaction(f"acknowledging alert {alert_id}") as conn:
            changed = conn.execute(
                update(t)
                .where(t.c.id == alert_id, t.c.status == "open")
                .values(status="acknowledged")
            ).rowcount
            if changed:
                return True
            if conn.execute(select(t.c.id).where(t.c.id == alert_id)).first() is None:
                raise NotFoundError(f"no alert with id {alert_id}")
            return False

    def prune(self, older_than: timedelta | datetime, pipeline: str | None = None) -> PruneResult:
        """Delete alerts (by ingest time), dead letters (by created_at) and statistics (by minute)
        older than the cutoff, and incidents whose last alert is older and that no remaining
        alert refers to. Model versions and consumer offsets are kept."""
        cutoff = (
            utc(older_than)
            if isinstance(older_than, datetime)
            else (datetime.now(UTC) - older_than)
        )
        a, i, d, st = s.alerts, s.incidents, s.dead_letters, s.stream_stats

        def scoped(table: Any, cond: Any) -> Any:
            return cond if pipeline is None else cond & (table.c.pipeline == pipeline)

        with self._transaction("pruning old rows") as conn:
            n_alerts = conn.execute(delete(a).where(scoped(a, a.c.ingest_time < cutoff))).rowcount
            n_dead = conn.execute(delete(d).where(scoped(d, d.c.created_at < cutoff))).rowcount
            n_stats = conn.execute(delete(st).where(scoped(st, st.c.minute < cutoff))).rowcount
            n_inc = conn.execute(
                delete(i).where(
                    scoped(i, i.c.last_seen < cutoff) & ~exists().where(a.c.incident_id == i.c.id)
                )
            ).rowcount
        return PruneResult(
            alerts=n_alerts, incidents=n_inc, dead_letters=n_dead, stream_stats=n_stats
        )

    def grant_read_only(self, role: str = "anomaly_grafana", password: str | None = None) -> None:
        """PostgreSQL: create (if missing) a role that can only SELECT the tables, for Grafana.

        Runs ``storage/grafana_role.sql``; with a password the role can log in."""
        if self.dialect != "postgresql":
            raise InvalidArgumentError("a read-only role needs PostgreSQL (SQLite has no roles)")
        from storage.grafana import grant_sql

        with self._transaction(f"creating the read-only role {role!r}") as conn:
            raw = conn.connection.driver_connection
            with raw.cursor() as cur:
                for statement in grant_sql(role, password):
                    cur.execute(statement)


# ---------------------------------------------------------------------- row preparation


_FIRED_JSON: dict[tuple[Callable[[Any], Any], tuple[str, ...]], Any] = {}


def _fired_json(fired: Any, encode: Callable[[Any], Any]) -> Any:
    """The few distinct detector lists, encoded once each."""
    key = (encode, tuple(fired))
    encoded = _FIRED_JSON.get(key)
    if encoded is None:
        encoded = encode(list(key[1]))
        if len(_FIRED_JSON) < 64:
            _FIRED_JSON[key] = encoded
    return encoded


def _alert_row(a: AlertRecord) -> list[Any]:
    """An alert as a list in ``ALERT_COLUMNS`` order: texts cleaned, times UTC, numbers as
    floats; the JSON columns still as Python values (encoded by ``_json_values`` at write time)."""
    # Runs once per alert on the hot path: plain expressions, no helper calls where avoidable.
    if a.severity not in _SEVERITY_RANK:
        raise ValueError(
            f"alert {a.record_id!r} at {a.kafka_topic}/{a.kafka_partition}/{a.kafka_offset}: "
            f"severity {a.severity!r} is not one of {', '.join(SEVERITIES)}"
        )
    entity, event_time, record = a.entity, a.event_time, a.record
    vae_score, vae_p, flow_score, flow_p = a.vae_score, a.vae_p, a.flow_score, a.flow_p
    gan_score, gan_p = a.gan_score, a.gan_p
    return [
        clean_text(a.pipeline, _PIPELINE_LEN),
        clean_text(a.record_id, _RECORD_ID_LEN),
        None if entity is None else clean_text(entity, _ENTITY_LEN),
        None if event_time is None else utc(event_time),
        utc(a.ingest_time),
        clean_text(a.kafka_topic, _TOPIC_LEN),
        int(a.kafka_partition),
        int(a.kafka_offset),
        clean_text(a.model_version, _MODEL_VERSION_LEN),
        None if vae_score is None else float(vae_score),
        None if vae_p is None else float(vae_p),
        None if flow_score is None else float(flow_score),
        None if flow_p is None else float(flow_p),
        None if gan_score is None else float(gan_score),
        None if gan_p is None else float(gan_p),
        float(a.ensemble_score),
        float(a.ensemble_p),
        a.severity,
        a.fired_detectors,
        a.top_features,
        record if record is not None else {},
        "open",  # status
        None,  # incident_id: set by the incident grouping
    ]


def _json_values(row: list[Any], encode: Callable[[Any], Any]) -> list[Any]:
    """A copy of an alert row with its JSON columns encoded (clean JSON, see sanitize.py).

    A copy, so that a retried batch starts again from the Python values."""
    values = row.copy()
    values[_FIRED] = _fired_json(values[_FIRED], encode)
    values[_TOP_FEATURES] = encode(values[_TOP_FEATURES])
    values[_RECORD] = encode(values[_RECORD])
    return values


def _in_order(rows: list[list[Any]]) -> bool:
    """Do the rows come from one partition with strictly rising offsets (the usual batch)?"""
    first = rows[0]
    pipeline, topic, partition, prev = first[_PIPELINE], first[_TOPIC], first[_PARTITION], -1
    for row in rows:
        offset = row[_OFFSET]
        if (
            offset <= prev
            or row[_PARTITION] != partition
            or row[_TOPIC] != topic
            or row[_PIPELINE] != pipeline
        ):
            return False
        prev = offset
    return True


_PIPELINE_LEN, _RECORD_ID_LEN, _ENTITY_LEN = s.PIPELINE_LEN, s.RECORD_ID_LEN, s.ENTITY_LEN
_TOPIC_LEN, _MODEL_VERSION_LEN = s.TOPIC_LEN, s.MODEL_VERSION_LEN


def _dead_letter_row(d: DeadLetterRecord) -> dict[str, Any]:
    raw = d.raw if isinstance(d.raw, bytes) else _raw_bytes(d.raw)
    return {
        "pipeline": clean_text(d.pipeline, s.PIPELINE_LEN),
        "kafka_topic": clean_text(d.kafka_topic, s.TOPIC_LEN),
        "kafka_partition": int(d.kafka_partition),
        "kafka_offset": int(d.kafka_offset),
        "raw": raw,
        "error_kind": clean_text(d.error_kind, s.ERROR_KIND_LEN),
        "error_message": clean_text(d.error_message, s.ERROR_MESSAGE_LEN),
        "created_at": utc(d.created_at),
    }


def _raw_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return bytes(value)


def _merge_offsets(offsets: Sequence[OffsetRecord]) -> list[OffsetRecord]:
    """One record per partition (the highest next offset, the lowest first offset), sorted, so
    every writer locks rows in the same order."""
    merged: dict[tuple[str, str, int], OffsetRecord] = {}
    for o in offsets:
        key = (o.pipeline, o.kafka_topic, int(o.kafka_partition))
        prev = merged.get(key)
        if prev is None:
            merged[key] = replace(o, kafka_partition=key[2])
            continue
        firsts = [f for f in (prev.first_offset, o.first_offset) if f is not None]
        merged[key] = replace(
            prev,
            next_offset=max(prev.next_offset, o.next_offset),
            first_offset=min(firsts) if len(firsts) == 2 else None,
        )
    return [merged[k] for k in sorted(merged)]


def _fence_stats(
    stats: Sequence[StreamStatRecord],
    offsets: Sequence[OffsetRecord],
    stored: dict[tuple[str, str, int], int],
) -> list[StreamStatRecord]:
    """The batch's statistics, minus the share of records another consumer already wrote.

    With ``first_offset`` on every offset record the share is exact per offset range; without it
    the statistics are dropped only when every partition of the batch is already past."""
    merged = _merge_stats(stats)
    if not merged or not offsets:
        return merged
    all_stale = all(stored.get(_key(o), 0) >= o.next_offset for o in offsets)
    if all_stale:
        return []
    if any(o.first_offset is None for o in offsets):
        return merged
    span = sum(max(0, o.next_offset - o.first_offset) for o in offsets)  # type: ignore[operator]
    done = sum(
        min(max(0, stored.get(_key(o), 0) - o.first_offset), max(0, o.next_offset - o.first_offset))  # type: ignore[operator]
        for o in offsets
    )
    if span <= 0 or done <= 0:
        return merged
    keep = (span - done) / span
    return [_scale(st, keep) for st in merged]


def _key(o: OffsetRecord) -> tuple[str, str, int]:
    return (o.pipeline, o.kafka_topic, o.kafka_partition)


def _scale(st: StreamStatRecord, keep: float) -> StreamStatRecord:
    def n(x: int) -> int:
        return math.floor(x * keep + 0.5)

    return replace(
        st,
        records_seen=n(st.records_seen),
        records_scored=n(st.records_scored),
        records_alerted=n(st.records_alerted),
        records_dead_lettered=n(st.records_dead_lettered),
        latency_ms_sum=st.latency_ms_sum * keep,
        latency_count=n(st.latency_count),
    )


def _merge_stats(stats: Iterable[StreamStatRecord]) -> list[StreamStatRecord]:
    """One row per (pipeline, minute): PostgreSQL's upsert may touch a row once per statement."""
    merged: dict[tuple[str, datetime], StreamStatRecord] = {}
    for st in stats:
        minute = utc(st.minute).replace(second=0, microsecond=0)
        pipeline = clean_text(st.pipeline, s.PIPELINE_LEN)
        st = replace(st, pipeline=pipeline, minute=minute)
        prev = merged.get((pipeline, minute))
        merged[(pipeline, minute)] = st if prev is None else _combine(prev, st)
    return [merged[k] for k in sorted(merged)]


def _combine(a: StreamStatRecord, b: StreamStatRecord) -> StreamStatRecord:
    def weighted(x: float | None, y: float | None) -> float | None:
        if x is None:
            return y
        if y is None:
            return x
        total = a.records_scored + b.records_scored
        return y if total == 0 else (x * a.records_scored + y * b.records_scored) / total

    maxes = [m for m in (a.latency_ms_max, b.latency_ms_max) if m is not None]
    return replace(
        a,
        records_seen=a.records_seen + b.records_seen,
        records_scored=a.records_scored + b.records_scored,
        records_alerted=a.records_alerted + b.records_alerted,
        records_dead_lettered=a.records_dead_lettered + b.records_dead_lettered,
        score_mean=weighted(a.score_mean, b.score_mean),
        score_p50=weighted(a.score_p50, b.score_p50),
        score_p90=weighted(a.score_p90, b.score_p90),
        score_p99=weighted(a.score_p99, b.score_p99),
        latency_ms_sum=a.latency_ms_sum + b.latency_ms_sum,
        latency_count=a.latency_count + b.latency_count,
        latency_ms_max=max(maxes) if maxes else None,
    )


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def config_database_url(cfg: Any) -> URL:
    """The database URL of a ``PipelineConfig``, with the password from ``password_file``."""
    from anomaly.config import read_secret

    url = normalize_url(cfg.database.url)
    password = read_secret(None, cfg.database.password_file)
    if password:
        url = url.set(password=password)
    return url
