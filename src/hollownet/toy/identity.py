"""Subject identity on the toy world: is *this* subject drawn -- its shape, both colours and their layout?

The toy's DINO / CLIP-I analogue, made to see what a person sees. A blob in the subject's colours, the
subject's shape in other colours, a colour-swapped subject and another subject must all score low;
the subject on any background, blurred by the VAE, at another place and size, high
(``benchmarks/toy_identity.py`` proves it per subject, with its AUC; ``tests/test_toy.py`` keeps it).

How: each pixel is labelled with its nearest colour among the subject's colours (read off its photos),
the world's shape and background colours and the image's own border colour. The subject's colour
masks in each photo are templates; the score of an image is the best mean IoU, over the subject's
colours, of its masks with a template shifted and scaled (every position; scales 0.7-1.4) -- so each
colour must sit where the subject has it. Pixels of a subject colour anywhere else count against it.

* :func:`identity_scores`: that score in [0, 1] per image.
* :data:`IDENTITY_THRESHOLD`: "the subject is recognisably drawn" (the identity rate's yes/no). A half
  subject (the plus's bar without its arms) scores about 0.5, so the line is above it.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from hollownet.toy import world as W
from hollownet.toy.evaluator import _border_colour, subject_colours

IDENTITY_THRESHOLD = 0.6
SCALES = (0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4)  # generated subject size / photo subject size
MAX_COLOUR_DISTANCE = 100.0  # farther from every subject colour than this: not the subject's colour
_WORLD_PALETTE = np.array([*W.COLOURS.values(), *W.BACKGROUNDS.values()], np.float32)


def _array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB").resize((W.SIZE, W.SIZE), Image.BICUBIC), np.float32)


def colour_masks(image: Image.Image, colours: np.ndarray) -> np.ndarray:
    """[K, H, W] booleans: pixels whose nearest colour (subject's, world's, the image's border) is subject colour k."""
    arr = _array(image)
    palette = np.concatenate([colours.astype(np.float32), _WORLD_PALETTE, _border_colour(arr)[None]])
    dist = np.linalg.norm(arr[:, :, None, :] - palette[None, None], axis=-1)  # [H, W, P]
    nearest = dist.argmin(-1)
    return np.stack([(nearest == k) & (dist[..., k] < MAX_COLOUR_DISTANCE) for k in range(len(colours))])


def _template(masks: np.ndarray) -> np.ndarray | None:
    """The masks cropped to the box around all of them (None when the photo shows no subject colour)."""
    ys, xs = np.nonzero(masks.any(0))
    if not len(ys):
        return None
    return masks[:, ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32)


class IdentityReference:
    """The subject's colours and colour-mask templates, read once from its photos."""

    def __init__(self, photos, colours: np.ndarray | None = None):
        self.colours = subject_colours(photos) if colours is None else np.asarray(colours, np.float32)
        crops = [t for t in (_template(colour_masks(p, self.colours)) for p in photos) if t is not None]
        if not crops:
            raise ValueError("the reference photos show none of the subject's colours")
        self.templates = []  # one conv weight [K, 1, h, w] per (photo, scale)
        for crop in crops:
            t = torch.from_numpy(crop)[None]
            for s in SCALES:
                h, w = max(2, round(crop.shape[1] * s)), max(2, round(crop.shape[2] * s))
                if h <= W.SIZE and w <= W.SIZE:
                    self.templates.append((F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False)[0] > 0.5)
                                          .float()[:, None])

    @torch.no_grad()
    def scores(self, images) -> list[float]:
        """Best mean IoU over the subject's colours, per image (see the module docstring)."""
        return [self._score(torch.from_numpy(colour_masks(im, self.colours)).float()) for im in images]

    def _score(self, masks: torch.Tensor) -> float:
        k = masks.shape[0]
        area = masks.sum((1, 2))  # [K]
        best = 0.0
        for t in self.templates:
            h, w = t.shape[-2:]
            # every placement that keeps at least half the template inside the image
            x = F.pad(masks[None], (w // 2, w // 2, h // 2, h // 2))
            inter = F.conv2d(x, t, groups=k)[0]  # [K, positions...]
            t_area = t.sum((1, 2, 3))[:, None, None]
            iou = inter / (area[:, None, None] + t_area - inter).clamp_min(1.0)
            best = max(best, float(iou.mean(0).max()))
        return best


def identity_scores(images, photos, colours: np.ndarray | None = None) -> list[float]:
    return IdentityReference(photos, colours).scores(images)


def identity_rate(scores) -> float:
    return float(np.mean([s >= IDENTITY_THRESHOLD for s in scores])) if len(scores) else 0.0


# ----------------------------------------------------------------------------- cases it must separate


def _blob(colours, background: str, rng) -> Image.Image:
    """A blob in the subject's two colours: an ellipse or a random polygon, split in halves, nested, or two side by side."""
    s = W.SUPERSAMPLE
    img = Image.new("RGB", (W.SIZE * s, W.SIZE * s), W.BACKGROUNDS[background])
    d = ImageDraw.Draw(img)
    cx, cy = (W.SIZE / 2 + rng.uniform(-6, 6)) * s, (W.SIZE / 2 + rng.uniform(-6, 6)) * s
    rx, ry = W.SIZE / 5 * rng.uniform(0.8, 1.3) * s, W.SIZE / 5 * rng.uniform(0.8, 1.3) * s
    a, b = colours if rng.random() < 0.5 else colours[::-1]
    kind = rng.randrange(4)
    box = [cx - rx, cy - ry, cx + rx, cy + ry]
    if kind == 0:  # an ellipse in two halves
        d.pieslice(box, 0, 180, fill=a)
        d.pieslice(box, 180, 360, fill=b)
    elif kind == 1:  # nested: an ellipse with a core
        d.ellipse(box, fill=a)
        f = rng.uniform(0.4, 0.7)
        d.ellipse([cx - rx * f, cy - ry * f, cx + rx * f, cy + ry * f], fill=b)
    elif kind == 2:  # two blobs side by side
        d.ellipse([cx - rx, cy - ry * 0.6, cx, cy + ry * 0.6], fill=a)
        d.ellipse([cx, cy - ry * 0.6, cx + rx, cy + ry * 0.6], fill=b)
    else:  # random polygons, one in each colour, overlapping
        for c in (a, b):
            n = rng.randint(4, 7)
            d.polygon([(cx + rx * rng.uniform(0.3, 1.1) * np.cos(2 * np.pi * i / n), cy + ry * rng.uniform(0.3, 1.1)
                        * np.sin(2 * np.pi * i / n)) for i in range(n)], fill=c)
    img = img.resize((W.SIZE, W.SIZE), Image.BOX)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.2))) if rng.random() < 0.5 else img


def separation_cases(name: str, n: int = 12, seed: int = 0) -> dict[str, list[Image.Image]]:
    """Renders the metric must call the subject (``subject``) or not (every other key), all on the
    unseen backgrounds: blobs in its colours, its shape in world colours, its colours swapped, half of
    it (one colour part only), and the other subjects."""
    rng = random.Random(f"identity-{name}-{seed}")
    subject = W.SUBJECTS[name]
    bgs = [W.UNSEEN_BACKGROUNDS[i % len(W.UNSEEN_BACKGROUNDS)] for i in range(n)]
    world = list(W.COLOURS.values())
    a, b = subject.colours
    as_ = lambda colours: dataclasses.replace(subject, colours=colours)  # noqa: E731
    return {
        "subject": [subject.render(bg, rng) for bg in bgs],
        "blob in its colours": [_blob(subject.colours, bg, rng) for bg in bgs],
        "its shape in world colours": [as_(tuple(rng.sample(world, 2))).render(bg, rng) for bg in bgs],
        "its colours swapped": [as_((b, a)).render(bg, rng) for bg in bgs],
        "half of it": [as_((a, W.BACKGROUNDS[bg]) if i % 2 else (W.BACKGROUNDS[bg], b)).render(bg, rng)
                       for i, bg in enumerate(bgs)],
        "other subjects": [W.SUBJECTS[o].render(bg, rng) for o in W.SUBJECTS if o != name for bg in bgs[: max(1, n // 3)]],
    }


def auc(positive, negative) -> float:
    """Probability that a positive outscores a negative (ties count half): the ROC AUC."""
    p, q = np.asarray(positive)[:, None], np.asarray(negative)[None]
    return float((p > q).mean() + 0.5 * (p == q).mean())
