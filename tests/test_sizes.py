"""hollownet.memory.sizes: the one rule for reading and writing sizes, and it stays torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from hollownet.errors import HollownetError
from hollownet.memory.sizes import SIZE_HELP, format_bytes, parse_size


def test_sizes_import_without_torch():
    # torch-free by design: reading or writing a size must not load torch
    code = "import sys, hollownet.memory.sizes; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(4000) == "3.91 KiB"
    assert format_bytes(3 * 1024**2) == "3.00 MiB"
    assert format_bytes(int(1.5 * 1024**3)) == "1.50 GiB"
    assert format_bytes(None) == "n/a"


def test_parse_size_unit_rules():
    # SI units are powers of 1000, IEC units and the one-letter forms powers of 1024, a bare number bytes
    assert [parse_size(f"2{u}") for u in ("KB", "MB", "GB", "TB")] == [2 * 10**3, 2 * 10**6, 2 * 10**9, 2 * 10**12]
    assert [parse_size(f"2{u}") for u in ("KiB", "MiB", "GiB", "TiB")] == [2 * 2**10, 2 * 2**20, 2 * 2**30, 2 * 2**40]
    assert [parse_size(f"2{u}") for u in ("k", "M", "g", "T")] == [2 * 2**10, 2 * 2**20, 2 * 2**30, 2 * 2**40]
    assert parse_size("4096") == parse_size("4096B") == parse_size(4096) == 4096
    assert parse_size(" 1.5 GiB ") == int(1.5 * 2**30) and parse_size(".5gb") == 5 * 10**8 and parse_size(2.7) == 2


def test_parse_size_refuses_bad_input_in_one_line():
    for bad, why in (("lots", "is not a size"), ("3 parsecs", "is not a size"), ("-1GiB", "is not a size"),
                     ("1e9", "is not a size"), ("", "is not a size"), (True, "is not a size"),
                     (0, "must be positive"), ("0MiB", "must be positive"), ("0.1B", "must be positive")):
        with pytest.raises(HollownetError, match=why) as e:
            parse_size(bad, "--budget")
        assert str(e.value).startswith("--budget ") and "\n" not in str(e.value), bad
    assert SIZE_HELP in str(pytest.raises(HollownetError, parse_size, "big").value)
