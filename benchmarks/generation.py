#!/usr/bin/env python
"""Generation as frugal as training, and what two-path inference costs (issue 14).

Memory (``--memory``, fake tensors, seconds, no weights): SD 2.1, 512 px, 30 steps, classifier-free
guidance, batch 1. For each mode the whole experience -- stage 1, stage 2 and ``hollownet generate``
(text encoder, U-Net denoising with the CFG batch, VAE decoder, each in turn) -- as ``hollownet plan``
predicts it (the same code as the real run, equal to the byte on the tiny model), next to fp32
inference (one U-Net step, batch 1: 3.35 GiB). Targets: the most frugal mode <= 1.0 GiB, bf16 <= 2.0 GiB.

Speed (``--speed``, real tensors, CPU, same run): seconds per image of ``generate.generate`` itself
(text encoder + denoising + VAE decode; building the models not timed), and the CPU seconds of
each U-Net call (``time.process_time``: on a shared, loaded CPU wall time is mostly waiting; use
``--threads 1`` there, OpenMP threads spin while they wait), on the SD 2.1 architecture
with random weights at reduced size (``--resolution``, default 256 px) and on the bundled toy model:
two-path as it was (two passes through the kept down blocks), two-path batched (one forward of
``[x, x]``, LoRA on the second half), merged, plain unfused LoRA on the whole U-Net, and two-path in
bf16 / int8 / nf4, as ratios to fp32 merged. Beside them the kept down blocks' share of the U-Net's
MACs (counted on meta tensors): two-path's MACs are about 1 + that share of merged's, its target on a
CPU. Each mode's images are compared with fp32 two-path's on the same seeds (relative L2 of the pixels).

    python benchmarks/generation.py --memory                     # seconds
    python benchmarks/generation.py --speed --steps 4            # minutes on a 2-core CPU
    python benchmarks/generation.py                              # both; benchmarks/results/generation.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
import time
import zlib
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from hollownet.settings import DEFAULT_LORA_TARGETS

import torch

GiB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results"
FP32_INFERENCE_GIB = 3.35  # the figure: SD 2.1 U-Net, fp32, one step at 512 px, batch 1

# label, plan modes (train's flags; generation in the same precision, resident)
MEMORY_ROWS = [
    ("fp32", dict(precision="fp32")),
    ("bf16", dict(precision="bf16")),
    ("bf16 + grad ckpt", dict(precision="bf16", grad_checkpointing=True)),
    ("int8 + ckpt + in-backward AdamW", dict(precision="int8", grad_checkpointing=True, optimizer="adamw-in-backward")),
    ("nf4 + ckpt + in-backward AdamW (most frugal)", dict(precision="nf4", grad_checkpointing=True, optimizer="adamw-in-backward")),
    ("bf16 streamed + in-backward AdamW", dict(precision="bf16", stream_weights=True, optimizer="adamw-in-backward")),
]
TARGETS = {"nf4 + ckpt + in-backward AdamW (most frugal)": 1.0, "bf16": 2.0, "bf16 + grad ckpt": 2.0}


# ----------------------------------------------------------------------------------- memory


def memory(model: str, resolution: int, steps: int, rank: int) -> dict:
    from hollownet.memory.planner import plan_memory
    from hollownet.requests import PlanRequest
    from hollownet.settings import Modes

    rows = {}
    print(f"{model}, {resolution} px, {steps} steps, CFG (batch 2), batch 1, LoRA r={rank}, the paper's cut; "
          "predicted peak tensor memory (GiB = 2^30 bytes)", flush=True)
    print(f"  {'mode':<46} {'stage 1':>8} {'stage 2':>8} {'generate':>9} {'whole':>7}   generation parts "
          f"(text encoder / U-Net / VAE decoder)   vs fp32 inference {FP32_INFERENCE_GIB}", flush=True)
    for label, modes in MEMORY_ROWS:
        req = PlanRequest(model=model, resolution=resolution, rank=rank, gen_steps=steps, modes=Modes(**modes),
                          inference_batches=(1,))
        d = plan_memory(req).to_json()
        parts = d["breakdown"]["generate_parts"]
        row = {k: d[k] for k in ("precompute_peak_bytes", "train_peak_bytes", "generate_peak_bytes", "whole_run_peak_bytes",
                                 "inference_peak_bytes")}
        row["generate_parts"] = parts
        target = TARGETS.get(label)
        if target is not None:
            row["target_gib"], row["target_met"] = target, d["whole_run_peak_bytes"] / GiB <= target
        rows[label] = row
        g = lambda n: f"{n / GiB:.2f}"  # noqa: E731
        mark = f"  [whole <= {target} GiB: {'met' if row['target_met'] else 'NOT met'}]" if target is not None else ""
        print(f"  {label:<46} {g(d['precompute_peak_bytes']):>8} {g(d['train_peak_bytes']):>8} {g(d['generate_peak_bytes']):>9} "
              f"{g(d['whole_run_peak_bytes']):>7}   {' / '.join(g(v) for v in parts.values()):<38} "
              f"{d['generate_peak_bytes'] / GiB / FP32_INFERENCE_GIB:.2f}x{mark}", flush=True)
    return rows


# ------------------------------------------------------------------------------------ speed


class RandomSource:
    """Random weights of a module's shapes (a tensor source as ``stream.SafetensorsSource``): each tensor
    drawn from its name's seed, scaled by its fan-in (norm weights 1, biases 0), so activations stay sane."""

    def __init__(self, module):
        from hollownet.lowmem.stream import state_tensors

        self.shapes = {k: (v.shape, v.dtype) for k, v in state_tensors(module)}

    def loading(self):
        return nullcontext()

    def __contains__(self, name):
        return name in self.shapes

    def info(self, name):
        return self.shapes[name]

    def read(self, name, dtype=None, device="cpu"):
        shape, dt = self.shapes[name]
        if not dt.is_floating_point:
            return torch.zeros(shape, dtype=dt, device=device)
        if len(shape) < 2:
            t = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        else:
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            t = torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        return t.to(device, dtype or torch.float32)


def random_lora(targets: list[str], unet_skeleton, rank: int):
    """A LoRA with both matrices random (B != 0: it changes the output), peft keys."""
    from hollownet.stages.generate import LoraWeights

    mods = dict(unet_skeleton.named_modules())
    state, g = {}, torch.Generator().manual_seed(0)
    for name in targets:
        m = mods[name]
        fan_in, fan_out = (m.in_features, m.out_features) if hasattr(m, "in_features") else (m.in_channels, m.out_channels)
        state[f"{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / math.sqrt(fan_in)
        state[f"{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.02
    return LoraWeights(targets, rank, float(rank), state)


def cached(parts):
    """``parts`` whose three models are built once (building is not what is timed)."""
    built = {}

    class Cached(type(parts)):
        def text_encoder(self, folder="text_encoder"):
            if folder not in built:
                built[folder] = super().text_encoder(folder)
            return built[folder]

        def unet(self):
            if "unet" not in built:
                built["unet"] = super().unet()
            return built["unet"]

        def vae_decoder(self):
            if "vae" not in built:
                built["vae"] = super().vae_decoder()
            return built["vae"]

    obj = Cached(**{f: getattr(parts, f) for f, spec in parts.__dataclass_fields__.items() if spec.init})
    return obj, built


def mac_share(unet_config: dict, plan, resolution: int, text_len: int, text_dim: int, factor: int) -> dict:
    """MACs of the whole U-Net and of its time embedding + ``conv_in`` + kept down units, on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    from hollownet import unet_split as H
    from hollownet.cut import meta_unet

    unet = meta_unet(unet_config)
    side = resolution // factor
    with torch.device("meta"), torch.no_grad():
        x = torch.empty(1, unet.config.in_channels, side, side)
        t = torch.zeros(1, dtype=torch.long)
        text = torch.empty(1, text_len, text_dim)
        with FlopCounterMode(display=False) as full:
            unet(x, t, text)
        with FlopCounterMode(display=False) as down:
            ctx = H.make_context(unet, x, t, text)
            H.encode(unet, plan, x, ctx)
    f, d = full.get_total_flops() / 2, down.get_total_flops() / 2
    return {"unet_macs": int(f), "kept_down_macs": int(d), "kept_down_share": round(d / f, 4),
            "two_path_mac_ratio_target": round(1 + d / f, 4)}


def speed_case(name: str, make_parts, plan_of, resolution: int, steps: int, reps: int, only: list[str] | None = None) -> dict:
    """Seconds per image of each mode on ``make_parts(precision, lora kind)``; pixels compared with fp32 two-path."""
    from hollownet.settings import Modes
    from hollownet.stages import generate as G

    cases = [  # label, precision, lora kind, merged, batched two-path
        ("fp32 merged", "fp32", "hollow", True, True),
        ("fp32 two-path, as it was (2 passes)", "fp32", "hollow", False, False),
        ("fp32 two-path, batched", "fp32", "hollow", False, True),
        ("fp32 plain LoRA, whole U-Net, unfused", "fp32", "lora", False, True),
        ("bf16 two-path", "bf16", "hollow", False, True),
        ("int8 two-path", "int8", "hollow", False, True),
        ("nf4 two-path", "nf4", "hollow", False, True),
    ]
    G.release_memory = lambda: None  # models are kept (cached): a full gc per part is not generation's cost
    unet_calls: list[float] = []
    plain_call = G.unet_call

    def timed_call(*args, **kw):  # the U-Net's share of an image: each call timed
        f = plain_call(*args, **kw)

        def call(x, t, cond):  # CPU seconds of this process: on a shared, loaded CPU wall time is mostly waiting
            t0 = time.process_time()
            out = f(x, t, cond)
            unet_calls.append(time.process_time() - t0)
            return out
        return call

    G.unet_call = timed_call
    out, ref_pixels = {}, {}
    print(f"\n{name}: {resolution} px, {steps} denoising steps, CFG, {reps} image(s) per mode after one warm-up", flush=True)
    for label, precision, kind, merged, batched in cases:
        if only and label != "fp32 merged" and not any(o in label for o in only):
            continue  # fp32 merged always runs: the ratios' base
        parts = make_parts(Modes(precision=precision), kind)
        parts.merged = merged
        plan = plan_of(parts) if kind == "hollow" and not merged else None
        parts, built = cached(parts)
        pixels, seconds, calls = [], [], []
        for i in range(reps + 1):
            unet_calls.clear()
            t0 = time.perf_counter()
            G.generate(parts, plan, [("a photo", 1000 + max(0, i - 1))], steps=steps, resolution=resolution, guidance=7.5,
                       batched=batched, on_image=lambda j, p: pixels.append(p.float()))
            if i:  # the first image warms up (allocator, kernels)
                seconds.append(time.perf_counter() - t0)
                calls += unet_calls
        built.clear()
        gc.collect()
        s = sorted(seconds)[len(seconds) // 2]
        c = sorted(calls)[len(calls) // 2]
        row = {"seconds_per_image": round(s, 3), "all": [round(x, 3) for x in seconds], "cpu_seconds_per_unet_call": round(c, 3)}
        if label == "fp32 two-path, batched":
            ref_pixels["two-path"] = pixels[-1]
        if "two-path" in label and "two-path" in ref_pixels:
            ref = ref_pixels["two-path"]
            row["pixel_rel_l2_vs_fp32_two_path"] = round(float((pixels[-1] - ref).norm() / ref.norm()), 5)
            row["pixel_mean_abs_vs_fp32_two_path"] = round(float((pixels[-1] - ref).abs().mean()), 3)
        out[label] = row
        print(f"  {label:<42} {s:7.2f} s/image (wall), U-Net call {c:6.2f} CPU s" + (f"   vs fp32 two-path: rel L2 {row['pixel_rel_l2_vs_fp32_two_path']:.4f}, "
              f"mean |diff| {row['pixel_mean_abs_vs_fp32_two_path']:.2f}/255" if "pixel_rel_l2_vs_fp32_two_path" in row else ""),
              flush=True)
    base, base_call = out["fp32 merged"]["seconds_per_image"], out["fp32 merged"]["cpu_seconds_per_unet_call"]
    for label, row in out.items():
        row["ratio_to_fp32_merged"] = round(row["seconds_per_image"] / base, 3)
        row["unet_call_ratio_to_fp32_merged"] = round(row["cpu_seconds_per_unet_call"] / base_call, 3)
    G.unet_call = plain_call
    return out


def sd21_parts(resolution: int, rank: int):
    """SD 2.1's architecture (bundled configs) with random weights: (make_parts, plan_of, mac info)."""
    from transformers import CLIPTextConfig, CLIPTextModel
    from diffusers import AutoencoderKL

    from hollownet.builder import lora_outside
    from hollownet.cut import make_plan, meta_unet
    from hollownet.memory.configs import load_model_configs
    from hollownet.stages import generate as G
    from hollownet.loading import vae_scale_factor

    mc = load_model_configs("sd21")
    skeleton = meta_unet(mc.unet)
    plan = make_plan(skeleton)
    with torch.device("meta"):
        modules = {"unet": skeleton, "text_encoder": CLIPTextModel(CLIPTextConfig(**mc.text_encoder)),
                   "vae": AutoencoderKL.from_config(mc.vae)}
    sources = {k: RandomSource(m) for k, m in modules.items()}
    loras = {"hollow": random_lora(lora_outside(skeleton, plan.hollow_prefixes(skeleton), DEFAULT_LORA_TARGETS), skeleton, rank),
             "lora": random_lora(lora_outside(skeleton, [], DEFAULT_LORA_TARGETS), skeleton, rank)}

    def make(modes, kind):
        return G.Parts(unet_config=mc.unet, text_configs={"text_encoder": mc.text_encoder}, vae_config=mc.vae,
                       source=sources.__getitem__,
                       token_ids=lambda prompts, tokenizer: torch.randint(0, 49407, (len(prompts), mc.text_len),
                                                               generator=torch.Generator().manual_seed(len(prompts))),
                       scheduler_config=mc.scheduler, lora=loras[kind], modes=modes)

    macs = mac_share(mc.unet, plan, resolution, mc.text_len, mc.text_dim, vae_scale_factor(mc.vae))
    return make, (lambda parts: plan), macs


def toy_parts(rank: int):
    from hollownet.builder import lora_outside
    from hollownet.cut import make_plan, meta_unet
    from hollownet.loading import vae_scale_factor
    from hollownet.memory.configs import load_model_configs
    from hollownet.stages import generate as G
    from hollownet.toy import model_dir

    mc = load_model_configs("toy")
    skeleton = meta_unet(mc.unet)
    plan = make_plan(skeleton)
    loras = {"hollow": random_lora(lora_outside(skeleton, plan.hollow_prefixes(skeleton), DEFAULT_LORA_TARGETS), skeleton, rank),
             "lora": random_lora(lora_outside(skeleton, [], DEFAULT_LORA_TARGETS), skeleton, rank)}

    def make(modes, kind):
        parts = G.Parts.real(model_dir(), loras[kind], modes, "cpu", "dpm")
        return parts

    macs = mac_share(mc.unet, plan, 64, mc.text_len, mc.text_dim, vae_scale_factor(mc.vae))
    return make, (lambda parts: plan), macs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", action="store_true", help="only the memory figures (fake tensors, seconds)")
    ap.add_argument("--speed", action="store_true", help="only the timings (real tensors, CPU)")
    ap.add_argument("--resolution", type=int, default=256, help="--speed on SD 2.1: image size (default 256: reduced)")
    ap.add_argument("--steps", type=int, default=4, help="--speed: denoising steps per image (default 4)")
    ap.add_argument("--reps", type=int, default=1, help="--speed: timed images per mode, after one warm-up (default 1)")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--skip-sd21", action="store_true", help="--speed: the toy model only")
    ap.add_argument("--skip-toy", action="store_true", help="--speed: SD 2.1's architecture only")
    ap.add_argument("--modes", help="--speed: comma list of parts of mode labels to time, e.g. 'two-path, batched,nf4' "
                                    "(fp32 merged, the base, always runs)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)
    both = not (args.memory or args.speed)
    if args.threads:
        torch.set_num_threads(args.threads)
    record = {"args": vars(args), "torch_threads": torch.get_num_threads()}
    if args.memory or both:
        record["memory"] = memory("sd21", 512, 30, args.rank)
    if args.speed or both:
        record["speed"] = {}
        cases = [] if args.skip_toy else [("toy", lambda: toy_parts(8), 64)]
        if not args.skip_sd21:
            cases.append(("sd21 architecture, random weights", lambda: sd21_parts(args.resolution, args.rank), args.resolution))
        for name, build, res in cases:
            make, plan_of, macs = build()
            print(f"\n{name}: the kept down blocks (with conv_in and the time embedding) are {macs['kept_down_share']:.1%} of "
                  f"the U-Net's MACs at {res} px: two-path's target on a CPU <= {macs['two_path_mac_ratio_target']:.2f}x merged",
                  flush=True)
            rows = speed_case(name, make, plan_of, res, args.steps, args.reps, args.modes.split(",") if args.modes else None)
            record["speed"][name] = {"resolution": res, "macs": macs, "modes": rows}
            print("  per image, ratios to fp32 merged: " + ", ".join(f"{k} {v['ratio_to_fp32_merged']:.2f}x" for k, v in rows.items()))
            print("  per U-Net call (CPU time), ratios to fp32 merged: "
                  + ", ".join(f"{k} {v['unet_call_ratio_to_fp32_merged']:.2f}x" for k, v in rows.items()))
            if "fp32 two-path, batched" not in rows:
                continue
            tp = rows["fp32 two-path, batched"]["unet_call_ratio_to_fp32_merged"]
            print(f"  two-path batched {tp:.2f}x merged per U-Net call [target <= {macs['two_path_mac_ratio_target']:.2f}x: "
                  f"{'met' if tp <= macs['two_path_mac_ratio_target'] else 'NOT met'}]", flush=True)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generation.json").write_text(json.dumps(record, indent=2))
    print(f"written: {out / 'generation.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
