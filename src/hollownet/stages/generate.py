"""Stage 5: generate images with the LoRA on the full, original U-Net.

Two-path (default, the paper's): at every denoising step the original U-Net with LoRA off runs up
to the hollow's output, then the LoRA layers run from that activation — the very function that was
trained. ``merged``: LoRA fused into the weights, one ordinary U-Net pass (cheaper, approximate).
The loop follows StableDiffusionPipeline.__call__'s numbered steps; the pipeline of the model's family
(``families.py``: SD or SDXL) supplies the text encoder(s), VAE and scheduler, and the family the
conditioning (SDXL: pooled text embeds and time ids, as ``added_cond_kwargs``). ``hollownet generate`` and the bench both generate through
:func:`load_pipeline`, :func:`prepare` and :func:`render`.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from hollownet import unet_split as H
from hollownet.checks import check_lora_matches, preflight_generate
from hollownet.cut import HollowPlan, plan_for_blocks
from hollownet.errors import HollownetError
from hollownet.families import detect_family, family_of_config
from hollownet.loading import resolve_model_dir
from hollownet.memory.tracker import MemoryTracker
from hollownet.settings import torch_dtype
from hollownet.stages.export import lora_weight_name, read_info
from hollownet.stages.store import save_image, save_json

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


def two_path_forward(unet, plan: HollowPlan, sample, timestep, text, added_cond_kwargs: dict | None = None) -> torch.Tensor:
    """Path A (LoRA off): encode + hollow. Path B (LoRA on): encode, then decode from A's hollow output."""
    with lora_off(unet):
        ctx = H.make_context(unet, sample, timestep, text, added_cond_kwargs=added_cond_kwargs)
        h, skips = H.encode(unet, plan, sample, ctx)
        hollow_out = H.hollow(unet, plan, h, ctx, skips)
    return H.hollowed_forward(unet, plan, sample, timestep, text, hollow_out, added_cond_kwargs=added_cond_kwargs)


def load_pipeline(model: str, lora: str | None, precision: str, device: str, scheduler: str, force: bool = False,
                  unet: str | Path | None = None):
    """The pipeline with ``lora`` loaded (and its ``hollownet.json``); ``unet``: a fine-tuned U-Net folder (full
    fine-tuning) in place of the model's."""
    model_dir = resolve_model_dir(model)
    if lora:  # before the 459-line size-mismatch traceback a wrong base model would give
        check_lora_matches(model_dir, lora, read_info(lora), force=force)
    if unet is not None and not Path(unet).is_dir():
        raise HollownetError(f"no fine-tuned unet/ in '{Path(unet).parent}'")
    dtype = torch_dtype(precision)
    parts = {"unet": UNet2DConditionModel.from_pretrained(unet, torch_dtype=dtype)} if unet is not None else {}
    family = detect_family(model_dir)
    extra = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
    pipe = family.pipeline_class().from_pretrained(model_dir, dtype=dtype, **extra, **parts)
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


def prepare(pipe, info: dict, *, lora: bool, merged: bool, resolution: int | None) -> tuple[HollowPlan | None, int]:
    """``(plan, resolution)``: the cut for two-path generation of a hollow LoRA, or None for one U-Net pass (the
    LoRA fused into the weights if ``merged``); the resolution defaults to the training one."""
    plan = None
    if info.get("method") == "hollow" and not merged:
        plan = plan_for_blocks(pipe.unet, info["hollow_blocks"])
    elif lora and merged:
        pipe.fuse_lora()
    return plan, resolution or info.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor


@torch.no_grad()
def denoise(pipe, plan: HollowPlan | None, prompt: str, *, steps, resolution, guidance, negative_prompt, generator, device):
    """One image: StableDiffusionPipeline's loop with the U-Net call swapped for the two-path one."""
    # 1. prompts (and the family's added conditioning: SDXL's pooled text embeds and time ids)
    cfg = guidance > 1.0
    text, added = family_of_config(pipe.unet.config).conditioning(pipe, prompt, negative_prompt, cfg, resolution, device)
    # 2. timesteps and initial noise
    pipe.scheduler.set_timesteps(steps, device=device)
    shape = (1, pipe.unet.config.in_channels, resolution // pipe.vae_scale_factor, resolution // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, text.dtype) * pipe.scheduler.init_noise_sigma
    # 3. denoising loop
    for t in pipe.scheduler.timesteps:
        x = torch.cat([latents] * 2) if cfg else latents
        x = pipe.scheduler.scale_model_input(x, t)
        pred = (two_path_forward(pipe.unet, plan, x, t, text, added) if plan is not None
                else pipe.unet(x, t, text, added_cond_kwargs=added).sample)
        if cfg:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
        latents = pipe.scheduler.step(pred, t, latents).prev_sample
    # 4. decode (in the family's VAE dtype: SDXL's VAE overflows in fp16)
    vae_dtype = family_of_config(pipe.unet.config).vae_dtype(pipe.vae.dtype)
    if pipe.vae.dtype != vae_dtype:
        pipe.vae.to(vae_dtype)
    image = pipe.vae.decode(latents.to(vae_dtype) / pipe.vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(image, output_type="pil")[0]


def render(pipe, plan: HollowPlan | None, jobs: list[tuple[str, int, str]], out: Path, *, steps: int, resolution: int,
           guidance: float, negative_prompt: str | None = None, device: str = "cpu", measure: bool = False):
    """One PNG per ``(prompt, noise seed, file name)`` job in ``out``, and ``manifest.json`` (file, prompt, seed: what
    ``hollownet eval`` reads). Returns ``(entries, memory)``; ``memory``: the first image's exact peak if ``measure``."""
    out.mkdir(parents=True, exist_ok=True)
    entries, memory = [], None
    for i, (prompt, seed, name) in enumerate(tqdm(jobs, desc="generate", unit="image", disable=None)):
        # the first image is measured exactly (every tensor byte); the others cost the same
        text_encoders = family_of_config(pipe.unet.config).text_modules(pipe)
        tracker = MemoryTracker(device=device).add_resident(pipe.unet, pipe.vae, *text_encoders) if measure and i == 0 else None
        with tracker if tracker is not None else nullcontext():
            image = denoise(pipe, plan, prompt, steps=steps, resolution=resolution, guidance=guidance,
                            negative_prompt=negative_prompt, generator=torch.Generator().manual_seed(seed), device=device)
        if tracker is not None:
            memory = {"peak_bytes": tracker.report.peak_bytes, "breakdown": tracker.report.breakdown}
        save_image(out / name, image)
        entries.append({"file": name, "prompt": prompt, "seed": seed})
    save_json(out / "manifest.json", {"images": entries})
    return entries, memory


def run_generate(cfg: GenerateConfig) -> dict:
    """Write ``num_images`` PNGs, ``manifest.json`` (file + prompt, read by ``hollownet eval``) and ``generate.json``."""
    preflight_generate(cfg)  # paths and resolution: before any model loads
    t0 = time.perf_counter()
    pipe, info = load_pipeline(cfg.model, cfg.lora, cfg.precision, cfg.device, cfg.scheduler, force=cfg.force)
    plan, resolution = prepare(pipe, info, lora=bool(cfg.lora), merged=cfg.merged, resolution=cfg.resolution)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    jobs = [(cfg.prompt, cfg.seed + i, f"{i:03d}.png") for i in range(cfg.num_images)]
    entries, memory = render(pipe, plan, jobs, Path(cfg.output), steps=cfg.steps, resolution=resolution,
                             guidance=cfg.guidance, negative_prompt=cfg.negative_prompt, device=cfg.device, measure=True)
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
    save_json(Path(cfg.output) / "generate.json", json.loads(json.dumps(record, default=str)))
    return record
