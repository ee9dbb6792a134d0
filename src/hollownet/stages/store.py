"""The pre-compute store: what stage 1 writes and stage 2 reads (like nanoGPT's prepare.py output).

A folder of safetensors files plus ``manifest.json``::

    manifest.json          identity (model fingerprint, cut, resolution, dtype, seed) + progress
    prompts.safetensors    "embeds" [P, L, D]: text-encoder output per prompt
    latents.safetensors    "latents" [N, 4, h, w]: VAE latents per photo (scaled)
    shard-00000.safetensors  per sample: "noisy", "target", "timestep", "prompt_index", "weight",
                             and "hollow_out" (the activation the hollow hands to the first kept up unit)

Every file is written to a temporary name and renamed (``files.write_bytes``, the one write path of
hollownet: temp file removed on any error, disk errors mapped to one line), so a crash leaves either the old or the
new file, never half of one. The manifest lists finished shards; a rerun computes only the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from hollownet.errors import HollownetError
from hollownet.files import file_damage, file_record, read_json, save_json

FORMAT = "hollownet-store/1"
IDENTITY_KEYS = ("model_fingerprint", "method", "hollow_blocks", "resolution", "dtype", "seed", "num_samples", "photos", "prompts", "prediction_type")


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


def _short(v) -> str:
    s = json.dumps(v) if not isinstance(v, str) else v
    return s if len(s) <= 60 else s[:57] + "..."
