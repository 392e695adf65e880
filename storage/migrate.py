"""Run the Alembic migrations from code: no alembic.ini, works from any directory."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import text
from sqlalchemy.engine import Connection

from storage.engine import remove_if_no_tables, sqlite_file
from storage.errors import InvalidArgumentError

if TYPE_CHECKING:
    from storage.engine import Database

log = logging.getLogger("storage.store")  # the logger these lines always had

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def revisions() -> list[str]:
    """Every migration's revision id, oldest first."""
    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def check_revision(revision: str) -> None:
    """Alembic's CommandError for a revision name no migration has, found without a database.
    Relative steps (``+1``, ``-1``, ``0002+1``) depend on the database and are left to Alembic."""
    if "+" in revision or "-" in revision:
        return
    ScriptDirectory.from_config(alembic_config()).get_revisions(revision)


# ------------------------------------------------------------------ AlertStore's schema commands


def upgrade_database(db: Database, revision: str = "head") -> None:
    """Run the migrations up to ``revision`` in one transaction (concurrent callers serialize);
    a SQLite file this call created is removed again when the migration fails."""
    # An unknown name fails here, before the first connection creates a SQLite file.
    with revision_errors("upgrade", revision):
        check_revision(revision)
    path = sqlite_file(db.url)
    new_file = path if path is not None and not path.exists() else None
    try:
        with db.transaction("database upgrade") as conn, revision_errors("upgrade", revision):
            if db.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(7301240591)"))
            before = MigrationContext.configure(conn).get_current_heads()
            command.upgrade(alembic_config(conn), revision)
            after = MigrationContext.configure(conn).get_current_heads()
    except BaseException:
        # Nothing was migrated (one transaction), so the file this call created holds no
        # table: leave no empty database behind.
        if new_file is not None:
            db.close()
            remove_if_no_tables(new_file)
        raise
    if after != before:  # Alembic's own step-by-step lines are INFO of logger "alembic"
        old, new = ",".join(before) or "base", ",".join(after) or "base"
        log.info(
            "database migrated from %s to %s",
            old,
            new,
            extra={"fields": {"from_revision": old, "to_revision": new}},
        )


def downgrade_database(db: Database, revision: str) -> None:
    with db.transaction("database downgrade") as conn, revision_errors("downgrade", revision):
        command.downgrade(alembic_config(conn), revision)


def database_revision(db: Database) -> str | None:
    with db.transaction("reading the schema revision", write=False) as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def revision_errors(action: str, revision: str) -> Iterator[None]:
    """Alembic's CommandError (an unknown or ambiguous revision, a downgrade target above the
    current one) as an InvalidArgumentError naming the revisions there are; raised inside the
    transaction, so nothing is migrated."""
    try:
        yield
    except CommandError as exc:
        known = ", ".join(revisions())
        raise InvalidArgumentError(
            f"database {action} to {revision!r}: {exc} (revisions: {known}; or head, base)"
        ) from None
