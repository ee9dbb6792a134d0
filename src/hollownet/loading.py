"""Finding a base model and loading exactly the parts of its U-Net that a stage needs.

A model is a diffusers folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/``) given as a local path or a hub id. The U-Net is built on the meta
device (no memory) and only the requested tensors are read from its safetensors file(s), so the
hollow's weights are never read during training.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from hollownet.errors import HollownetError
from hollownet.singlefile import convert_single_file, is_single_file
from hollownet.toy import NAME as TOY, model_dir as toy_model_dir

LAYOUT = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def resolve_model_dir(model: str | os.PathLike) -> Path:
    """A local diffusers folder, the bundled toy model (``toy``), a single-file checkpoint, or a hub id
    fetched into the local cache (where a network exists)."""
    path = toy_model_dir() if str(model) == TOY else Path(model).expanduser()
    if is_single_file(path):  # one .safetensors / .ckpt in the original SD layout: converted once, cached
        return convert_single_file(path)
    if path.exists():
        check_layout(path)
        return path
    if str(model).count("/") == 1 and not str(model).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            local = Path(snapshot_download(str(model), allow_patterns=["*.json", "*.txt", "*.safetensors", "*.model"]))
        except Exception as e:  # offline, unknown id, gated repo...
            raise HollownetError(
                f"model '{model}' is not a local folder (no such directory: {path.absolute()}) and cannot be fetched "
                f"as a hub id ({type(e).__name__}): check the path, or pass a local diffusers folder"
            ) from None
        check_layout(local)
        return local
    raise HollownetError(f"model '{model}' is neither an existing folder nor a hub id (owner/name)")


def denoiser(model_dir: Path) -> str:
    """The denoiser's folder: ``unet``, or ``transformer`` in an SD3 / SD3.5 folder."""
    return "transformer" if not (model_dir / "unet").exists() and (model_dir / "transformer").is_dir() else "unet"


def check_layout(path: Path) -> None:
    missing = [name for name in LAYOUT if not (path / name).exists()]
    if denoiser(path) == "transformer":  # SD3: transformer/ for unet/ (families.SD3.check_folder checks the rest)
        missing = [name for name in missing if name != "unet"]
    if missing:
        raise HollownetError(
            f"'{path}' is not a diffusers model folder (missing {', '.join(missing)}); "
            "point --model at a folder saved by StableDiffusionPipeline.save_pretrained, "
            "or at a single-file SD 1.x / 2.x checkpoint (.safetensors / .ckpt)"
        )


def weight_files(model_dir: Path, component: str = "unet") -> dict[str, Path]:
    """Tensor name -> safetensors file that holds it (single file or sharded with an index)."""
    folder = model_dir / component
    for index in (folder / (UNET_WEIGHTS + ".index.json"), folder / "model.safetensors.index.json"):
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {k: folder / v for k, v in weight_map.items()}
    for name in (UNET_WEIGHTS, "diffusion_pytorch_model.fp16.safetensors", "model.safetensors"):
        f = folder / name
        if f.exists():
            with safe_open(f, framework="pt") as sf:
                return {k: f for k in sf.keys()}
    raise HollownetError(
        f"no safetensors weights in '{folder}' (.bin checkpoints cannot be read selectively); "
        "re-save the model with safe_serialization=True"
    )


def model_fingerprint(model_dir: Path) -> str:
    """Cheap identity of a U-Net (or SD3 transformer) checkpoint: config, tensor headers and a sample of the bytes."""
    component = denoiser(model_dir)
    h = hashlib.sha256((model_dir / component / "config.json").read_bytes())
    for f in sorted(set(weight_files(model_dir, component).values())):
        size = f.stat().st_size
        h.update(str(size).encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return h.hexdigest()[:16]


def vae_scale_factor(vae_config: dict | None) -> int:
    """Pixels per latent pixel: 2 per VAE down block after the first (diffusers' rule; SD's is 8, the toy's 4)."""
    return 2 ** (len((vae_config or {}).get("block_out_channels", (0, 0, 0, 0))) - 1)


def is_under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def load_unet(
    model_dir: Path,
    *,
    skip: list[str] = (),
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, list[str]]:
    """The U-Net with every tensor under the ``skip`` module prefixes left on the meta device.

    Returns the model and the names of the tensors actually read, so callers (and tests) can check
    that skipped parts were never touched.
    """
    from diffusers import UNet2DConditionModel

    config = UNet2DConditionModel.load_config(model_dir / "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    files = weight_files(model_dir)
    wanted = [k for k in unet.state_dict() if not is_under(k, list(skip))]
    missing = [k for k in wanted if k not in files]
    if missing:
        raise HollownetError(f"U-Net checkpoint in '{model_dir}' lacks {len(missing)} tensors (e.g. {missing[0]}); is it complete?")
    state = read_tensors(files, wanted, dtype=dtype, device=device)
    unet.load_state_dict(state, strict=False, assign=True)
    unet.requires_grad_(False).eval()
    return unet, wanted


def read_tensors(files: dict[str, Path], keys: list[str], *, dtype, device) -> dict[str, torch.Tensor]:
    """Read only ``keys``, file by file; floating tensors cast to ``dtype`` on the way in."""
    by_file: dict[Path, list[str]] = {}
    for k in keys:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for f, ks in by_file.items():
        with safe_open(f, framework="pt", device=str(device)) as sf:
            for k in ks:
                t = sf.get_tensor(k)
                out[k] = t.to(dtype) if t.is_floating_point() else t
    return out


def prediction_type(model_dir: Path) -> str:
    cfg = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    return cfg.get("prediction_type", "epsilon")


def return_freed_memory_promptly() -> bool:
    """Make glibc's malloc give large freed blocks back to the OS at once; True if it applied.

    glibc serves a request above its mmap threshold with a mapping of its own that ``free`` unmaps,
    but it raises the threshold as such blocks are freed (up to 32 MiB), after which tensors of that
    size come from its heap and stay there once freed. Streaming weights and quantizing layer by
    layer free a large tensor after a large tensor, so a run with 0.71 GiB of live tensors was seen
    holding 1.80 GiB of anonymous memory; with the threshold fixed at 128 KiB, 1.13 GiB (of which
    about 0.4 GiB is the Python and torch runtime), 1.43 GiB at 4 MiB. The price is page faults on
    every fresh large tensor: that streamed SD 2.1 step at 512 px took 34 s instead of 26.5 s (29 s
    at 4 MiB). Only the low-memory modes, which ask for the least memory, take it. A no-op where libc
    is not glibc.
    """
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_MMAP_THRESHOLD = -3  # glibc's malloc.h; setting it also turns the dynamic threshold off
    return bool(mallopt(M_MMAP_THRESHOLD, 128 * 1024))


def release_memory() -> None:
    """Return freed memory now (after the caller dropped the text encoder or VAE)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
