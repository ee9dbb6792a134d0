"""Single-file checkpoints (one ``.safetensors`` / ``.ckpt`` in the original SD layout) as base models.

A single file is converted ONCE, by diffusers' ``StableDiffusionPipeline.from_single_file`` (offline: the
pipeline and component configs and the CLIP tokenizer are bundled), into a diffusers folder in the cache
(``$HOLLOWNET_CACHE`` or ``~/.cache/hollownet``, ``single-file/<name>-<fingerprint>``, written into a
scratch folder and renamed, so it is complete or absent). Every stage then reads that folder as any
other, so stage 2's selective loading holds: the hollow's tensors are never read there. The cost is disk:
the converted folder is about the checkpoint's size again (fp32 weights as stored: an fp16 SD 1.5
file of 2 GB gives ~2 GB, an fp32 one ~4 GB); delete the cache folder to get it back.

The model type comes from the keys (diffusers' ``infer_diffusers_model_type``): SD 1.x, SD 2.x, SDXL.
SD 2.x's prediction type is not in the keys: a ``<name>.yaml`` beside the file (AUTOMATIC1111's convention;
``parameterization: "v"`` = v-prediction) or ``HOLLOWNET_PREDICTION_TYPE=epsilon|v_prediction`` decides;
otherwise diffusers' heuristic (epsilon only for a .ckpt at global step 875000, i.e. SD 2 base; else v).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sys
from functools import lru_cache
from pathlib import Path

import torch

from hollownet.errors import HollownetError
from hollownet.paths import CHECKPOINT_SUFFIXES

SUFFIXES = CHECKPOINT_SUFFIXES
CONFIG_DIR = Path(__file__).parent / "configs"
BPE_FILE = Path(__file__).parent / "assets" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
KINDS = {"v1": "sd15", "v2": "sd21", "xl_base": "sdxl"}
SOURCE_FILE = "hollownet_single_file.json"


def is_single_file(model) -> bool:
    p = Path(model).expanduser()
    return p.is_file() and p.suffix.lower() in SUFFIXES


def cache_root() -> Path:
    return Path(os.environ.get("HOLLOWNET_CACHE") or Path.home() / ".cache" / "hollownet").expanduser() / "single-file"


def file_fingerprint(path: Path) -> str:
    """Size, the first and last MiB (a safetensors header names every tensor and its offsets)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        h.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        h.update(fh.read())
    return h.hexdigest()[:16]


# ---- reading keys -------------------------------------------------------------------------------------


def checkpoint_shapes(path: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """Every tensor as an empty meta tensor of its shape (no weights read), and the .ckpt's global_step."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, framework="pt") as f:
                return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}, None
        except (SafetensorError, OSError) as e:
            raise HollownetError(f"cannot read '{path}' as safetensors ({e})") from None
    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle / zip errors of many kinds
        raise HollownetError(f"cannot read '{path}' as a PyTorch checkpoint ({type(e).__name__}); a .ckpt must be "
                             "a plain tensor state dict (weights_only)") from None
    step = ckpt.get("global_step") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
    return {k: torch.empty(v.shape, device="meta") for k, v in state.items() if isinstance(v, torch.Tensor)}, step


def detect_kind(shapes: dict) -> str:
    """sd15, sd21 or sdxl from the keys, by diffusers' ``infer_diffusers_model_type``."""
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    if not any(k.startswith("model.diffusion_model.") for k in shapes):
        raise HollownetError("not a Stable Diffusion checkpoint in the original layout (no model.diffusion_model.* "
                             "tensors); pass a diffusers folder or an SD 1.x / 2.x .safetensors / .ckpt")
    model_type = infer_diffusers_model_type(shapes)
    if model_type not in KINDS:
        raise HollownetError(f"single-file checkpoint of type '{model_type}' (diffusers' name); hollownet takes SD 1.x and 2.x")
    return KINDS[model_type]


def prediction_type_for(path: Path, kind: str, global_step: int | None) -> tuple[str, str]:
    """(prediction type, how it was decided)."""
    env = os.environ.get("HOLLOWNET_PREDICTION_TYPE")
    if env:
        if env not in ("epsilon", "v_prediction"):
            raise HollownetError(f"HOLLOWNET_PREDICTION_TYPE={env!r}: use epsilon or v_prediction")
        return env, "HOLLOWNET_PREDICTION_TYPE"
    yaml_file = path.with_suffix(".yaml")
    if yaml_file.is_file():
        import yaml

        try:
            params = (yaml.safe_load(yaml_file.read_text()) or {}).get("model", {}).get("params", {})
        except (yaml.YAMLError, AttributeError) as e:
            raise HollownetError(f"cannot read '{yaml_file}' ({type(e).__name__})") from None
        return ("v_prediction" if params.get("parameterization") == "v" else "epsilon"), f"{yaml_file.name} parameterization"
    if kind != "sd21":
        return "epsilon", "SD 1.x / SDXL are epsilon models"
    if global_step == 875000:
        return "epsilon", "diffusers' heuristic (global_step 875000: SD 2 base)"
    return "v_prediction", "diffusers' heuristic for SD 2.x (768-v); override with a .yaml beside it or HOLLOWNET_PREDICTION_TYPE"


# ---- bundled configs ----------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's byte -> printable character table, in CLIP's order (printable bytes first)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> tuple[str, str]:
    """(vocab.json, merges.txt) of CLIP's tokenizer, derived from the bundled BPE file by CLIP's rule:
    the 256 byte symbols, the same with ``</w>``, one token per merge (the first 48,894), then the two
    special tokens: 49,408 tokens."""
    lines = gzip.decompress(BPE_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"


def _bundled(name: str) -> dict:
    cfg = json.loads((CONFIG_DIR / name).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_note")}


def write_bundled_config(kind: str, prediction_type: str, dest: Path) -> Path:
    """A diffusers config folder (no weights) for ``from_single_file(config=...)``: SD 1.5 or SD 2.1 layout."""
    import diffusers

    if kind not in ("sd15", "sd21"):
        raise HollownetError(f"no bundled pipeline configs for {kind} single files (SD 1.x and 2.x only); for SDXL pass "
                             "a StableDiffusionXLPipeline diffusers folder")
    dest.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "DDPMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    parts = {"model_index.json": index, "unet/config.json": _bundled(f"{kind}_unet.json"),
             "vae/config.json": _bundled(f"{kind}_vae.json"), "text_encoder/config.json": _bundled(f"{kind}_text_encoder.json"),
             "scheduler/scheduler_config.json": {**_bundled(f"{kind}_scheduler.json"), "prediction_type": prediction_type}}
    vocab, merges = clip_tokenizer_files()
    pad = "<|endoftext|>" if kind == "sd15" else "!"  # SD 2.x's OpenCLIP tokenizer pads with "!"
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad}
    parts["tokenizer/tokenizer_config.json"] = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                                                "do_lower_case": True, "errors": "replace", **special}
    parts["tokenizer/special_tokens_map.json"] = special
    for rel, obj in parts.items():
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(json.dumps(obj, indent=2))
    (dest / "tokenizer" / "vocab.json").write_text(vocab, encoding="utf-8")
    (dest / "tokenizer" / "merges.txt").write_text(merges, encoding="utf-8")
    return dest


def _check_shapes(shapes: dict, config_dir: Path) -> None:
    """A checkpoint whose U-Net is not the config's (another channel count) is refused before converting."""
    unet = json.loads((config_dir / "unet" / "config.json").read_text())
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is not None and tuple(conv_in.shape[:2]) != (unet["block_out_channels"][0], unet["in_channels"]):
        raise HollownetError(f"the checkpoint's U-Net (conv_in {tuple(conv_in.shape)}) is not the bundled config's; "
                             "convert it with hollownet.singlefile.convert_single_file(path, config=<diffusers folder>)")


# ---- conversion ---------------------------------------------------------------------------------------


def cached_dir(path: Path) -> Path:
    return cache_root() / f"{path.stem}-{file_fingerprint(path)}"


def convert_single_file(path: str | os.PathLike, config: str | os.PathLike | None = None, quiet: bool = False) -> Path:
    """The diffusers folder of a single-file checkpoint: from the cache, or converted now (once).

    ``config``: a diffusers folder whose configs (and tokenizer) describe the checkpoint; default the
    bundled SD 1.5 / 2.1 ones for the detected type.
    """
    import tempfile

    path = Path(path).expanduser().resolve()
    dest = cached_dir(path)
    if (dest / "model_index.json").is_file():
        return dest
    shapes, step = checkpoint_shapes(path)
    kind = detect_kind(shapes)
    pred, why = prediction_type_for(path, kind, step)
    if not quiet:
        print(f"hollownet: converting single-file {kind} checkpoint '{path.name}' ({pred}: {why}) once into {dest}",
              file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".convert-") as tmp:
        tmp = Path(tmp)
        cfg_dir = Path(config) if config is not None else write_bundled_config(kind, pred, tmp / "config")
        _check_shapes(shapes, cfg_dir)
        pipe = _from_single_file(path, cfg_dir)
        if config is None or pred != pipe.scheduler.config.get("prediction_type"):
            pipe.scheduler.register_to_config(prediction_type=pred)
        out = tmp / "model"
        pipe.save_pretrained(out, safe_serialization=True)
        del pipe
        (out / SOURCE_FILE).write_text(json.dumps({"single_file": str(path), "fingerprint": file_fingerprint(path),
                                                   "kind": kind, "prediction_type": pred, "prediction_type_from": why,
                                                   "config": str(config) if config is not None else "bundled"}, indent=2))
        try:
            os.replace(out, dest)
        except OSError:  # another process finished first
            if not (dest / "model_index.json").is_file():
                raise
    return dest


def _from_single_file(path: Path, cfg_dir: Path):
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_single_file(str(path), config=str(cfg_dir), local_files_only=True,
                                                        safety_checker=None, requires_safety_checker=False)
    except (ValueError, OSError, KeyError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise HollownetError(f"diffusers could not convert '{path.name}' ({first[:160]})") from None


def plan_model(model: str) -> str:
    """For ``hollownet plan``: a single file's converted folder if cached, else the bundled configs of its type."""
    if not is_single_file(model):
        return model
    path = Path(model).expanduser().resolve()
    dest = cached_dir(path)
    if (dest / "model_index.json").is_file():
        return str(dest)
    shapes, _ = checkpoint_shapes(path)
    kind = detect_kind(shapes)
    conv_in = shapes.get("model.diffusion_model.input_blocks.0.0.weight")
    first = json.loads((CONFIG_DIR / f"{kind}_unet.json").read_text())["block_out_channels"][0]
    if conv_in is not None and conv_in.shape[0] != first:
        raise HollownetError(f"'{path.name}' is not a standard {kind} U-Net; run 'hollownet train' or 'generate' on it "
                             "once (it converts the file) or plan its diffusers folder")
    return kind

