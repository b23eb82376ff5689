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


def check_bearer_token(token: str, what: str) -> str:
    """A bearer token travels in an HTTP header, so it must be visible ASCII (RFC 6750's token68 alphabet plus the
    other printable characters servers accept): anything else cannot be sent, or would arrive as other bytes."""
    bad = next((c for c in token if not ("!" <= c <= "~")), None)
    if bad is not None:
        raise UsageError(f"{what}: the token holds {bad!r}; a bearer token takes visible ASCII characters only "
                         "(no spaces, control or non-ASCII characters)")
    return token
