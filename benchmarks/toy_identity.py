"""Proof that the toy's identity metric sees the subject (hollownet.toy.identity), per subject.

    python benchmarks/toy_identity.py            # ~1 min on one core; writes benchmarks/results/toy_identity.json

For each bundled subject: renders of it on the unseen backgrounds (must score high) against blobs in
its colours, its shape in world colours, its colours swapped, half of it and the other subjects (must
score low); each case as rendered and through the toy VAE (encode + decode, as generated images come
out). Prints the AUC of "subject" against all the rest, the lowest positive and the highest negative
score, and each case's identity rate at IDENTITY_THRESHOLD.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from hollownet.toy import model_dir
from hollownet.toy import world as W
from hollownet.toy.identity import IDENTITY_THRESHOLD, IdentityReference, auc, identity_rate, separation_cases


@torch.no_grad()
def through_vae(vae, images):
    """Encode and decode as the toy pipeline does (its latents' mean; generated images are decoded by this decoder)."""
    from PIL import Image

    x = torch.from_numpy(W.to_array(images))
    y = vae.decode(vae.encode(x).latent_dist.mean).sample
    arr = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=24, help="images per case (default 24)")
    p.add_argument("--output", default="benchmarks/results/toy_identity.json")
    args = p.parse_args()
    from diffusers import AutoencoderKL

    torch.set_num_threads(1)
    vae = AutoencoderKL.from_pretrained(model_dir() / "vae", torch_dtype=torch.float32).eval()
    report = {"threshold": IDENTITY_THRESHOLD, "subjects": {}}
    print(f"identity threshold {IDENTITY_THRESHOLD}; n = {args.n} per case; AUC: subject vs every other case")
    for name in W.SUBJECTS:
        ref = IdentityReference(W.subject_photos(name))
        row = {}
        for how in ("rendered", "through the VAE"):
            cases = separation_cases(name, args.n)
            if how != "rendered":
                cases = {k: through_vae(vae, v) for k, v in cases.items()}
            scores = {k: ref.scores(v) for k, v in cases.items()}
            neg = [s for k, v in scores.items() if k != "subject" for s in v]
            row[how] = {"auc": auc(scores["subject"], neg), "lowest_subject": min(scores["subject"]),
                        "highest_other": max(neg),
                        "rate": {k: identity_rate(v) for k, v in scores.items()},
                        "mean": {k: float(np.mean(v)) for k, v in scores.items()}}
            r = row[how]
            print(f"{name:8s} {how:16s} AUC {r['auc']:.3f}  lowest subject {r['lowest_subject']:.2f}  "
                  f"highest other {r['highest_other']:.2f}  identity rate: " +
                  ", ".join(f"{k} {v:.2f}" for k, v in r["rate"].items()), flush=True)
        report["subjects"][name] = row
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
