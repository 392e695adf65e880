"""The read-only PostgreSQL role for Grafana (``storage/grafana_role.sql``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from storage.errors import InvalidArgumentError

SCRIPT = Path(__file__).resolve().parent / "grafana_role.sql"
DEFAULT_ROLE = "anomaly_grafana"
_ROLE_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


def grant_sql(role: str = DEFAULT_ROLE, password: str | None = None) -> list[Any]:
    """Statements that create ``role`` (if missing) with SELECT on the tables only."""
    if not _ROLE_NAME.match(role):
        raise InvalidArgumentError(
            f"role name {role!r}: use lower-case letters, digits and _ (at most 63)"
        )
    statements: list[Any] = [SCRIPT.read_text(encoding="utf-8").replace(DEFAULT_ROLE, role)]
    if password is not None:
        from psycopg import sql

        statements.append(
            sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(role), sql.Literal(password)
            )
        )
    return statements
