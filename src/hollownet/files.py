"""hollownet's file-writing library: every file it writes goes through :func:`write_bytes`.

A write goes to a temporary name of this writer only (PID and a counter) in the same folder, is
fsynced, then renamed over the target, so a crash leaves either the old or the new file, never half
of one; the temp file is removed on any error, and disk errors (a full disk, a quota, a read-only or
forbidden folder) become one :class:`~hollownet.errors.HollownetError` line. Temp files whose writer
died (kill -9) are removed by :func:`remove_stale_temps`. Also here: JSON records read back with a
one-line error for a damaged file, and the size / SHA-256 records that find a damaged file on resume.

The ground floor: imports nothing of hollownet but ``errors``.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import re
import shutil
from pathlib import Path

import torch

from hollownet.errors import HollownetError

# errno -> (what happened, what to do); the one line a user sees for a failed write of any kind
DISK_ERRORS = {
    errno.ENOSPC: ("no space left on device", "free some space or pick another --output"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or pick another --output"),
    errno.EROFS: ("read-only file system", "pick a writable --output"),
    errno.EACCES: ("permission denied", "pick a writable --output or fix its permissions"),
    errno.EPERM: ("operation not permitted", "pick a writable --output or fix its permissions"),
}
RESUME_HINT = "; finished work is kept: rerun the same command to resume"


def disk_error(e: BaseException, path: Path | str) -> HollownetError | None:
    """The one-line error for a failed write of ``path``, or None if ``e`` is not a disk problem.

    OSErrors carry their errno; libraries that raise their own errors (safetensors'
    SafetensorError, torch.save's RuntimeError) are recognized by the OS message they quote.
    """
    code = getattr(e, "errno", None)
    if code not in DISK_ERRORS:
        text = str(e)
        code = next((c for c in DISK_ERRORS if f"os error {c})" in text or os.strerror(c) in text), None)
        if code is None:
            return None
    what, fix = DISK_ERRORS[code]
    return HollownetError(f"{what} writing {path}: {fix}{RESUME_HINT if code in (errno.ENOSPC, errno.EDQUOT) else ''}")


_TEMPS = itertools.count()
TEMP_RE = re.compile(r"\.pid(\d+)-\d+\.tmp$")


def temp_name(path: Path) -> Path:
    """A temp name of this writer only (PID and a counter): two writers never share one."""
    return path.with_name(f".{path.name}.pid{os.getpid()}-{next(_TEMPS)}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a temp file's or a lock's writer)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temps(folder: Path, pattern: str = ".*.tmp") -> None:
    """Temp files whose writer is gone (kill -9 mid-write), and unnamed ones of older versions; a live
    writer's (this process's other threads included) are left alone."""
    for p in Path(folder).glob(pattern):
        m = TEMP_RE.search(p.name)
        if m and (int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1)))):
            continue
        try:
            p.unlink()
        except IsADirectoryError:
            shutil.rmtree(p, ignore_errors=True)
        except FileNotFoundError:
            pass


def write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, rename.

    On any error (a full disk, a signal, Ctrl-C) the temp file is removed and ``path`` is left as
    it was; disk errors (ENOSPC, EDQUOT, EROFS, EACCES) become one :class:`HollownetError` line.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # e.g. a bench cell that failed before making its folder
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        mapped = disk_error(e, path) if isinstance(e, Exception) else None
        if mapped is not None:
            raise mapped from None
        raise


def append_line(path: Path | str, line: bytes) -> None:
    """Append one ``\n``-ended line to ``path`` and fsync: a constant cost however long the file is.

    A line cut off by a kill -9 mid-append is dropped first (the file is cut back to its last newline), so
    every line before this one is whole; disk errors become one :class:`HollownetError` line, as in :func:`write_bytes`.
    """
    path = Path(path)
    try:
        with open(path, "ab+") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":  # a half-written last line: keep what precedes it
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
            f.write(line.rstrip(b"\n") + b"\n")
            f.flush()
            os.fsync(f.fileno())
    except Exception as e:
        mapped = disk_error(e, path)
        if mapped is not None:
            raise mapped from None
        raise


def read_lines_json(path: Path | str) -> list[dict]:
    """The JSON objects of an :func:`append_line` file, in order; a line that does not parse (cut off, damaged)
    is skipped: what it recorded counts as not done."""
    path = Path(path)
    if not path.is_file():
        return []
    out = []
    for raw in path.read_bytes().split(b"\n"):
        try:
            obj = json.loads(raw.decode("utf-8"))
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def atomic_write(path: Path, write) -> None:
    """``write(file)`` into memory, then :func:`write_bytes`: one atomic, error-mapped write path.

    ``write`` gets a binary file object (``torch.save(obj, f)``, ``image.save(f, "PNG")``...).
    """
    import io

    buf = io.BytesIO()
    write(buf)
    write_bytes(path, buf.getvalue())


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    data = save(tensors, metadata=metadata)
    write_bytes(path, _sorted_metadata(data) if metadata and len(metadata) > 1 else data)


def _sorted_metadata(data: bytes) -> bytes:
    """The same file with its ``__metadata__`` keys in sorted order.

    safetensors keeps metadata in a Rust HashMap, whose order changes from one process (one map)
    to the next, so two saves of the same LoRA could differ in their header bytes. Sorted, the
    same tensors and metadata always give the same bytes. The header keeps its length (padded
    with spaces, as the format allows); if it would not fit, the bytes are returned unchanged.
    """
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    if meta is None:
        return data
    text = json.dumps({"__metadata__": dict(sorted(meta.items())), **header}, separators=(",", ":"),
                      ensure_ascii=False).encode()
    if len(text) > n:
        return data
    return data[:8] + text + b" " * (n - len(text)) + data[8 + n :]


def save_json(path: Path, obj: dict) -> None:
    write_bytes(path, json.dumps(obj, indent=2).encode())


def read_json(path: Path | str, fix: str) -> dict:
    """A JSON record hollownet wrote (a manifest, hollownet.json, train.json...). A damaged one (garbage,
    truncated, not UTF-8) is one line naming the file and ``fix``, never a JSONDecodeError traceback."""
    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise HollownetError(f"cannot read '{path}' ({e.strerror or e}); {fix}") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
        why = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
        raise HollownetError(f"'{path}' is damaged (not valid JSON: {why}); {fix}") from None
    if not isinstance(data, dict):
        raise HollownetError(f"'{path}' is damaged (a JSON {type(data).__name__}, not an object); {fix}")
    return data


def save_torch(path: Path, obj) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save_image(path: Path, image, format: str = "PNG") -> None:
    atomic_write(path, lambda f: image.save(f, format))


def check_writable(folder: Path | str, flag: str = "--output") -> Path:
    """Refuse, before any model loads, an output folder that is a file or cannot be written.

    Creates nothing: the nearest existing ancestor is probed with a temp file.
    """
    import tempfile

    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise HollownetError(f"{flag} '{folder}' is an existing file, not a folder: pick another {flag}")
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise HollownetError(f"{flag} '{folder}' is inside '{probe}', which is a file: pick another {flag}")
    try:
        fd, name = tempfile.mkstemp(prefix=".hollownet-probe-", dir=probe)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        what, fix = DISK_ERRORS.get(e.errno, (e.strerror or str(e), f"pick a writable {flag}"))
        raise HollownetError(f"{what}: cannot write to {flag} '{folder}': {fix.replace('--output', flag)}") from None
    return folder


def tensor_digest(obj) -> str:
    """SHA-256 of every tensor in ``obj`` (nested dicts / lists / tuples), in order: a checksum a torch.save
    file can carry inside itself (torch.load verifies none)."""
    h = hashlib.sha256()

    def walk(o):
        if isinstance(o, torch.Tensor):
            t = o.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")  # no copy: the buffer itself
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(str(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_damage(path: Path, record: dict | None) -> str | None:
    """Why ``path`` is not the file that was written, or None."""
    size = path.stat().st_size
    if record:
        if size != record["bytes"]:
            return f"{size} bytes, {record['bytes']} written"
        return None if sha256_file(path) == record["sha256"] else "its checksum differs from the one written"
    return safetensors_damage(path, size)


def safetensors_damage(path: Path, size: int) -> str | None:
    """A cheap check without a record: the header parses and its tensors end exactly at the file's end."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or 8 + n > size:
                return "its header is cut off"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, OSError):
        return "its header is not valid safetensors"
    return None if 8 + n + end == size else f"{size} bytes, its header says {8 + n + end}"
