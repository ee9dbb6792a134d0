"""Does the held-out validation loss pick the same step as the identity metric? (issue 27; the toy's figures)

    python benchmarks/best_step.py                       # subject plus, Hollowed Net at the toy's defaults
    python benchmarks/best_step.py --subject ring --every 100

One ``hollownet train --model toy`` at its defaults with ``--save-every N`` (snapshots) and ``--validate-every
N/2`` (the held-out loss), then ``hollownet generate --step S`` of every snapshot on the three unseen
backgrounds and the toy's identity metric (toy/identity.py) on each. Prints one row a step and the step each
criterion would choose. Resumable: rerun the same command; finished training and images are kept.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subject", default="plus", help="a toy subject (default plus)")
    p.add_argument("--method", default="hollow", choices=("hollow", "lora"))
    p.add_argument("--every", type=int, default=100, help="snapshot every N steps (default 100)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the toy's)")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--output", default="benchmarks/results/best_step")
    args = p.parse_args()

    from hollownet.cli import main as cli
    from hollownet.settings import TOY_DEFAULTS
    from hollownet.toy import world as W
    from hollownet.toy.bench import score_folder

    out = Path(args.output) / f"{args.subject}-{args.method}"
    photos = out / "photos"
    if not photos.is_dir():
        photos.mkdir(parents=True)
        for i, img in enumerate(W.subject_photos(args.subject, 5)):
            img.save(photos / f"{i:02d}.png")
    run = out / "run"
    total = args.steps or TOY_DEFAULTS["steps"]
    if not (run / "train.json").is_file():
        code = cli(["train", "--model", "toy", "--images", str(photos), "--prompt", W.INSTANCE_PROMPT,
                    "--method", args.method, "--output", str(run), "--save-every", str(args.every),
                    "--validate-every", str(max(1, args.every // 2)), "--steps", str(total)])
        if code:
            return code
    rows = []
    for step in range(args.every, total + 1, args.every):
        scores = []
        for j, prompt in enumerate(W.evaluation_prompts()):
            folder = out / "images" / f"step-{step:06d}" / f"p{j}"
            if not (folder / "manifest.json").is_file():
                snapshot = [] if step == total else ["--step", str(step)]
                code = cli(["generate", "--model", "toy", "--lora", str(run), *snapshot, "--prompt", prompt,
                            "--num-images", str(args.images_per_prompt), "--seed", str(100 * j), "--output", str(folder)])
                if code:
                    return code
            scores.append(score_folder(folder, photos))
        n = sum(s["n_generated"] for s in scores)
        mean = lambda k: sum(s[k] * s["n_generated"] for s in scores) / n  # noqa: E731
        rows.append({"step": step, "identity": mean("identity"), "identity_score": mean("identity_score"),
                     "background": mean("background")})
    history = dict((int(s), v) for s, v in json.loads((run / "validation.json").read_text())["history"])
    for r in rows:
        r["validation_loss"] = history.get(r["step"])
    (out / "best_step.json").write_text(json.dumps({"subject": args.subject, "method": args.method, "rows": rows,
                                                    "validation_history": sorted(history.items())}, indent=1))
    print(f"toy model, subject {args.subject}, {args.method}, {args.images_per_prompt * 3} images a step "
          "(the toy's figures, not Stable Diffusion's)")
    print("  step  validation loss  identity  identity score  background")
    for r in rows:
        loss = "-" if r["validation_loss"] is None else f"{r['validation_loss']:.4f}"
        print(f"  {r['step']:4d}  {loss:>15s}  {r['identity']:8.2f}  {r['identity_score']:14.3f}  {r['background']:10.2f}")
    by_loss = min(history, key=history.get)
    by_identity = max(rows, key=lambda r: (r["identity"], r["identity_score"]))["step"]
    print(f"lowest validation loss at step {by_loss}; best identity at step {by_identity}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
