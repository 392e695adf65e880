"""Errors a user can act on. Each message names the field, column, row or file at fault."""

from __future__ import annotations


class UserFacingError(Exception):
    """Base for errors the CLI prints without a traceback (exit status 2)."""


class ConfigError(UserFacingError, ValueError):
    """A pipeline configuration that cannot be used; the message names the field."""


class DataError(UserFacingError, ValueError):
    """Input data that cannot be used (missing column, strings in a numeric column, ...)."""


class BundleError(UserFacingError, ValueError):
    """A model bundle that is missing, tampered, truncated or otherwise unsafe to load."""


class IdentityError(BundleError):
    """A bundle that is not the one it claims or is registered to be: its manifest.json differs
    from the registered sha256, or was edited after it was saved (its content_sha256)."""


class NotFittedError(UserFacingError, RuntimeError):
    """A model used before ``fit``."""


class DeviceError(UserFacingError, ValueError):
    """A torch device that is not a device name, or that this torch build or machine lacks."""


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (the CLI prints user errors as one line)."""
    return " ".join(str(exc).split()) or type(exc).__name__
