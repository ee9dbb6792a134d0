"""Sizes and their units, torch-free: the one way bytes are read (``--budget 1.5GiB``) and written.

SI units are powers of 1000 (``2GB`` = 2*10^9 bytes), IEC units powers of 1024 (``1.5GiB`` = 1.5*2^30), and
the one-letter forms ``K M G T`` are binary as in ``free -g`` and docker's ``2g``. A bare number counts bytes.
"""

from __future__ import annotations

import re

from hollownet.errors import HollownetError

KiB = 1024
MiB = 1024**2
GiB = 1024**3

#: The one rule for sizes everywhere (``--budget``, ``--memory-budget``, JSON): see the module docstring.
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
SIZE_HELP = "a size: 2GB (10^9 bytes), 1.5GiB or 1.5G (2^30 bytes), 800MiB, or a number of bytes"


def format_bytes(n: int | float | None) -> str:
    """Human-readable binary size: ``"4000 B"``, ``"3.91 KiB"``, ``"12.50 MiB"``, ``"1.25 GiB"``."""
    if n is None:
        return "n/a"
    a = abs(n)
    if a >= GiB:
        return f"{n / GiB:.2f} GiB"
    if a >= MiB:
        return f"{n / MiB:.2f} MiB"
    if a >= KiB:
        return f"{n / KiB:.2f} KiB"
    return f"{int(n)} B"


def parse_size(value, what: str = "size") -> int:
    """Bytes in ``value``: an int, or a string such as ``"800MiB"``, ``"2GB"``, ``"0.8G"`` (see :data:`SIZE_UNITS`)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        if not m or m.group(2).lower() not in SIZE_UNITS:
            raise HollownetError(f"{what} {value!r} is not {SIZE_HELP}")
        n = int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])
    if n <= 0:
        raise HollownetError(f"{what} {value!r} must be positive")
    return n
