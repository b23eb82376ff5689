"""Errors that end a script with one clear line instead of a traceback."""
import logging
import sys

# stdlib logging, not lib.log: this module sits at the bottom of the import graph (docs/design.md)
logger = logging.getLogger("speclab.errors")


class UsageError(Exception):
    """Bad input from the user (env var, flag, file, folder). Scripts exit with code 2."""


class EngineUnavailable(UsageError):
    """An engine cannot start here (package missing, no GPU); the message says how to fix it."""


def exit_on_usage_error(main):
    """Decorator for script entry points: UsageError -> one line on stderr and exit 2."""

    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UsageError as exc:
            logger.error(f"error: {exc}")
            sys.exit(2)

    wrapped.__name__ = main.__name__
    wrapped.__doc__ = main.__doc__
    return wrapped
