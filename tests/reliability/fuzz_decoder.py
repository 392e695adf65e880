"""Coverage-guided fuzzing (atheris/libFuzzer) of the record decoder and the model's own checks.

One input is a micro-batch: the fuzzer's bytes split on 0x1E (record separator) into up to 16
Kafka values, decoded with the fraud example's schema. Invariants checked on every input:

* nothing raises (a crash is a finding; libFuzzer writes the input to ``crash-*``);
* every value is accepted or rejected exactly once, each rejection with a known kind and a message;
* batch decoding agrees with decoding each value alone;
* with ``FUZZ_BUNDLE`` (a model bundle), ``validate_frame`` of the accepted rows never raises and
  the rows it accepts score to finite numbers.

    python tests/reliability/fuzz_decoder.py -max_total_time=600          # the long run
    FUZZ_BUNDLE=path/to/bundle python tests/reliability/fuzz_decoder.py -runs=100000

Seeds: valid fraud records and one malformed record of every kind (tests/reliability/malformed.py),
written to a temporary corpus directory unless corpus directories are given.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))

with atheris.instrument_imports(include=["streams.decode", "anomaly.features.preprocess"]):
    from streams.decode import RecordDecoder
    from streams.rejects import ERROR_KINDS

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from anomaly.config import SchemaConfig  # noqa: E402

SEP = b"\x1e"
SCHEMA_DICT = yaml.safe_load((ROOT / "examples" / "fraud.yaml").read_text())["schema"]
SCHEMA = SchemaConfig(**SCHEMA_DICT)
DECODER = RecordDecoder(SCHEMA)
MODEL = None
SCORER = None
if os.environ.get("FUZZ_BUNDLE"):
    import torch

    from anomaly.estimator.model import AnomalyModel
    from anomaly.scoring.scorer import BatchScorer

    torch.set_num_threads(1)
    MODEL = AnomalyModel.load(os.environ["FUZZ_BUNDLE"])
    SCORER = BatchScorer(MODEL, device="cpu", threads=1)
VALIDATOR_KINDS = ("missing_column", "not_a_number", "infinite", "missing_value")


def check(data: bytes) -> None:
    values = data.split(SEP)[:16]
    batch = DECODER.decode(values, partitions=[0] * len(values), offsets=list(range(len(values))))
    rejected = {r.index for r in batch.rejected}
    accepted = set(batch.index.tolist())
    assert not rejected & accepted
    assert sorted(rejected | accepted) == list(range(len(values)))
    assert len(batch.frame) == len(accepted)
    for r in batch.rejected:
        assert r.error_kind in ERROR_KINDS and r.error_message, r
    for i, value in enumerate(values):
        alone = DECODER.decode([value])
        assert alone.n_valid == (i in accepted), (i, value[:100])
    if MODEL is not None and batch.n_valid:
        problems = MODEL.preprocessor_.validate_frame(batch.frame)
        bad = {row for row, _, _ in problems}
        for _, kind, message in problems:
            assert kind in VALIDATOR_KINDS and message
        keep = [row for row in range(batch.n_valid) if row not in bad]
        if keep:
            result = SCORER.score(batch.frame.iloc[keep].reset_index(drop=True))
            assert np.isfinite(result.scores.to_numpy(dtype=np.float64)).all()


def seeds(directory: Path) -> None:
    from malformed import MUTATIONS

    from anomaly.synthetic.datasets import generate_fraud
    from streams.replay import encode_rows

    frame = generate_fraud(40, anomaly_fraction=0.1, seed=1).drop(
        columns=["is_anomaly", "anomaly_kind"]
    )
    good = encode_rows(frame)
    r = random.Random(0)
    (directory / "valid").write_bytes(SEP.join(good[:4]))
    for name, fn in MUTATIONS.items():
        value, _ = fn(json.loads(good[0]), SCHEMA_DICT, r)
        (directory / name).write_bytes(SEP.join([good[1], value[:20000], good[2]]))


def main() -> None:
    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):
        corpus = Path(tempfile.mkdtemp(prefix="fuzz-decoder-"))
        seeds(corpus)
        argv.append(str(corpus))
    atheris.Setup(argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
