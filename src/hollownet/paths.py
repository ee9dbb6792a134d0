"""Path checks that need no torch: the CLI runs them first, so a mistyped --model, --images, --lora or --output
is refused in one line before the seconds torch takes to import (``checks.py`` does the rest, after).
"""

from __future__ import annotations

import re
from pathlib import Path

from hollownet.errors import HollownetError
from hollownet.toy import NAME as TOY

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")  # single-file SD checkpoints (singlefile.py)

# short names people type for the base models hollownet trains -> their hub ids ('hollownet plan' knows
# sd15 / sd21 / sdxl by their bundled configs; train and generate need the weights)
HUB_IDS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd14": "CompVis/stable-diffusion-v1-4",
    "sd21": "stabilityai/stable-diffusion-2-1",
    "sd21base": "stabilityai/stable-diffusion-2-1-base",
    "sd20": "stabilityai/stable-diffusion-2",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
}
ALIASES = {"sd1": "sd15", "sdv15": "sd15", "sd2": "sd21", "sdv21": "sd21", "sd2base": "sd21base", "sdxl10": "sdxl",
           "sdxlbase": "sdxl", "sdxlbase10": "sdxl", "sdv14": "sd14"}


def hub_id_for(name: str) -> str | None:
    """The hub id a short model name (``sd21``, ``SD-2.1``, ``sd15``, ``sdxl``...) stands for, or None."""
    key = re.sub(r"[\s._-]", "", name.lower())
    key = ALIASES.get(key, key)
    return HUB_IDS.get(key)


def check_model_path(model: str) -> None:
    """A local-looking --model that does not exist is a mistyped path (or a short name), not a hub id."""
    text = str(model)
    if text == TOY:  # the bundled toy model
        return
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            raise HollownetError(f"--model '{model}' is a file but not a .safetensors / .ckpt checkpoint: pass a "
                                 "diffusers model folder or a single-file SD checkpoint")
        return
    hub = hub_id_for(text)
    if hub is not None:
        also = " (stabilityai/stable-diffusion-2-1-base for its 512 px model)" if hub.endswith("2-1") else ""
        raise HollownetError(f"--model '{model}' is not a folder here; for that model pass its hub id, --model {hub}{also}, "
                             "or a local diffusers folder of it")
    looks_local = text.startswith((".", "/", "~")) or "\\" in text or text.count("/") != 1
    first = Path(text.split("/")[0]).expanduser()
    if looks_local or (text.count("/") == 1 and first.is_dir()):
        nearest = path
        while not nearest.exists() and nearest.parent != nearest:
            nearest = nearest.parent
        raise HollownetError(f"model folder '{model}' does not exist (nearest existing folder: '{nearest}'); "
                             "check the path")


def check_input_folder(folder: str | Path, flag: str = "--images") -> Path:
    """An input folder that exists and is a folder."""
    path = Path(folder).expanduser()
    if not path.exists():
        raise HollownetError(f"{flag} folder '{folder}' not found: check the path")
    if not path.is_dir():
        raise HollownetError(f"{flag} '{folder}' is a file: pass the folder that holds the photos")
    return path


def check_output_path(folder: str | Path, flag: str = "--output") -> None:
    """An output folder that is not a file, nor inside one (whether it can be written: ``check_writable``)."""
    folder = Path(folder).expanduser()
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        where = "an existing file, not a folder" if probe == folder else f"inside '{probe}', which is a file"
        raise HollownetError(f"{flag} '{folder}' is {where}: pick another {flag}")


def preflight_paths(command: str, args) -> None:
    """``train`` / ``generate``'s paths, from the parsed flags, before torch is imported."""
    if command not in ("train", "generate"):
        return
    check_model_path(args.model)
    if command == "train":
        check_input_folder(args.images)
        if args.class_images:
            check_input_folder(args.class_images, "--class-images")
    elif args.lora is not None and not Path(args.lora).expanduser().exists():
        raise HollownetError(f"--lora '{args.lora}' not found: pass the --output folder of 'hollownet train'")
    check_output_path(args.output)
