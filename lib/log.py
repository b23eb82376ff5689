"""The project's logger: library modules log through children of "speclab" (get_logger(__name__)); scripts call
setup_logging() once at the start of main().

Importing the library configures nothing: until a script (or a test) calls setup_logging(), records propagate to
the root logger, so a test stays silent and pytest's caplog sees them. After it, INFO and below go to stdout and
WARNING and above to stderr, as the bare message, which is what print() showed before.
"""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("speclab")


def get_logger(name: str) -> logging.Logger:
    """The child of "speclab" for a module: get_logger("lib.decoding.eagle") -> speclab.decoding.eagle."""
    name = name.removeprefix("lib.") if name != "lib" else ""
    return logger.getChild(name) if name else logger


class _StdStream(logging.StreamHandler):
    """A StreamHandler on sys.stdout or sys.stderr as they are when a record comes, not as they were at set-up
    (pytest's capsys and contextlib.redirect_stdout replace them)."""

    def __init__(self, name: str, level: int):
        logging.Handler.__init__(self, level)
        self.stream_name = name

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value):  # StreamHandler.setStream; the stream is always the current one
        pass


def setup_logging(verbose: bool = False) -> logging.Logger:
    """Console handlers on "speclab": INFO (DEBUG too with verbose) to stdout, WARNING and above to stderr, each
    record as its bare message. Calling it again only changes the level."""
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Not through the root logger: a library that configures the root one (SGLang's logging.basicConfig(force=True))
    # would print every line a second time.
    logger.propagate = False
    if not any(isinstance(h, _StdStream) for h in logger.handlers):
        out = _StdStream("stdout", logging.DEBUG)
        out.addFilter(lambda record: record.levelno < logging.WARNING)
        err = _StdStream("stderr", logging.WARNING)
        for handler in (out, err):
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
    return logger
