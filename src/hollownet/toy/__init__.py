"""The bundled toy text-to-image model: a shapes world in the exact Stable Diffusion pipeline layout.

``model_dir()`` is its diffusers folder (``StableDiffusionPipeline.from_pretrained`` loads it); the
CLI takes it as ``--model toy``. Its quality figures are the toy's, never Stable Diffusion's.
``world`` holds the palette, shapes, captions and renderer; ``evaluator`` the toy scores;
``pretrain`` the script that made the weights.
"""

from __future__ import annotations

import os
from pathlib import Path

NAME = "toy"


def model_dir() -> Path:
    """The bundled model's folder (fp16 safetensors, committed; ``python -m hollownet.toy.pretrain`` made it).

    ``HOLLOWNET_TOY_MODEL=FOLDER`` points ``--model toy`` at another copy, e.g. one you pretrained again.
    """
    override = os.environ.get("HOLLOWNET_TOY_MODEL")
    return Path(override).expanduser().resolve() if override else Path(__file__).resolve().parent / "model"


def is_toy(model) -> bool:
    """``model`` (a name or a folder) is the toy model: its defaults and its evaluator apply."""
    return str(model) == NAME or Path(str(model)).expanduser().resolve() == model_dir()
