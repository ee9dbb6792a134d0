#!/usr/bin/env python
"""Time, on this machine in one run: training steps of full / lora / hollow, and a short
personalization (stage 1 + N steps) of hollow against lora, on the SD 2.x architecture with random
weights (nothing downloaded).

Everything runs the project's own functions: ``builder.add_lora`` / ``train.train_step`` for the
steps; ``precompute.make_shard`` for stage 1's U-Net part (hollow: the encoder and the hollow only,
the kept up blocks are never built, exactly as ``run_precompute`` leaves them unloaded); the text
encoder and the VAE encoder as stage 1 calls them (both methods pay for those: ``hollownet train``
runs stage 1 for every method). Not timed: building / loading the models (weights are random
here; from disk, hollow reads the encoder + hollow in stage 1 and the kept layers in stage 2).

    python benchmarks/speed.py                                   # 256 px, 3 timed steps, N=4 (minutes on a CPU)
    python benchmarks/speed.py --resolutions 256,512 --steps 3 --personalize-steps 20 --device cuda   # the full run

Full fine-tuning needs ~14 GiB of RAM at 256 px and ~17 GiB at 512 px (fp32 weights, grads, AdamW).
Results: benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def random_unet(mc, dtype, device, drop=()):
    """A random-weight U-Net in ``dtype`` with the modules under ``drop`` on the meta device (never loaded)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(mc.unet)
    mods = dict(unet.named_modules())
    for name in drop:
        mods[name].to_empty(device="meta")
    if dtype != torch.float32 or device != "cpu":
        unet.to(device=device, dtype=dtype)
    return unet.requires_grad_(False).eval()


def trained_model(mc, method: str, rank: int, precision: str, device: str):
    """What train.build_model returns, with random weights: (unet, plan, trainable params)."""
    from hollownet.cut import make_plan, meta_unet
    from hollownet.builder import add_lora, init_lora
    from hollownet.settings import torch_dtype

    plan, skip = None, []
    if method == "hollow":
        skeleton = meta_unet(mc.unet)
        plan = make_plan(skeleton, rank=rank)
        skip = plan.hollow_prefixes(skeleton)
    unet = random_unet(mc, torch_dtype(precision), device, drop=skip)
    if method == "full":
        unet.requires_grad_(True)
        return unet, plan, list(unet.parameters())
    from hollownet.cut import lora_target_modules

    add_lora(unet, lora_target_modules(unet, skip, TARGETS), rank)
    return unet, plan, init_lora(unet, torch_dtype(precision), device)


def store_batch(mc, plan, resolution: int, batch: int, dtype, device) -> dict:
    from hollownet.memory.fake import hollow_out_shape, latent_size

    h, w = latent_size(mc, resolution)
    c = mc.unet.get("in_channels", 4)
    b = dict(noisy=torch.randn(batch, c, h, w), target=torch.randn(batch, c, h, w),
             timestep=torch.randint(0, 1000, (batch,)), prompt_index=torch.zeros(batch, dtype=torch.long),
             weight=torch.ones(batch))
    if plan is not None:
        b["hollow_out"] = torch.randn(batch, *hollow_out_shape(mc, plan, resolution)).to(dtype)
    return b


def time_steps(unet, plan, params, batches, embeds, cfg, dtype) -> list[float]:
    """Seconds of each ``train_step`` over ``batches`` (a fresh AdamW: the first step makes its state)."""
    from hollownet.builder import Network
    from hollownet.stages.train import train_step

    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    unet.train()
    out = []
    for batch in batches:
        sync(cfg.device)
        t0 = time.perf_counter()
        train_step(Network(unet, plan, params, dtype, cfg.modes.checkpointing), batch, embeds, optimizer, cfg)
        sync(cfg.device)
        out.append(time.perf_counter() - t0)
    del optimizer
    return out


def stage1_front(mc, precision: str, device: str, photos: int, resolution: int) -> dict:
    """Stage 1's text encoder and VAE encoder, as precompute.embed_prompts / encode_photos run them."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    from hollownet.settings import torch_dtype

    dtype = torch_dtype(precision)
    out = {}
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(**mc.text_encoder)).to(device, dtype).eval()
    ids = torch.randint(0, 49408, (1, mc.text_len))
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        embeds = encoder(ids.to(device))[0].float().cpu()
    sync(device)
    out["text encoder"] = time.perf_counter() - t0
    del encoder
    vae = AutoencoderKL.from_config(mc.vae)
    vae.decoder, vae.post_quant_conv = None, None  # never loaded by stage 1
    vae = vae.to(device, dtype).eval()
    pixels = torch.rand(photos, 3, resolution, resolution) * 2 - 1
    g = torch.Generator().manual_seed(0)
    latents = []
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        for chunk in pixels.split(4):
            moments = vae.quant_conv(vae.encoder(chunk.to(device, dtype)))
            mean, logvar = moments.float().cpu().chunk(2, dim=1)
            latents.append(mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * torch.randn(mean.shape, generator=g))
    sync(device)
    out["VAE encoder"] = time.perf_counter() - t0
    del vae
    gc.collect()
    return {"seconds": out, "embeds": embeds, "latents": torch.cat(latents) * mc.vae.get("scaling_factor", 0.18215)}


def stage1_unet(mc, method: str, front: dict, n: int, precision: str, device: str):
    """Stage 1's U-Net part on ``n`` samples with precompute.make_shard (hollow: encoder + hollow only)."""
    from diffusers import DDPMScheduler

    from hollownet.cut import make_plan, meta_unet
    from hollownet.settings import torch_dtype
    from hollownet.stages.precompute import PrecomputeConfig, kept_up_modules, make_shard, sample_table

    class Bar:
        def update(self, k=1):
            pass

    dtype = torch_dtype(precision)
    cfg = PrecomputeConfig(model=mc.name, images="", prompt="", output="", method=method, num_samples=n,
                           precision=precision, shard_size=max(n, 1), device=device)
    unet = plan = None
    if method == "hollow":
        skeleton = meta_unet(mc.unet)
        plan = make_plan(skeleton)
        unet = random_unet(mc, dtype, device, drop=kept_up_modules(skeleton, plan))
    scheduler = DDPMScheduler.from_config(mc.scheduler)
    rows = sample_table(front["latents"].shape[0], 0, cfg, scheduler.config.num_train_timesteps)
    sync(device)
    t0 = time.perf_counter()
    shard = make_shard(rows, front["latents"], front["embeds"], scheduler, unet, plan, dtype, cfg, Bar())
    sync(device)
    seconds = time.perf_counter() - t0
    del unet
    gc.collect()
    return seconds, shard


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd21", help="sd21 (default) or sd15: bundled configs, random weights")
    ap.add_argument("--methods", default="full,lora,hollow")
    ap.add_argument("--resolutions", default="256", help="comma list, e.g. 256,512")
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per method and resolution (after one warm-up)")
    ap.add_argument("--personalize-steps", type=int, default=4, help="N: personalization = stage 1 + N steps (0: skip)")
    ap.add_argument("--personalize-resolution", type=int, help="default: the first of --resolutions")
    ap.add_argument("--rank", type=int, default=32, help="LoRA rank (hollownet train's default, 32)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--photos", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's; on a busy shared CPU fewer "
                                                 "threads than cores avoid OpenMP spin-wait slowdowns)")
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from hollownet.memory.configs import load_model_configs
    from hollownet.settings import Modes, torch_dtype
    from hollownet.stages.train import TrainConfig

    torch.set_flush_denormal(True)  # random weights can underflow; denormal arithmetic would distort CPU timings
    mc = load_model_configs(args.model)
    if mc.text_encoder is None or mc.vae is None:
        ap.error(f"{args.model}: speed.py needs bundled text encoder and VAE configs (sd15, sd21)")
    methods = [m for m in args.methods.split(",") if m]
    resolutions = [int(r) for r in args.resolutions.split(",") if r]
    pres = args.personalize_resolution or resolutions[0]
    dtype = torch_dtype(args.precision)
    embeds = torch.randn(1, mc.text_len, mc.text_dim)
    record = dict(model=args.model, device=args.device, threads=torch.get_num_threads(), rank=args.rank,
                  precision=args.precision, batch=args.batch, steps={}, personalization=None)
    print(f"{args.model} architecture, random weights, {args.device} ({torch.get_num_threads()} threads), "
          f"LoRA r={args.rank}, {args.precision}, batch {args.batch}", flush=True)

    front = None
    if args.personalize_steps and {"lora", "hollow"} <= set(methods):
        front = stage1_front(mc, args.precision, args.device, args.photos, pres)
        print(f"  stage 1 text encoder {front['seconds']['text encoder']:.2f} s, "
              f"VAE encoder ({args.photos} photos) {front['seconds']['VAE encoder']:.2f} s", flush=True)

    def report(method, res, times, build):
        timed = sorted(times[1:] or times)
        mid = len(timed) // 2
        median = timed[mid] if len(timed) % 2 else (timed[mid - 1] + timed[mid]) / 2
        record["steps"].setdefault(method, {})[str(res)] = dict(seconds_per_step=round(median, 3), min=round(timed[0], 3),
                                                                 warmup=round(times[0], 3), all=[round(t, 3) for t in times])
        print(f"  {method:<6} {res:>4} px: {median:7.2f} s/step median, {timed[0]:.2f} min  "
              f"(warm-up {times[0]:.2f} s; model built in {build:.0f} s)", flush=True)

    # Full fine-tuning alone (it needs the memory of the others together), then lora and hollow
    # side by side, their steps interleaved so that whatever else runs on the machine slows both alike.
    kept: dict[str, tuple] = {}  # method -> (unet, plan, params, cfg, build seconds)
    for method in [m for m in methods if m == "full"] + [m for m in methods if m != "full"]:
        if method == "full" and args.precision != "fp32":
            continue
        cfg = TrainConfig(model=args.model, store="", output="", method=method, rank=args.rank,
                          modes=Modes(precision=args.precision), device=args.device)
        t0 = time.perf_counter()
        unet, plan, params = trained_model(mc, method, args.rank, args.precision, args.device)
        build = time.perf_counter() - t0
        if method == "full":
            for res in resolutions:
                batches = [store_batch(mc, plan, res, args.batch, dtype, args.device) for _ in range(1 + args.steps)]
                report(method, res, time_steps(unet, plan, params, batches, embeds, cfg, dtype), build)
            del unet, params, plan
            gc.collect()
        else:
            kept[method] = (unet, plan, params, cfg, build)
    from hollownet.builder import Network
    from hollownet.stages.train import train_step

    for res in resolutions:
        batches = {m: [store_batch(mc, k[1], res, args.batch, dtype, args.device) for _ in range(1 + args.steps)]
                   for m, k in kept.items()}
        opts = {m: torch.optim.AdamW(k[2], lr=k[3].lr) for m, k in kept.items()}
        times = {m: [] for m in kept}
        for i in range(1 + args.steps):
            for m, (unet, plan, params, cfg, _) in kept.items():
                unet.train()
                sync(args.device)
                t0 = time.perf_counter()
                train_step(Network(unet, plan, params, dtype, cfg.modes.checkpointing), batches[m][i], embeds, opts[m], cfg)
                sync(args.device)
                times[m].append(time.perf_counter() - t0)
        for m in kept:
            report(m, res, times[m], kept[m][4])
        del opts, batches

    personal: dict[str, dict] = {}
    if front is not None and {"lora", "hollow"} <= set(kept):
        # Stage 1's U-Net part for each method, then the N steps of both, interleaved step by step so
        # that whatever else runs on the machine slows both alike.
        n = args.personalize_steps
        batches = {}
        for method in ("lora", "hollow"):
            s1, shard = stage1_unet(mc, method, front, n * args.batch, args.precision, args.device)
            keys = ("noisy", "target", "timestep", "prompt_index", "weight") + (("hollow_out",) if method == "hollow" else ())
            batches[method] = [{k: shard[k][i * args.batch:(i + 1) * args.batch].clone() for k in keys} for i in range(n)]
            personal[method] = dict(stage1_text_vae=round(sum(front["seconds"].values()), 3), stage1_unet=round(s1, 3), steps=[])
        opts = {m: torch.optim.AdamW(kept[m][2], lr=kept[m][3].lr) for m in ("lora", "hollow")}
        for i in range(n):
            for m in ("lora", "hollow"):
                unet, plan, params, cfg, _ = kept[m]
                sync(args.device)
                t0 = time.perf_counter()
                train_step(Network(unet, plan, params, dtype, cfg.modes.checkpointing), batches[m][i], front["embeds"],
                           opts[m], cfg)
                sync(args.device)
                personal[m]["steps"].append(round(time.perf_counter() - t0, 3))
        for m in ("lora", "hollow"):
            r = personal[m]
            r["train"] = round(sum(r["steps"]), 3)
            r["total"] = round(r["stage1_text_vae"] + r["stage1_unet"] + r["train"], 3)
            print(f"  {m:<6} personalization at {pres} px, N={n}: text encoder + VAE {r['stage1_text_vae']:.2f} s, "
                  f"stage 1 U-Net part {r['stage1_unet']:.2f} s, {n} steps {r['train']:.2f} s = {r['total']:.2f} s", flush=True)
        del opts
    kept.clear()
    gc.collect()

    lines = ["", "seconds per training step (median of the timed steps; ratios to LoRA)"]
    for res in resolutions:
        ref = record["steps"].get("lora", {}).get(str(res), {}).get("seconds_per_step")
        cells = []
        for method in methods:
            s = record["steps"].get(method, {}).get(str(res))
            if s:
                cells.append(f"{method} {s['seconds_per_step']:.2f} s" + (f" ({s['seconds_per_step'] / ref:.2f}x)" if ref else ""))
        lines.append(f"  {res:>4} px: " + ",  ".join(cells))
    if len(personal) == 2:
        ratio = personal["hollow"]["total"] / personal["lora"]["total"]
        record["personalization"] = dict(resolution=pres, steps=args.personalize_steps, photos=args.photos, **personal,
                                         hollow_over_lora=round(ratio, 3), target_met=ratio <= 1.0)
        lines += [f"personalization (stage 1 + {args.personalize_steps} steps, {pres} px): hollow {personal['hollow']['total']:.1f} s, "
                  f"lora {personal['lora']['total']:.1f} s: hollow / lora = {ratio:.2f}x "
                  f"[target <= 1.0x: {'met' if ratio <= 1.0 else 'NOT met'}]"]
    print("\n".join(lines))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(record, indent=2))
    print(f"written: {out / 'speed.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
