"""CLI: ``anomaly db ...``, ``anomaly alerts ...``, ``anomaly models ...``.

Only argparse and the storage errors are imported here; each handler imports SQLAlchemy and the
store when it runs.
The database URL comes from ``--db``, else ``--config PIPELINE.yaml`` (its ``database`` section,
where ``ANOMALY_DATABASE_URL`` overrides the file), else ``ANOMALY_DATABASE_URL``. ``--db`` and
``--config`` together are refused: one of them would be ignored, and a model registered in another
database than the pipeline's ``serve`` reads is silently never used.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from storage.errors import DatabaseURLError, InvalidArgumentError

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT_S = {"s": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    _register_db(subparsers)
    _register_alerts(subparsers)
    _register_models(subparsers)


def _register_db(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    db = subparsers.add_parser("db", help="database schema and upkeep (migrations, prune)")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION", required=True)

    p = db_sub.add_parser("upgrade", help="run the migrations up to the latest (or --to REV)")
    db_args(p)
    p.add_argument("--to", default="head", metavar="REV", help="target revision (default head)")
    p.set_defaults(handler=_db_upgrade)

    p = db_sub.add_parser("downgrade", help="undo migrations down to REV ('base': drop all)")
    db_args(p)
    p.add_argument("--to", required=True, metavar="REV", help="target revision, or base")
    p.set_defaults(handler=_db_downgrade)

    p = db_sub.add_parser("current", help="print the database's schema revision")
    db_args(p)
    p.set_defaults(handler=_db_current)

    p = db_sub.add_parser(
        "prune", help="delete alerts, dead letters, statistics and incidents older than a cutoff"
    )
    db_args(p)
    p.add_argument(
        "--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h, 90m, 2w, or ISO time"
    )
    p.add_argument("--pipeline", help="only this pipeline's rows")
    p.set_defaults(handler=_db_prune)

    p = db_sub.add_parser(
        "grafana-role",
        help="PostgreSQL: create a read-only role for Grafana (storage/grafana_role.sql)",
    )
    db_args(p)
    p.add_argument("--role", default="anomaly_grafana", help="role name (default %(default)s)")
    p.add_argument(
        "--password-env",
        metavar="VAR",
        help="environment variable holding the role's password (lets the role log in)",
    )
    p.set_defaults(handler=_db_grafana_role)


def _register_alerts(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    alerts = subparsers.add_parser("alerts", help="list and acknowledge stored alerts")
    alerts_sub = alerts.add_subparsers(dest="alerts_command", metavar="ACTION", required=True)
    p = alerts_sub.add_parser("list", help="newest alerts first")
    db_args(p)
    p.add_argument("--pipeline")
    p.add_argument("--since", metavar="AGE|ISO", help="e.g. 2h, 7d or 2026-01-31T12:00:00Z")
    p.add_argument("--status", choices=("open", "acknowledged", "resolved"))
    p.add_argument("--entity")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(handler=_alerts_list)

    p = alerts_sub.add_parser(
        "ack",
        help="acknowledge an alert (or an incident's alerts), optionally with a verdict",
        description="Acknowledge alert ID, or with --incident every alert of that incident. "
        "With --verdict, also record the analyst's verdict on each (who: --by, default the OS "
        "user; when: now); a later verdict replaces an earlier one. The dashboards' precision "
        "panels and `anomaly evaluate --from-db` read the verdicts.",
    )
    p.add_argument("id", type=int, nargs="?", help="the alert's id (alerts list shows it)")
    p.add_argument("--incident", type=int, metavar="ID", help="all alerts of this incident")
    p.add_argument(
        "--verdict", metavar="VERDICT", help="true_positive or false_positive (default: none)"
    )
    p.add_argument("--by", metavar="NAME", help="who decided (default: the OS user)")
    p.add_argument("--note", metavar="TEXT", help="why (with --verdict)")
    db_args(p)
    p.set_defaults(handler=_alerts_ack)


def _register_models(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    models = subparsers.add_parser("models", help="registered model versions per pipeline")
    models_sub = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    p = models_sub.add_parser("list", help="registered versions (* marks the active one)")
    db_args(p)
    p.add_argument("--pipeline")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_models_list)

    p = models_sub.add_parser(
        "register", help="verify a model bundle and record it as a version of a pipeline"
    )
    p.add_argument("bundle", metavar="BUNDLE_DIR")
    db_args(p)
    p.add_argument("--pipeline", help="default: the name in --config")
    p.add_argument(
        "--no-activate", action="store_true", help="register only; keep the active version"
    )
    p.set_defaults(handler=_models_register)

    p = models_sub.add_parser(
        "verify",
        help="compare a registered version's bundle on disk with the identity registered for it",
        description="Verify the bundle of VERSION (default: the active one) file by file and "
        "print, as JSON, the sha256 registered for it beside the one on disk (what `serve` "
        "compares). Exit status 0 when they match, 1 when they differ.",
    )
    p.add_argument("version", nargs="?", help="default: the active version")
    db_args(p)
    p.add_argument("--pipeline", help="default: the name in --config")
    p.set_defaults(handler=_models_verify)

    p = models_sub.add_parser(
        "activate", help="make VERSION the pipeline's active model (the service switches to it)"
    )
    p.add_argument("version")
    db_args(p)
    p.add_argument("--pipeline", help="default: the name in --config")
    p.set_defaults(handler=_models_activate)


def db_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--db", metavar="URL", help="database URL (not with --config; default ANOMALY_DATABASE_URL)"
    )
    p.add_argument(
        "--config",
        metavar="PIPELINE.yaml",
        help="use the pipeline config's database (ANOMALY_DATABASE_URL overrides its URL) and, "
        "for models, its name; not with --db (use --db URL --pipeline NAME instead)",
    )


# ---------------------------------------------------------------------- helpers


def resolve_url(args: argparse.Namespace) -> Any:
    """``--db``, else the pipeline config's database URL, else ``ANOMALY_DATABASE_URL``."""
    from storage.engine import config_database_url, normalize_url

    one_database(args)
    if getattr(args, "db", None):
        return normalize_url(args.db)
    if getattr(args, "config", None):
        from anomaly.config import load_config

        return config_database_url(load_config(args.config))
    env = os.environ.get("ANOMALY_DATABASE_URL")
    if env:
        return normalize_url(env)
    raise DatabaseURLError(
        "no database given: pass --db URL or --config PIPELINE.yaml, or set ANOMALY_DATABASE_URL"
    )


def one_database(args: argparse.Namespace) -> None:
    """Refuse ``--db`` with ``--config``: either would silently override the other's database."""
    if getattr(args, "db", None) and getattr(args, "config", None):
        raise InvalidArgumentError(
            "--db and --config both name the database: pass one (--db URL --pipeline NAME, or "
            "--config with ANOMALY_DATABASE_URL to point the config at another database)"
        )


def open_store(args: argparse.Namespace, create: bool = False) -> Any:
    """The store at the URL the arguments give. Only ``db upgrade`` may create a SQLite file:
    any other command on a file that is not there says to run it, and creates nothing."""
    from storage.store import AlertStore

    return AlertStore(resolve_url(args), create=create)


def cutoff_time(value: str, what: str) -> Any:
    """``30d``/``2h``/``90m``/``45s``/``2w`` back from now, or an ISO time, as an aware datetime."""
    from datetime import UTC, datetime, timedelta

    match = _DURATION.match(value)
    if match:
        try:
            age = timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2).lower()])
        except OverflowError:  # timedelta holds at most 999,999,999 days
            raise InvalidArgumentError(f"{what} {value!r}: too long a duration") from None
        try:
            return datetime.now(UTC) - age
        except OverflowError:
            raise InvalidArgumentError(
                f"{what} {value!r}: reaches back before the year 1"
            ) from None
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidArgumentError(
            f"{what} {value!r}: expected a duration like 30d, 12h, 90m, 45s, 2w or an ISO time"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")


def emit_json(value: Any) -> None:
    """``value`` as one line of JSON (times in ISO format, bytes as text)."""
    import json

    emit(json.dumps(value, default=json_default, ensure_ascii=False))


# ---------------------------------------------------------------------- handlers


def _db_upgrade(args: argparse.Namespace) -> int:
    with open_store(args, create=True) as store:
        store.upgrade(args.to)
        emit(f"database {store.url.render_as_string()} at revision {store.current_revision()}")
    return 0


def _db_downgrade(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        store.downgrade(args.to)
        revision = store.current_revision() or "base (no tables)"
        emit(f"database {store.url.render_as_string()} at revision {revision}")
    return 0


def _db_current(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        emit(str(store.current_revision() or "none (empty database: run anomaly db upgrade)"))
    return 0


def _db_prune(args: argparse.Namespace) -> int:
    cutoff = cutoff_time(args.older_than, "--older-than")
    with open_store(args) as store:
        result = store.prune(cutoff, pipeline=args.pipeline)
    emit(
        f"deleted {result.alerts} alerts, {result.incidents} incidents, "
        f"{result.dead_letters} dead letters, {result.stream_stats} statistics rows, "
        f"{result.drift_windows} drift windows, {result.reservoir} reservoir records "
        f"older than {cutoff.isoformat(timespec='seconds')}"
    )
    return 0


def _db_grafana_role(args: argparse.Namespace) -> int:
    password = None
    if args.password_env:
        password = os.environ.get(args.password_env)
        if not password:
            raise InvalidArgumentError(f"--password-env: ${args.password_env} is not set")
    if resolve_url(args).get_backend_name() == "sqlite":
        # Said before the store is opened: "no such file" would hide the real problem.
        raise InvalidArgumentError("a read-only role needs PostgreSQL (SQLite has no roles)")
    with open_store(args) as store:
        store.grant_read_only(args.role, password)
    emit(
        f"role {args.role} can read the monitoring tables"
        + (" and log in" if password else " (NOLOGIN: set a password to use it)")
    )
    return 0


def _alerts_list(args: argparse.Namespace) -> int:
    if args.limit < 1:  # PostgreSQL refuses a negative LIMIT, SQLite reads it as no limit
        raise InvalidArgumentError(f"--limit must be >= 1, got {args.limit}")
    since = cutoff_time(args.since, "--since") if args.since else None
    with open_store(args) as store:
        rows = store.list_alerts(
            pipeline=args.pipeline,
            since=since,
            status=args.status,
            entity=args.entity,
            limit=args.limit,
        )
    if args.json:
        for row in rows:
            emit_json(row)
        return 0
    if not rows:
        emit("no alerts")
        return 0
    header = ("id", "ingest_time", "pipeline", "entity", "severity", "score", "status", "record")
    table = [
        (
            str(r["id"]),
            r["ingest_time"].isoformat(timespec="seconds"),
            r["pipeline"],
            r["entity"] or "-",
            r["severity"],
            f"{r['ensemble_score']:.4g}",
            r["status"],
            r["record_id"],
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    for row in (header, *table):
        emit("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return 0


def _alerts_ack(args: argparse.Namespace) -> int:
    from storage.verdicts import check_verdict

    if (args.id is None) == (args.incident is None):
        raise InvalidArgumentError("alerts ack: give an alert ID or --incident ID (one of them)")
    by = None
    if args.verdict is not None:
        by = args.by if args.by is not None else _os_user()
        check_verdict(args.verdict, by, args.note)  # before opening the database
    elif args.note is not None or args.by is not None:
        raise InvalidArgumentError("--note and --by: only with --verdict")
    elif args.id is not None:  # the acknowledgement as it always was
        with open_store(args) as store:
            changed = store.ack_alert(args.id)
        emit(f"alert {args.id} " + ("acknowledged" if changed else "was not open (unchanged)"))
        return 0
    with open_store(args) as store:
        result = store.ack(
            args.id, incident_id=args.incident, verdict=args.verdict, by=by, note=args.note
        )
    what = f"alert {args.id}" if args.id is not None else f"incident {args.incident}"
    line = f"{what}: {len(result.alert_ids)} alert(s), {len(result.acknowledged)} acknowledged"
    if result.verdict is not None:
        when = result.verdict_at.isoformat(timespec="seconds")
        line += f"; verdict {result.verdict} by {result.verdict_by} at {when}"
    emit(line)
    return 0


def _os_user() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no passwd entry (some containers)
        return "unknown"


def _models_list(args: argparse.Namespace) -> int:
    with open_store(args) as store:
        versions = store.list_model_versions(args.pipeline)
    if args.json:
        for v in versions:
            emit_json({f: getattr(v, f) for f in v.__slots__})
        return 0
    if not versions:
        emit("no model versions registered")
        return 0
    for v in versions:
        created = v.created_at.isoformat(timespec="seconds") if v.created_at else "-"
        emit(f"{'*' if v.active else ' '} {v.pipeline}  {v.version}  {created}  {v.bundle_path}")
    return 0


def _pipeline(args: argparse.Namespace, command: str) -> str:
    one_database(args)  # before the bundle is loaded
    if args.pipeline:
        from anomaly.config import check_pipeline_name

        return check_pipeline_name(args.pipeline, "--pipeline")
    if args.config:
        from anomaly.config import load_config

        return load_config(args.config).name
    raise InvalidArgumentError(f"models {command}: pass --pipeline NAME (or --config)")


def _models_register(args: argparse.Namespace) -> int:
    from pathlib import Path

    from anomaly.estimator.model import AnomalyModel
    from storage.records import ModelVersionRecord

    pipeline = _pipeline(args, "register")
    root = Path(args.bundle).resolve()
    model = AnomalyModel.load(root)  # verifies every file against the manifest
    rec = ModelVersionRecord.of_bundle(pipeline, model, root)
    with open_store(args) as store:
        rec = store.register_model_version(rec, activate=not args.no_activate)
    state = "active" if rec.active else "registered (not active)"
    emit(f"pipeline {rec.pipeline}: model version {rec.version} {state}")
    return 0


def _models_verify(args: argparse.Namespace) -> int:
    import json

    from anomaly.estimator.bundle import inspect_bundle

    pipeline = _pipeline(args, "verify")
    with open_store(args) as store:
        versions = store.list_model_versions(pipeline)
    wanted = [v for v in versions if (v.version == args.version if args.version else v.active)]
    if not wanted:
        what = f"model version {args.version!r}" if args.version else "active model version"
        raise InvalidArgumentError(f"pipeline {pipeline!r} has no {what} registered")
    rec = wanted[0]
    on_disk = inspect_bundle(rec.bundle_path)["manifest_sha256"]  # every file checked first
    match = on_disk == rec.bundle_sha256
    report = {
        "pipeline": pipeline,
        "version": rec.version,
        "bundle_path": rec.bundle_path,
        "registered_sha256": rec.bundle_sha256,
        "on_disk_sha256": on_disk,
        "match": match,
    }
    emit(json.dumps(report, indent=2))
    return 0 if match else 1


def _models_activate(args: argparse.Namespace) -> int:
    pipeline = _pipeline(args, "activate")
    with open_store(args) as store:
        rec = store.activate_model_version(pipeline, args.version)
    emit(f"pipeline {rec.pipeline}: model version {rec.version} is active")
    return 0


def json_default(value: Any) -> Any:
    from storage.sanitize import _to_text  # bytes as text, as the store writes them

    return value.isoformat() if hasattr(value, "isoformat") else _to_text(value)
