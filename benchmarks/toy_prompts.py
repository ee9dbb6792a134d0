"""Prompt following of the bundled toy model: background / colour / shape drawn as the caption says.

    python benchmarks/toy_prompts.py [--n 100] [--guidance 3] [--steps 25] [--out benchmarks/results/toy_prompts]
    HOLLOWNET_TOY_MODEL=DIR python benchmarks/toy_prompts.py --evaluator src/hollownet/toy/model/evaluator.safetensors

New random captions (seeded; the model's own caption grammar, 20% short ones), drawn by the stock
``StableDiffusionPipeline`` loaded from the bundled folder, read back by the toy evaluator. Chance is
0.2 / 0.2 / 0.33. ``--evaluator``: read with another evaluator (default the model folder's), e.g.
the bundled one for another copy of the model, so two models are read by the same ruler. Writes
``toy_prompts.json`` and a sheet of the first 24 images. The toy's figures.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=100)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--seed", type=int, default=2024)
    p.add_argument("--out", default="benchmarks/results/toy_prompts")
    p.add_argument("--evaluator", type=Path, default=None, help="evaluator.safetensors (default: the model folder's)")
    args = p.parse_args()
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from hollownet.toy import model_dir
    from hollownet.toy import world as W
    from hollownet.toy.evaluator import classify, load_evaluator
    from hollownet.sheets import contact_sheet

    pipe = StableDiffusionPipeline.from_pretrained(model_dir(), dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)  # as hollownet generate
    pipe.set_progress_bar_config(disable=True)
    rng = random.Random(args.seed)
    scenes = [W.random_scene(rng) for _ in range(args.n)]
    short = [rng.random() < W.SHORT_CAPTION_RATE for _ in scenes]
    captions = [s.caption(short=k) for s, k in zip(scenes, short)]
    t0 = time.perf_counter()
    images = []
    for i in range(0, args.n, 10):
        images += pipe(captions[i:i + 10], num_inference_steps=args.steps, guidance_scale=args.guidance, height=64,
                       width=64, generator=torch.Generator().manual_seed(args.seed + i)).images
    seconds = time.perf_counter() - t0
    got = classify(load_evaluator(args.evaluator), images)
    acc = {k: float(np.mean([g[k] == getattr(s, k) for g, s in zip(got, scenes)])) for k in ("colour", "shape")}
    acc["background"] = float(np.mean([g["background"] == s.background for g, s, k in zip(got, scenes, short) if not k]))
    per_shape = {sh: float(np.mean([g["shape"] == sh for g, s in zip(got, scenes) if s.shape == sh])) for sh in W.SHAPES}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": str(model_dir()), "evaluator": str(args.evaluator or model_dir() / "evaluator.safetensors"),
              "n": args.n, "guidance": args.guidance, "steps": args.steps, "seed": args.seed,
              "accuracy": acc, "shape_accuracy_by_shape": per_shape, "seconds_per_image": seconds / args.n,
              "note": "background scored on captions that name one; the toy model's figures, not SD's"}
    (out / "toy_prompts.json").write_text(json.dumps(record, indent=1))
    contact_sheet({f"row {r}": images[r * 8:(r + 1) * 8] for r in range(3)}, out / "toy_prompts.png",
                  caption=" | ".join(captions[:4]) + " ...", cell=96)
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
