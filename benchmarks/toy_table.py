"""The paper's table in miniature, on the bundled toy model (the toy's figures, not Stable Diffusion's).

    python benchmarks/toy_table.py --reduced          # 1 subject x 2 seeds x 4 rows, ~15 min on 2 cores
    python benchmarks/toy_table.py                    # every row, 4 subjects x 5 seeds: hours; resumable

It is ``hollownet bench --model toy --dataset toy`` with the rows below (rerun the same command to
continue: finished cells are kept). Ranks are the paper's scaled to the toy's width: SD's narrowest
attention is 320 channels, the toy's 32, so r=128 becomes r=12 and r=1 stays 1. Full fine-tuning
uses a 10x lower learning rate than LoRA (as the paper's 5e-6 against LoRA's 1e-4 / 5e-5).
"""

from __future__ import annotations

import argparse
import sys

HIGH_RANK = 12
REDUCED = ["full:lr=1e-4", f"lora:r={HIGH_RANK}", "lora:r=1", f"hollow:r={HIGH_RANK}"]


def all_rows() -> list[str]:
    from hollownet.cut import all_plans, load_unet_config, make_plan, meta_unet
    from hollownet.toy import model_dir

    unet = meta_unet(load_unet_config(model_dir()))
    default = make_plan(unet).hollow_blocks
    cuts = [p.hollow_blocks for p in all_plans(unet) if p.hollow_blocks != default]
    r = f"r={HIGH_RANK}"
    return REDUCED + [
        f"hollow:{r}:infer=merged",
        *[f"hollow:{r}:blocks={'+'.join(c)}" for c in cuts],  # the paper's "fraction of hollowed layers"
        f"hollow:{r}:weights=bf16", f"hollow:{r}:weights=int8", f"hollow:{r}:weights=nf4",
        f"hollow:{r}:stream=1", f"hollow:{r}:opt=in-backward",
        f"hollow:{r}:samples=100", f"hollow:{r}:samples=300",  # stage-1 reuse: 100 / 300 stored for 1200 seen
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="1 subject, 2 seeds, 4 rows (under ~15 min)")
    p.add_argument("--output", default=None, help="default benchmarks/results/toy_table[_reduced]")
    p.add_argument("--subjects", default=None, help="comma-separated (default: all toy subjects; plus if --reduced)")
    p.add_argument("--seeds", default=None, help="default 0-4 (0,1 if --reduced)")
    p.add_argument("--methods", default=None, help="override the rows (comma-separated specs)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    args = p.parse_args()
    from hollownet.cli import main as cli

    out = args.output or ("benchmarks/results/toy_table_reduced" if args.reduced else "benchmarks/results/toy_table")
    methods = args.methods or ",".join(REDUCED if args.reduced else all_rows())
    argv = ["bench", "--model", "toy", "--dataset", "toy", "--output", out, "--methods", methods,
            "--seeds", args.seeds or ("0,1" if args.reduced else "0-4"),
            "--images-per-prompt", str(args.images_per_prompt)]
    subjects = args.subjects or ("plus" if args.reduced else None)
    if subjects:
        argv += ["--subjects", subjects]
    print("hollownet " + " ".join(argv), flush=True)
    return cli(argv)


if __name__ == "__main__":
    sys.exit(main())
