"""What one scored batch hands the outputs (``streams.batch.build_sink_batch``), with the real
decoder, model and scorer."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from anomaly.config import config_from_dict
from anomaly.scoring.scorer import BatchScorer
from streams.batch import Message, build_sink_batch
from streams.decode import RecordDecoder
from streams.replay import encode_rows

from .conftest import LABELS


def test_an_id_with_a_lone_surrogate_never_stops_the_scores_topic(
    trained_model, fraud_schema, fraud_records
):
    """The decoders reject an id holding a lone surrogate (invalid_json); should one get through
    anyway, its score is keyed by the id's escape, not a UnicodeEncodeError on the worker thread
    (which stopped the service at every restart)."""
    cfg = config_from_dict(
        {"name": "p", "schema": fraud_schema, "kafka": {"topic": "t", "scores_topic": "t.s"}},
        environ={},
    )
    values = encode_rows(fraud_records.drop(columns=LABELS).iloc[:20])
    messages = [Message("t", 0, i, v, None) for i, v in enumerate(values)]
    decoder = RecordDecoder(cfg.schema)
    decoded = decoder.decode(values, partitions=[0] * 20, offsets=list(range(20)))
    decoded.frame.loc[3, "id"] = "txn-\ud800"
    result = BatchScorer(trained_model.model, device="cpu", threads=1).score(decoded.frame)
    _, scores_out, _ = build_sink_batch(
        cfg, messages, decoded, result, "v1", datetime.now(UTC), decoder.stored_record
    )
    assert len(scores_out) == 20
    key, body = scores_out[3]
    assert key == b"txn-\\ud800" and json.loads(body)["record_id"] == "txn-\\ud800"
    assert scores_out[4][0] == decoded.frame["id"][4].encode()
