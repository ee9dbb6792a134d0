"""The toy model's scorer for ``hollownet bench --model toy --dataset toy`` (the subjects: ``datasets.toy_dataset``).

Columns (all the toy's, not Stable Diffusion's):
  identity      share of generated images in which the subject is recognisably drawn: its shape, both
                colours and their layout (toy.identity; the DINO / CLIP-I analogue that sees identity)
  identity_score  its continuous score, mean over the images (best-aligned colour-mask IoU, 0-1)
  toy_subject   DINO-like: cosine of the toy evaluator's features, generated vs subject photos
  presence      share of generated images showing both subject colours (pixel rule: "colours present";
                a blob in the right colours passes it, so it does not stand for the subject)
  background    share of generated images whose background is the one the prompt named
  drift         share of images for *ordinary* world prompts in which the subject appears anyway
                (language drift: lower is better)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from PIL import Image

from hollownet.toy import world as W
from hollownet.toy.evaluator import load_evaluator, score_images, subject_colours, subject_present
from hollownet.toy.identity import IDENTITY_THRESHOLD, IdentityReference

TOY_METRICS = ("identity", "identity_score", "toy_subject", "presence", "background", "drift")
# ordinary prompts (no identifier) on the unseen backgrounds: the subject should not appear in them
DRIFT_PROMPTS = ("a red circle on a black background", "a blue square on a teal background",
                 "a yellow triangle on a navy background")


class ToyScorer:
    """The bench's scorer for the toy model (no DINO / CLIP weights exist for its world); see ``metrics.DinoClipScorer``."""

    metrics = TOY_METRICS
    config = {"scorer": "toy", "identity_threshold": IDENTITY_THRESHOLD}  # what a cell's result depends on, besides the images
    extra_prompts = {"drift": DRIFT_PROMPTS}  # generated into CELL/drift too: does the subject leak into them?

    def __init__(self, evaluator=None):
        self.evaluator = evaluator

    def load(self) -> ToyScorer:
        self.evaluator = self.evaluator or load_evaluator()
        return self

    def score(self, cell_folder: Path, subject) -> dict:
        return score_cell(cell_folder / "images", cell_folder / "drift", subject.folder, self.load().evaluator)


def background_named(prompt: str) -> str | None:
    m = re.search(r"on an? (\w+) background", prompt)
    return m.group(1) if m and m.group(1) in W.BACKGROUNDS else None


def _manifest_images(folder: Path):
    entries = json.loads((folder / "manifest.json").read_text())["images"]
    return [Image.open(folder / e["file"]).convert("RGB") for e in entries], [e["prompt"] for e in entries]


def score_folder(images_dir: Path, photos_dir: Path, evaluator=None) -> dict:
    """The toy columns but drift for one folder of ``hollownet generate`` output (``hollownet eval --model toy``)."""
    evaluator = evaluator or load_evaluator()
    photos = [Image.open(p).convert("RGB") for p in sorted(Path(photos_dir).iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    images, prompts = _manifest_images(Path(images_dir))
    backgrounds = [background_named(p) for p in prompts]
    s = score_images(evaluator, images, photos, backgrounds=backgrounds if all(backgrounds) else None)
    identity = IdentityReference(photos, subject_colours(photos)).scores(images)
    per_prompt = {}
    for score, p in zip(identity, prompts):
        per_prompt.setdefault(p, []).append(score >= IDENTITY_THRESHOLD)
    return {"identity": sum(x >= IDENTITY_THRESHOLD for x in identity) / len(identity),
            "identity_score": sum(identity) / len(identity), "toy_subject": s["toy_subject_score"],
            "presence": s["presence"], "background": s.get("background_followed"),
            "n_generated": len(images), "n_reference": len(photos), "n_prompts": len(set(prompts)),
            "per_prompt": {p: sum(v) / len(v) for p, v in per_prompt.items()}}


def score_cell(images_dir: Path, drift_dir: Path, photos_dir: Path, evaluator=None) -> dict:
    """The toy columns for one cell: subject images in ``images_dir``, ordinary-prompt images in ``drift_dir``."""
    evaluator = evaluator or load_evaluator()
    scores = score_folder(images_dir, photos_dir, evaluator)
    photos = [Image.open(p).convert("RGB") for p in sorted(photos_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    colours = subject_colours(photos)
    drift_images, _ = _manifest_images(drift_dir)
    return {**scores, "drift": sum(subject_present(im, colours) for im in drift_images) / max(1, len(drift_images))}
