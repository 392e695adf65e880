"""The model registry: model bundle versions per pipeline, at most one of them active."""

from __future__ import annotations

from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select, update

from storage import schema as s
from storage.engine import Database, utc
from storage.errors import ModelVersionConflict, NotFoundError
from storage.queries import matching
from storage.records import ModelVersionRecord
from storage.sanitize import clean_json, clean_text


def register(db: Database, rec: ModelVersionRecord, activate: bool = True) -> ModelVersionRecord:
    """See ``AlertStore.register_model_version``."""
    t = s.model_versions
    created = utc(rec.created_at) if rec.created_at else datetime.now(UTC)
    # Stored as the alert rows store them (cut to the column, with a marker), and looked up as
    # stored: a version longer than its column must find its own row again.
    pipeline = clean_text(rec.pipeline, s.PIPELINE_LEN)
    version = clean_text(rec.version, s.MODEL_VERSION_LEN)
    with db.transaction(f"registering model version {version!r}") as conn:
        existing = conn.execute(
            select(t.c.bundle_sha256).where(t.c.pipeline == pipeline, t.c.version == version)
        ).first()
        if existing is not None and existing.bundle_sha256 != rec.bundle_sha256:
            raise ModelVersionConflict(
                f"model version {version!r} of pipeline {pipeline!r} is already "
                f"registered with bundle sha256 {existing.bundle_sha256}, not {rec.bundle_sha256}"
            )
        if existing is None:
            conn.execute(
                t.insert().values(
                    pipeline=pipeline,
                    version=version,
                    created_at=created,
                    bundle_path=clean_text(rec.bundle_path, s.BUNDLE_PATH_LEN),
                    bundle_sha256=rec.bundle_sha256,
                    metrics=clean_json(rec.metrics),
                    active=False,
                )
            )
        if activate:
            _activate(db, conn, pipeline, version)
    return _one(db, pipeline, version)


def activate(db: Database, pipeline: str, version: str) -> ModelVersionRecord:
    """See ``AlertStore.activate_model_version``."""
    with db.transaction(f"activating model version {version!r}") as conn:
        _activate(db, conn, pipeline, version)
    return _one(db, pipeline, version)


def _activate(db: Database, conn: Connection, pipeline: str, version: str) -> None:
    t = s.model_versions
    query = select(t.c.version, t.c.active).where(t.c.pipeline == pipeline)
    if db.dialect == "postgresql":
        query = query.with_for_update()
    active_by_version = {r.version: r.active for r in conn.execute(query)}
    if version not in active_by_version:
        known = ", ".join(sorted(active_by_version)) or "none"
        raise NotFoundError(
            f"no model version {version!r} for pipeline {pipeline!r} (registered: {known})"
        )
    if active_by_version[version]:
        return
    conn.execute(update(t).where(t.c.pipeline == pipeline, t.c.active).values(active=False))
    conn.execute(
        update(t)
        .where(t.c.pipeline == pipeline, t.c.version == version)
        .values(active=True, activated_at=datetime.now(UTC))
    )


def active(db: Database, pipeline: str) -> ModelVersionRecord | None:
    found = versions(db, pipeline=pipeline, active=True)
    return found[0] if found else None


def _one(db: Database, pipeline: str, version: str) -> ModelVersionRecord:
    found = versions(db, pipeline=pipeline, version=version)
    assert found, (pipeline, version)
    return found[0]


def versions(db: Database, **equal: Any) -> list[ModelVersionRecord]:
    """The registered versions ``matching`` ``equal`` (all when empty), by pipeline, oldest
    first."""
    t = s.model_versions
    query = matching(select(t).order_by(t.c.pipeline, t.c.created_at, t.c.id), t, **equal)
    return [
        ModelVersionRecord(**{f.name: r[f.name] for f in fields(ModelVersionRecord)})
        for r in db.rows("reading model versions", query)
    ]
