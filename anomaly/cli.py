"""The ``anomaly`` command line: a thin dispatcher.

Each subsystem owns a ``commands`` module that only imports ``argparse`` at import time and
registers its sub-commands with ``register(subparsers)``; every handler imports the heavy modules
(torch, SQLAlchemy, confluent-kafka) inside itself, so ``anomaly --help`` stays fast and ``anomaly``
(the core package) never imports Kafka or SQL code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from anomaly.errors import UserFacingError

# Sub-command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "anomaly.commands",  # train, score, inspect
    "anomaly.quality_commands",  # evaluate
    "storage.commands",  # db upgrade/prune, alerts list/ack
    "streams.commands",  # serve, replay, demo
    "dashboards.commands",  # dashboards build/push
    "anomaly.synthetic_commands",  # generate (example datasets)
)


class CommandError(UserFacingError):
    """An error a user can fix; printed without a traceback, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anomaly",
        description="Anomaly detection monitoring: train, score, serve from Kafka, store alerts.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # A subsystem not built yet must not break the others.
            if exc.name == name:
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        result = handler(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Errors meant for the user (bad config, bad data, tampered bundle) carry a clear message
        # and subclass UserFacingError. Anything else is a bug: show the trace.
        if isinstance(exc, UserFacingError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
