#!/usr/bin/env python
"""One-command GPU check (issue 28): what a CUDA user sees beside the planner's tensor bytes.

    python benchmarks/gpu_check.py                          # on the GPU: SD 2.1 at 512 px, SDXL at 1024 px
    python benchmarks/gpu_check.py --device cpu --tiny      # dry run: tiny models, 64 px (the test suite runs it)

Per architecture (random weights: no download; the bundled SD 2.1 / SDXL configs), batch 1:

* **training** (stage 2), LoRA FT and Hollowed Net in fp32, bf16 + gradient checkpointing, int8, nf4
  (+ AdamW in backward) and streamed weights: the planner's prediction (``P.predict_train``, fake
  tensors), the tracker's exact tensor bytes of the same step on the device (``MemoryTracker``, as
  ``hollownet train`` records them), ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` of
  that step (what the allocator really took: its rounding, cuBLAS workspaces), and seconds per step
  (median of the timed steps, after one warm-up and the measured step);
* **generation** (``hollownet generate``'s code, 1 image, CFG), two-path vs merged, fp32 and bf16: the
  planner's ``predict_generate`` beside the tracker and the allocator, and seconds per image;
* the **CUDA context**: device memory in use outside torch's allocator (context, cuBLAS / cuDNN
  handles, other processes), at the start and at the end.

The network, the step and generation are the project's own (``TrainConfig.network`` = ``builder.build_unet``,
``train.train_step``, ``generate.generate``); weights come from ``stream.RandomSource``, which makes what
a safetensors file would give (fp32 on the CPU, then cast and moved as ``SafetensorsSource`` does) without a
multi-GB file, so streamed weights are timed without disk reads (their memory is exact, their speed optimistic).
The planner's predictions run in worker processes on the CPU while the GPU measures.

Resumable: every cell is written to ``gpu_check.json`` as it finishes and skipped when rerun (``--fresh``:
start over); ``--time-limit`` stops starting cells (default 420 s: the whole check <= 8 minutes on one
H100); ``gpu_check.md`` is rewritten from the JSON after every cell. With ``--device cpu`` the allocator
columns are empty and the check asserts planner == tracker to the byte (as the test suite does).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hollownet.builder import add_lora  # noqa: E402
from hollownet.cut import meta_unet, resolve_plan  # noqa: E402
from hollownet.loading import vae_scale_factor  # noqa: E402
from hollownet.lowmem.stream import RandomSource  # noqa: E402
from hollownet.memory import predict as P  # noqa: E402
from hollownet.memory.configs import load_model_configs  # noqa: E402
from hollownet.memory.tracker import MemoryTracker, PartMeter  # noqa: E402
from hollownet.optimizers import make_optimizer  # noqa: E402
from hollownet.requests import PlanRequest  # noqa: E402
from hollownet.settings import Modes  # noqa: E402
from hollownet.stages import generate as G  # noqa: E402
from hollownet.stages.train import train_step  # noqa: E402

GiB = 1024**3
IB = "adamw-in-backward"
# label -> PlanRequest settings (method, and Modes' fields)
TRAIN_MODES: dict[str, dict] = {
    "LoRA FT fp32": dict(method="lora"),
    "LoRA FT bf16 + ckpt": dict(method="lora", precision="bf16", grad_checkpointing=True),
    "LoRA FT int8 + ckpt": dict(method="lora", precision="int8", grad_checkpointing=True),
    "LoRA FT nf4 + ckpt": dict(method="lora", precision="nf4", grad_checkpointing=True),
    "Hollowed fp32": dict(),
    "Hollowed bf16 + ckpt": dict(precision="bf16", grad_checkpointing=True),
    "Hollowed int8 + ckpt": dict(precision="int8", grad_checkpointing=True),
    "Hollowed nf4 + ckpt": dict(precision="nf4", grad_checkpointing=True),
    "Hollowed nf4 + ckpt + in-backward": dict(precision="nf4", grad_checkpointing=True, optimizer=IB),
    "Hollowed streamed bf16 + in-backward": dict(precision="bf16", stream_weights=True, optimizer=IB),
}
# label -> (precision, merged): hollow LoRA generation, two-path (the default) vs merged
GENERATE_MODES: dict[str, tuple[str, bool]] = {
    "two-path fp32": ("fp32", False), "merged fp32": ("fp32", True),
    "two-path bf16": ("bf16", False), "merged bf16": ("bf16", True),
}


@dataclass
class Arch:
    name: str
    source: str  # a bundled config name, or a tiny model's builder (hollownet.tiny) for a folder made on first use
    resolution: int
    rank: int
    gen_steps: int
    folder: Path | None = None

    @property
    def model(self) -> str:
        """What the planner reads (configs only): the bundled name, or the tiny model's folder, built once."""
        if self.folder is None:
            return self.source
        if not (self.folder / "model_index.json").exists():
            from hollownet import tiny  # here: only the dry run builds tiny models (diffusers, transformers)

            getattr(tiny, self.source)(self.folder)
        return str(self.folder)


def architectures(tiny: bool, out_dir: Path) -> list[Arch]:
    if not tiny:  # r=128 on SD 2.1 (the README's memory table), r=32 on SDXL (its SDXL table)
        return [Arch("SD 2.1", "sd21", 512, 128, 30), Arch("SDXL", "sdxl", 1024, 32, 30)]
    folder = out_dir / "_tiny_models"
    return [Arch("tiny SD", "build_tiny_model", 64, 4, 2, folder / "sd"),
            Arch("tiny SDXL", "build_tiny_sdxl", 64, 4, 2, folder / "sdxl")]


# ------------------------------------------------------------------------------------- weights


# ----------------------------------------------------------------------------------- devices


def cuda_outside_torch(device: str) -> int | None:
    """Device memory in use that torch's allocator did not reserve: the CUDA context, library handles
    (cuBLAS, cuDNN) and any other process on the GPU."""
    if not device.startswith("cuda"):
        return None
    free, total = torch.cuda.mem_get_info(device)
    return total - free - torch.cuda.memory_reserved(device)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def reset_peaks(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocator_peaks(device: str, base: int) -> dict:
    """The allocator's peaks since :func:`reset_peaks`, less what was allocated before (``base``)."""
    if not device.startswith("cuda"):
        return dict(max_allocated_bytes=None, max_reserved_bytes=None)
    return dict(max_allocated_bytes=torch.cuda.max_memory_allocated(device) - base,
                max_reserved_bytes=torch.cuda.max_memory_reserved(device))


# -------------------------------------------------------------------------------- predictions


def plan_request(arch: Arch, settings: dict, device: str, **kw) -> PlanRequest:
    modes, rest = Modes.split(settings)
    return PlanRequest(model=arch.model, resolution=arch.resolution, rank=arch.rank, batch=1, modes=modes,
                       device=device, gen_steps=arch.gen_steps, num_images=1, **rest, **kw)


def predict(kind: str, req: PlanRequest) -> int:
    """The planner's peak for a cell (runs in a worker process: fake tensors, CPU only)."""
    torch.set_num_threads(1)
    mc = load_model_configs(req.model)
    if kind == "train":
        return P.predict_train(mc, req)[0].peak_bytes
    return P.predict_generate(mc, req)["peak_bytes"]


# ------------------------------------------------------------------------------------ training


def train_cell(arch: Arch, settings: dict, device: str, steps: int) -> dict:
    """Build the network from random weights on ``device``; a warm-up step, the measured step (tracker +
    allocator), then ``steps`` timed steps: the trainer's own ``train_step``."""
    req = plan_request(arch, settings, device)
    mc = load_model_configs(arch.model)
    skeleton = meta_unet(mc.unet)
    plan = resolve_plan(skeleton, rank=req.rank, lora_targets=tuple(req.lora_targets)) if req.method == "hollow" else None
    cfg = replace(req.train_config(), device=device)
    reset_peaks(device)
    base = torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0
    t0 = time.perf_counter()
    net = cfg.network(mc.unet, RandomSource.for_module(skeleton), plan.hollow_blocks if plan else None)
    build_s = time.perf_counter() - t0
    shapes = P.train_batch_shapes(mc.unet, plan, arch.resolution, req.per_step, mc.text_len, mc.text_dim,
                                        req.prompts, vae_scale_factor(mc.vae), mc.added_cond)
    batch, embeds = P.make_train_batch(shapes, net.dtype, torch.Generator().manual_seed(0))
    optimizer = make_optimizer(net.params, cfg.modes.optimizer, cfg.lr, cfg.max_grad_norm)
    net.unet.train()
    train_step(net, batch, embeds, optimizer, cfg)  # warm-up: AdamW's state, the allocator's pools, kernels
    sync(device)
    reset_peaks(device)
    tracker = MemoryTracker(device).add_resident(net.unet, optimizer)
    train_step(net, batch, embeds, optimizer, cfg, tracker)
    sync(device)
    peaks = allocator_peaks(device, base)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = train_step(net, batch, embeds, optimizer, cfg)
        sync(device)
        times.append(time.perf_counter() - t0)
    del net, optimizer, batch, embeds
    return dict(tracker_bytes=tracker.report.peak_bytes, **peaks, seconds_per_step=round(statistics.median(times), 4),
                step_seconds=[round(t, 4) for t in times], build_seconds=round(build_s, 2), finite_loss=bool(loss == loss),
                compute_dtype=cfg.modes.compute)


# ---------------------------------------------------------------------------------- generation


def generation_parts(arch: Arch, req: PlanRequest, device: str):
    """The planner's generation parts for ``req`` (the same construction), made real: random weights on
    ``device`` and a random LoRA (B small, not zero: the LoRA path computes as a trained one would)."""
    mc = load_model_configs(arch.model)
    fake, cut = P.generation_parts(mc, req)
    sources = {k: RandomSource(fake.source(k).shapes) for k in ("unet", "vae", *mc.text_configs)}
    lora = fake.lora
    if lora is not None:
        unet = meta_unet(mc.unet)
        add_lora(unet, lora.targets, lora.rank, lora.alpha)
        g = torch.Generator().manual_seed(0)
        state = {f"{n}.{p}.weight": torch.randn(getattr(m, p)["default"].weight.shape, generator=g) * 0.01
                 for n, m in unet.named_modules() if isinstance(m, LoraLayer) for p in ("lora_A", "lora_B")}
        lora = replace(lora, state=state)
    parts = replace(fake, source=sources.__getitem__, device=device, mode=None, to_fake=None, lora=lora)
    return parts, cut


def generate_cell(arch: Arch, precision: str, merged: bool, device: str) -> dict:
    """One image with CFG: measured (the planner's 3 denoising steps, tracker + allocator), then timed whole."""
    req = plan_request(arch, dict(precision=precision), device, merged=merged)
    parts, cut = generation_parts(arch, req, device)
    run = dict(jobs=[("a photo of sks dog", 0)], steps=arch.gen_steps, resolution=arch.resolution, guidance=req.guidance)
    reset_peaks(device)
    base = torch.cuda.memory_allocated(device) if device.startswith("cuda") else 0
    meter = PartMeter(True, device)
    G.generate(parts, cut, meter=meter, run_steps=P.GENERATE_PREDICT_STEPS, **run)
    sync(device)
    peaks = allocator_peaks(device, base)
    t0 = time.perf_counter()
    G.generate(parts, cut, **run)  # models built when their part starts, as hollownet generate
    sync(device)
    record = G.memory_record(meter)
    return dict(tracker_bytes=record["peak_bytes"], peak_part=record["peak_part"], **peaks,
                seconds_per_image=round(time.perf_counter() - t0, 3), compute_dtype=parts.modes.compute)


# --------------------------------------------------------------------------------- the check


def cells(archs: list[Arch], device: str) -> list[tuple[str, Arch, str, dict]]:
    """``(key, arch, kind, settings)`` of every cell, in run order (training first, then generation)."""
    out = []
    for arch in archs:
        out += [(f"{arch.name} | train | {label}", arch, "train", s) for label, s in TRAIN_MODES.items()]
        out += [(f"{arch.name} | generate | {label}", arch, "generate", dict(precision=p, merged=m))
                for label, (p, m) in GENERATE_MODES.items()]
    return out


def run_cell(arch: Arch, kind: str, settings: dict, device: str, steps: int) -> dict:
    if kind == "train":
        return train_cell(arch, settings, device, steps)
    return generate_cell(arch, settings["precision"], settings["merged"], device)


def prediction_request(arch: Arch, kind: str, settings: dict, device: str) -> PlanRequest:
    if kind == "train":
        return plan_request(arch, settings, device)
    return plan_request(arch, dict(precision=settings["precision"]), device, merged=settings["merged"])


def environment(device: str) -> dict:
    env = dict(device=device, torch=torch.__version__, cpus=os.cpu_count(), threads=torch.get_num_threads())
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(device)
        torch.zeros(1, device=device)  # the context exists from here
        env.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda,
                   outside_torch_at_start_bytes=cuda_outside_torch(device))
    return env


def save(result: dict, out: Path) -> None:
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    out.with_suffix(".md").write_text(report(result))


def run_check(args) -> dict:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    if result.get("environment", {}).get("device") not in (None, args.device) or result.get("tiny", args.tiny) != args.tiny:
        result = {}  # another device or model size: not this check's cells
    result.update(tiny=args.tiny, environment=result.get("environment") or environment(args.device))
    result.setdefault("cells", {})
    wanted = [w.strip() for w in args.only.split(";") if w.strip()]
    todo = [c for c in cells(architectures(args.tiny, out.parent), args.device)
            if c[0] not in result["cells"] and (not wanted or any(w in c[0] for w in wanted))]
    started = time.perf_counter()
    # spawned, not forked: this process has initialized CUDA; the workers only run fake tensors on the CPU
    pool = ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) if args.workers else None
    futures = {key: pool.submit(predict, kind, prediction_request(arch, kind, s, args.device))
               for key, arch, kind, s in todo} if pool else {}
    for key, arch, kind, settings in todo:
        if time.perf_counter() - started > args.time_limit:
            print(f"time limit ({args.time_limit} s) reached: rerun to go on", flush=True)
            break
        try:
            cell = run_cell(arch, kind, settings, args.device, args.steps)
        except torch.OutOfMemoryError as e:
            cell = dict(error=f"out of memory: {str(e).splitlines()[0]}")
        finally:
            gc.collect()
        req = prediction_request(arch, kind, settings, args.device)
        cell["planner_bytes"] = futures[key].result() if key in futures else predict(kind, req)
        if args.device == "cpu" and "tracker_bytes" in cell:
            cell["planner_equals_tracker"] = cell["planner_bytes"] == cell["tracker_bytes"]
        result["cells"][key] = dict(kind=kind, arch=arch.name, resolution=arch.resolution, rank=arch.rank, **cell)
        print(f"  {key}: {summary(cell)}", flush=True)
        save(result, out)
    if pool:
        pool.shutdown(cancel_futures=True)
    result["environment"]["outside_torch_at_end_bytes"] = cuda_outside_torch(args.device)
    save(result, out)
    return result


# ------------------------------------------------------------------------------------- report


def gib(b, tiny: bool = False) -> str:
    """GiB with 3 decimals (MiB with 2 for the tiny models' few MiB)."""
    return "–" if b is None else f"{b / 2**20:.2f}" if tiny else f"{b / GiB:.3f}"


def summary(cell: dict) -> str:
    if "error" in cell:
        return cell["error"]
    speed = f"{cell['seconds_per_step']} s/step" if "seconds_per_step" in cell else f"{cell['seconds_per_image']} s/image"
    return (f"planner {cell.get('planner_bytes')} bytes, tracker {cell['tracker_bytes']}, allocated "
            f"{cell['max_allocated_bytes']}, reserved {cell['max_reserved_bytes']}; {speed}")


def report(result: dict) -> str:
    env, tiny = result.get("environment", {}), bool(result.get("tiny"))
    unit = "MiB = 2^20 bytes" if tiny else "GiB = 2^30 bytes"
    lines = ["# GPU check (benchmarks/gpu_check.py)", "",
             f"Device: {env.get('gpu', env.get('device'))}; torch {env.get('torch')}, CUDA {env.get('cuda', '–')}; "
             f"{'tiny random-weight models (dry run)' if result.get('tiny') else 'random weights, bundled configs'}. "
             f"{unit}; allocated / reserved: torch.cuda.max_memory_allocated / max_memory_reserved of the "
             "measured step (the allocated bytes before the cell subtracted); tracker: the exact tensor bytes "
             "hollownet records.", "",
             f"Device memory outside torch's allocator (CUDA context, library handles): "
             f"{gib(env.get('outside_torch_at_start_bytes'))} GiB at the start, "
             f"{gib(env.get('outside_torch_at_end_bytes'))} GiB at the end (– off CUDA).", ""]
    for kind, speed, unit in (("train", "seconds_per_step", "s/step"), ("generate", "seconds_per_image", "s/image")):
        lines += [f"| {kind} cell | compute | planner | tracker | allocated | reserved | {unit} |", "|---|---|---:|---:|---:|---:|---:|"]
        for key, c in result.get("cells", {}).items():
            if c["kind"] != kind:
                continue
            name = key.replace(f" | {kind} | ", ": ")  # no "|" inside a table cell
            if "error" in c:
                lines.append(f"| {name} ({c['resolution']} px) | | {gib(c.get('planner_bytes'), tiny)} | {c['error']} | | | |")
                continue
            lines.append(f"| {name} ({c['resolution']} px, r={c['rank']}) | {c.get('compute_dtype')} | "
                         f"{gib(c['planner_bytes'], tiny)} | {gib(c['tracker_bytes'], tiny)} | {gib(c['max_allocated_bytes'], tiny)} | "
                         f"{gib(c['max_reserved_bytes'], tiny)} | {c[speed]} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (with --tiny: the dry run)")
    ap.add_argument("--tiny", action="store_true", help="tiny random-weight SD and SDXL models at 64 px (seconds)")
    ap.add_argument("--steps", type=int, default=None, help="timed training steps per cell (default 3; 1 with --tiny)")
    ap.add_argument("--time-limit", type=float, default=420, help="seconds after which no new cell starts (default 420)")
    ap.add_argument("--workers", type=int, default=None,
                    help="processes running the planner beside the GPU (default min(8, CPUs - 2); 0 with --tiny)")
    ap.add_argument("--only", default="", help="';'-separated parts of cell names to run, e.g. 'SDXL | train' (default: all)")
    ap.add_argument("--fresh", action="store_true", help="start over instead of skipping the finished cells")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    args = ap.parse_args(argv)
    if not args.device.startswith("cuda") and not args.tiny:
        ap.error("without a GPU, run the dry run: --device cpu --tiny")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error("this torch sees no CUDA device: run on a GPU machine, or the dry run --device cpu --tiny")
    args.steps = args.steps or (1 if args.tiny else 3)
    if args.workers is None:
        args.workers = 0 if args.tiny else max(1, min(8, (os.cpu_count() or 2) - 2))
    return run_check(args)


if __name__ == "__main__":
    main()
