"""Requests larger than the machine: the planner's prediction against the memory the device has, before
``train`` or ``generate`` allocates anything; refused in one line with both figures and the flags that fit.

The prediction runs the real code on fake tensors (``planner.plan_memory``): seconds on an idle CPU for the
tiny test model, a minute or more for SD 2.x on a busy one. So it runs only where a request could be near
the machine's size: a request at most the model's default resolution and batch, on a device with at least
:data:`SCREEN` times the model's weight files available, is let through without it. (The calibration: SD 2.1,
fp32 weights, full fine-tuning at 512 px peaks near 15.4 GB, 3x its 5.2 GB of fp32 weight files; LoRA and
generation far less.)
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

from hollownet.errors import HollownetError
from hollownet.memory.sizes import format_bytes, parse_size
from hollownet.settings import Modes, model_defaults

#: The available figure, instead of the device's: "3MiB", "12GB" (what-ifs, and the tests' small machine).
AVAILABLE_ENV = "HOLLOWNET_AVAILABLE_MEMORY"
SCREEN = 8  # available >= SCREEN x the weight files, at default resolution and batch: fits without a prediction
FLAG = "--ignore-memory-check"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def available_memory(device: str) -> int | None:
    """Bytes the device can still allocate: CUDA's free memory, a CPU's MemAvailable; None where not known
    (MPS, XPU): then nothing is checked."""
    given = os.environ.get(AVAILABLE_ENV)
    if given:
        return parse_size(given, AVAILABLE_ENV)
    if device.startswith("cuda"):
        import torch

        return torch.cuda.mem_get_info(torch.device(device))[0]
    if device != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        return None
    return psutil.virtual_memory().available


def weight_bytes(model_dir: Path) -> int:
    """The model's weight files on disk (every part), bytes."""
    return sum(p.stat().st_size for p in Path(model_dir).rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def clearly_fits(model: str, model_dir: Path, available: int, resolution: int, batch: int = 1) -> bool:
    """The request is ordinary (default resolution and batch or less) and the device has room to spare."""
    d = model_defaults(model)
    return resolution <= d["resolution"] and batch <= d["batch"] and available >= SCREEN * weight_bytes(model_dir)


def peak_of(plan: dict, stages: tuple[str, ...]) -> tuple[int, str]:
    """(the largest predicted peak of ``stages``, its stage's name)."""
    return max((plan.get(f"{s}_peak_bytes") or 0, s) for s in stages)


def check_train(req, model_dir: Path, photos: int, class_photos: int) -> None:
    """``hollownet train``'s request against the device's memory (stage 1 and stage 2)."""
    from hollownet.memory.budget import BudgetError, fit_budget  # lazy: the planner loads torch
    from hollownet.memory.planner import plan_memory  # lazy: as above
    from hollownet.requests import PlanRequest  # lazy: as above

    available = available_memory(req.device)
    if available is None or req.ignore_memory_check or clearly_fits(req.model, model_dir, available, req.resolution, req.batch):
        return
    plan_req = PlanRequest.from_train(req, model=str(model_dir), photos=photos, class_photos=class_photos)
    peak, stage = peak_of(plan_memory(plan_req, stages=("precompute", "train")).to_json(), ("precompute", "train"))
    if peak <= available:
        return
    try:
        best = fit_budget(plan_req, available, top=1).fits[0]
        fits = f"these settings fit: {' '.join(best.flags())} --rank {req.rank} (hollownet plan --budget lists more)"
    except BudgetError as e:
        fits = f"nothing fits at {req.resolution} px, batch {req.batch}, rank {req.rank}" + (
            f" (the smallest peak: {format_bytes(max(e.smallest.train_peak or 0, e.smallest.precompute_peak or 0))});"
            if e.smallest else ";") + " lower --resolution, --batch or --rank"
    raise HollownetError(_refusal("training", peak, stage, available, req.device, fits))


def check_generate(cfg, model_dir: Path, info: dict, resolution: int) -> None:
    """``hollownet generate``'s request against the device's memory; the precisions that fit are tried in
    order of fidelity (fp32, bf16, int8, nf4)."""
    from hollownet.memory.planner import plan_memory  # lazy: the planner loads torch
    from hollownet.requests import PlanRequest  # lazy: as above

    available = available_memory(cfg.device)
    if available is None or cfg.ignore_memory_check or clearly_fits(cfg.model, model_dir, available, resolution):
        return
    lora = dict(method=info.get("method") or "lora", hollow_blocks=info.get("hollow_blocks"), rank=info.get("rank"),
                lora_targets=info.get("lora_targets")) if cfg.lora else dict(method="lora", merged=True)
    if cfg.lora and cfg.merged:
        lora["merged"] = True
    req = PlanRequest(model=str(model_dir), resolution=resolution, gen_steps=cfg.steps, guidance=cfg.guidance,
                      num_images=cfg.num_images, modes=cfg.modes, device=cfg.device,
                      **{k: v for k, v in lora.items() if v is not None})
    predict = lambda r: plan_memory(r, stages=("generate",)).to_json()["generate_peak_bytes"] or 0  # noqa: E731
    peak = predict(req)
    if peak <= available:
        return
    fits = f"nothing fits at {resolution} px; lower --resolution"
    for precision in ("fp32", "bf16", "int8", "nf4"):
        if precision == cfg.precision or (req.merged and precision in ("int8", "nf4")):
            continue
        if predict(replace(req, modes=Modes(precision=precision).on(cfg.device))) <= available:
            fits = f"this fits: --precision {precision}"
            break
    raise HollownetError(_refusal("generation", peak, "generate", available, cfg.device, fits))


def _refusal(what: str, peak: int, stage: str, available: int, device: str, fits: str) -> str:
    source = f"{AVAILABLE_ENV}" if os.environ.get(AVAILABLE_ENV) else ("free GPU memory" if device.startswith("cuda")
                                                                         else "available RAM")
    return (f"this {what} needs about {format_bytes(peak)} ({stage} peak, predicted by the planner) but {device} has "
            f"{format_bytes(available)} ({source}); {fits}; {FLAG} to run it anyway")
