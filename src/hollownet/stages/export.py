"""Stage 4: the trained LoRA, written for the FULL U-Net in the diffusers/peft layout.

The hollowed U-Net keeps the full model's module names, so its LoRA keys are already the full
U-Net's: the family's pipeline (``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``)
``load_lora_weights(dir)`` loads the file with no conversion.
Beside it, ``hollownet.json`` records the cut and the settings that ``generate`` needs, and (by
default) ``pytorch_lora_weights_kohya.safetensors`` holds the same LoRA in the kohya layout that
ComfyUI, Forge and AUTOMATIC1111 read (``formats.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from diffusers.utils import convert_state_dict_to_diffusers
from peft.utils import get_peft_model_state_dict
from torch import nn

from hollownet.errors import HollownetError
from hollownet.families import SD_FAMILY, Family
from hollownet.settings import DEFAULT_LORA_FORMAT, LORA_FORMATS
from hollownet.stages import formats
from hollownet.files import read_json, save_json, save_tensors

LORA_FILE = formats.DIFFUSERS_FILE
INFO_FILE = "hollownet.json"
ADAPTER = "default"
INFO_FIX = ("rerun 'hollownet train' with the same --output to write it again, or copy it from a backup "
            "(without it a hollow LoRA cannot run two-path)")


def lora_state_dict(unet: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``unet`` under diffusers' key names (``...lora.down.weight``)."""
    name = adapter or next(iter(unet.peft_config))
    state = get_peft_model_state_dict(unet, adapter_name=name)
    converted = convert_state_dict_to_diffusers(state)
    if any(".lora_A." in k for k in converted) and any(".lora.down." in k for k in converted):
        # The converter renames only attention projections (to_q/k/v/out.0). With other targets too
        # (proj_in, conv1 ...) the keys would be mixed, and load_lora_weights picks the layout from the
        # first key: it silently dropped the attention layers. peft's names throughout load fully.
        converted = state
    return {k: v.detach().float().cpu().contiguous() for k, v in converted.items()}


def save_lora(unet: nn.Module, out_dir: str | Path, info: dict, adapter: str | None = None,
              lora_format: str = DEFAULT_LORA_FORMAT, family: Family = SD_FAMILY) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (+ LoRA config metadata) and/or its kohya twin, and ``hollownet.json``.

    ``lora_format``: diffusers, kohya or both; ``family``: whose pipeline writes the file. Returns the path
    of the first file written.
    """
    if lora_format not in LORA_FORMATS:
        raise HollownetError(f"--format {lora_format!r} is not one of {', '.join(LORA_FORMATS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = adapter or next(iter(unet.peft_config))
    metadata = unet.peft_config[name].to_dict()
    metadata = json.loads(json.dumps(metadata, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    version = formats.base_model_version(unet.config)
    info = {**info, "base_model_version": version, "lora_files": []}
    if lora_format in ("diffusers", "both"):
        # diffusers' own writer, with its metadata, through the one atomic write path (files.write_bytes):
        # a crash or a full disk never leaves half a LoRA file.
        def save_function(weights, filename):
            packed = {f"unet.{k}": v for k, v in metadata.items()}  # as diffusers' own writer packs it
            meta = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
            save_tensors(Path(filename), weights, metadata=meta)

        shutil.rmtree(out_dir / ".lora.tmp", ignore_errors=True)  # left by an older version
        family.pipeline_class().save_lora_weights(
            out_dir, unet_lora_layers=lora_state_dict(unet, name), unet_lora_adapter_metadata=metadata,
            safe_serialization=True, save_function=save_function, weight_name=LORA_FILE,
        )
        info["lora_files"].append(LORA_FILE)
    if lora_format in ("kohya", "both"):
        lora = formats.from_peft_model(unet, name)
        meta = formats.kohya_metadata(lora, base_model_version=version, method=info.get("method"),
                                      hollow_blocks=info.get("hollow_blocks"))
        formats.write_kohya(lora, out_dir / formats.KOHYA_FILE, meta, unet_config=unet.config)
        info["lora_files"].append(formats.KOHYA_FILE)
    save_json(out_dir / INFO_FILE, info)
    return out_dir / info["lora_files"][0]


def read_info(lora_dir: str | Path) -> dict:
    path = Path(lora_dir) / INFO_FILE
    if not any((Path(lora_dir) / f).exists() for f in (LORA_FILE, formats.KOHYA_FILE)):
        raise HollownetError(f"no {LORA_FILE} (or {formats.KOHYA_FILE}) in '{lora_dir}'; pass the --output folder of 'hollownet train'")
    return read_json(path, INFO_FIX) if path.exists() else {}


def lora_weight_name(lora_dir: str | Path) -> str:
    """The file in a LoRA folder that ``load_lora_weights`` should read: the diffusers one, else the kohya one."""
    return formats.lora_file(lora_dir).name


# --save-every snapshots (stages/watch.py writes them; generate --step reads them)
SNAPSHOTS = "snapshots"


def step_name(step: int) -> str:
    return f"step-{step:04d}"


def snapshot_dir(lora: str | Path, step: int) -> Path:
    """``hollownet generate --lora OUT --step N``: the snapshot folder, or one line listing those there are."""
    folder = Path(lora) / SNAPSHOTS / step_name(step)
    if folder.is_dir():
        return folder
    have = sorted(p.name for p in (Path(lora) / SNAPSHOTS).glob("step-*") if p.is_dir())
    listed = ", ".join(str(int(n[5:])) for n in have) if have else "none (train with --save-every N to make them)"
    raise HollownetError(f"'{lora}' has no snapshot at step {step}; the snapshots there are at steps: {listed}")
