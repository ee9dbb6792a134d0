#!/usr/bin/env python
"""SDXL's memory table: LoRA FT vs Hollowed Net (default cut), 1024 px, batch 1, stage 1, stage 2 and the
whole run, per mode, next to inference.

Every figure is ``hollownet.memory.planner``'s: the trainer's own code on fake tensors (SDXL 1.0 base's
bundled configs: the U-Net, both text encoders, the VAE), counted by the tracker that measures real runs
(they agree to the byte on the tiny SDXL test model, tests/test_sdxl.py). No weights are loaded.

Stage 1 runs as the trainer runs it for the mode (``settings.Modes.stage1``): sample-major for fp32 / bf16
(``--precompute-batch`` samples per U-Net forward, the trainer's default 4; the VAE takes one photo at a time), layer-major under a
700 MiB budget for the quantized and streamed modes. Whole run = the larger of stage 1 and stage 2
(generation not included; its peak is the inference column's). Streaming needs the hollowed network
(LoRA FT has no streamed mode).

    python benchmarks/sdxl_memory_table.py              # writes benchmarks/results/sdxl_memory_table.{json,txt}
    python benchmarks/sdxl_memory_table.py --jobs 1     # one process (default: 2)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

GiB = 1024**3
RESULTS = Path(__file__).resolve().parent / "results"

METHODS = [("lora", "LoRA FT (whole U-Net)"), ("hollow", "Hollowed Net (default cut)")]
# key, label, Modes settings
MODES = [
    ("fp32", "fp32", dict(precision="fp32")),
    ("bf16_ckpt", "bf16 + ckpt", dict(precision="bf16", grad_checkpointing=True)),
    ("int8_ckpt", "int8 + ckpt", dict(precision="int8", grad_checkpointing=True)),
    ("nf4_ckpt", "nf4 + ckpt", dict(precision="nf4", grad_checkpointing=True)),
    ("nf4_ckpt_inbw", "nf4 + ckpt + in-backward AdamW", dict(precision="nf4", grad_checkpointing=True,
                                                             optimizer="adamw-in-backward")),
    ("stream_inbw", "streamed bf16 + in-backward AdamW", dict(precision="bf16", stream_weights=True,
                                                               optimizer="adamw-in-backward")),
]
TARGETS = [  # (description, test on the results)
    ("Hollowed bf16 + ckpt, stage 2, below SDXL bf16 inference (batch 1)",
     lambda r, inf: r["hollow_bf16_ckpt"]["train_peak_bytes"] < inf["bf16"]["1"]),
    ("the most frugal mode's whole run <= 2.0 GiB",
     lambda r, inf: min(whole(v) for v in r.values()) <= 2.0 * GiB),
]


def whole(r: dict) -> int:
    return max(r["precompute_peak_bytes"] or 0, r["train_peak_bytes"] or 0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="sdxl", help="sdxl (bundled SDXL 1.0 base configs, default) or an SDXL folder")
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--precompute-batch", type=int, default=4, help="stage 1 samples per forward (sample-major)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--output", default=str(RESULTS))
    args = ap.parse_args(argv)

    from hollownet.memory.planner import predict_many

    common = dict(model=args.model, resolution=args.resolution, batch=1, rank=args.rank,
                  precompute_batch=args.precompute_batch)
    tasks, keys = [], []
    for method, _ in METHODS:
        for key, _, modes in MODES:
            if method == "lora" and modes.get("stream_weights"):
                continue
            tasks.append(({**common, "method": method, **modes}, ("precompute", "train")))
            keys.append(f"{method}_{key}")
    for precision in ("fp32", "bf16"):
        tasks.append(({**common, "precision": precision, "inference_batches": (1, 2)}, ("inference",)))
        keys.append(f"inference_{precision}")
    t0 = time.perf_counter()

    def done(r: dict) -> None:  # one line per prediction as it lands (each takes a minute or more)
        print(f"  {time.perf_counter() - t0:5.0f} s  {r['method']} {r['precision']} ckpt={r['grad_checkpointing']} "
              f"stream={r['stream_weights']} {r['optimizer']}", file=sys.stderr, flush=True)

    results = dict(zip(keys, predict_many(tasks, jobs=args.jobs, progress=done)))
    seconds = time.perf_counter() - t0
    inference = {p: results.pop(f"inference_{p}")["inference_peak_bytes_by_batch"] for p in ("fp32", "bf16")}
    cut = next(r for k, r in results.items() if k.startswith("hollow"))

    title = (f"{args.model}, {args.resolution} px, batch 1, LoRA r={args.rank} on to_q/k/v/out.0: predicted peak "
             "tensor memory (GiB = 2^30 B)")
    lines = [title, f"  cut: {', '.join(cut['hollow_blocks'])} ({cut['fraction']:.1%} of U-Net params; "
                    f"removes {cut['lora_targets_removed_share']:.1%} of the LoRA target layers)", "",
             f"  {'method':<28} {'mode':<34} {'stage 1':>8} {'stage 2':>8} {'whole':>8}   stage 1's largest part"]
    rows = []
    for method, mlabel in METHODS:
        for key, label, _ in MODES:
            r = results.get(f"{method}_{key}")
            if r is None:
                continue
            s1, s2 = r["precompute_peak_bytes"], r["train_peak_bytes"]
            if r["stage1"].get("layer_major"):
                layout = "layer-major"
            elif r["precompute_peak_part"] == "VAE encoder":
                layout = "1 photo per forward"  # encoders.encode_latents
            else:
                layout = f"{args.precompute_batch} per forward"
            rows.append(dict(method=method, mode=key, label=label, stage1_bytes=s1, stage2_bytes=s2,
                             whole_bytes=whole(r), stage1_part=r["precompute_peak_part"], stage1_layout=layout,
                             stage1_parts=r["breakdown"]["precompute_parts"], train_breakdown=r["breakdown"]["train"]))
            lines.append(f"  {mlabel:<28} {label:<34} {s1 / GiB:8.2f} {s2 / GiB:8.2f} {whole(r) / GiB:8.2f}   "
                         f"{r['precompute_peak_part']} ({layout})")
    lines += ["", f"  {'inference, U-Net only':<63} {'batch 1':>8} {'batch 2':>8}"]
    for p in ("fp32", "bf16"):
        lines.append(f"  {p:<63} {inference[p]['1'] / GiB:8.2f} {inference[p]['2'] / GiB:8.2f}")
    lines += ["", "targets (issue 13)"]
    met = []
    for desc, test in TARGETS:
        ok = bool(test(results, inference))
        met.append(dict(description=desc, met=ok))
        lines.append(f"  [{'met' if ok else 'NOT met'}] {desc}")
    lines += ["", "whole = max(stage 1, stage 2); inference = one U-Net denoising step, no grad, text encoders and VAE "
                  "not resident.", f"({seconds:.0f} s, {args.jobs} processes, no weights loaded)"]
    text = "\n".join(lines)
    print(text)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sdxl_memory_table.json").write_text(json.dumps(dict(title=title, settings=common, rows=rows,
                                                                inference_bytes=inference, targets=met,
                                                                cut=cut["hollow_blocks"], seconds=round(seconds, 1)),
                                                           indent=2))
    (out / "sdxl_memory_table.txt").write_text(text + "\n")
    return 0 if all(t["met"] for t in met) else 1


if __name__ == "__main__":
    sys.exit(main())
