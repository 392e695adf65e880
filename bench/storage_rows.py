"""The store's write path as written against its shortcuts, kept and removed.

Each line times one step the way ``storage/`` does it now ("store") and the other way
("alternative"): the plain version of a shortcut the store keeps (msgspec JSON, positional alert
rows), or the shortcut the store had and dropped because it saved too little to be worth its
code (the cache of encoded detector lists, the in-order check, ...). CPU microseconds per alert,
best of --repeat alternating runs over the batch of bench/storage.py, in this process.

With ``--pg-url`` (and always on a scratch SQLite file) it also times, against a database: the
binary COPY's client CPU with and without the C dumper for bytes (``writes._copy_alerts``), and
the statistics upsert with its statement built once per store or per batch (``stats``).

For scale: in bench/storage.py's ``new`` scenario (COPY) the client spends ~6-8 us of CPU per
alert on the 2-CPU development machine, client and server together ~20-24 us. The store keeps a
shortcut that saves ~2% of the client's CPU per alert (~0.12 us) or more, and drops the rest.

    python bench/storage_rows.py
    python bench/storage_rows.py --pg-url postgresql+psycopg://postgres@127.0.0.1:5432/test
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from storage import alert_rows as ar  # noqa: E402
from storage import sanitize, writes  # noqa: E402
from storage import schema as s  # noqa: E402
from storage.engine import utc  # noqa: E402
from storage.records import AlertRecord, StreamStatRecord  # noqa: E402
from storage.sanitize import clean_json, clean_text, json_bytes  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_storage", ROOT / "bench" / "storage.py")
assert _spec is not None and _spec.loader is not None
bench_storage = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_storage)


# ---------------------------------------------------------------------- the alternatives


def fast_utc(value: datetime) -> datetime:
    """``utc`` with the shortcut the store dropped: an aware UTC time returned as is."""
    tz = value.tzinfo
    if tz is UTC:
        return value
    return value.replace(tzinfo=UTC) if tz is None else value.astimezone(UTC)


_PIPELINE_LEN, _RECORD_ID_LEN, _ENTITY_LEN = s.PIPELINE_LEN, s.RECORD_ID_LEN, s.ENTITY_LEN
_TOPIC_LEN, _MODEL_VERSION_LEN = s.TOPIC_LEN, s.MODEL_VERSION_LEN


def fast_alert_row(a: AlertRecord) -> list[Any]:
    """``alert_row`` as it was: module-level aliases, attributes read once into locals, inline
    float conversions (``utc`` and ``clean_text`` as the store has them, timed on their own)."""
    if a.severity not in ar.SEVERITY_RANK:
        raise ValueError(a.severity)
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
        "open",
        None,
    ]


def plain_clean_text(value: Any, limit: int | None = None) -> str:
    """``clean_text`` without its shortcut: the UTF-8 check for ASCII text too."""
    s_ = value if isinstance(value, str) else str(value)
    try:
        s_.encode("utf-8")
    except UnicodeEncodeError:
        s_ = s_.encode("utf-8", "backslashreplace").decode("utf-8")
    if "\x00" in s_:
        s_ = s_.replace("\x00", "\\u0000")
    if limit is not None and len(s_) > limit:
        marker = f"...[truncated {len(s_)} chars]"
        s_ = s_[: max(0, limit - len(marker))] + marker
    return s_


def plain_by_position(rows: list[list[Any]]) -> tuple[list[list[Any]], dict[Any, list[int]]]:
    """``writes._by_position`` without the in-order check: always dedupe, sort, find ranges."""
    unique: dict[tuple[str, str, int, int], list[Any]] = {}
    for row in rows:
        unique.setdefault(ar.position(row), row)
    rows = [unique[key] for key in sorted(unique)]
    ranges: dict[tuple[str, str, int], list[int]] = {}
    for row in rows:
        partition, offset = (row[ar.PIPELINE], row[ar.TOPIC], row[ar.PARTITION]), row[ar.OFFSET]
        if partition in ranges:
            ranges[partition][1] = offset
        else:
            ranges[partition] = [offset, offset]
    return rows, ranges


def plain_json_bytes(value: Any) -> bytes:
    """``json_bytes`` without the msgspec fast path: clean, then the stdlib encoder."""
    return sanitize._ENCODE(clean_json(value)).encode("utf-8")


@dataclass(slots=True)
class NamedAlertRow:
    """The named alternative to a positional row: a slots dataclass, turned into a tuple in
    ``ALERT_COLUMNS`` order (encoding the JSON columns) for COPY."""

    pipeline: str
    record_id: str
    entity: str | None
    event_time: datetime | None
    ingest_time: datetime
    kafka_topic: str
    kafka_partition: int
    kafka_offset: int
    model_version: str
    vae_score: float | None
    vae_p: float | None
    flow_score: float | None
    flow_p: float | None
    gan_score: float | None
    gan_p: float | None
    ensemble_score: float
    ensemble_p: float
    severity: str
    fired_detectors: list[str]
    top_features: Any
    record: Any
    status: str = "open"
    incident_id: int | None = None

    def copy_values(self, encode: Callable[[Any], Any]) -> tuple[Any, ...]:
        return (
            self.pipeline,
            self.record_id,
            self.entity,
            self.event_time,
            self.ingest_time,
            self.kafka_topic,
            self.kafka_partition,
            self.kafka_offset,
            self.model_version,
            self.vae_score,
            self.vae_p,
            self.flow_score,
            self.flow_p,
            self.gan_score,
            self.gan_p,
            self.ensemble_score,
            self.ensemble_p,
            self.severity,
            encode(list(self.fired_detectors)),
            encode(self.top_features),
            encode(self.record),
            self.status,
            self.incident_id,
        )


def named_row(a: AlertRecord) -> NamedAlertRow:
    """``alert_row``'s expressions into the dataclass: only the container differs."""
    if a.severity not in ar.SEVERITY_RANK:
        raise ValueError(a.severity)
    f = sanitize.clean_float
    return NamedAlertRow(
        clean_text(a.pipeline, s.PIPELINE_LEN),
        clean_text(a.record_id, s.RECORD_ID_LEN),
        None if a.entity is None else clean_text(a.entity, s.ENTITY_LEN),
        None if a.event_time is None else utc(a.event_time),
        utc(a.ingest_time),
        clean_text(a.kafka_topic, s.TOPIC_LEN),
        int(a.kafka_partition),
        int(a.kafka_offset),
        clean_text(a.model_version, s.MODEL_VERSION_LEN),
        f(a.vae_score),
        f(a.vae_p),
        f(a.flow_score),
        f(a.flow_p),
        f(a.gan_score),
        f(a.gan_p),
        float(a.ensemble_score),
        float(a.ensemble_p),
        a.severity,
        a.fired_detectors,
        a.top_features,
        a.record if a.record is not None else {},
    )


# ---------------------------------------------------------------------- measurements


def per_alert_us(
    store: Callable[[], Any], other: Callable[[], Any], n: int, repeat: int
) -> tuple[float, float]:
    """Best time per alert of each, the two run alternately (a busy machine slows both)."""
    best = [float("inf"), float("inf")]
    for _ in range(repeat):
        for i, fn in enumerate((store, other)):
            start = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - start)
    return 1e6 * best[0] / n, 1e6 * best[1] / n


def cpu_figures(alerts: list[AlertRecord], repeat: int) -> list[tuple[str, float, float]]:
    n = len(alerts)
    rows = [ar.alert_row(a) for a in alerts]
    texts = [a.record_id for a in alerts]
    times = [a.ingest_time for a in alerts]
    pending = [(r[ar.INGEST_TIME], i, r) for i, r in enumerate(rows)]
    by_time_index = itemgetter(0, 1)

    def t(store: Callable[[], Any], other: Callable[[], Any]) -> tuple[float, float]:
        return per_alert_us(store, other, n, repeat)

    return [
        (
            "KEPT json_bytes x3: msgspec / clean_json + stdlib",
            *t(
                lambda: [ar.json_values(r, json_bytes) for r in rows],
                lambda: [ar.json_values(r, plain_json_bytes) for r in rows],
            ),
        ),
        (
            "KEPT row + COPY values: list / slots dataclass",
            *t(
                lambda: [ar.json_values(ar.alert_row(a), json_bytes) for a in alerts],
                lambda: [named_row(a).copy_values(json_bytes) for a in alerts],
            ),
        ),
        (
            "KEPT detector list: cached / json_bytes each",
            *t(
                lambda: [ar._fired_json(r[ar.FIRED], json_bytes) for r in rows],
                lambda: [json_bytes(list(r[ar.FIRED])) for r in rows],
            ),
        ),
        (
            "KEPT clean_text x5: isascii first / always encode",
            *t(
                lambda: [[clean_text(x, 256) for _ in range(5)] for x in texts],
                lambda: [[plain_clean_text(x, 256) for _ in range(5)] for x in texts],
            ),
        ),
        (
            "KEPT new rows: in-order check / dedupe, sort, ranges",
            *t(lambda: writes._by_position(rows), lambda: plain_by_position(rows)),
        ),
        (
            "dropped: alert_row: plain / locals + aliases",
            *t(
                lambda: [ar.alert_row(a) for a in alerts],
                lambda: [fast_alert_row(a) for a in alerts],
            ),
        ),
        (
            "dropped: utc() x2: astimezone / `tz is UTC`",
            *t(
                lambda: [(utc(x), utc(x)) for x in times],
                lambda: [(fast_utc(x), fast_utc(x)) for x in times],
            ),
        ),
        (
            "dropped: incident sort: tuples / key=itemgetter",
            *t(lambda: sorted(pending), lambda: sorted(pending, key=by_time_index)),
        ),
    ]


def copy_figures(url: str, alerts: list[AlertRecord], rounds: int) -> tuple[float, float]:
    """Client CPU ms per COPY of the batch (rolled back): the C bytes dumper vs psycopg's
    default for bytea."""
    from psycopg.types.string import BytesBinaryDumper

    from storage import AlertStore

    store = AlertStore(url)
    rows = [ar.alert_row(a) for a in alerts]
    times: dict[bool, list[float]] = {True: [], False: []}
    with store.engine.connect() as conn:
        raw = conn.connection.driver_connection
        for r in range(rounds):
            for c_dumper in (True, False) if r % 2 == 0 else (False, True):
                start = time.process_time()
                with raw.cursor() as cur:
                    if c_dumper:
                        cur.adapters.register_dumper(bytes, BytesBinaryDumper)
                    with cur.copy(ar.ALERT_COPY) as copy:
                        copy.set_types(ar.COPY_TYPES)
                        for row in rows:
                            copy.write_row(ar.json_values(row, json_bytes))
                raw.rollback()
                times[c_dumper].append(time.process_time() - start)
    store.close()
    return statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3


def stats_figures(url: str, rounds: int) -> tuple[float, float]:
    """Wall ms per statistics upsert (one row, in a transaction rolled back): the statement
    built once per store vs built for every batch."""
    from storage.engine import Database
    from storage.stats import StatsWriter

    db = Database(url)
    shared = StatsWriter(db)
    stats = [StreamStatRecord("p", bench_storage.T0, records_seen=10, records_scored=10)]
    times: dict[bool, list[float]] = {True: [], False: []}
    with db.engine.connect() as conn:
        for r in range(rounds):
            for cached in (True, False) if r % 2 == 0 else (False, True):
                start = time.perf_counter()
                for _ in range(50):
                    with conn.begin() as tx:
                        (shared if cached else StatsWriter(db)).upsert(conn, stats)
                        tx.rollback()
                times[cached].append((time.perf_counter() - start) / 50)
    db.close()
    return statistics.median(times[True]) * 1e3, statistics.median(times[False]) * 1e3


@contextmanager
def scratch_databases(pg_url: str | None) -> Iterator[dict[str, str]]:
    """Migrated scratch databases: a SQLite file, and one beside ``pg_url`` (dropped after)."""
    from sqlalchemy import create_engine, text

    from storage import AlertStore

    with tempfile.TemporaryDirectory() as tmp:
        urls = {"SQLite": f"sqlite:///{tmp}/bench.db"}
        admin, name = None, f"am_bench_{uuid.uuid4().hex[:10]}"
        if pg_url:
            admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            urls["PostgreSQL"] = f"{pg_url.rsplit('/', 1)[0]}/{name}"
        try:
            for url in urls.values():
                with AlertStore(url) as store:
                    store.upgrade()
            yield urls
        finally:
            if admin is not None:
                with admin.connect() as conn:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                admin.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=30, help="runs per figure (best taken)")
    parser.add_argument("--pg-url", help="also time COPY and the statistics upsert on PostgreSQL")
    parser.add_argument("--rounds", type=int, default=16, help="alternating database rounds")
    args = parser.parse_args(argv)
    batch = bench_storage.make_batch("p", 0, args.batch, 500, True)
    print(f"{args.batch} alerts; CPU us per alert, best of {args.repeat}")
    print(f"{'':<52} {'store':>7} {'altern.':>7} {'alt-store':>9}")
    for label, store, other in cpu_figures(batch.alerts, args.repeat):
        print(f"{label:<52} {store:>7.2f} {other:>7.2f} {other - store:>+9.2f}")
    with scratch_databases(args.pg_url) as urls:
        if "PostgreSQL" in urls:
            c_ms, py_ms = copy_figures(urls["PostgreSQL"], batch.alerts, args.rounds)
            print(
                f"KEPT COPY of {args.batch} rows, client CPU ms (median of {args.rounds}): "
                f"C bytes dumper {c_ms:.1f}, psycopg's default {py_ms:.1f} "
                f"({1e3 * (py_ms - c_ms) / args.batch:+.2f} us per alert without it)"
            )
        for name, url in urls.items():
            once, each = stats_figures(url, args.rounds)
            print(
                f"KEPT {name} statistics upsert, ms per batch (median of {args.rounds}): "
                f"statement built once {once:.2f}, per batch {each:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
