from __future__ import annotations

from collections.abc import Iterator

import pytest

from storage import AlertStore


@pytest.fixture
def store(db_url: str) -> Iterator[AlertStore]:
    """A migrated store on SQLite and on PostgreSQL (the ``db_url`` parametrization)."""
    s = AlertStore(db_url, incident_window_s=600)
    s.upgrade()
    try:
        yield s
    finally:
        s.close()
