"""Malformed Kafka record values of every kind, built from a valid record of the fraud schema.

Each ``make_*`` function takes a valid record (a dict), a ``random.Random`` and returns the value
bytes and the dead-letter kinds that are acceptable for it. Used by the hypothesis property test,
the atheris fuzz seed corpus and the 10k-malformed-records service run.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable

# Dead-letter kinds of the decoder (streams.rejects.ERROR_KINDS) and the model's own checks
# (anomaly.features.preprocess.Preprocessor.validate_frame).
VALIDATOR_KINDS = ("missing_column", "not_a_number", "infinite", "missing_value")

FIVE_MB = 5 * 1024 * 1024


def _enc(record: object) -> bytes:
    return json.dumps(record).encode()


def _numeric(record: dict, schema: dict, r: random.Random) -> str:
    return r.choice(schema["numeric"])


def invalid_json(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    raw = _enc(record)
    choice = r.randrange(4)
    if choice == 0:
        return raw[: r.randrange(1, len(raw) - 1)], {"invalid_json"}
    if choice == 1:
        return raw.replace(b":", b"=", 1), {"invalid_json"}
    if choice == 2:
        return raw + b"}", {"invalid_json"}
    return b"{" + b",".join(b'"k%d"' % i for i in range(r.randrange(1, 20))), {"invalid_json"}


def not_object(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    value = r.choice([[record], "text", 42, None, True, [1, 2, 3]])
    return _enc(value), {"not_object"}


def wrong_type(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    name = r.choice([schema["id_field"], _numeric(record, schema, r)])
    bad = r.choice(["12.5", True, [1.0], {"v": 1}])
    if name == schema["id_field"]:
        bad = r.choice([[1], {"v": 1}, 1.5, True])
    return _enc(record | {name: bad}), {"wrong_type"}


def missing_field(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    required = [schema["id_field"], schema["time_field"], *schema["numeric"]]
    name = r.choice(required)
    return _enc({k: v for k, v in record.items() if k != name}), {"missing_field"}


def null_or_nan(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    """null or NaN (as Python's json writes it) in a feature: missing under missing=reject."""
    name = _numeric(record, schema, r)
    if r.random() < 0.5:
        return _enc(record | {name: None}), {"missing_value"}
    return _enc(record | {name: float("nan")}), {"missing_value"}


def infinite(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    name = _numeric(record, schema, r)
    if r.random() < 0.5:
        return _enc(record | {name: r.choice([float("inf"), float("-inf")])}), {"not_finite"}
    # Beyond float64: a literal JSON itself allows.
    raw = _enc(record | {name: 0.5}).replace(b": 0.5", b": " + r.choice([b"1e400", b"-2e999"]))
    return raw, {"not_finite"}


def huge_integer(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    name = _numeric(record, schema, r)
    digits = b"9" * r.randrange(400, 5000)
    return _enc(record | {name: 0.5}).replace(b": 0.5", b": " + digits), {
        "not_finite",
        "wrong_type",
        "invalid_json",
    }


def invalid_time(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    bad = r.choice(["yesterday", "2026-13-45T99:00:00Z", 1e20, -1e19, ""])
    return _enc(record | {schema["time_field"]: bad}), {"invalid_time"}


def deep_nesting(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    depth = r.randrange(65, 20_000)
    raw = _enc(record | {"extra": 0})[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}"
    return raw, {"too_deep", "oversized"}


def invalid_utf8(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    raw = _enc(record | {"note": "x"})
    bad = r.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
    return raw.replace(b'"x"', b'"' + bad + b'"'), {"invalid_utf8"}


def empty(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    return b"", {"empty"}


def five_megabytes(record: dict, schema: dict, r: random.Random) -> tuple[bytes, set[str]]:
    raw = _enc(record | {"pad": ""})
    return raw.replace(b'"pad": ""', b'"pad": "' + b"x" * FIVE_MB + b'"'), {"oversized"}


MUTATIONS: dict[str, Callable[[dict, dict, random.Random], tuple[bytes, set[str]]]] = {
    "invalid_json": invalid_json,
    "not_object": not_object,
    "wrong_type": wrong_type,
    "missing_field": missing_field,
    "null_or_nan": null_or_nan,
    "infinite": infinite,
    "huge_integer": huge_integer,
    "invalid_time": invalid_time,
    "deep_nesting": deep_nesting,
    "invalid_utf8": invalid_utf8,
    "empty": empty,
}
