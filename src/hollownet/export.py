"""Stage 4: the trained LoRA, written for the FULL U-Net in the diffusers/peft layout.

The hollowed U-Net keeps the full model's module names, so its LoRA keys are already the full
U-Net's: ``StableDiffusionPipeline.load_lora_weights(dir)`` loads the file with no conversion.
Beside it, ``hollownet.json`` records the cut and the settings that ``generate`` needs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

from .store import save_json, save_tensors

LORA_FILE = "pytorch_lora_weights.safetensors"
INFO_FILE = "hollownet.json"
ADAPTER = "default"


def lora_state_dict(unet: nn.Module, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """The LoRA tensors of ``unet`` under diffusers' key names (``...lora.down.weight``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    name = adapter or next(iter(unet.peft_config))
    state = get_peft_model_state_dict(unet, adapter_name=name)
    return {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}


def save_lora(unet: nn.Module, out_dir: str | Path, info: dict, adapter: str | None = None) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (+ LoRA config metadata) and ``hollownet.json``."""
    from diffusers import StableDiffusionPipeline

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = adapter or next(iter(unet.peft_config))
    metadata = unet.peft_config[name].to_dict()
    metadata = json.loads(json.dumps(metadata, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    # diffusers' own writer, with its metadata, through the one atomic write path (store.write_bytes):
    # a crash or a full disk never leaves half a LoRA file.
    def save_function(weights, filename):
        from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

        packed = {f"unet.{k}": v for k, v in metadata.items()}  # as diffusers' own writer packs it
        meta = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(packed, indent=2, sort_keys=True)}
        save_tensors(Path(filename), weights, metadata=meta)

    shutil.rmtree(out_dir / ".lora.tmp", ignore_errors=True)  # left by an older version
    StableDiffusionPipeline.save_lora_weights(
        out_dir, unet_lora_layers=lora_state_dict(unet, name), unet_lora_adapter_metadata=metadata,
        safe_serialization=True, save_function=save_function, weight_name=LORA_FILE,
    )
    save_json(out_dir / INFO_FILE, info)
    return out_dir / LORA_FILE


def read_info(lora_dir: str | Path) -> dict:
    from .errors import HollownetError

    path = Path(lora_dir) / INFO_FILE
    if not (Path(lora_dir) / LORA_FILE).exists():
        raise HollownetError(f"no {LORA_FILE} in '{lora_dir}'; pass the --output folder of 'hollownet train'")
    return json.loads(path.read_text()) if path.exists() else {}
