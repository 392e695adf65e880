"""The storage commands through ``anomaly.cli.main``, on both dialects."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from storage_testlib import alert

from anomaly.cli import main
from storage import AlertStore
from storage.records import ModelVersionRecord, SinkBatch

NOW = datetime.now(UTC)


@pytest.fixture
def seeded(store: AlertStore, db_url: str) -> str:
    long_ago = NOW - timedelta(days=40)
    old = [alert(i, entity="m1", event_time=long_ago, ingest_time=long_ago) for i in range(2)]
    new = [alert(10 + i, entity="m2", ingest_time=NOW - timedelta(minutes=30)) for i in range(3)]
    other = [alert(20, pipeline="machines", ingest_time=NOW - timedelta(minutes=5))]
    store.write_batch(SinkBatch("cards", alerts=old + new + other))
    return db_url


def test_alerts_list_and_ack(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["alerts", "list", "--db", seeded, "--pipeline", "cards", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["kafka_offset"] for r in rows] == [12, 11, 10, 1, 0]
    assert all(r["pipeline"] == "cards" for r in rows)

    assert main(["alerts", "list", "--db", seeded, "--since", "2h", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(r["kafka_offset"] for r in rows) == [10, 11, 12, 20]

    since = (NOW - timedelta(minutes=10)).isoformat()
    assert main(["alerts", "list", "--db", seeded, "--since", since, "--limit", "5"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == [
        "id",
        "ingest_time",
        "pipeline",
        "entity",
        "severity",
        "score",
        "status",
        "record",
    ]
    assert len(out) == 2 and "machines" in out[1]

    alert_id = rows[0]["id"]
    assert main(["alerts", "ack", str(alert_id), "--db", seeded]) == 0
    assert "acknowledged" in capsys.readouterr().out
    assert main(["alerts", "list", "--db", seeded, "--status", "acknowledged", "--json"]) == 0
    assert [json.loads(x)["id"] for x in capsys.readouterr().out.splitlines()] == [alert_id]

    assert main(["alerts", "ack", "999999", "--db", seeded]) == 2
    assert "no alert with id 999999" in capsys.readouterr().err


def test_db_prune(seeded: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["db", "prune", "--db", seeded, "--older-than", "30d"]) == 0
    assert "deleted 2 alerts, 1 incidents" in capsys.readouterr().out
    with AlertStore(seeded) as store:
        assert len(store.list_alerts(limit=None)) == 4
    assert main(["db", "prune", "--db", seeded, "--older-than", "soon"]) == 2
    assert "expected a duration like 30d" in capsys.readouterr().err
    # Ages beyond what a date or a timedelta holds are one-line errors too.
    assert main(["db", "prune", "--db", seeded, "--older-than", "1000000d"]) == 2
    assert "'1000000d': reaches back before the year 1" in capsys.readouterr().err
    assert main(["alerts", "list", "--db", seeded, "--since", "9999999999d"]) == 2
    assert "--since '9999999999d': too long a duration" in capsys.readouterr().err
    # PostgreSQL refuses a negative LIMIT and SQLite reads it as none: refused on both.
    assert main(["alerts", "list", "--db", seeded, "--limit", "-1"]) == 2
    assert "--limit must be >= 1, got -1" in capsys.readouterr().err


def test_url_from_environment_and_from_pipeline_config(
    seeded: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.delenv("ANOMALY_DATABASE_URL", raising=False)
    assert main(["alerts", "list"]) == 2
    assert "no database given" in capsys.readouterr().err

    monkeypatch.setenv("ANOMALY_DATABASE_URL", seeded)
    assert main(["alerts", "list", "--pipeline", "machines", "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1

    monkeypatch.delenv("ANOMALY_DATABASE_URL")
    config = tmp_path / "cards.yaml"
    config.write_text(
        f"name: cards\nschema:\n  numeric: [amount]\ndatabase:\n  url: '{seeded}'\n",
        encoding="utf-8",
    )
    assert main(["alerts", "list", "--config", str(config), "--json"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 6


def test_db_and_config_together_are_refused(
    sqlite_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Either would silently override the other: a model registered with --db in another database
    than the config's would never be seen by the pipeline's serve."""
    config_db = tmp_path / "config.db"
    config = tmp_path / "cards.yaml"
    config.write_text(
        f"name: cards\nschema:\n  numeric: [amount]\ndatabase:\n  url: 'sqlite:///{config_db}'\n",
        encoding="utf-8",
    )
    both = ["--db", sqlite_url, "--config", str(config)]
    for argv in (
        ["db", "upgrade"],
        ["alerts", "list"],
        ["models", "register", str(tmp_path / "bundle")],
        ["models", "activate", "v1"],
    ):
        assert main([*argv, *both]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --db and --config both name the database: pass one")
        assert err.count("\n") == 1
    assert not config_db.exists()
    assert not Path(sqlite_url.removeprefix("sqlite:///")).exists()


def test_pipeline_names_fit_the_pipeline_columns(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The config's name limit is the migrated columns' length: the longest accepted name is
    stored whole (registered versions are found again, offsets are written), a longer one is a
    one-line error before anything is written."""
    from sqlalchemy import text

    from anomaly.config import PIPELINE_NAME_MAX_LEN
    from storage.records import OffsetRecord
    from storage.schema import PIPELINE_LEN

    assert PIPELINE_LEN == PIPELINE_NAME_MAX_LEN
    with AlertStore(pg_url) as store:
        store.upgrade()
        with store.engine.connect() as conn:
            lengths = conn.execute(
                text(
                    "SELECT DISTINCT character_maximum_length FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND column_name = 'pipeline'"
                )
            ).scalars()
            assert set(lengths) == {PIPELINE_NAME_MAX_LEN}
        longest = "p" * PIPELINE_NAME_MAX_LEN
        store.register_model_version(ModelVersionRecord(longest, "v1", "/m/v1", "0" * 64))
        assert store.active_model_version(longest).version == "v1"
        store.write_batch(SinkBatch(longest, offsets=[OffsetRecord(longest, "t", 0, 5)]))
        assert store.load_offsets(longest, "t") == {0: 5}

    config = tmp_path / "long.yaml"
    config.write_text(f"name: {'p' * 201}\nschema:\n  numeric: [amount]\n", encoding="utf-8")
    for argv in (
        ["models", "register", str(tmp_path / "bundle"), "--config", str(config)],
        ["models", "activate", "v1", "--db", pg_url, "--pipeline", "p" * 201],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "a pipeline name has at most 200 characters, got 201\n" in err
        assert err.startswith("error: ") and err.count("\n") == 1


def test_models_list_and_activate(
    store: AlertStore, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store.register_model_version(ModelVersionRecord("cards", "v1", "/m/v1", "0" * 64))
    store.register_model_version(ModelVersionRecord("cards", "v2", "/m/v2", "1" * 64), False)
    assert main(["models", "list", "--db", db_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("* cards  v1") and lines[1].startswith("  cards  v2")

    config = tmp_path / "cards.yaml"
    config.write_text(
        f"name: cards\nschema:\n  numeric: [amount]\ndatabase:\n  url: '{db_url}'\n",
        encoding="utf-8",
    )
    assert main(["models", "activate", "v2", "--config", str(config)]) == 0
    assert "model version v2 is active" in capsys.readouterr().out
    assert store.active_model_version("cards").version == "v2"
    assert main(["models", "list", "--db", db_url, "--json"]) == 0
    listed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [(v["version"], v["active"]) for v in listed] == [("v1", False), ("v2", True)]
    assert main(["models", "activate", "v7", "--db", db_url, "--pipeline", "cards"]) == 2
    assert "no model version 'v7'" in capsys.readouterr().err


def test_storage_commands_import_only_argparse() -> None:
    import subprocess
    import sys

    code = (
        "import sys, storage.commands; "
        "bad = [m for m in ('sqlalchemy', 'alembic', 'psycopg', 'confluent_kafka') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_models_register_verifies_and_records_a_real_bundle(
    store: AlertStore, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from anomaly.estimator.model import AnomalyModel

    rng = np.random.default_rng(0)
    model = AnomalyModel(
        target_fpr=0.05, seed=0, device="cpu", detectors=["vae"], max_epochs=1, min_steps=0
    )
    model.fit(rng.normal(size=(300, 3)).astype("float32"))
    bundle = tmp_path / "bundle"
    version = model.save(bundle)

    args = ["models", "register", str(bundle), "--db", db_url, "--pipeline", "cards"]
    assert main(args) == 0
    assert f"model version {version} active" in capsys.readouterr().out
    active = store.active_model_version("cards")
    assert active is not None and active.version == version
    assert active.bundle_path == str(bundle.resolve())
    assert active.metrics["target_fpr"] == pytest.approx(0.05)
    assert set(active.metrics["calibration_quantiles"]) >= {"p50", "p99"}
    assert main(args) == 0  # the same bundle again: idempotent

    (bundle / "vae.safetensors").write_bytes(b"tampered")
    assert main(args) == 2
    assert "bundle" in capsys.readouterr().err


def test_models_verify_shows_the_registered_identity_beside_the_one_on_disk(
    store: AlertStore, db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from anomaly.estimator.model import AnomalyModel

    def fit(seed: int) -> AnomalyModel:
        model = AnomalyModel(
            target_fpr=0.05, seed=seed, device="cpu", detectors=["vae"], max_epochs=1, min_steps=0
        )
        return model.fit(np.random.default_rng(seed).normal(size=(300, 3)).astype("float32"))

    bundle = tmp_path / "bundle"
    version = fit(0).save(bundle)
    db = ["--db", db_url, "--pipeline", "cards"]
    assert main(["models", "register", str(bundle), *db]) == 0
    capsys.readouterr()
    assert main(["models", "verify", *db]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["version"] == version and report["match"] is True
    assert report["registered_sha256"] == report["on_disk_sha256"]

    # Another self-consistent bundle in its place: it verifies on its own, but is not the one
    # registered, and the two identities are shown side by side.
    other = tmp_path / "other"
    fit(1).save(other)
    for name in ("manifest.json", "vae.safetensors", "calibration.safetensors"):
        (bundle / name).write_bytes((other / name).read_bytes())
    assert main(["models", "verify", version, *db]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["match"] is False
    assert report["registered_sha256"] != report["on_disk_sha256"]
    assert main(["models", "verify", "v9", *db]) == 2
    assert "no model version 'v9' registered" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import numpy as np

    from anomaly.estimator.model import AnomalyModel

    model = AnomalyModel(
        target_fpr=0.05, seed=0, device="cpu", detectors=["vae"], max_epochs=1, min_steps=0
    )
    model.fit(np.random.default_rng(0).normal(size=(300, 3)).astype("float32"))
    bundle = tmp_path_factory.mktemp("tiny") / "bundle"
    model.save(bundle)
    return bundle


def _commands_on(url: str, bundle: Path) -> list[list[str]]:
    return [
        ["alerts", "list", "--db", url],
        ["alerts", "ack", "1", "--db", url],
        ["models", "register", str(bundle), "--db", url, "--pipeline", "cards"],
    ]


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_commands_on_a_database_never_migrated_say_to_run_db_upgrade(
    db_url: str, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An existing database without the tables (a fresh PostgreSQL database, an empty SQLite
    # file): "retry once the database is reachable" was wrong advice.
    if db_url.startswith("sqlite"):
        Path(db_url.removeprefix("sqlite:///")).touch()
    for command in _commands_on(db_url, tiny_bundle):
        assert main(command) == 2, command
        err = _one_line_error(capsys)
        assert "run `anomaly db upgrade`" in err and "reachable" not in err, err


def test_commands_on_a_sqlite_file_that_is_not_there_create_nothing(
    tmp_path: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "anomaly.db"
    for command in [*_commands_on(f"sqlite:///{path}", tiny_bundle), ["db", "current"]]:
        if command[0] == "db":
            command += ["--db", f"sqlite:///{path}"]
        assert main(command) == 2, command
        err = _one_line_error(capsys)
        assert f"{path} does not exist" in err and "`anomaly db upgrade`" in err, err
        assert not list(tmp_path.iterdir()), command
    # The migration is what creates it.
    assert main(["db", "upgrade", "--db", f"sqlite:///{path}"]) == 0
    assert path.exists()


def test_an_unknown_revision_is_a_one_line_error(
    store: AlertStore, db_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from storage.migrate import head_revision

    for action in ("upgrade", "downgrade"):
        assert main(["db", action, "--db", db_url, "--to", "bogus"]) == 2
        err = _one_line_error(capsys)
        assert f"database {action} to 'bogus'" in err and head_revision() in err, err
    assert store.current_revision() == head_revision()  # nothing was migrated


# "+99": a step past the head however many migrations there are (with five, "+5" is the head).
@pytest.mark.parametrize("to", ["bogus", "+99"])
def test_a_failed_first_upgrade_leaves_no_sqlite_file_behind(
    to: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An unknown revision (found before connecting) and one Alembic only rejects once it has
    the database (a relative step past the head) both leave the directory as it was."""
    path = tmp_path / "new.db"
    assert main(["db", "upgrade", "--db", f"sqlite:///{path}", "--to", to]) == 2
    err = _one_line_error(capsys)
    assert f"database upgrade to {to!r}" in err, err
    assert not list(tmp_path.iterdir())
    # A file that was there stays.
    path.touch()
    assert main(["db", "upgrade", "--db", f"sqlite:///{path}", "--to", to]) == 2
    capsys.readouterr()
    assert path.exists()


@pytest.mark.postgres
def test_a_role_or_database_that_does_not_exist_is_named(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(pg_url)
    no_role = url.set(username="no_such_role_17").render_as_string(hide_password=False)
    no_db = url.set(database="no_such_db_17").render_as_string(hide_password=False)
    assert main(["alerts", "list", "--db", no_role]) == 2
    err = _one_line_error(capsys)
    assert "no such role 'no_such_role_17'" in err and "reachable" not in err, err
    assert main(["alerts", "list", "--db", no_db]) == 2
    err = _one_line_error(capsys)
    assert "no such database 'no_such_db_17'" in err and "reachable" not in err, err
