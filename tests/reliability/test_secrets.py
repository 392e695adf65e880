"""Secrets: Kafka SASL and database credentials come from the environment or from files and never
reach a log line, even at debug level and on the error paths (database unreachable, broker
refusing the SASL handshake).

The read-only Grafana role (SELECT only, no UPDATE/DELETE) is tested where it is made:
tests/storage/test_grafana_role.py, and every dashboard panel runs under it in
tests/dashboards/test_sql_panels.py.
"""

from __future__ import annotations

import time

import pytest
from harness import ServeProcess, StreamProducer, make_stream, records_seen, wait_for
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from anomaly.config import load_config
from storage.store import AlertStore
from streams.broker import create_topic
from streams.kafka import consumer_settings, producer_settings, redacted

pytestmark = [pytest.mark.reliability]

DB_SECRET = "db-Pw-7f3a9c1e"  # PostgreSQL here trusts loopback, so any password connects
KAFKA_SECRET = "kafka-Pw-b82d54aa"


def test_sasl_password_from_env_or_file_reaches_librdkafka_but_not_the_log_form(
    tmp_path, pipeline_file, sqlite_url, trained_model
):
    secret_file = tmp_path / "sasl.txt"
    secret_file.write_text(KAFKA_SECRET + "\n")
    path = pipeline_file(
        sqlite_url,
        trained_model.bundle,
        kafka={
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": "svc",
        },
    )
    from_env = load_config(path, environ={"ANOMALY_KAFKA_SASL_PASSWORD": KAFKA_SECRET})
    from_file = load_config(path, environ={"ANOMALY_KAFKA_SASL_PASSWORD_FILE": str(secret_file)})
    for cfg in (from_env, from_file):
        conf = consumer_settings(cfg)
        assert conf["sasl.password"] == KAFKA_SECRET
        assert producer_settings(cfg.kafka)["sasl.password"] == KAFKA_SECRET
        assert KAFKA_SECRET not in repr(redacted(conf))
    db_file = tmp_path / "db.txt"
    db_file.write_text(DB_SECRET)
    cfg = load_config(path, environ={"ANOMALY_DATABASE_PASSWORD_FILE": str(db_file)})
    assert cfg.database.password_file == str(db_file)


@pytest.mark.kafka
@pytest.mark.postgres
def test_serve_never_logs_credentials(
    pg_url, tmp_path, kafka_bootstrap, topic_name, pipeline_file, trained_model
):
    """Database password in the URL from the environment, Kafka SASL password in the environment,
    debug logging on; the database is unreachable at first (error paths log the URL), then
    records flow. Then a second start whose broker connection fails the SASL handshake, with the
    password from a file."""
    create_topic(kafka_bootstrap, topic_name, partitions=1)
    url = make_url(pg_url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    proxy.cut()  # refused: the service starts while the database is down
    with_password = url.set(port=proxy.port, password=DB_SECRET).render_as_string(
        hide_password=False
    )
    config = pipeline_file(None, trained_model.bundle)
    env = {
        "ANOMALY_DATABASE_URL": with_password,
        "ANOMALY_KAFKA_SASL_USERNAME": "svc",
        "ANOMALY_KAFKA_SASL_PASSWORD": KAFKA_SECRET,
    }
    cfg = load_config(config, environ=env)
    stream = make_stream(trained_model.model, 300, seed=66)
    serve = ServeProcess(
        config, tmp_path / "serve.log", "--stop-when-idle", "3", env=env, verbose=True
    )
    try:
        wait_for(lambda: "database unavailable" in serve.log_text(), 60, "an outage log line")
        time.sleep(1.0)
        proxy.restore()
        producer = StreamProducer(kafka_bootstrap, topic_name, stream.values)
        producer.start()
        producer.finish()
        assert serve.wait(120) == 0, serve.log_text()[-3000:]
    finally:
        if serve.alive():
            serve.kill()
        proxy.close()
    assert records_seen(pg_url, cfg.name) == len(stream.values)
    log = serve.log_text()
    assert "database unavailable" in log and "***" in log  # the URL is logged, masked
    assert DB_SECRET not in log and KAFKA_SECRET not in log
    assert repr(AlertStore(with_password)).count(DB_SECRET) == 0

    # SASL against a broker that does not offer it: the connection fails and is logged.
    secret_file = tmp_path / "sasl.txt"
    secret_file.write_text(KAFKA_SECRET)
    db_file = tmp_path / "db.txt"
    db_file.write_text(DB_SECRET)
    env2 = {
        "ANOMALY_DATABASE_URL": pg_url,
        "ANOMALY_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
        "ANOMALY_KAFKA_SASL_MECHANISM": "PLAIN",
        "ANOMALY_KAFKA_SASL_USERNAME": "svc",
        "ANOMALY_KAFKA_SASL_PASSWORD_FILE": str(secret_file),
        "ANOMALY_DATABASE_PASSWORD_FILE": str(db_file),
    }
    sasl = ServeProcess(config, tmp_path / "sasl.log", env=env2, verbose=True)
    try:
        wait_for(lambda: "kafka error" in sasl.log_text().lower(), 60, "a Kafka error logged")
        time.sleep(2.0)
        assert sasl.alive()
    finally:
        sasl.kill()
    log = sasl.log_text()
    assert DB_SECRET not in log and KAFKA_SECRET not in log
