"""Ctrl-C (SIGINT) and SIGTERM for the CLI: one message and exit 128 + the signal (130, 143), never a silent end.

Inside stage 2's loop the first signal is deferred: the step running finishes, a checkpoint of it is saved
(``run_train``'s ``on_step`` stop, the path the app's Stop button takes) and the rerun resumes from exactly
that step. Anywhere else (stage 1 keeps its finished shards), or on a second signal, the run stops at once.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the run; ``signum`` says which (the exit code is 128 + it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Stops:
    """The CLI's signal handler; :meth:`on_step` is the stage-2 hook that turns a signal into a clean stop."""

    def __init__(self):
        self.signum: int | None = None  # a deferred signal, waiting for the step to end
        self.in_loop = False

    def handle(self, signum, frame) -> None:
        if self.in_loop and self.signum is None:
            self.signum = signum
            print(f"hollownet: {signal.Signals(signum).name}: stopping after this step to save a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        raise Interrupted(signum)

    def on_step(self, step: int, losses, memory) -> bool:
        self.in_loop = True
        return self.signum is not None

    @contextmanager
    def installed(self):
        """The handler for SIGINT and SIGTERM while inside; the previous ones restored after (tests call main)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self.handle) for s in SIGNALS}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def exit_code(signum: int | None) -> int:
    return 128 + (signum or signal.SIGINT)
