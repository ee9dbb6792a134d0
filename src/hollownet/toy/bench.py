"""The toy model's scorer for ``hollownet bench --model toy --dataset toy`` (the subjects: ``datasets.toy_dataset``).

Columns (all the toy's, not Stable Diffusion's):
  toy_subject   DINO-like: cosine of the toy evaluator's features, generated vs subject photos
  presence      share of generated images in which the subject is drawn (pixel rule)
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

TOY_METRICS = ("toy_subject", "presence", "background", "drift")
# ordinary prompts (no identifier) on the unseen backgrounds: the subject should not appear in them
DRIFT_PROMPTS = ("a red circle on a black background", "a blue square on a teal background",
                 "a yellow triangle on a navy background")


class ToyScorer:
    """The bench's scorer for the toy model (no DINO / CLIP weights exist for its world); see ``metrics.DinoClipScorer``."""

    metrics = TOY_METRICS
    config = {"scorer": "toy"}  # what a cell's result depends on, besides the images
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


def score_cell(images_dir: Path, drift_dir: Path, photos_dir: Path, evaluator=None) -> dict:
    """The toy columns for one cell: subject images in ``images_dir``, ordinary-prompt images in ``drift_dir``."""
    evaluator = evaluator or load_evaluator()
    photos = [Image.open(p).convert("RGB") for p in sorted(photos_dir.iterdir()) if p.suffix.lower() in (".png", ".jpg", ".jpeg")]
    images, prompts = _manifest_images(images_dir)
    s = score_images(evaluator, images, photos, backgrounds=[background_named(p) for p in prompts])
    drift_images, _ = _manifest_images(drift_dir)
    colours = subject_colours(photos)
    per_prompt = {}
    for img, p in zip(images, prompts):
        per_prompt.setdefault(p, []).append(subject_present(img, colours))
    return {"toy_subject": s["toy_subject_score"], "presence": s["presence"], "background": s["background_followed"],
            "drift": sum(subject_present(im, colours) for im in drift_images) / max(1, len(drift_images)),
            "n_generated": len(images), "n_reference": len(photos), "n_prompts": len(set(prompts)),
            "per_prompt": {p: sum(v) / len(v) for p, v in per_prompt.items()}}
