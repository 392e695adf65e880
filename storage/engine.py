"""The database connection: URL normalising, engine set-up, SQLite transaction settings, and
turning driver errors into ``StorageError``s (retryable or not).

``Database`` is what every other part of the store holds: the engine, its dialect, and
``transaction()``, the one way they open a transaction.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, func
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, make_url

from storage.errors import (
    DatabaseAccessError,
    DatabaseURLError,
    RetryableStorageError,
    SchemaMissingError,
    StorageError,
)
from storage.sanitize import dumps


def utc(value: datetime) -> datetime:
    """Aware UTC; a naive datetime is taken to be UTC already."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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


# How long PostgreSQL lets a transaction of ours sit idle between statements before it ends the
# session (``idle_in_transaction_session_timeout``), so that a writer stalled mid-batch (a
# frozen VM, a SIGSTOP, swapping) cannot hold the locks every writer of the pipeline shares: its
# incident entity locks, its statistics minute, its reservoir count. Our transactions never wait
# on anything but the server between statements (milliseconds), and a consumer group evicts such
# a member after its 6 s session timeout; until its session ended, the member that took over its
# partitions waited on those locks and could not even handle the rebalance
# (tests/reliability/test_rebalance.py, ``freeze``: 3 of 17 runs before this, 0 of 10 after).
STALLED_TRANSACTION_TIMEOUT_S = 10.0


def make_engine(
    url: str | URL, stalled_transaction_timeout_s: float = STALLED_TRANSACTION_TIMEOUT_S
) -> Engine:
    u = normalize_url(url)
    if u.get_backend_name() == "sqlite":
        engine = create_engine(
            u, connect_args={"timeout": 30.0}, json_serializer=dumps, pool_pre_ping=True
        )
        _sqlite_transactions(engine, memory=u.database in (None, "", ":memory:"))
        return engine
    engine = create_engine(
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
    _end_stalled_transactions(engine, stalled_transaction_timeout_s)
    return engine


def _end_stalled_transactions(engine: Engine, timeout_s: float) -> None:
    """Set ``idle_in_transaction_session_timeout`` on each new connection (see
    ``STALLED_TRANSACTION_TIMEOUT_S``); 0 leaves the server's setting. A SET on connect rather
    than a libpq ``options`` startup parameter, which connection poolers such as PgBouncer
    refuse. The stalled writer's next statement then fails as retryable, its batch rolled back."""
    if timeout_s <= 0:
        return
    milliseconds = str(max(1, round(timeout_s * 1000)))

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute(
                "SELECT set_config('idle_in_transaction_session_timeout', %s, false)",
                (milliseconds,),
            )
        dbapi_connection.commit()


def sqlite_file(url: URL) -> Path | None:
    """The file of a SQLite URL; None for other databases and in-memory SQLite."""
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def require_sqlite_file(url: URL) -> None:
    """SchemaMissingError if ``url`` is a SQLite file that does not exist (SQLite would create
    it empty on the first connection, and the command then fail on the missing tables)."""
    path = sqlite_file(url)
    if path is not None and not path.exists():
        raise SchemaMissingError(
            f"no database at {url.render_as_string(hide_password=True)}: {path} does not exist "
            "(`anomaly db upgrade` creates it)"
        )


def remove_if_no_tables(path: Path) -> None:
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
_SQLITE_UNUSABLE_FILE = ("unable to open database file", "attempt to write a readonly database")
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
    if reason.startswith(_SQLITE_UNUSABLE_FILE):
        # SQLite reports these as OperationalError, which reads as "retry": but a missing
        # folder or a read-only file stays so, and the service would retry forever.
        return DatabaseAccessError(
            f"{what} on {where} failed: {reason} (check that the folder exists and that this "
            "user may write the file and its folder)"
        )
    if match := _NO_SUCH_DATABASE.search(reason):
        return DatabaseAccessError(
            f"{what} on {where} failed: no such database {match.group(1)!r} on the server "
            "(create it, or fix the database name in the URL)"
        )
    return None


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated:
            return True
        return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)
    try:
        import psycopg
    except ImportError:  # pragma: no cover - SQLite-only install
        return False
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)


def _is_driver_error(exc: BaseException) -> bool:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - SQLite-only install
        return False
    return isinstance(exc, psycopg.Error)


class Database:
    """One database: its URL, engine and dialect, and the transactions on it."""

    def __init__(
        self,
        url: str | URL,
        *,
        create: bool = True,
        stalled_transaction_timeout_s: float = STALLED_TRANSACTION_TIMEOUT_S,
    ) -> None:
        self.url = normalize_url(url)
        if not create:
            require_sqlite_file(self.url)
        self.engine = make_engine(self.url, stalled_transaction_timeout_s)
        self.dialect = self.engine.dialect.name

    def where(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def close(self) -> None:
        self.engine.dispose()

    def insert(self, table: Any) -> Any:
        """The dialect's INSERT (with ``on_conflict_do_nothing`` / ``on_conflict_do_update``)."""
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(table)

    def upsert(self, table: Any, key: list[str], update: Iterable[str]) -> Any:
        """INSERT ... ON CONFLICT (``key``) DO UPDATE, setting the ``update`` columns to the
        inserted row's values."""
        ins = self.insert(table)
        return ins.on_conflict_do_update(
            index_elements=key, set_={c: ins.excluded[c] for c in update}
        )

    def rows(self, what: str, query: Any) -> list[dict[str, Any]]:
        """The rows of ``query`` as dicts, read in a transaction of their own."""
        with self.transaction(what, write=False) as conn:
            return [dict(r) for r in conn.execute(query).mappings()]

    def greatest(self, a: Any, b: Any) -> Any:
        return func.greatest(a, b) if self.dialect == "postgresql" else func.max(a, b)

    @contextmanager
    def transaction(self, what: str, write: bool = True) -> Iterator[Connection]:
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
                    if is_retryable(exc) and not conn.invalidated:
                        with suppress(Exception):  # best effort
                            conn.invalidate()
                    raise
        except (sa_exc.DBAPIError, sa_exc.InterfaceError) as exc:
            raise self.translate(exc, what, committing) from exc
        except StorageError:
            raise
        except Exception as exc:
            # The raw psycopg connection (COPY) raises the driver's own errors, unwrapped (the
            # retryable ones among them: SQLAlchemy's were caught above).
            if _is_driver_error(exc):
                raise self.translate(exc, what, committing) from exc
            raise

    def translate(self, exc: BaseException, what: str, committing: bool = False) -> StorageError:
        """The ``StorageError`` for a failure while doing ``what``."""
        orig = getattr(exc, "orig", None) or exc
        reason = " ".join(str(orig).split()) or type(orig).__name__
        where = self.where()
        unfixable = _not_retryable(orig, what, where)
        if unfixable is not None:
            return unfixable
        if is_retryable(exc) and committing:
            return RetryableStorageError(
                f"{what} on {where} failed while committing ({type(orig).__name__}: {reason}): "
                "the server may or may not have stored it; retry the same call once the "
                "database is reachable (positions already stored are skipped, so a retry "
                "never duplicates)"
            )
        if is_retryable(exc):
            return RetryableStorageError(
                f"{what} on {where} failed and was rolled back, nothing was written "
                f"({type(orig).__name__}: {reason}); retry once the database is reachable"
            )
        return StorageError(f"{what} on {where} failed: {type(orig).__name__}: {reason}")


def config_database_url(cfg: Any) -> URL:
    """The database URL of a ``PipelineConfig``, with the password from ``password_file``."""
    from anomaly.config import read_secret

    url = normalize_url(cfg.database.url)
    password = read_secret(None, cfg.database.password_file)
    if password:
        url = url.set(password=password)
    return url
