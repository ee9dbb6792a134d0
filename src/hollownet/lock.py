"""One writer per output folder: ``FOLDER/.hollownet.lock`` holds the owner's PID, host and start time.

A second run on the same folder is refused in one line naming the owner; a lock whose process is gone
(kill -9, a crash, a power cut) is taken over with a warning. Two runs on one folder would race on the
same store shards and checkpoints and do the work twice.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from hollownet.errors import HollownetError
from hollownet.files import pid_alive

LOCK_NAME = ".hollownet.lock"


def process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), so a reused PID is not taken for the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def owner_alive(owner: dict) -> bool:
    pid = owner.get("pid")
    if not isinstance(pid, int) or not pid_alive(pid):
        return False
    start = process_start(pid)
    return start is None or owner.get("start") in (None, start)


def _me() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _read(path: Path) -> dict | None:
    try:
        owner = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as a stale lock
    return owner if isinstance(owner, dict) else {}


def acquire(folder: str | Path, flag: str = "--output") -> Path:
    """Take ``folder``'s lock (made with the folder if need be); refuse in one line while another run holds it
    (``flag``: the option that names the folder, in the refusal)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    me = _me()
    for _ in range(3):  # a lost race with another taker: look again
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(path)
            if owner is None:
                continue
            if owner.get("host") not in (None, me["host"]):
                raise HollownetError(f"'{folder}' is in use by a hollownet run on host {owner['host']} (PID {owner.get('pid')}, "
                                     f"since {owner.get('since')}): wait for it, or delete {path} if that run is gone")
            if owner_alive(owner) and owner.get("pid") != me["pid"]:
                raise HollownetError(f"'{folder}' is in use by another hollownet run (PID {owner['pid']} on {owner.get('host')}, "
                                     f"since {owner.get('since')}): wait for it to finish or pick another {flag}")
            warnings.warn(f"took over the lock of '{folder}' from PID {owner.get('pid')}, which is no longer running")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise HollownetError(f"could not take the lock {path}: another run keeps taking it; pick another {flag}")


def release(path: Path) -> None:
    """Remove the lock if it is still this process's (a taker after a crash may own it now)."""
    owner = _read(path)
    if owner and owner.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


@contextmanager
def output_lock(folder: str | Path, flag: str = "--output"):
    path = acquire(folder, flag)
    try:
        yield path
    finally:
        release(path)
