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
import os
import sys
from collections.abc import Sequence

from anomaly.errors import UserFacingError

# Sub-command modules, in the order their commands appear in --help.
COMMAND_MODULES = (
    "anomaly.cli.model_commands",  # train, score, inspect
    "anomaly.cli.quality_commands",  # evaluate
    "storage.commands",  # db upgrade/prune, alerts list/ack, models
    "storage.loop_commands",  # drift, retrain, evaluate --from-db
    "streams.commands",  # serve, replay, demo
    "dashboards.commands",  # dashboards build/push
    "anomaly.cli.synthetic_commands",  # generate (example datasets)
)


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


def user_error_message(exc: BaseException) -> str | None:
    """The one-line message for an error the user can act on, or None for a bug (traceback).

    Errors of our own code meant for the user subclass UserFacingError. An OSError comes from
    the user's environment (a missing output directory, no permission, a full disk): its message
    names the file and the reason, which is all the user needs.
    """
    if isinstance(exc, UserFacingError):
        return str(exc)
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return str(exc) or type(exc).__name__
    return None


def _silence_stdout() -> None:
    """After the reader of stdout went away (``anomaly inspect | head -3``): point stdout at
    /dev/null, so the interpreter's final flush of what is still buffered fails no more (the
    way Python's docs on SIGPIPE recommend for command-line tools)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a file descriptor (tests capture it): nothing is left to flush


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        # Alembic logs each of its plugins and migration steps at INFO (a dozen lines at every
        # `serve` start): detail for --verbose. The store logs one line when it migrates.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        result = handler(args)
        # Inside the try: output still buffered when the reader has gone must fail here, where
        # it is handled, not at interpreter exit.
        sys.stdout.flush()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader stopped reading (`| head`): that is not an error worth a message. Exit 1,
        # as Python itself does on EPIPE.
        _silence_stdout()
        return 1
    except Exception as exc:
        # Errors meant for the user (bad config, bad data, tampered bundle, a missing directory)
        # get one line; anything else is a bug: show the trace.
        message = user_error_message(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 2
    return int(result or 0)
