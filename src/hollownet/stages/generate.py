"""Stage 5: generate images with the LoRA on the full, original U-Net.

Two-path (default, the paper's): at every denoising step the original U-Net with LoRA off runs up
to the hollow's output, then the LoRA layers run from that activation — the very function that was
trained. ``merged``: LoRA fused into the weights, one ordinary U-Net pass (cheaper, approximate).
The loop follows StableDiffusionPipeline.__call__'s numbered steps; the pipeline supplies the
text encoder, VAE and scheduler.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hollownet import unet_split as H
from hollownet.errors import HollownetError
from hollownet.stages.export import lora_weight_name, read_info
from hollownet.loading import resolve_model_dir
from hollownet.cut import HollowPlan, plan_for_blocks
from hollownet.settings import torch_dtype
from hollownet.stages.store import save_json

SCHEDULERS = ("ddim", "dpm", "default")


@dataclass
class GenerateConfig:
    model: str
    lora: str | None
    prompt: str
    output: str
    steps: int = 30
    resolution: int | None = None  # default: the training resolution
    guidance: float = 7.5
    negative_prompt: str | None = None
    seed: int = 0
    num_images: int = 4
    merged: bool = False
    scheduler: str = "dpm"
    precision: str = "fp32"
    device: str = "cpu"
    force: bool = False  # load a LoRA recorded for another base model anyway

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise HollownetError(f"--scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.steps < 1 or self.num_images < 1:
            raise HollownetError("--steps and --num-images must be at least 1")


@contextmanager
def lora_off(unet):
    """The original U-Net: adapters disabled inside, re-enabled after."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def two_path_forward(unet, plan: HollowPlan, sample, timestep, text) -> torch.Tensor:
    """Path A (LoRA off): encode + hollow. Path B (LoRA on): encode, then decode from A's hollow output."""
    with lora_off(unet):
        ctx = H.make_context(unet, sample, timestep, text)
        h, skips = H.encode(unet, plan, sample, ctx)
        hollow_out = H.hollow(unet, plan, h, ctx, skips)
    return H.hollowed_forward(unet, plan, sample, timestep, text, hollow_out)


def load_pipeline(model: str, lora: str | None, precision: str, device: str, scheduler: str, force: bool = False):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    from hollownet.checks import check_lora_matches

    model_dir = resolve_model_dir(model)
    if lora:  # before the 459-line size-mismatch traceback a wrong base model would give
        check_lora_matches(model_dir, lora, read_info(lora), force=force)
    pipe = StableDiffusionPipeline.from_pretrained(
        model_dir, dtype=torch_dtype(precision), safety_checker=None, requires_safety_checker=False
    )
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    elif scheduler == "dpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    info = {}
    if lora:
        info = read_info(lora)
        pipe.load_lora_weights(lora, weight_name=lora_weight_name(lora))  # the diffusers file, else the kohya one
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device), info


@torch.no_grad()
def denoise(pipe, plan: HollowPlan | None, prompt: str, *, steps, resolution, guidance, negative_prompt, generator, device):
    """One image: StableDiffusionPipeline's loop with the U-Net call swapped for the two-path one."""
    # 1. prompts
    cfg = guidance > 1.0
    cond, uncond = pipe.encode_prompt(prompt, device, 1, cfg, negative_prompt)
    text = torch.cat([uncond, cond]) if cfg else cond
    # 2. timesteps and initial noise
    pipe.scheduler.set_timesteps(steps, device=device)
    shape = (1, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, text.dtype) * pipe.scheduler.init_noise_sigma
    # 3. denoising loop
    for t in pipe.scheduler.timesteps:
        x = torch.cat([latents] * 2) if cfg else latents
        x = pipe.scheduler.scale_model_input(x, t)
        pred = two_path_forward(pipe.unet, plan, x, t, text) if plan is not None else pipe.unet(x, t, text).sample
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = pipe.scheduler.step(pred, t, latents).prev_sample
    # 4. decode
    image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def run_generate(cfg: GenerateConfig) -> dict:
    """Write ``num_images`` PNGs, ``manifest.json`` (file + prompt, read by ``hollownet eval``) and ``generate.json``."""
    from hollownet.checks import preflight_generate
    from hollownet.stages.store import save_image

    preflight_generate(cfg)  # paths and resolution: before any model loads
    t0 = time.perf_counter()
    pipe, info = load_pipeline(cfg.model, cfg.lora, cfg.precision, cfg.device, cfg.scheduler, force=cfg.force)
    plan = None
    if info.get("method") == "hollow" and not cfg.merged:
        plan = plan_for_blocks(pipe.unet, info["hollow_blocks"])
    elif cfg.lora and cfg.merged:
        pipe.fuse_lora()
    resolution = cfg.resolution or info.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    entries = []
    from tqdm.auto import tqdm

    from hollownet.memory.tracker import MemoryTracker

    memory = None
    for i in tqdm(range(cfg.num_images), desc="generate", unit="image", disable=None):
        generator = torch.Generator().manual_seed(cfg.seed + i)
        # the first image is measured exactly (every tensor byte); the others cost the same
        tracker = MemoryTracker(device=cfg.device).add_resident(pipe.unet, pipe.vae, pipe.text_encoder) if i == 0 else None
        with tracker if tracker is not None else nullcontext():
            image = denoise(pipe, plan, cfg.prompt, steps=cfg.steps, resolution=resolution, guidance=cfg.guidance,
                            negative_prompt=cfg.negative_prompt, generator=generator, device=cfg.device)
        if tracker is not None:
            memory = {"peak_bytes": tracker.report.peak_bytes, "breakdown": tracker.report.breakdown}
        name = f"{i:03d}.png"
        save_image(out / name, image)
        entries.append({"file": name, "prompt": cfg.prompt, "seed": cfg.seed + i})
    save_json(out / "manifest.json", {"images": entries})
    record = {
        "settings": asdict(cfg),
        "mode": "two-path" if plan is not None else ("merged" if cfg.lora else "base model"),
        "resolution": resolution,
        "lora_info": info,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_per_image": round((time.perf_counter() - t0) / cfg.num_images, 3),
        "memory": memory,
        "cuda_max_memory_allocated": torch.cuda.max_memory_allocated() if cfg.device.startswith("cuda") else None,
        "images": [e["file"] for e in entries],
    }
    save_json(out / "generate.json", json.loads(json.dumps(record, default=str)))
    return record
