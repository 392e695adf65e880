"""SQL storage: schema (SQLAlchemy 2 + Alembic) and the alert sink. Knows nothing of Kafka.

``from storage import AlertStore`` imports SQLAlchemy on first use only, so importing
``storage.records`` or ``storage.commands`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from storage.store import AlertStore

__all__ = ["AlertStore"]


def __getattr__(name: str) -> Any:
    if name == "AlertStore":
        from storage.store import AlertStore

        return AlertStore
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
