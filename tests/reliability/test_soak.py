"""The soak script (tests/reliability/soak.py) in miniature: the same ``run`` over a few thousand
records, so CI keeps the code of the documented 1M-record run working and its accounting honest.

    python tests/reliability/soak.py --records 1000000 --out soak-1m.json    # the real soak
"""

from __future__ import annotations

import pytest
from harness import env_int
from soak import run

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.postgres]


def test_soak_in_miniature(pg_url, tmp_path, kafka_bootstrap, trained_model):
    records = env_int("RELIABILITY_SOAK_RECORDS", 8000)
    result = run(
        records=records,
        bootstrap=kafka_bootstrap,
        db_url=pg_url,
        bundle=trained_model.bundle,
        workdir=tmp_path,
        interval=0.5,
        max_lag=3000,
        batch_size=500,
        chunk=2000,
    )
    assert result.samples and result.samples[-1]["written"] == records
    assert result.alerts > 0
    assert result.rss_peak_mb > 0
    # Memory: nothing near the size of what went through (8k records are ~3 MB of JSON; the
    # model, torch and the libraries are ~300-400 MB).
    assert result.rss_end_mb < result.rss_start_mb + 100, result
