"""Layer-major vs sample-major stage 1: peak tensor memory and wall time.

(a) **Peak** on the real SD 2.1 architecture (bundled configs, ``src/hollownet/configs/sd21_*.json``)
    at the full setting (512 px, 400 samples, fp32, default cut), measured with ``MemoryTracker``
    under ``torch._subclasses.FakeTensorMode``: the modules are built on the meta device and
    every layer gets fake weights when it loads (``layerwise.EmptyWeights``), so nothing is read
    and nothing allocated, but every storage has its size. Layer-major runs the same per-layer
    loop as ``run_precompute(layer_major=True)`` (``layerwise.run_text_encoder`` /
    ``run_vae_encoder`` / ``run_unet_hollow``) with ``Arrays(simulate=True)``: the spill decisions
    are the real ones, a spilled chunk read is a fake tensor of the chunk's size (what
    ``torch.from_numpy(memmap[a:b])`` costs), a write to disk does nothing, and only the first,
    second and last chunk of a layer run (all other chunks repeat the second's shapes and memory).
    Sample-major is measured as ``run_precompute`` measures it (``PartMeter``: whole text encoder,
    whole VAE encoder in chunks of ``batch_size`` photos, whole U-Net encoder + hollow on the first
    shard). Also shown: one fp32 forward of the whole U-Net at batch 1 (inference).

(b) **Wall time**, real random weights on this machine's CPU: an SD 2.1-architecture model with
    random weights is saved once in the diffusers layout (cached, ~5 GB), then ``run_precompute``
    runs sample-major and layer-major on the same photos into fresh stores, same process, and the
    stores are compared tensor by tensor. Default 256 px and 12 samples (a few minutes on 2 cores;
    SD 2.1 at 512 px on 2 CPU cores costs ~13 s a sample); ``--wall-resolution 512 --wall-samples
    400`` is the full setting. ``--measure`` adds runs with ``track_memory=True`` (real measured
    peaks at the reduced size).

Prints the figures and writes ``benchmarks/results/layerwise_stage1.json``.

    python benchmarks/layerwise_stage1.py                    # (a) and (b), defaults
    python benchmarks/layerwise_stage1.py --skip-wall        # (a) only, seconds
    python benchmarks/layerwise_stage1.py --skip-fake --wall-samples 32 --measure
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hollownet import encoders as E  # noqa: E402
from hollownet.lowmem import layerwise as LW  # noqa: E402
from hollownet.memory.sizes import format_bytes, parse_size  # noqa: E402
from hollownet.memory.tracker import PartMeter  # noqa: E402
from hollownet.cut import CONFIG_DIR, load_unet_config, make_plan, meta_unet  # noqa: E402
from hollownet.stages.precompute import PrecomputeConfig, kept_up_modules, make_shard, run_precompute, sample_table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GiB = 1024**3


def _config(name: str) -> dict:
    cfg = json.loads((CONFIG_DIR / name).read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def materialize(module: nn.Module, dtype, skip=()) -> None:
    """Every parameter and buffer (non-persistent ones too, as ``from_pretrained`` makes them) a
    fresh tensor of its shape: fake inside a FakeTensorMode. Tensors under ``skip`` stay on meta."""
    from hollownet.loading import is_under

    for mname, mod in module.named_modules():
        if skip and is_under(mname, list(skip)):
            continue
        for k, p in list(mod._parameters.items()):
            if p is not None:
                dt = dtype if p.is_floating_point() else p.dtype
                mod._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=dt), requires_grad=False)
        for k, b in list(mod._buffers.items()):
            if b is not None:
                mod._buffers[k] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)


def _models(model: str):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = meta_unet(load_unet_config(model)).requires_grad_(False).eval()
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(_config(f"{model}_vae.json"))
        text = CLIPTextModel(CLIPTextConfig(**_config(f"{model}_text_encoder.json")))
    return unet, vae.requires_grad_(False).eval(), text.requires_grad_(False).eval()


def prompt_ids(length: int = 77) -> torch.Tensor:
    """CLIP ids of a short prompt, padded: <bos> 'a photo of sks dog' <eos> pad... (SD 2.x pads with id 0)."""
    ids = [49406, 320, 1125, 539, 48136, 1929, 49407]
    return torch.tensor([ids + [0] * (length - len(ids))])


def fake_peaks(args) -> dict:
    from diffusers import DDPMScheduler
    from torch._subclasses import FakeTensorMode

    dtype, res, n, P = torch.float32, args.resolution, args.samples, 1
    budget = parse_size(args.budget, "--budget")
    h = res // 8
    out = {"setting": dict(model=args.model, resolution=res, samples=n, photos=args.photos, precision="fp32",
                           budget_bytes=budget, batch_size=args.batch_size)}

    # --- layer-major: the run_precompute(layer_major=True) loop, fake weights, simulated spill
    t0 = time.perf_counter()
    unet, vae, text = _models(args.model)
    plan = make_plan(unet)
    out["setting"]["hollow_blocks"] = plan.hollow_blocks
    pred = LW.predict_peak(unet, plan, vae=vae, text=text, resolution=res, num_samples=n, photos=args.photos,
                           prompts=P, budget=budget, batch_size=args.batch_size, dtype=dtype)
    s, stats = pred["summary"], pred["stats"]
    out["layer_major"] = dict(peak_bytes=s["peak_bytes"], peak_layer=s["peak_phase"], breakdown=s["breakdown"],
                              part_peaks={p: max(v for k, v in s["parts"].items() if k.startswith(p + ":"))
                                          for p in ("text encoder", "VAE encoder", "U-Net encoder + hollow")},
                              unet_spilled_bytes=pred["unet_spilled_bytes"], seconds=round(time.perf_counter() - t0, 2),
                              layers={p: [dict(name=x.name, weight_bytes=x.weight_bytes, chunk=x.chunk,
                                               work_per_sample=x.work_per_sample, peak=s["parts"][f"{p}: {x.name}"])
                                          for x in v] for p, v in stats.items()})

    # --- sample-major, as run_precompute measures it
    t0 = time.perf_counter()
    unet, vae, text = _models(args.model)
    sm = PartMeter(True, "cpu")
    ids = prompt_ids(text.config.max_position_embeddings)
    pcfg = PrecomputeConfig(model=args.model, images="-", prompt="-", output="-", resolution=res, num_samples=n,
                            batch_size=args.batch_size)
    table = sample_table(args.photos, 0, pcfg, 1000)
    with FakeTensorMode() as mode:
        materialize(text, dtype)
        E.embed(text, mode.from_tensor(ids), "cpu", sm)
        _to_meta(text)
        materialize(vae, dtype, skip=["decoder", "post_quant_conv"])
        pixels = torch.empty(args.photos, 3, res, res)
        E.encode_latents(vae, pixels, 0, dtype, "cpu", args.batch_size, sm)
        _to_meta(vae)
        del pixels
        scheduler = DDPMScheduler.from_config(_config(f"{args.model}_scheduler.json"))
        materialize(unet, dtype, skip=kept_up_modules(unet, plan))
        latents = torch.empty(args.photos, 4, h, h)
        embeds = torch.empty(P, 77, text.config.hidden_size)
        with sm.measure("U-Net encoder + hollow", unet):
            make_shard(table[: pcfg.shard_size], latents, embeds, scheduler, unet, plan, dtype, pcfg)
        _to_meta(unet)
        # reference: fp32 inference, the whole U-Net, batch 1
        unet_full = meta_unet(load_unet_config(args.model)).requires_grad_(False).eval()
        materialize(unet_full, dtype)
        with torch.no_grad(), sm.measure("(reference) U-Net fp32 inference, batch 1", unet_full):
            unet_full(torch.empty(1, 4, h, h), torch.zeros(1, dtype=torch.long), torch.empty(1, 77, text.config.hidden_size)).sample
    s = sm.summary()
    ref = s["parts"].pop("(reference) U-Net fp32 inference, batch 1")
    stage = {k: v for k, v in s["parts"].items()}
    top = max(stage, key=stage.get)
    out["sample_major"] = dict(peak_bytes=stage[top], peak_part=top, part_peaks=stage, seconds=round(time.perf_counter() - t0, 2))
    out["unet_inference_fp32_batch1_bytes"] = ref
    return out


def _to_meta(module: nn.Module) -> None:
    LW._to_meta(module)


# ------------------------------------------------------------------------------ wall time


def build_random_model(folder: Path, model: str = "sd21", seed: int = 0) -> Path:
    """An SD 2.x-architecture pipeline with random weights, diffusers layout (cached in ``folder``)."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from hollownet.tiny import save_tokenizer

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(tmp / "_tok", max_length=77)  # byte-level CLIP BPE: ids < 514 < the real vocab
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(_config(f"{model}_vae.json")),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_config(f"{model}_text_encoder.json"))),
        tokenizer=tokenizer, unet=UNet2DConditionModel.from_config(load_unet_config(model)),
        scheduler=DDPMScheduler.from_config(_config(f"{model}_scheduler.json")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp, safe_serialization=True)
    shutil.rmtree(tmp / "_tok")
    del pipe
    os.replace(tmp, folder)
    return folder


def make_photos(folder: Path, count: int, size: int = 512) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        p = folder / f"{i:02d}.png"
        if not p.exists():
            base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # smooth-ish random image
            Image.fromarray(base).resize((size, size), Image.BICUBIC).save(p)
    return folder


def compare_stores(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for f in sorted(p.name for p in a.glob("*.safetensors")):
        x, y = load_file(a / f), load_file(b / f)
        assert x.keys() == y.keys(), f
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=1e-4, atol=1e-4)
            worst = max(worst, (x[k].double() - y[k].double()).abs().max().item())
    return worst


def wall_times(args) -> dict:
    model = build_random_model(Path(args.model_dir), args.model)
    photos = make_photos(RESULTS / "_photos", args.wall_photos)
    work = RESULTS / "_stores"
    shutil.rmtree(work, ignore_errors=True)
    base = dict(model=str(model), images=str(photos), prompt="a photo of sks dog", resolution=args.wall_resolution,
                num_samples=args.wall_samples, shard_size=args.shard_size, batch_size=args.batch_size)
    runs = [("sample-major", {}), ("layer-major", dict(layer_major=True, memory_budget=args.budget))]
    if args.no_budget_too:
        runs.append(("layer-major, no budget", dict(layer_major=True)))
    out = {"setting": dict(model=f"{args.model} architecture, random weights", resolution=args.wall_resolution,
                           samples=args.wall_samples, photos=args.wall_photos, batch_size=args.batch_size,
                           budget=args.budget, threads=torch.get_num_threads(), cpus=os.cpu_count(),
                           shard_size=args.shard_size), "runs": {}}
    for rep in range(args.repeats):
        for name, kw in runs:
            store = work / f"{name.replace(' ', '_').replace(',', '')}-{rep}"
            t0, c0 = time.perf_counter(), time.process_time()
            r = run_precompute(PrecomputeConfig(**base, output=str(store), **kw), track_memory=False)
            secs, cpu = time.perf_counter() - t0, time.process_time() - c0
            entry = out["runs"].setdefault(name, {"seconds": [], "cpu_seconds": [], "load_avg_after": []})
            entry["seconds"].append(round(secs, 2))
            entry["cpu_seconds"].append(round(cpu, 2))
            entry["load_avg_after"].append(round(os.getloadavg()[0], 2))
            print(f"  {name:24s} run {rep}: {secs:7.1f} s wall, {cpu:7.1f} s CPU (load avg {os.getloadavg()[0]:.1f})", flush=True)
            if name.startswith("layer-major") and r.layer_major:
                out["runs"][name]["unet_chunks"] = {x["name"]: x["chunk"] for x in r.layer_major.get("U-Net encoder + hollow", [])}
                out["runs"][name]["unet_spilled_bytes"] = r.layer_major.get("spilled_bytes")
    sm = work / "sample-major-0"
    for name, _ in runs[1:]:
        out["runs"][name]["max_abs_diff_vs_sample_major"] = compare_stores(sm, work / f"{name.replace(' ', '_').replace(',', '')}-0")
    if args.measure:
        for name, kw in runs:
            store = work / f"measured-{name.replace(' ', '_').replace(',', '')}"
            t0 = time.perf_counter()
            r = run_precompute(PrecomputeConfig(**base, output=str(store), **kw), track_memory=True)
            out["runs"][name]["measured"] = dict(peak_bytes=r.memory["peak_bytes"], peak_phase=r.memory["peak_phase"],
                                                 seconds_with_tracking=round(time.perf_counter() - t0, 2))
            print(f"  {name:24s} measured peak {format_bytes(r.memory['peak_bytes'])} in {r.memory['peak_phase']}", flush=True)
    for name in out["runs"]:
        out["runs"][name]["median_seconds"] = statistics.median(out["runs"][name]["seconds"])
        out["runs"][name]["median_cpu_seconds"] = statistics.median(out["runs"][name]["cpu_seconds"])
    shutil.rmtree(work, ignore_errors=True)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd21", help="bundled architecture (configs/<model>_*.json)")
    ap.add_argument("--budget", default="0.8GiB", help="layer-major memory budget")
    ap.add_argument("--batch-size", type=int, default=4, help="sample-major batch (and VAE noise chunks)")
    ap.add_argument("--resolution", type=int, default=512, help="(a) resolution")
    ap.add_argument("--samples", type=int, default=400, help="(a) training samples")
    ap.add_argument("--photos", type=int, default=4, help="(a) photos")
    ap.add_argument("--wall-resolution", type=int, default=256, help="(b) resolution")
    ap.add_argument("--wall-samples", type=int, default=12, help="(b) training samples")
    ap.add_argument("--wall-photos", type=int, default=2, help="(b) photos")
    ap.add_argument("--shard-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=1, help="(b) runs of each mode (alternating)")
    ap.add_argument("--no-budget-too", action="store_true", help="(b) also time layer-major without a budget")
    ap.add_argument("--measure", action="store_true", help="(b) also run with track_memory=True (real peaks)")
    ap.add_argument("--model-dir", default=str(RESULTS / "_model_sd21_random"), help="(b) random model cache")
    ap.add_argument("--skip-fake", action="store_true")
    ap.add_argument("--skip-wall", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "layerwise_stage1.json"))
    args = ap.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    result = {"torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    if not args.skip_fake:
        print(f"(a) peak, {args.model} {args.resolution} px, {args.samples} samples, fp32, FakeTensorMode", flush=True)
        f = fake_peaks(args)
        result["peak"] = f
        lm, sm = f["layer_major"], f["sample_major"]
        print(f"  layer-major (budget {args.budget}): {format_bytes(lm['peak_bytes'])} at {lm['peak_layer']}"
              f"  [{', '.join(f'{k} {format_bytes(v)}' for k, v in lm['part_peaks'].items())}]")
        print(f"    breakdown: {', '.join(f'{k} {format_bytes(v)}' for k, v in lm['breakdown'].items() if v)};"
              f" U-Net activations spilled: {format_bytes(lm['unet_spilled_bytes'])}  ({lm['seconds']} s)")
        print(f"  sample-major: {format_bytes(sm['peak_bytes'])} in {sm['peak_part']}"
              f"  [{', '.join(f'{k} {format_bytes(v)}' for k, v in sm['part_peaks'].items())}]  ({sm['seconds']} s)")
        print(f"  (reference) whole U-Net fp32 inference, batch 1: {format_bytes(f['unet_inference_fp32_batch1_bytes'])}")
        print(f"  target <= 0.8 GiB: {'met' if lm['peak_bytes'] <= 0.8 * GiB else 'NOT met'}"
              f" ({lm['peak_bytes'] / GiB:.4f} GiB)", flush=True)
    if not args.skip_wall:
        print(f"(b) wall time, {args.model} architecture with random weights, {args.wall_resolution} px, "
              f"{args.wall_samples} samples, {torch.get_num_threads()} threads, CPU", flush=True)
        w = wall_times(args)
        result["wall"] = w
        sm_s, sm_c = w["runs"]["sample-major"]["median_seconds"], w["runs"]["sample-major"]["median_cpu_seconds"]
        print("  medians (a shared machine: the load average after each run is in the JSON):")
        for name, r in w["runs"].items():
            extra = f", max |diff| vs sample-major {r['max_abs_diff_vs_sample_major']:.2e}" if "max_abs_diff_vs_sample_major" in r else ""
            print(f"  {name:24s} {r['median_seconds']:7.1f} s wall ({r['median_seconds'] / sm_s:.2f}x sample-major), "
                  f"{r['median_cpu_seconds']:7.1f} s CPU ({r['median_cpu_seconds'] / sm_c:.2f}x){extra}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
