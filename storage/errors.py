"""Storage errors. ``RetryableStorageError`` means: nothing of the batch was written, try again."""

from __future__ import annotations

from anomaly.errors import UserFacingError


class StorageError(Exception):
    """A database operation failed in a way that retrying will not fix."""


class RetryableStorageError(StorageError, UserFacingError):
    """The database was unreachable, the connection was lost, or the transaction lost a race
    (deadlock, serialization failure, SQLite busy). The whole transaction was rolled back, so the
    same call can be repeated as is once the database is back. (User-facing too: on the command
    line "database unreachable" needs no traceback.)"""


class NotFoundError(StorageError, UserFacingError, LookupError):
    """The alert, model version, ... named by the user does not exist."""


class ModelVersionConflict(StorageError, UserFacingError, ValueError):
    """A model version registered again with a different bundle hash."""


class DatabaseURLError(StorageError, UserFacingError, ValueError):
    """No database URL given, or one SQLAlchemy cannot use."""


class InvalidArgumentError(StorageError, UserFacingError, ValueError):
    """An argument the store cannot use (a role name, a duration, ...); the message says which."""


class SchemaMissingError(StorageError, UserFacingError):
    """The database lacks the tables (never migrated, or older than this code), or, for a SQLite
    file a command would otherwise create empty, does not exist: ``anomaly db upgrade`` fixes it.
    Retrying does not, so this is not a RetryableStorageError."""


class DatabaseAccessError(StorageError, UserFacingError):
    """The server refused the connection for a reason that retrying will not fix: the role or
    the database named in the URL does not exist. The message says which."""
