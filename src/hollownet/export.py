"""Stage 4: the trained LoRA, written for the FULL U-Net in the diffusers/peft layout.

The hollowed U-Net keeps the full model's module names, so its LoRA keys are already the full
U-Net's: ``StableDiffusionPipeline.load_lora_weights(dir)`` loads the file with no conversion.
Beside it, ``hollownet.json`` records the cut and the settings that ``generate`` needs.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from .store import save_json

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
    # Written into a scratch folder and renamed, so a crash never leaves half a LoRA file.
    tmp = out_dir / ".lora.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=lora_state_dict(unet, name), unet_lora_adapter_metadata=metadata, safe_serialization=True
    )
    os.replace(tmp / LORA_FILE, out_dir / LORA_FILE)
    shutil.rmtree(tmp, ignore_errors=True)
    save_json(out_dir / INFO_FILE, info)
    return out_dir / LORA_FILE


def read_info(lora_dir: str | Path) -> dict:
    from .errors import HollownetError

    path = Path(lora_dir) / INFO_FILE
    if not (Path(lora_dir) / LORA_FILE).exists():
        raise HollownetError(f"no {LORA_FILE} in '{lora_dir}'; pass the --output folder of 'hollownet train'")
    return json.loads(path.read_text()) if path.exists() else {}
