"""Two-path vs merged inference for the toy table's Hollowed Net cells: the same LoRA, the same noise.

    python benchmarks/toy_paths.py [--table benchmarks/results/toy_table_reduced] [--method hollow:r=12]

For every finished cell of ``--method`` in a ``toy_table.py`` output (its LoRA is kept in CELL/train),
generate the cell's prompts and the drift prompts twice with the cell's noise seeds and settings:
two-path (the paper's: the original U-Net up to the hollow's output, then the LoRA'd outer layers;
what the cell itself did) and merged (the LoRA fused into the weights, one ordinary U-Net pass, whose
hollow then sees the LoRA'd encoder's features, which training never showed it). Both are scored by the
toy scorer, timed, and the first image's peak is measured exactly (``MemoryTracker``). Also: the mean
absolute pixel difference between the two paths' images, and whether the two-path images equal the
cell's own (regeneration is exact). Writes ``OUT/paths.json`` and prints a markdown table.
The toy model's figures, not Stable Diffusion's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from hollownet.toy.bench import TOY_METRICS as METRICS  # noqa: E402  (identity first)


def _pixels(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    entries = json.loads((folder / "manifest.json").read_text())["images"]
    return [np.asarray(Image.open(folder / e["file"]).convert("RGB"), np.float32) for e in entries]


def _one_path(cell: Path, result: dict, subject, scorer, out: Path, merged: bool) -> dict:
    """Generate the cell's images one way into ``out``; scores, s/image, exact peak of the first image."""
    from hollownet.stages.generate import load_pipeline, prepare, render

    c = result["config"]
    pipe, info = load_pipeline("toy", str(cell / "train"), c["precision"], "cpu", c["scheduler"])
    plan, resolution = prepare(pipe, info, lora=True, merged=merged, resolution=c["resolution"])
    seconds, n, peak = 0.0, 0, None
    for name, prompts in {"images": c["prompts"], **scorer.extra_prompts}.items():
        # the bench's noise seeds (bench.generate_images): image i of prompt p
        jobs = [(prompt, result["seed"] * 1_000_003 + p * 1_009 + i, f"p{p:02d}-{i:02d}.png")
                for p, prompt in enumerate(prompts) for i in range(c["images_per_prompt"])]
        t0 = time.perf_counter()
        _, memory = render(pipe, plan, jobs, out / name, steps=c["gen_steps"], resolution=resolution,
                           guidance=c["guidance"], measure=peak is None)
        seconds, n = seconds + time.perf_counter() - t0, n + len(jobs)
        peak = peak if peak is not None else memory["peak_bytes"]
    scores = scorer.score(out, subject)
    return {**{k: scores[k] for k in METRICS}, "s_per_image": seconds / n, "peak_bytes": peak}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--table", default="benchmarks/results/toy_table_reduced", help="a toy_table.py / bench output")
    p.add_argument("--method", default="hollow:r=12", help="the hollow row to compare (its cells' LoRAs)")
    p.add_argument("--output", default=None, help="default TABLE/paths")
    args = p.parse_args()
    from hollownet.evaluation.datasets import load_dataset
    from hollownet.toy.bench import ToyScorer

    table = Path(args.table)
    out = Path(args.output or table / "paths")
    subjects = {s.name: s for s in load_dataset("toy", table).subjects}
    scorer = ToyScorer().load()
    rows = []
    for path in sorted(table.glob("cells/*/*/seed-*/result.json")):
        result = json.loads(path.read_text())
        if result["method"] != args.method or result["status"] != "ok":
            continue
        cell, name = path.parent, f"{result['subject']}-seed-{result['seed']}"
        row = {"subject": result["subject"], "seed": result["seed"], "cell_scores": {k: result["scores"][k] for k in METRICS}}
        for path_name, merged in (("two-path", False), ("merged", True)):
            row[path_name] = _one_path(cell, result, subjects[result["subject"]], scorer, out / name / path_name, merged)
            print(f"{name} {path_name}: {json.dumps(row[path_name])}", flush=True)
        two = _pixels(out / name / "two-path" / "images")
        row["two_path_equals_cell"] = all(np.array_equal(a, b) for a, b in zip(two, _pixels(cell / "images")))
        row["mean_abs_pixel_diff"] = float(np.mean([np.abs(a - b).mean() for a, b in
                                                    zip(two, _pixels(out / name / "merged" / "images"))]))
        rows.append(row)
    if not rows:
        print(f"no finished {args.method} cells under {table}/cells")
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "paths.json").write_text(json.dumps({"table": str(table), "method": args.method, "cells": rows}, indent=1))

    def ms(path_name: str, key: str) -> str:
        v = [r[path_name][key] for r in rows]
        return f"{statistics.mean(v):.3f} ± {statistics.stdev(v):.3f}" if len(v) > 1 else f"{v[0]:.3f}"

    which = ", ".join(f"{r['subject']} seed {r['seed']}" for r in rows)
    print(f"\n{args.method}, {len(rows)} cell(s) ({which}); mean ± std over cells; the toy's figures\n")
    print("| inference | " + " | ".join(METRICS) + " | s / image | peak (MiB) |")
    print("|---|" + "---:|" * (len(METRICS) + 2))
    for path_name in ("two-path", "merged"):
        peak = statistics.mean(r[path_name]["peak_bytes"] for r in rows) / 2**20
        print(f"| {path_name} | " + " | ".join(ms(path_name, k) for k in METRICS)
              + f" | {ms(path_name, 's_per_image')} | {peak:.1f} |")
    print(f"\nmean |pixel difference| two-path vs merged (0-255): "
          f"{statistics.mean(r['mean_abs_pixel_diff'] for r in rows):.2f}; two-path regenerates the cells' images "
          f"exactly: {all(r['two_path_equals_cell'] for r in rows)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
