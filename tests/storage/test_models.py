"""Model versions: registration is idempotent, one active version per pipeline."""

from __future__ import annotations

import pytest

from storage import AlertStore
from storage.errors import ModelVersionConflict, NotFoundError
from storage.records import ModelVersionRecord


def _rec(version: str, sha: str = "0" * 64, pipeline: str = "cards") -> ModelVersionRecord:
    metrics = {"target_fpr": 0.001, "threshold": 3.2, "calibration_quantiles": {"p50": 0.4}}
    return ModelVersionRecord(pipeline, version, f"/models/{version}", sha, metrics=metrics)


def test_register_and_switch_the_active_version(store: AlertStore) -> None:
    assert store.active_model_version("cards") is None
    v1 = store.register_model_version(_rec("v1"))
    assert v1.active and v1.activated_at is not None and v1.created_at is not None
    assert v1.metrics["calibration_quantiles"] == {"p50": 0.4}
    v2 = store.register_model_version(_rec("v2", "1" * 64), activate=False)
    assert not v2.active
    assert store.active_model_version("cards").version == "v1"

    assert store.activate_model_version("cards", "v2").active
    assert store.active_model_version("cards").version == "v2"
    assert [(v.version, v.active) for v in store.list_model_versions("cards")] == [
        ("v1", False),
        ("v2", True),
    ]
    # Another pipeline has its own active version.
    store.register_model_version(_rec("v1", pipeline="machines"))
    assert store.active_model_version("machines").version == "v1"
    assert store.active_model_version("cards").version == "v2"

    # Registering the same bundle again is a no-op; another bundle under the same name is not.
    assert store.register_model_version(_rec("v1"), activate=False).bundle_sha256 == "0" * 64
    with pytest.raises(ModelVersionConflict, match="already registered"):
        store.register_model_version(_rec("v1", "f" * 64))
    with pytest.raises(NotFoundError, match="registered: v1, v2"):
        store.activate_model_version("cards", "v9")
    assert store.active_model_version("cards").version == "v2"


def test_the_database_allows_one_active_version_per_pipeline(store: AlertStore) -> None:
    from sqlalchemy import exc, update

    from storage.schema import model_versions

    store.register_model_version(_rec("v1"))
    store.register_model_version(_rec("v2", "1" * 64), activate=False)
    with pytest.raises(exc.IntegrityError), store.engine.begin() as conn:
        conn.execute(update(model_versions).values(active=True))


@pytest.mark.parametrize("activate", [True, False])
def test_a_version_longer_than_its_column_finds_its_own_row(
    store: AlertStore, activate: bool
) -> None:
    long = "v" * 200  # stored cut to the column with a marker, as alert rows store it
    stored = store.register_model_version(_rec(long), activate=activate)
    assert stored.version != long and stored.version.startswith("v" * 50)
    assert stored.active is activate
    # Registering it again is the same no-op as for any version.
    assert store.register_model_version(_rec(long), activate=activate).version == stored.version
