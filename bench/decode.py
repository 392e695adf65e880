"""Microseconds per record of ``RecordDecoder.decode``: this tree's decoder vs a baseline revision.

The records are the ones ``bench/stream.py`` produces (``generate_fraud`` rows through
``encode_rows``, the fraud schema of examples/fraud.yaml), in batches of ``--batch`` records;
``--extra-numeric K`` adds K float fields to records and schema (a wider feature vector). Both
decoders run in the same process in alternating rounds (a busy machine slows both alike); each
figure is the best round. The baseline is ``streams/decode.py`` at ``--baseline`` (default: the
revision before the decode speed-ups), loaded from ``git show``.

    python bench/decode.py                                  # fraud schema, 2000-record batches
    python bench/decode.py --extra-numeric 25 --rounds 40   # 30 numeric features
    python bench/decode.py --baseline HEAD~3
    python bench/decode.py --avro                           # Avro values vs JSON, this tree

With ``--avro`` the same records go in as Avro (examples/fraud.avsc, Schema Registry framing) to
``streams.avro.AvroRecordDecoder``, against this tree's JSON decoder on their JSON values. With
``--registry`` too, a third set is written with an evolved writer schema (fields reversed, one
more field, times in milliseconds) registered in the test suite's stand-in Schema Registry, and
read by a decoder with ``kafka.schema_registry_url``: Avro schema resolution against the file.

    python bench/decode.py --avro --registry
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from itertools import chain
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, bench/ is first on sys.path and bench/storage.py would shadow the package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from anomaly.config import SchemaConfig  # noqa: E402
from anomaly.synthetic.datasets import generate_fraud  # noqa: E402
from streams.decode import RecordDecoder  # noqa: E402
from streams.replay import encode_rows  # noqa: E402

BASELINE = "95edc5b"  # streams/decode.py before the decode speed-ups


def load_baseline(revision: str):
    source = subprocess.run(
        ["git", "show", f"{revision}:streams/decode.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp(prefix="bench-decode-")) / "baseline_decode.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("baseline_decode", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["baseline_decode"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def records(n: int, extra_numeric: int) -> tuple[SchemaConfig, list[bytes]]:
    schema = yaml.safe_load((ROOT / "examples" / "fraud.yaml").read_text())["schema"]
    frame = generate_fraud(n, anomaly_fraction=0.01, seed=2)
    rng = np.random.default_rng(0)
    extra = [f"x{j}" for j in range(extra_numeric)]
    for name in extra:
        frame[name] = np.round(rng.normal(size=n) * 100, 4)
    schema["numeric"] = [*schema["numeric"], *extra]
    return SchemaConfig(**schema), encode_rows(frame)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=5, help="distinct batches per round")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--extra-numeric", type=int, default=0)
    parser.add_argument("--baseline", default=BASELINE, help="git revision of the baseline")
    parser.add_argument("--avro", action="store_true", help="Avro decoder vs the JSON decoder")
    parser.add_argument(
        "--registry", action="store_true", help="with --avro: also an evolved registry schema"
    )
    args = parser.parse_args()

    schema, values = records(args.batch * args.batches, args.extra_numeric)
    batches = [values[i : i + args.batch] for i in range(0, len(values), args.batch)]
    if args.avro:
        return avro_vs_json(schema, batches, args)
    size = sum(map(len, values)) / len(values)
    print(
        f"{len(batches)} batches of {args.batch} records, {size:.0f} bytes/record, "
        f"{len(schema.numeric)} numeric + {len(schema.categorical)} categorical features"
    )
    baseline = load_baseline(args.baseline).RecordDecoder(schema)
    current = RecordDecoder(schema)
    # Same output before timing anything.
    before, after = baseline.decode(batches[0]), current.decode(batches[0])
    pd.testing.assert_frame_equal(before.frame, after.frame, check_exact=True)
    assert before.rejected == after.rejected

    best = {"baseline": float("inf"), "current": float("inf")}
    for _ in range(args.rounds):
        for name, decoder in (("baseline", baseline), ("current", current)):
            start = time.perf_counter()
            for batch in batches:
                decoder.decode(batch)
            best[name] = min(best[name], (time.perf_counter() - start) / len(values))
    for name, seconds in best.items():
        print(f"{name:9s} {seconds * 1e6:6.2f} us/record  (best of {args.rounds} rounds)")
    print(f"speed-up  {best['baseline'] / best['current']:.2f}x")
    return 0


def avro_vs_json(schema: SchemaConfig, batches: list[list[bytes]], args) -> int:
    from anomaly.config import config_from_dict
    from streams.avro import encode_avro_rows, make_decoder

    if args.extra_numeric:
        raise SystemExit("--avro: examples/fraud.avsc has no extra fields; use --extra-numeric 0")
    cfg = config_from_dict(
        {
            "name": "bench",
            "schema": vars(schema),
            "kafka": {"format": "avro", "avro_schema": str(ROOT / "examples" / "fraud.avsc")},
        },
        environ={},
    )
    json_decoder, avro_decoder = RecordDecoder(schema), make_decoder(cfg)
    frames = [json_decoder.decode(b).frame for b in batches]
    avro_batches = [encode_avro_rows(f, cfg) for f in frames]
    pd.testing.assert_frame_equal(avro_decoder.decode(avro_batches[0]).frame, frames[0])
    size = sum(map(len, chain.from_iterable(avro_batches))) / sum(map(len, avro_batches))
    print(f"Avro values: {size:.0f} bytes/record")
    runs = [("json", json_decoder, batches), ("avro", avro_decoder, avro_batches)]
    registry = None
    if args.registry:
        registry, run = registry_run(cfg, frames)
        runs.append(run)
    best = dict.fromkeys((name for name, _, _ in runs), float("inf"))
    n = sum(map(len, batches))
    for _ in range(args.rounds):
        for name, decoder, data in runs:
            start = time.perf_counter()
            for batch in data:
                decoder.decode(batch)
            best[name] = min(best[name], (time.perf_counter() - start) / n)
    if registry is not None:
        registry.__exit__()
    for name, seconds in best.items():
        print(f"{name:8s} {seconds * 1e6:6.2f} us/record  (best of {args.rounds} rounds)")
    print(f"avro / json time: {best['avro'] / best['json']:.2f}x")
    if registry is not None:
        print(f"registry (resolved) / avro time: {best['registry'] / best['avro']:.2f}x")
    return 0


def registry_run(cfg, frames: list[pd.DataFrame]):
    """The stand-in registry (started) and the ("registry", decoder, batches) run."""
    import dataclasses
    import io
    import json

    import fastavro

    from streams.avro import encode_avro_rows, make_decoder
    from tests.streams.registry import SchemaRegistryStandIn

    schema = json.loads((ROOT / "examples" / "fraud.avsc").read_text())
    fields = list(reversed(json.loads(json.dumps(schema["fields"]))))  # a copy to edit
    for f in fields:
        if f["name"] == cfg.schema.time_field:
            f["type"] = {"type": "long", "logicalType": "timestamp-millis"}
    fields.insert(3, {"name": "device_fingerprint", "type": "string"})
    writer = {**schema, "fields": fields}
    registry = SchemaRegistryStandIn().__enter__()
    schema_id = registry.register(json.dumps(writer))
    parsed = fastavro.parse_schema(writer)
    reader = fastavro.parse_schema(schema)
    batches = []
    for frame in frames:
        values = []
        for value in encode_avro_rows(frame, cfg):  # the file's records, written as v2
            record = fastavro.schemaless_reader(io.BytesIO(value[5:]), reader, None)
            record["device_fingerprint"] = "fp-0123456789abcdef"
            out = io.BytesIO()
            out.write(b"\x00" + schema_id.to_bytes(4, "big"))
            fastavro.schemaless_writer(out, parsed, record)
            values.append(out.getvalue())
        batches.append(values)
    kafka = dataclasses.replace(cfg.kafka, schema_registry_url=registry.url)
    decoder = make_decoder(dataclasses.replace(cfg, kafka=kafka))
    pd.testing.assert_frame_equal(decoder.decode(batches[0]).frame, frames[0])
    return registry, ("registry", decoder, batches)


if __name__ == "__main__":
    sys.exit(main())
