"""SIGINT (Ctrl-C), SIGTERM (plain `kill`, schedulers, cron timeouts) and SIGHUP (the terminal went away) stop a
run the same way. A signal the run was started with ignored (nohup, a background job) stays ignored.

While `StopSignals` is active, any of them raises `Interrupted` where the program is, except inside a `held()`
block (aggregating and saving finished work): there the signal is only noted and raised when the block ends, so
nothing finished is dropped half-saved. One stop is enough: once raised, later signals are only noted (a second
Ctrl-C cannot cut the saving short), and so are all after `hold_for_good()` (the final save).
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived. A KeyboardInterrupt, so code that already handles Ctrl-C handles SIGTERM too."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP


class StopSignals:
    """A context manager: installs the handlers on entry, restores the previous ones on exit."""

    def __init__(self):
        self.signum: int | None = None  # the first stop signal received
        self._held = 0
        self._pending = False  # received inside held(), not raised yet
        self._previous = {}

    def __enter__(self) -> StopSignals:
        for sig in STOP_SIGNALS:
            if signal.getsignal(sig) is not signal.SIG_IGN:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is not None:
            return  # the stop is under way
        self.signum = signum
        if self._held:
            self._pending = True
            return
        raise Interrupted(signum)

    @contextmanager
    def held(self):
        """Signals inside the block are raised when it ends (if nothing holds them further)."""
        self._held += 1
        try:
            yield
        finally:
            self._held -= 1
        if not self._held and self._pending:
            self._pending = False
            raise Interrupted(self.signum)

    def hold_for_good(self):
        """From now on signals are only noted (the last save, the summary)."""
        self._held += 1
