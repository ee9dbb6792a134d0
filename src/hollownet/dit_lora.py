"""Loading exactly one side of a prefix cut, LoRA on the suffix, and the LoRA in diffusers' SD3 layout.

Stage 1 needs the prefix (embedders, blocks ``0..k-1``) and stage 2 the suffix (blocks ``k..N-1``, the
output layers): each is built on the meta device and reads only its own tensors from the transformer's
safetensors file(s), so training never reads the prefix. The LoRA sits in the suffix only, under the
full model's module names, so the file it is saved to (``transformer.<name>.lora_A.weight`` ...) is a
LoRA for the whole transformer: ``StableDiffusion3Pipeline.load_lora_weights`` takes it and computes
exactly what training trained.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from hollownet.dit_cut import SD3_LORA_TARGETS, suffix_lora_targets
from hollownet.dit_split import check_k, check_supported, prefix_modules, suffix_modules
from hollownet.errors import HollownetError
from hollownet.loading import is_under, read_tensors, weight_files

PARTS = ("prefix", "suffix")


def load_part(model_dir: str | Path, k: int, part: str, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> tuple[nn.Module, list[str]]:
    """The transformer of a diffusers SD3 folder with only ``part`` (``prefix``: stage 1's, ``suffix``:
    stage 2's) loaded; everything else stays on the meta device. Returns it and the tensor names read."""
    # diffusers is heavy to import: only the loaders need its model class
    from diffusers import SD3Transformer2DModel

    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, not {part!r}")
    folder = Path(model_dir) / "transformer"
    if not (folder / "config.json").exists():
        raise HollownetError(f"'{model_dir}' has no transformer/config.json; give an SD3 / SD3.5 diffusers folder")
    with torch.device("meta"):
        transformer = SD3Transformer2DModel.from_config(SD3Transformer2DModel.load_config(folder))
    check_supported(transformer)
    check_k(transformer, k)
    keep = prefix_modules(transformer, k) if part == "prefix" else suffix_modules(transformer, k)
    files = weight_files(Path(model_dir), "transformer")
    wanted = [name for name in transformer.state_dict() if is_under(name, keep)]
    missing = [name for name in wanted if name not in files]
    if missing:
        raise HollownetError(f"transformer checkpoint in '{model_dir}' lacks {len(missing)} tensors (e.g. {missing[0]}); is it complete?")
    transformer.load_state_dict(read_tensors(files, wanted, dtype=dtype, device=device), strict=False, assign=True)
    unset = [n for n, t in [*transformer.named_parameters(), *transformer.named_buffers()] if t.is_meta and is_under(n, keep)]
    if unset:  # a buffer the file does not hold (PatchEmbed's positions without pos_embed_max_size)
        raise HollownetError(f"the {part} needs {unset[0]}, which the checkpoint does not hold; set pos_embed_max_size in its config")
    transformer.requires_grad_(False).eval()
    return transformer, wanted


def add_suffix_lora(transformer: nn.Module, k: int, rank: int, *, alpha: float | None = None,
                    targets: tuple[str, ...] = SD3_LORA_TARGETS, init: bool | str = True) -> list[str]:
    """LoRA (peft, via diffusers' ``add_adapter``) on the suffix's target modules only, named as in the
    full transformer; trainable. ``init=True`` starts it at zero (B = 0), as training does."""
    from peft import LoraConfig  # peft loads only where a LoRA is made

    names = suffix_lora_targets(transformer, k, targets)
    if not names:
        raise HollownetError(f"no LoRA target ({', '.join(targets)}) is left after prefix k={k}; pick a smaller k")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha, init_lora_weights=init,
                                       target_modules=names))
    return names


def lora_state_dict(transformer: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors under the full transformer's module names (peft's ``lora_A.weight`` / ``lora_B.weight``)."""
    from peft.utils import get_peft_model_state_dict  # peft loads only where a LoRA is saved

    return get_peft_model_state_dict(transformer)


def save_sd3_lora(transformer: nn.Module, folder: str | Path) -> Path:
    """``folder/pytorch_lora_weights.safetensors`` in diffusers' SD3 layout (``transformer.<name>...``), with
    the adapter's config (rank, alpha) as metadata, so ``load_lora_weights`` restores the true scale."""
    # the pipeline class carries diffusers' SD3 LoRA writer; only saving needs it
    from diffusers import StableDiffusion3Pipeline

    config = transformer.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])  # a set: JSON needs a list
    StableDiffusion3Pipeline.save_lora_weights(folder, transformer_lora_layers=lora_state_dict(transformer),
                                               transformer_lora_adapter_metadata=config)
    return Path(folder) / "pytorch_lora_weights.safetensors"
