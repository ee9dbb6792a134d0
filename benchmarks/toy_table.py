"""The paper's table in miniature, on the bundled toy model (the toy's figures, not Stable Diffusion's).

    python benchmarks/toy_table.py --reduced          # 1 subject x 2 seeds x 4 rows
    python benchmarks/toy_table.py --main             # the methods: 5 rows x 4 subjects x 5 seeds
    python benchmarks/toy_table.py --sweep            # cuts, low-memory modes, reuse: 3 subjects x 5 seeds
    python benchmarks/toy_table.py                    # every row, 4 subjects x 5 seeds: many hours; resumable

It is ``hollownet bench --model toy --dataset toy`` with the rows below (rerun the same command to
continue: finished cells are kept), scored by the toy scorer (identity first: toy/identity.py). Every row
uses the toy's defaults (settings.TOY_DEFAULTS: LoRA targets, rank, steps, lr, batch) unless it names
another value, and Hollowed Net the same settings as LoRA FT, as the paper does. "High rank" is the
default rank; r=1 is the paper's low-rank row. Full fine-tuning uses a 10x lower learning rate than
LoRA (as the paper's 5e-6 against LoRA's 1e-4 / 5e-5).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hollownet.settings import TOY_DEFAULTS

HIGH_RANK = TOY_DEFAULTS["rank"]
SEEN = TOY_DEFAULTS["steps"] * TOY_DEFAULTS["batch"]  # training samples one run sees
REDUCED = [f"full:lr={TOY_DEFAULTS['lr'] / 10:g}", f"lora:r={HIGH_RANK}", "lora:r=1", f"hollow:r={HIGH_RANK}"]
MAIN = REDUCED + [f"hollow:r={HIGH_RANK}:infer=merged"]
BASELINES = [f"lora:r={HIGH_RANK}", f"hollow:r={HIGH_RANK}"]  # the sweep's reference rows (shared with --main)


def all_rows() -> list[str]:
    return MAIN + sweep_rows()


def sweep_rows() -> list[str]:
    """Every other valid cut, the low-memory modes and stage-1 reuse, each against the paper's cut."""
    from hollownet.cut import all_plans, load_unet_config, make_plan, meta_unet
    from hollownet.toy import model_dir

    unet = meta_unet(load_unet_config(model_dir()))
    default = make_plan(unet).hollow_blocks
    cuts = [p.hollow_blocks for p in all_plans(unet) if p.hollow_blocks != default]
    r = f"r={HIGH_RANK}"
    return [
        *[f"hollow:{r}:blocks={'+'.join(c)}" for c in cuts],  # the paper's "fraction of hollowed layers"
        f"hollow:{r}:weights=bf16", f"hollow:{r}:weights=int8", f"hollow:{r}:weights=nf4",
        f"hollow:{r}:stream=1", f"hollow:{r}:opt=in-backward",
        f"hollow:{r}:samples={SEEN // 12}", f"hollow:{r}:samples={SEEN // 4}",  # stage-1 reuse: stored samples, each seen 12x / 4x
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--reduced", action="store_true", help="1 subject, 2 seeds, 4 rows (under ~15 min)")
    which.add_argument("--main", action="store_true", help="full FT, LoRA r=12 / r=1, Hollowed two-path / merged; every subject")
    which.add_argument("--sweep", action="store_true",
                       help="every other cut, bf16 / int8 / nf4 / streamed / in-backward, reuse; subject plus, "
                            "beside LoRA r=12 and Hollowed r=12 (their cells copied from --main's folder where it has them)")
    p.add_argument("--workers", type=int, default=2, help="cells at once (default 2: one per core, one thread each)")
    p.add_argument("--output", default=None, help="default benchmarks/results/toy_table[_reduced|_main|_sweep]")
    p.add_argument("--subjects", default=None, help="comma-separated (default: all toy subjects; plus if --reduced)")
    p.add_argument("--seeds", default=None, help="default 0-4 (0,1 if --reduced)")
    p.add_argument("--methods", default=None, help="override the rows (comma-separated specs)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    args = p.parse_args()
    from hollownet.cli import main as cli

    kind = "reduced" if args.reduced else "main" if args.main else "sweep" if args.sweep else None
    out = Path(args.output or "benchmarks/results/toy_table" + (f"_{kind}" if kind else ""))
    rows = {"reduced": REDUCED, "main": MAIN, "sweep": BASELINES + sweep_rows(), None: all_rows()}[kind]
    methods = args.methods or ",".join(rows)
    argv = ["bench", "--model", "toy", "--dataset", "toy", "--output", str(out), "--methods", methods,
            "--seeds", args.seeds or ("0,1" if args.reduced else "0-4"),
            "--images-per-prompt", str(args.images_per_prompt), "--workers", str(args.workers),
            "--cpus-per-job", "1"]
    subjects = args.subjects or ("plus" if args.reduced or args.sweep else None)
    if args.sweep and args.output is None:
        _copy_cells(out.parent / "toy_table_main", out, (subjects or "").split(","), BASELINES)
    if subjects:
        argv += ["--subjects", subjects]
    print("hollownet " + " ".join(argv), flush=True)
    return cli(argv)


def _copy_cells(src: Path, dst: Path, subjects: list[str], methods: list[str]) -> None:
    """Finished cells of the same spec, subject and seed are the same run: take them rather than train them again."""
    from hollownet.evaluation.specs import parse_method

    for subject in subjects:
        for m in methods:
            folder = parse_method(m).slug
            for cell in sorted((src / "cells" / subject / folder).glob("seed-*")):
                target = dst / "cells" / subject / folder / cell.name
                if (cell / "result.json").exists() and not target.exists():
                    shutil.copytree(cell, target)
                    print(f"copied {cell} -> {target}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
