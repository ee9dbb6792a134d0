"""Generation for an SD3 / SD3.5 folder: the stock ``StableDiffusion3Pipeline``, the LoRA loaded by its own
``load_lora_weights``. One path: the prefix carries no LoRA, so the full transformer with the LoRA is exactly
the function stage 2 trained (``tests/test_dit_e2e.py``). ``generate.run_generate`` hands an SD3 folder here.

The files written are ``hollownet generate``'s: one PNG per image (written as it is made), ``manifest.json``
(what ``hollownet eval`` reads) and ``generate.json``.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from hollownet.errors import HollownetError
from hollownet.families import SD3_FAMILY
from hollownet.loading import model_fingerprint, vae_scale_factor
from hollownet.settings import FLOAT_PRECISIONS, torch_dtype
from hollownet.stages.export import read_info
from hollownet.stages.formats import DIFFUSERS_FILE
from hollownet.files import save_image, save_json


def check_settings(cfg) -> None:
    """Refuse, in one line, what SD3 generation does not run yet (``cfg``: a ``generate.GenerateConfig``)."""
    if cfg.merged:
        raise HollownetError("--merged is not supported for SD3: its generation is one path already (the prefix "
                             "carries no LoRA); drop --merged")
    if cfg.precision not in FLOAT_PRECISIONS or cfg.stream_weights:
        raise HollownetError(f"SD3 generation runs float weights in memory: use --precision {'|'.join(FLOAT_PRECISIONS)} "
                             "without --stream-weights")
    if cfg.scheduler == "ddim":
        raise HollownetError("--scheduler ddim is not a flow-matching sampler: for SD3 use --scheduler default (the "
                             "model's own Euler) or dpm (DPM-Solver++ in its flow-matching form)")


def scheduler_for(pipe, name: str):
    """``default``: the folder's own (``FlowMatchEulerDiscreteScheduler``); ``dpm``: DPM-Solver++ on the same
    flow (diffusers' ``use_flow_sigmas`` form, the folder's shift)."""
    # diffusers is heavy to import: only generation needs this scheduler class
    from diffusers import DPMSolverMultistepScheduler

    if name == "dpm":
        config = pipe.scheduler.config
        return DPMSolverMultistepScheduler.from_config(config, use_flow_sigmas=True, prediction_type="flow_prediction",
                                                       flow_shift=config.get("shift", 1.0))
    return pipe.scheduler


def load_pipeline(model_dir: Path, cfg, info: dict):
    """The stock pipeline (no T5: ``text_encoder_3=None``), the LoRA loaded by ``load_lora_weights``."""
    # diffusers is heavy to import: only generation needs the pipeline class
    from diffusers import StableDiffusion3Pipeline

    SD3_FAMILY.check_folder(model_dir)
    recorded = info.get("model_fingerprint")
    if cfg.lora and recorded and not cfg.force and recorded != model_fingerprint(model_dir):
        raise HollownetError(f"the LoRA in '{cfg.lora}' was trained on another base model ('{info.get('base_model')}'): "
                             "pass that model, or --force to load it anyway")
    pipe = StableDiffusion3Pipeline.from_pretrained(model_dir, text_encoder_3=None, tokenizer_3=None,
                                                    torch_dtype=torch_dtype(cfg.precision))
    pipe.scheduler = scheduler_for(pipe, cfg.scheduler)
    if cfg.lora:
        if not (Path(cfg.lora) / DIFFUSERS_FILE).is_file():
            raise HollownetError(f"'{cfg.lora}' has no {DIFFUSERS_FILE}: pass the --output folder of 'hollownet train'")
        try:
            pipe.load_lora_weights(cfg.lora, weight_name=DIFFUSERS_FILE)
        except (ValueError, RuntimeError, KeyError) as e:  # wrong shapes or layout: diffusers' long message, cut to its first line
            raise HollownetError(f"the LoRA in '{cfg.lora}' does not load into this SD3 model: "
                                 f"{str(e).strip().splitlines()[0][:200]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(cfg.device)


def run_dit_generate(cfg, model_dir: Path) -> dict:
    """``hollownet generate`` for an SD3 folder: ``cfg.num_images`` PNGs, ``manifest.json``, ``generate.json``."""
    check_settings(cfg)
    t0 = time.perf_counter()
    info = read_info(cfg.lora) if cfg.lora else {}
    pipe = load_pipeline(model_dir, cfg, info)
    size = pipe.transformer.config.sample_size * vae_scale_factor(dict(pipe.vae.config))
    resolution = cfg.resolution or info.get("resolution") or size
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(cfg.num_images):
        image = pipe(prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, height=resolution, width=resolution,
                     num_inference_steps=cfg.steps, guidance_scale=cfg.guidance,
                     generator=torch.Generator().manual_seed(cfg.seed + i)).images[0]
        entries.append({"file": f"{i:03d}.png", "prompt": cfg.prompt, "seed": cfg.seed + i})
        save_image(out / entries[-1]["file"], image)
    save_json(out / "manifest.json", {"images": entries})
    seconds = time.perf_counter() - t0
    record = {"settings": asdict(cfg), "family": SD3_FAMILY.name, "scheduler": type(pipe.scheduler).__name__,
              "modes": {"precision": cfg.precision, "compute_dtype": cfg.precision, "stream_weights": False},
              "mode": "lora" if cfg.lora else "base model", "resolution": resolution, "lora_info": info,
              "seconds": round(seconds, 3), "seconds_per_image": round(seconds / cfg.num_images, 3), "memory": None,
              "cuda_max_memory_allocated": None, "images": [e["file"] for e in entries]}
    save_json(out / "generate.json", record)
    return record
