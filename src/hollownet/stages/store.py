"""The pre-compute store: what stage 1 writes and stage 2 reads (like nanoGPT's prepare.py output).

A folder of safetensors files plus ``manifest.json``::

    manifest.json          identity (model fingerprint, cut, resolution, dtype, seed) + progress
    prompts.safetensors    "embeds" [P, L, D]: text-encoder output per prompt
    latents.safetensors    "latents" [N, 4, h, w]: VAE latents per photo (scaled)
    shard-00000.safetensors  per sample: "noisy", "target", "timestep", "prompt_index", "weight",
                             and "hollow_out" (the activation the hollow hands to the first kept up unit)

Every file is written to a temporary name and renamed (``files.write_bytes``, the one write path of
hollownet: temp file removed on any error, disk errors mapped to one line), so a crash leaves either the old or the
new file, never half of one. A finished file's size and SHA-256 are appended to ``progress.jsonl`` (one short
line, fsynced: a cost that does not grow with the number of shards, where rewriting a manifest holding a
200,000-sample table after each of 3,125 shards did); :meth:`Store.finish` folds them into the manifest
(``done_shards``, ``files``) at the end of stage 1. A rerun computes only the shards neither lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hollownet.errors import HollownetError
from hollownet.files import append_line, file_damage, file_record, read_json, read_lines_json, save_json

FORMAT = "hollownet-store/1"
PROGRESS = "progress.jsonl"  # finished files since the manifest was last written: {"file", "bytes", "sha256"[, "shard"]}
IDENTITY_KEYS = ("model_fingerprint", "method", "hollow_blocks", "resolution", "dtype", "seed", "num_samples", "photos", "prompts", "prediction_type")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


class Store:
    """Read/write access to one store folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.manifest_path = self.root / "manifest.json"
        self.progress_path = self.root / PROGRESS
        self._open: dict[int, object] = {}
        self._manifest: dict | None = None  # read once: only this store's writer changes it (output_lock)

    def exists(self) -> bool:
        return self.manifest_path.exists()

    def manifest(self) -> dict:
        """The manifest as written (its progress: :meth:`done_shards`, :meth:`records`)."""
        if self._manifest is None:
            if not self.exists():
                raise HollownetError(f"no pre-compute store at '{self.root}' (manifest.json missing); run stage 1 first")
            self._manifest = read_json(self.manifest_path, f"delete the store folder '{self.root}' and rerun to compute it again")
        return self._manifest

    def write_manifest(self, manifest: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        save_json(self.manifest_path, manifest)
        self._manifest = manifest

    def check_identity(self, expected: dict) -> None:
        """Refuse a store made for another model, cut, resolution, dtype, seed, photos or prompts."""
        have = self.manifest()
        for key in IDENTITY_KEYS:
            if key in expected and have.get(key) != expected[key]:
                raise HollownetError(
                    f"the store in '{self.root}' was made with a different {key} "
                    f"({_short(have.get(key))} vs {_short(expected[key])}); use a new --output folder or delete that store"
                )

    def _progress(self) -> tuple[set[int], dict[str, dict]]:
        """(finished shards, file name -> size and SHA-256): the manifest's, then ``progress.jsonl``'s."""
        m = self.manifest()
        shards, files = set(m.get("done_shards", [])), dict(m.get("files") or {})
        for line in read_lines_json(self.progress_path):
            if isinstance(line.get("file"), str) and "bytes" in line and "sha256" in line:
                files[line["file"]] = {"bytes": line["bytes"], "sha256": line["sha256"]}
                if isinstance(line.get("shard"), int):
                    shards.add(line["shard"])
        return shards, files

    def records(self) -> dict[str, dict]:
        """File name -> the size and SHA-256 it was written with."""
        return self._progress()[1]

    def done_shards(self) -> set[int]:
        return {i for i in self._progress()[0] if (self.root / shard_name(i)).exists()}

    def mark_done(self, shard: int) -> None:
        """Shard ``shard`` is written (call after its file is in place): one line in ``progress.jsonl``."""
        append_line(self.progress_path, json.dumps({"shard": shard, "file": shard_name(shard),
                                                    **file_record(self.root / shard_name(shard))}).encode())

    def record(self, name: str) -> None:
        """Note a finished file's size and SHA-256, for :meth:`damaged` to check on resume."""
        append_line(self.progress_path, json.dumps({"file": name, **file_record(self.root / name)}).encode())

    def finish(self, drop: str | None = None) -> None:
        """Fold ``progress.jsonl`` into the manifest (one rewrite; the end of stage 1), without file ``drop``'s record."""
        if drop is None and not self.progress_path.exists():
            return
        shards, files = self._progress()
        files.pop(drop, None)
        m = {**self.manifest(), "done_shards": sorted(i for i in shards if shard_name(i) != drop), "files": files}
        self.write_manifest(m)
        self.progress_path.unlink(missing_ok=True)  # killed before this: its lines repeat the manifest's, harmless

    def damaged(self) -> dict[str, str]:
        """Finished files that are not what was written: name -> why (size, checksum, or for a store made
        before checksums were recorded, a safetensors header that does not fit the file's length)."""
        records = self.records()
        names = [shard_name(i) for i in sorted(self.done_shards())]
        names += [n for n in ("prompts.safetensors", "latents.safetensors", "validation.safetensors")  # the held-out samples
                  if (self.root / n).exists()]
        bad = {}
        for name in names:
            why = file_damage(self.root / name, records.get(name))
            if why:
                bad[name] = why
        return bad

    def forget(self, name: str) -> None:
        """Delete a damaged file and its record, so the resumed run computes it again."""
        self.finish(drop=name)
        (self.root / name).unlink(missing_ok=True)

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


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."
