"""Checks that run before any model loads: paths, prompts, photo counts, devices.

Refusals are :class:`HollownetError` (one line, exit 2 in the CLI); doubtful-but-possible input
is a ``warnings.warn`` (one ``warning: ...`` line in the CLI).
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path

from hollownet.cut import meta_unet
from hollownet.paths import check_input_folder, check_model_path  # noqa: F401  (check_model_path: the app's)
from hollownet.photos import list_photos
from hollownet.errors import HollownetError
from hollownet.loading import model_fingerprint
from hollownet.stages.formats import lora_file, read_lora
from hollownet.files import check_writable

# identifiers kohya / diffusers DreamBooth users know; any <token> (Custom Diffusion's <new1>) counts too
RARE_IDENTIFIERS = ("sks", "ohwx", "zwx", "xjy", "bnha", "phol", "olis", "shs", "zkz", "tok")
FEW_PHOTOS, MANY_PHOTOS = 3, 20


def has_rare_identifier(prompt: str) -> bool:
    words = re.findall(r"<[^<>\s]+>|[A-Za-z0-9_]+", prompt)
    return any(w.startswith("<") or w.lower() in RARE_IDENTIFIERS for w in words)


# words of ordinary captions; the identifier of a prompt with no rare token is its first word not in here
COMMON_WORDS = frozenset("a an the photo photograph picture image portrait close up closeup of my our your his her their "
                         "this that these those in on at with and by for to from".split())


def prompt_identifier(prompt: str) -> str | None:
    """The word the instance prompt teaches: its first rare identifier (``sks``, ``<new1>``...), else its first
    word that is not an ordinary caption word; None for an empty prompt."""
    words = re.findall(r"<[^<>\s]+>|[A-Za-z0-9_]+", prompt)
    rare = [w for w in words if w.startswith("<") or w.lower() in RARE_IDENTIFIERS]
    if rare:
        return rare[0]
    return next((w for w in words if w.lower() not in COMMON_WORDS), None)


def caption_words(caption: str) -> list[str]:
    return re.findall(r"<[^<>\s]+>|[A-Za-z0-9_]+", caption)


def check_number(value, flag: str, example: str, positive: bool = False) -> None:
    """A float flag that must be finite (NaN would train or draw nothing, silently); ``positive``: also > 0."""
    if value is None:
        return
    if not math.isfinite(value) or (positive and value <= 0):
        raise HollownetError(f"{flag} {value} must be a finite number{' above 0' if positive else ''}, e.g. {example}")


def check_instance_prompt(prompt: str) -> None:
    if not prompt or not prompt.strip():
        warnings.warn('--prompt is empty: the LoRA learns the subject with no words to call it by; '
                      'use e.g. "a photo of sks dog"')
    elif not has_rare_identifier(prompt):
        warnings.warn(f'--prompt "{prompt}" has no rare identifier, so training changes what its common words '
                      'mean for every prompt; add one, e.g. "a photo of sks dog"')


def check_generate_prompt(prompt: str) -> None:
    if not prompt or not prompt.strip():
        warnings.warn("--prompt is empty: the images will not be conditioned on any text")


def check_photo_folder(folder: str | Path, flag: str = "--images") -> None:
    """The folder exists and has photos (load_photos says what is wrong); warn about odd counts."""
    path = check_input_folder(folder, flag)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stray files: load_photos warns about them once, later
        n = len(list_photos(path))
    if n == 0:
        return  # load_photos raises its own, more detailed error (HEIC hint etc.)
    if flag == "--images" and n < FEW_PHOTOS:
        warnings.warn(f"only {n} photo{'s' if n != 1 else ''} in {folder}: 3-6 varied photos of the subject "
                      "give the best results")
    elif flag == "--images" and n > MANY_PHOTOS:
        warnings.warn(f"{n} photos in {folder}: DreamBooth-style training uses 3-6 (more cost pre-compute time "
                      "and rarely help)")


def check_resolution(resolution: int | None, flag: str = "--resolution") -> None:
    if resolution is None:
        return
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8 or resolution % 8:
        raise HollownetError(f"{flag} {resolution} must be a positive multiple of 8 (the VAE's downscale factor), "
                             "e.g. 512")


def preflight_train(req) -> None:
    """Everything ``personalize`` can check before stage 1 loads a model."""
    check_model_path(req.model)
    check_resolution(req.resolution)
    check_photo_folder(req.images)
    if req.class_images:
        check_photo_folder(req.class_images, "--class-images")
    check_number(req.lr, "--lr", "1e-4", positive=True)
    check_number(req.lora_alpha, "--lora-alpha", "the rank", positive=True)
    check_number(req.prior_loss_weight, "--prior-loss-weight", "1.0")
    check_writable(req.output)
    check_instance_prompt(req.prompt)


def preflight_generate(cfg) -> None:
    check_model_path(cfg.model)
    check_resolution(cfg.resolution)
    if cfg.lora is not None and not Path(cfg.lora).expanduser().exists():
        raise HollownetError(f"--lora '{cfg.lora}' not found: pass the --output folder of 'hollownet train'")
    check_number(cfg.guidance, "--guidance", "7.5")
    check_writable(cfg.output)
    check_generate_prompt(cfg.prompt)


def check_lora_matches(model_dir: Path, lora_dir: str | Path, info: dict, force: bool = False) -> None:
    """Refuse, before loading, a LoRA recorded for another base model, or whose shapes do not fit."""
    recorded = info.get("model_fingerprint")
    if recorded and not force:
        have = model_fingerprint(model_dir)
        if recorded != have:
            raise HollownetError(
                f"the LoRA in '{lora_dir}' was trained on another base model ('{info.get('base_model')}', fingerprint "
                f"{recorded}; --model '{model_dir}' is {have}): pass that model, or --force to load it anyway")
    bad = lora_shape_mismatch(model_dir, Path(lora_dir))
    if bad:
        raise HollownetError(f"the LoRA in '{lora_dir}' does not fit --model '{model_dir}': {bad}; "
                             "it was trained on a different architecture")


def lora_shape_mismatch(model_dir: Path, lora_dir: Path) -> str | None:
    """The first U-Net LoRA tensor whose shape does not fit the model (the diffusers or the kohya file)."""
    from diffusers import UNet2DConditionModel
    from torch import nn


    unet = meta_unet(UNet2DConditionModel.load_config(model_dir / "unet"))
    modules = dict(unet.named_modules())
    try:
        lora, _ = read_lora(lora_file(lora_dir))
    except HollownetError:  # a layout hollownet does not read (e.g. with text-encoder layers): diffusers checks it
        return None
    for key, tensor in lora.tensors.items():
        name, part = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        mod = modules.get(name)
        if mod is None:
            return f"it has LoRA weights for {name}, which this U-Net lacks"
        if isinstance(mod, nn.Linear):
            n_in, n_out = mod.in_features, mod.out_features
        elif isinstance(mod, nn.Conv2d):
            n_in, n_out = mod.in_channels, mod.out_channels
        else:
            continue
        down = part == "lora_A"
        if (down and tensor.shape[1] != n_in) or (not down and tensor.shape[0] != n_out):
            want = f"{'input' if down else 'output'} size {n_in if down else n_out}"
            return f"{key} has shape {list(tensor.shape)}, the layer needs {want}"
    return None