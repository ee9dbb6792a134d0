#!/usr/bin/env python
"""Every valid hollow cut of a U-Net: memory, parameters and LoRA size against the hollowed fraction.

For each skip-symmetric cut (depth 0 = only the mid block ... the deepest) and plain LoRA (no
hollow, fraction 0): hollowed / kept / LoRA parameters, the LoRA file size (fp32), the predicted
training peak in each setting (default: fp32; fp32 + gradient checkpointing; bf16 frozen weights +
checkpointing) and stage 1's peak (fp32, as the trainer runs it). Predictions are
``hollownet.memory.planner``'s (fake tensors, no weights; the trainer's own code path).

    python benchmarks/sweep.py                              # SD 2.1, r=128, 512 px -> results/sweep.{json,png}
    python benchmarks/sweep.py --settings fp32 --no-stage1  # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

GiB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = {
    "fp32": dict(precision="fp32", grad_checkpointing=False),
    "fp32+ckpt": dict(precision="fp32", grad_checkpointing=True),
    "bf16": dict(precision="bf16", grad_checkpointing=False),
    "bf16+ckpt": dict(precision="bf16", grad_checkpointing=True),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sd21")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--settings", default="fp32,fp32+ckpt,bf16+ckpt", help=f"comma list of {', '.join(SETTINGS)}")
    ap.add_argument("--no-stage1", action="store_true", help="skip stage 1 (pre-compute) predictions")
    ap.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)

    from hollownet.memory.configs import load_model_configs
    from hollownet.memory.planner import predict_many
    from hollownet.cut import all_plans, default_depth, lora_size, lora_target_modules, meta_unet

    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        ap.error(f"unknown --settings {', '.join(unknown)}; choose from {', '.join(SETTINGS)}")
    mc = load_model_configs(args.model)
    skeleton = meta_unet(mc.unet)
    mods = dict(skeleton.named_modules())
    total = sum(p.numel() for p in skeleton.parameters())
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    cuts = [dict(method="lora", depth=None, fraction=0.0, hollow_blocks=None, hollow_params=0,
                 lora_params=sum(lora_size(mods[n], args.rank) for n in lora_target_modules(skeleton, [], targets)))]
    for p in all_plans(skeleton):
        skip = p.hollow_prefixes(skeleton)
        cuts.append(dict(method="hollow", depth=p.depth, fraction=round(p.fraction, 4), hollow_blocks=p.hollow_blocks,
                         hollow_params=p.hollow_params,
                         lora_params=sum(lora_size(mods[n], args.rank) for n in lora_target_modules(skeleton, skip, targets))))
    common = dict(model=args.model, rank=args.rank, resolution=args.resolution, batch=args.batch)
    tasks, where = [], []
    for i, cut in enumerate(cuts):
        for name in names:
            tasks.append(({**common, "method": cut["method"], "depth": cut["depth"], **SETTINGS[name]}, ("train",)))
            where.append((i, name))
        if not args.no_stage1:
            tasks.append(({**common, "method": cut["method"], "depth": cut["depth"]}, ("precompute",)))
            where.append((i, "stage1"))
    tasks.append(({**common, "method": "lora"}, ("inference",)))
    where.append((None, "inference"))
    t0 = time.perf_counter()
    done = [0]

    def tick(_):
        done[0] += 1
        print(f"\r  predicted {done[0]}/{len(tasks)} ({time.perf_counter() - t0:.0f} s)", end="", file=sys.stderr, flush=True)

    results = predict_many(tasks, jobs=args.jobs, progress=tick)
    print(file=sys.stderr)
    inference = None
    for (i, name), r in zip(where, results):
        if name == "inference":
            inference = r["inference_peak_bytes"]
        elif name == "stage1":
            cuts[i]["stage1_bytes"] = r["precompute_peak_bytes"]
            cuts[i]["stage1_parts"] = r["breakdown"]["precompute_parts"]
        else:
            cuts[i].setdefault("train_bytes", {})[name] = r["train_peak_bytes"]
    for cut in cuts:
        cut["kept_params"] = total - cut["hollow_params"]
        cut["lora_mib_fp32"] = round(cut["lora_params"] * 4 / 2**20, 1)

    head = (f"{args.model}, LoRA r={args.rank}, {args.resolution} px, batch {args.batch}: every cut "
            f"(U-Net {total / 1e6:.1f}M params; GiB = 2^30 B; fp32 U-Net inference {inference / GiB:.2f} GiB)")
    cols = "".join(f"{'train ' + n:>16}" for n in names) + ("" if args.no_stage1 else f"{'stage 1 fp32':>14}")
    lines = [head, "", f"  {'depth':>5} {'hollow':>7} {'kept':>8} {'LoRA':>7} {'LoRA MiB':>9}{cols}  cut"]
    for cut in cuts:
        cells = "".join(f"{cut['train_bytes'][n] / GiB:14.2f} G" for n in names)
        if not args.no_stage1:
            cells += f"{cut['stage1_bytes'] / GiB:12.2f} G"
        blocks = "LoRA on the whole U-Net (no hollow)" if cut["method"] == "lora" else ", ".join(cut["hollow_blocks"])
        depth = "-" if cut["depth"] is None else str(cut["depth"])
        lines.append(f"  {depth:>5} {cut['fraction']:7.1%} {cut['kept_params'] / 1e6:7.1f}M {cut['lora_params'] / 1e6:6.2f}M "
                     f"{cut['lora_mib_fp32']:9.1f}{cells}  {blocks}")
    seconds = time.perf_counter() - t0
    lines.append(f"({seconds:.0f} s, {args.jobs} processes, no weights loaded)")
    text = "\n".join(lines)
    print(text)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(dict(settings=common, unet_params=total, inference_bytes=inference,
                                                    train_settings=names, cuts=cuts, seconds=round(seconds, 1)), indent=2))
    (out / "sweep.txt").write_text(text + "\n")
    plot(cuts, names, inference, not args.no_stage1, out / "sweep.png", head, default_depth(skeleton))
    print(f"written: {out / 'sweep.json'}, sweep.txt, sweep.png")
    return 0


def plot(cuts, names, inference, stage1: bool, path: Path, title: str, paper_depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [c["fraction"] for c in cuts]
    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name in names:
        ax.plot(x, [c["train_bytes"][name] / GiB for c in cuts], marker="o", ms=3, label=f"training, {name}")
    if stage1:
        ax.plot(x, [c["stage1_bytes"] / GiB for c in cuts], marker="s", ms=3, ls=":", label="stage 1 (pre-compute), fp32")
    ax.axhline(inference / GiB, color="#d83b3b", ls="--", lw=1, label="fp32 inference (U-Net, batch 1)")
    paper = [c for c in cuts if c["depth"] == paper_depth]
    if paper:
        ax.axvline(paper[0]["fraction"], color="#888888", lw=0.8, ls="-.", label="default (paper's) cut")
    ax.set_xlabel("hollowed fraction of U-Net parameters (0 = plain LoRA)")
    ax.set_ylabel("predicted peak memory (GiB)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
