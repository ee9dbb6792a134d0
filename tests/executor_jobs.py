"""Jobs for test_executor.py's local-executor test, in a module light to import (no torch) in each job process."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from hollownet.errors import HollownetError
from hollownet.executor import JobKilled


def crash_once(marker: str) -> str:
    """A job that kills its own process the first time (as the OOM killer would), then succeeds."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return "second try"


def fails(_):
    raise HollownetError("bad photos")


def child_killed(_):
    raise JobKilled("hollownet train was killed by signal 9")
