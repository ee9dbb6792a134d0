"""The toy evaluator: what DINO, CLIP and a human do for Stable Diffusion, done for the toy world.

* ``ToyEvaluator``: a small CNN trained on world renders only (never on a benchmark subject), with
  heads for background, colour and shape; its pooled features give the **DINO-like subject score**
  (cosine of generated images' features to the subject photos'), labelled as the toy's.
* ``shape_of``: the shape read off the foreground's geometry (how much of its bounding box it fills:
  triangle ~0.5, circle ~0.79, square ~1), exact on renders where the CNN confused circles and squares.
* ``subject_present``: pixel rule for "the subject is in the picture": the image's foreground (pixels
  away from its border colour) is mostly the subject's own colours, nearer to them than to any
  world colour. Flat-colour images make this exact where a learned detector would guess.
* ``score_images``: the columns of the miniature paper table for one set of generated images.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import nn

from hollownet.toy import model_dir
from hollownet.toy import world as W

HEADS = {"background": list(W.BACKGROUNDS), "colour": list(W.COLOURS), "shape": list(W.SHAPES)}
FEATURES = 128


class ToyEvaluator(nn.Module):
    def __init__(self):
        super().__init__()
        chans = [3, 32, 64, 64, FEATURES]
        layers = []
        for i, (a, b) in enumerate(zip(chans, chans[1:])):
            layers += [nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.GroupNorm(8, b), nn.GELU()]
        self.body = nn.Sequential(*layers)
        self.heads = nn.ModuleDict({k: nn.Linear(FEATURES, len(v)) for k, v in HEADS.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of images in [-1, 1], [N, 3, 64, 64]."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        f = self.features(x)
        return {k: head(f) for k, head in self.heads.items()}


def _augment(img: Image.Image, rng: random.Random) -> Image.Image:
    """Generated images are blurrier, noisier and duller than renders: train on such renders."""
    if rng.random() < 0.7:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 1.6)))
    arr = np.asarray(img, np.float32)
    arr = arr * rng.uniform(0.85, 1.1) + rng.uniform(-15, 15)  # contrast / brightness
    arr = arr + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(0, 12), arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _batch(rng: random.Random, n: int):
    scenes = [W.random_scene(rng) for _ in range(n)]
    x = torch.from_numpy(W.to_array([_augment(W.render(s), rng) for s in scenes]))
    y = {k: torch.tensor([HEADS[k].index(getattr(s, k)) for s in scenes]) for k in HEADS}
    return x, y


def train_evaluator(minutes: float = 2.0, seed: int = 0) -> tuple[ToyEvaluator, dict]:
    torch.manual_seed(seed)
    rng = random.Random(f"evaluator-{seed}")
    model = ToyEvaluator()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < minutes * 60:
        x, y = _batch(rng, 64)
        out = model(x)
        loss = sum(F.cross_entropy(out[k], y[k]) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    model.eval().requires_grad_(False)
    x, y = _batch(random.Random("evaluator-heldout"), 512)
    with torch.no_grad():
        out = model(x)
    acc = {k: round((out[k].argmax(1) == y[k]).float().mean().item(), 4) for k in HEADS}
    return model, {"steps": step, "heldout_accuracy": acc}


def save_evaluator(model: ToyEvaluator, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(path))


def load_evaluator(path: Path | None = None) -> ToyEvaluator:
    from safetensors.torch import load_file


    model = ToyEvaluator()
    state = load_file(str(path or model_dir() / "evaluator.safetensors"))
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().requires_grad_(False)


def _tensor(images) -> torch.Tensor:
    images = [im.convert("RGB").resize((W.SIZE, W.SIZE), Image.BICUBIC) for im in images]
    return torch.from_numpy(W.to_array(images))


@torch.no_grad()
def classify(model: ToyEvaluator, images) -> list[dict[str, str]]:
    """Background and colour by the CNN, shape by the foreground's geometry (:func:`shape_of`)."""
    out = model(_tensor(images))
    return [{"background": HEADS["background"][int(out["background"][i].argmax())],
             "colour": HEADS["colour"][int(out["colour"][i].argmax())], "shape": shape_of(im)}
            for i, im in enumerate(images)]


@torch.no_grad()
def features(model: ToyEvaluator, images) -> torch.Tensor:
    return F.normalize(model.features(_tensor(images)), dim=-1)


# ----------------------------------------------------------------------------- subject presence


def _border_colour(arr: np.ndarray, inset: int = 3) -> np.ndarray:
    """Median colour of a frame ``inset`` pixels in (the VAE's outermost pixels are its least exact)."""
    a = arr[inset:-inset, inset:-inset]
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return np.median(border, axis=0)


def foreground(arr: np.ndarray, threshold: float = 45.0) -> np.ndarray:
    """Pixels [K, 3] whose colour is far from the image's border (background) colour."""
    d = np.linalg.norm(arr - _border_colour(arr), axis=-1)
    return arr[d > threshold]


#: Bounding-box fill, between the ideal shapes' (triangle 0.5, circle 0.785, square 1.0). Measured on
#: 64 renders each, clean, augmented and VAE-reconstructed: triangle 0.50-0.64, circle 0.71-0.83,
#: square 0.85-1.00; the cuts lie in the gaps. A blob filling 0.9 of its box counts as a square.
FILL_TRIANGLE_CIRCLE, FILL_CIRCLE_SQUARE = 0.67, 0.845


def box_fill(image: Image.Image, inset: int = 3) -> float:
    """Share of the foreground's bounding box that the foreground fills; 0 without a foreground.

    Foreground: pixels more than half-way from the border colour to the farthest colour (the shape's
    edge at its half-tone, so the area is the drawn one whatever the contrast), inside a frame of
    ``inset`` pixels (the VAE's outermost pixels are its least exact)."""
    arr = np.asarray(image.convert("RGB").resize((W.SIZE, W.SIZE), Image.BICUBIC), np.float32)
    d = np.linalg.norm(arr - _border_colour(arr), axis=-1)[inset:-inset, inset:-inset]
    far = np.percentile(d, 99.5)
    if far < 45.0:
        return 0.0
    ys, xs = np.nonzero(d > far / 2)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return float(len(ys) / box)


def shape_of(image: Image.Image) -> str:
    """circle, square or triangle, by :func:`box_fill`."""
    fill = box_fill(image)
    return "triangle" if fill < FILL_TRIANGLE_CIRCLE else "circle" if fill < FILL_CIRCLE_SQUARE else "square"


def subject_colours(photos, k: int = 2) -> np.ndarray:
    """The subject's ``k`` main colours, read from its photos' foregrounds (bins of 24, far apart)."""
    pix = np.concatenate([foreground(np.asarray(p.convert("RGB"), np.float32)) for p in photos])
    bins = (pix // 24).astype(int)
    keys, counts = np.unique(bins, axis=0, return_counts=True)
    picked: list[np.ndarray] = []
    for i in np.argsort(-counts):
        c = pix[(bins == keys[i]).all(1)].mean(0)
        if all(np.linalg.norm(c - q) > 60 for q in picked):
            picked.append(c)
        if len(picked) == k:
            break
    return np.stack(picked)


def subject_shares(image: Image.Image, colours: np.ndarray) -> tuple[float, list[float]]:
    """(foreground area as a share of the image, per subject colour the share of the foreground whose
    nearest colour, among the subject's and the world's shape colours, is that subject colour)."""
    arr = np.asarray(image.convert("RGB").resize((W.SIZE, W.SIZE)), np.float32)
    fg = foreground(arr)
    if not len(fg):
        return 0.0, [0.0] * len(colours)
    palette = np.concatenate([colours, np.array(list(W.COLOURS.values()), np.float32)])
    nearest = np.linalg.norm(fg[:, None] - palette[None], axis=-1).argmin(1)
    return len(fg) / (W.SIZE * W.SIZE), [float((nearest == i).mean()) for i in range(len(colours))]


def subject_present(image: Image.Image, colours: np.ndarray, min_area: float = 0.03) -> bool:
    """Foreground covers >= ``min_area`` of the image, over half of it is nearest a subject colour
    (against the world's shape colours), and each subject colour holds at least 15% of it."""
    area, shares = subject_shares(image, colours)
    return area >= min_area and sum(shares) > 0.5 and min(shares) >= 0.15


def score_images(model: ToyEvaluator, generated, photos, *, backgrounds: list[str] | None = None) -> dict:
    """Subject fidelity (DINO-like), presence rate and, where prompts named one, background followed."""
    feats_gen, feats_ref = features(model, generated), features(model, photos)
    colours = subject_colours(photos)
    out = {
        "toy_subject_score": float((feats_gen @ feats_ref.T).mean()),
        "presence": float(np.mean([subject_present(im, colours) for im in generated])),
        # continuous companion of presence: share of the foreground in the subject's own colours
        "subject_colour_share": float(np.mean([sum(subject_shares(im, colours)[1]) for im in generated])),
    }
    if backgrounds:
        got = [c["background"] for c in classify(model, generated)]
        out["background_followed"] = float(np.mean([g == b for g, b in zip(got, backgrounds)]))
    return out
