"""CLI: ``anomaly dashboards build`` and ``anomaly dashboards push``.

Only argparse and the CLI's error class are imported here; the builder and grafana-client are
imported when a command runs.
"""

from __future__ import annotations

import argparse
import os

from anomaly.errors import UserFacingError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser("dashboards", help="Grafana dashboards: build JSON, push")
    sub = parser.add_subparsers(dest="dashboards_command", metavar="ACTION", required=True)

    p = sub.add_parser("build", help="write the dashboards' JSON (and provisioning YAML)")
    p.add_argument("--out", required=True, help="directory for the dashboard JSON files")
    p.add_argument(
        "--provisioning",
        metavar="DIR",
        help="also write Grafana provisioning files (datasources, dashboard provider) here",
    )
    p.set_defaults(handler=_build)

    p = sub.add_parser(
        "push",
        help="create the folder and datasources if missing and upsert the dashboards",
        description="Push to a running Grafana. Idempotent: objects already as they should be "
        "are not written again.",
    )
    p.add_argument("--url", required=True, help="Grafana URL, e.g. http://localhost:3000")
    p.add_argument(
        "--token",
        default=os.environ.get("GRAFANA_TOKEN"),
        help="service-account token (default: $GRAFANA_TOKEN; or put user:pass in the URL)",
    )
    p.add_argument(
        "--db-host", default="postgres:5432", help="PostgreSQL host:port as Grafana reaches it"
    )
    p.add_argument("--db-name", default="anomaly", help="database name (default %(default)s)")
    p.add_argument("--db-user", default="anomaly_grafana", help="read-only role")
    p.add_argument(
        "--db-password-env",
        default="ANOMALY_GRAFANA_DB_PASSWORD",
        metavar="VAR",
        help="environment variable with the role's password (default %(default)s)",
    )
    p.add_argument("--db-sslmode", default="disable", help="require, verify-full, ...")
    p.add_argument("--prometheus-url", default="http://prometheus:9090")
    p.add_argument(
        "--no-datasources",
        action="store_true",
        help="leave datasources alone (they are provisioned some other way)",
    )
    p.add_argument("--timeout", type=float, default=10.0)
    p.set_defaults(handler=_push)

    p = sub.add_parser(
        "check",
        help="run every SQL panel query against a PostgreSQL database (read-only)",
        description="Expand each SQL panel's Grafana macros for the last hours and run it in a "
        "read-only transaction: a failing query or a column the panel does not expect is "
        "reported. Exit status 1 if any panel fails.",
    )
    p.add_argument("--db", required=True, metavar="URL", help="postgresql+psycopg://...")
    p.add_argument("--hours", type=float, default=24.0, help="time range (default 24)")
    p.add_argument("--role", help="SET ROLE first, e.g. anomaly_grafana, to check its grants")
    p.set_defaults(handler=_check)


def _build(args: argparse.Namespace) -> int:
    from dashboards.generate import write_dashboards, write_provisioning

    paths = write_dashboards(args.out)
    if args.provisioning:
        paths += write_provisioning(args.provisioning)
    for path in paths:
        print(path)
    return 0


def _push(args: argparse.Namespace) -> int:
    from dashboards.datasources import postgres_datasource, prometheus_datasource
    from dashboards.push import PushError, push

    datasources = []
    if not args.no_datasources:
        datasources = [
            postgres_datasource(
                host=args.db_host,
                database=args.db_name,
                user=args.db_user,
                password=os.environ.get(args.db_password_env),
                sslmode=args.db_sslmode,
            ),
            prometheus_datasource(args.prometheus_url),
        ]
    try:
        result = push(args.url, args.token, datasources=datasources, timeout=args.timeout)
    except PushError as exc:
        raise UserFacingError(str(exc)) from exc
    print(result.summary())
    return 0


def _check(args: argparse.Namespace) -> int:
    from dashboards.check import check_panels

    if not args.db.startswith(("postgresql", "postgres://")):
        raise UserFacingError("--db must be a PostgreSQL URL: the dashboards read PostgreSQL")
    results = check_panels(args.db, hours=args.hours, role=args.role)
    for r in results:
        status = f"ok ({r.rows} rows)" if r.ok else f"FAILED: {r.error}"
        print(f"{r.dashboard:<16} {r.panel:<55} {status}")
    failed = sum(not r.ok for r in results)
    print(f"{len(results) - failed} of {len(results)} SQL panels ok")
    return 1 if failed else 0
