"""The pre-compute store: what stage 1 writes and stage 2 reads (like nanoGPT's prepare.py output).

A folder of safetensors files plus ``manifest.json``::

    manifest.json          identity (model fingerprint, cut, resolution, dtype, seed) + progress
    prompts.safetensors    "embeds" [P, L, D]: text-encoder output per prompt
    latents.safetensors    "latents" [N, 4, h, w]: VAE latents per photo (scaled)
    shard-00000.safetensors  per sample: "noisy", "target", "timestep", "prompt_index", "weight",
                             and "hollow_out" (the activation the hollow hands to the first kept up unit)

Every file is written to a temporary name and renamed (``write_bytes``, the one write path of
hollownet: temp file removed on any error, disk errors mapped to one line), so a crash leaves either the old or the
new file, never half of one. The manifest lists finished shards; a rerun computes only the rest.
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
from safetensors import safe_open

from hollownet.errors import HollownetError
from hollownet.lock import pid_alive

FORMAT = "hollownet-store/1"
IDENTITY_KEYS = ("model_fingerprint", "method", "hollow_blocks", "resolution", "dtype", "seed", "num_samples", "photos", "prompts", "prediction_type")


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


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class Store:
    """Read/write access to one store folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self._open: dict[int, object] = {}

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        if not self.exists():
            raise HollownetError(f"no pre-compute store at '{self.root}' (manifest.json missing); run stage 1 first")
        return read_json(self.manifest_path, f"delete the store folder '{self.root}' and rerun to compute it again")

    def write_manifest(self, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_json(self.manifest_path, manifest)

    def check_identity(self, expected: dict) -> None:
        """Refuse a store made for another model, cut, resolution, dtype, seed, photos or prompts."""
        have = self.manifest()
        for key in IDENTITY_KEYS:
            if key in expected and have.get(key) != expected[key]:
                raise HollownetError(
                    f"the store in '{self.root}' was made with a different {key} "
                    f"({_short(have.get(key))} vs {_short(expected[key])}); use a new --output folder or delete that store"
                )

    def done_shards(self) -> set[int]:
        m = self.manifest()
        return {i for i in m.get("done_shards", []) if (self.root / shard_name(i)).exists()}

    def mark_done(self, shard: int) -> None:
        m = self.manifest()
        m["done_shards"] = sorted(set(m.get("done_shards", [])) | {shard})
        m.setdefault("files", {})[shard_name(shard)] = file_record(self.root / shard_name(shard))
        self.write_manifest(m)

    def record(self, name: str) -> None:
        """Note a finished file's size and SHA-256 in the manifest, for :meth:`damaged` to check on resume."""
        m = self.manifest()
        m.setdefault("files", {})[name] = file_record(self.root / name)
        self.write_manifest(m)

    def damaged(self) -> dict[str, str]:
        """Finished files that are not what was written: name -> why (size, checksum, or for a store made
        before checksums were recorded, a safetensors header that does not fit the file's length)."""
        m = self.manifest()
        names = [shard_name(i) for i in sorted(self.done_shards())]
        names += [n for n in ("prompts.safetensors", "latents.safetensors", "validation.safetensors")  # the held-out samples
                  if (self.root / n).exists()]
        bad = {}
        for name in names:
            why = file_damage(self.root / name, (m.get("files") or {}).get(name))
            if why:
                bad[name] = why
        return bad

    def forget(self, name: str) -> None:
        """Delete a damaged file and its record, so the resumed run computes it again."""
        m = self.manifest()
        m["done_shards"] = [i for i in m.get("done_shards", []) if shard_name(i) != name]
        (m.get("files") or {}).pop(name, None)
        (self.root / name).unlink(missing_ok=True)
        self.write_manifest(m)

    def is_complete(self) -> bool:
        return self.exists() and len(self.done_shards()) == self.manifest()["num_shards"]

    # reading, for stage 2
    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        with safe_open(self.root / name, framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def samples(self, indices: list[int], keys=("noisy", "target", "timestep", "prompt_index", "weight", "hollow_out")) -> dict[str, torch.Tensor]:
        """A batch of samples, reading only their rows from the shards (safetensors slices)."""
        size = self.manifest()["shard_size"]
        rows: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for i in indices:
            f = self._shard(i // size)
            r = i % size
            for k in keys:
                if k in f.keys():
                    rows[k].append(f.get_slice(k)[r : r + 1])
        return {k: torch.cat(v) for k, v in rows.items() if v}

    def _shard(self, i: int):
        if i not in self._open:
            self._open[i] = safe_open(self.root / shard_name(i), framework="pt")
        return self._open[i]


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


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."
