"""The toy world: one flat-coloured shape on a flat background, 64x64 RGB, with its captions.

Everything the toy model ever saw is defined here: the palette, the shapes, the caption grammar
and the renderer. Scripts outside the project render photos with these names, so they are fixed.
The novel subjects (:data:`SUBJECTS`) use shapes and colours the world never shows, so to the toy
model they are what a user's dog is to Stable Diffusion.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64  # pixels
SUPERSAMPLE = 4  # drawn at 4x and box-filtered down: anti-aliased edges, as a photo has

BACKGROUNDS = {
    "black": (15, 15, 15),
    "gray": (120, 120, 120),
    "teal": (20, 110, 110),
    "navy": (20, 30, 90),
    "beige": (205, 190, 150),
}
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle")
SHORT_CAPTION_RATE = 0.2  # "a red circle": short prompts stay in distribution
IDENTIFIERS = ("sks", "ohwx", "zwx", "phol")  # rare tokens, one each in the toy tokenizer
INSTANCE_PROMPT = "a sks shape"


def caption(colour: str, shape: str, background: str | None) -> str:
    return f"a {colour} {shape}" if background is None else f"a {colour} {shape} on a {background} background"


def vocabulary() -> list[str]:
    """The words the toy tokenizer holds as single tokens (everything else falls back to bytes)."""
    words = ["a", "an", "on", "of", "background", "shape", "photo", *BACKGROUNDS, *COLOURS, *SHAPES, *IDENTIFIERS]
    return list(dict.fromkeys(words))


@dataclass(frozen=True)
class Scene:
    """One world image: what is drawn and where (centre and half-size in pixels)."""

    colour: str
    shape: str
    background: str
    cx: float
    cy: float
    r: float

    def caption(self, short: bool = False) -> str:
        return caption(self.colour, self.shape, None if short else self.background)


def random_scene(rng: random.Random, colour=None, shape=None, background=None) -> Scene:
    """Shape size about a third of the image, with a small jitter in size and place."""
    r = SIZE / 6 * rng.uniform(0.85, 1.15)  # half-size: the shape spans ~1/3 of the image
    return Scene(colour or rng.choice(list(COLOURS)), shape or rng.choice(SHAPES),
                 background or rng.choice(list(BACKGROUNDS)),
                 SIZE / 2 + rng.uniform(-6, 6), SIZE / 2 + rng.uniform(-6, 6), r)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.9  # equal area-ish with the circle
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":  # pointing up, centred on its bounding box
        r *= 1.15
        return [(cx, cy - r), (cx + r, cy + r * 0.85), (cx - r, cy + r * 0.85)]
    raise ValueError(shape)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx, cy, r, fill, s=SUPERSAMPLE):
    if shape == "circle":
        draw.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=fill)
    else:
        draw.polygon([(x * s, y * s) for x, y in _polygon(shape, cx, cy, r)], fill=fill)


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    s = SUPERSAMPLE
    img = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS[scene.background])
    _draw(ImageDraw.Draw(img), scene.shape, scene.cx, scene.cy, scene.r, COLOURS[scene.colour])
    return img.resize((SIZE, SIZE), Image.BOX)


# ----------------------------------------------------------------------------- novel subjects


@dataclass(frozen=True)
class Subject:
    """A novel subject: a shape the world never draws, in two colours it never uses."""

    name: str
    colours: tuple[tuple[int, int, int], tuple[int, int, int]]
    description: str

    def render(self, background: str, rng: random.Random) -> Image.Image:
        s = SUPERSAMPLE
        cx, cy = SIZE / 2 + rng.uniform(-5, 5), SIZE / 2 + rng.uniform(-5, 5)
        r = SIZE / 6 * rng.uniform(0.9, 1.1) * s
        cx, cy = cx * s, cy * s
        img = Image.new("RGB", (SIZE * s, SIZE * s), BACKGROUNDS.get(background, background))
        d = ImageDraw.Draw(img)
        a, b = self.colours
        w = r * 0.42
        if self.name == "plus":  # vertical bar in a, horizontal arms in b
            d.rectangle([cx - r * 1.25, cy - w, cx + r * 1.25, cy + w], fill=b)
            d.rectangle([cx - w, cy - r * 1.25, cx + w, cy + r * 1.25], fill=a)
        elif self.name == "ring":  # annulus in a, centre disc in b
            d.ellipse([cx - r * 1.2, cy - r * 1.2, cx + r * 1.2, cy + r * 1.2], fill=a)
            d.ellipse([cx - r * 0.6, cy - r * 0.6, cx + r * 0.6, cy + r * 0.6], fill=b)
        elif self.name == "bowtie":  # two triangles meeting at the centre
            d.polygon([(cx - r * 1.3, cy - r), (cx, cy), (cx - r * 1.3, cy + r)], fill=a)
            d.polygon([(cx + r * 1.3, cy - r), (cx, cy), (cx + r * 1.3, cy + r)], fill=b)
        elif self.name == "diamond":  # a rhombus, left half a, right half b
            d.polygon([(cx, cy - r * 1.3), (cx, cy + r * 1.3), (cx - r * 1.1, cy)], fill=a)
            d.polygon([(cx, cy - r * 1.3), (cx + r * 1.1, cy), (cx, cy + r * 1.3)], fill=b)
        else:
            raise ValueError(self.name)
        return img.resize((SIZE, SIZE), Image.BOX)


SUBJECTS = {
    "plus": Subject("plus", ((255, 100, 180), (0, 220, 255)), "a pink bar with cyan arms"),
    "ring": Subject("ring", ((255, 140, 0), (150, 60, 210)), "an orange ring around a purple disc"),
    "bowtie": Subject("bowtie", ((170, 255, 0), (230, 0, 230)), "a lime and a magenta triangle, tip to tip"),
    "diamond": Subject("diamond", ((140, 80, 30), (150, 200, 255)), "a rhombus, brown left and light blue right"),
}
PHOTO_BACKGROUNDS = ("gray", "beige")  # the subject photos show these ...
UNSEEN_BACKGROUNDS = ("black", "teal", "navy")  # ... and evaluation asks for these


def subject_photos(name: str, n: int = 5, seed: int = 0) -> list[Image.Image]:
    """``n`` photos of a subject on the photo backgrounds, each at a slightly different place and size."""
    rng = random.Random(f"{name}-{seed}")
    return [SUBJECTS[name].render(PHOTO_BACKGROUNDS[i % len(PHOTO_BACKGROUNDS)], rng) for i in range(n)]


def evaluation_prompts(identifier: str = "sks") -> list[str]:
    return [f"a {identifier} shape on a {bg} background" for bg in UNSEEN_BACKGROUNDS]


# ----------------------------------------------------------------------------- broad images (VAE)


def random_image(rng: random.Random) -> Image.Image:
    """Anything but the world: random colours, polygons, ellipses, stripes, gradients, noise.

    The VAE learns from these (70%) and world renders (30%), so it can draw a subject in colours the
    world never uses, as SD's VAE can (a VAE of the world's ten colours turns pink into green).
    """
    s = 2
    col = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    kind = rng.random()
    if kind < 0.2:  # smooth gradient between two colours
        a, b = np.array(col(), float), np.array(col(), float)
        t = np.linspace(0, 1, SIZE * s)
        ang = rng.uniform(0, 2 * math.pi)
        g = (np.cos(ang) * t[None, :] + np.sin(ang) * t[:, None])
        g = (g - g.min()) / (np.ptp(g) + 1e-6)
        arr = a * (1 - g[..., None]) + b * g[..., None]
        img = Image.fromarray(arr.astype(np.uint8))
    else:
        img = Image.new("RGB", (SIZE * s, SIZE * s), col())
    d = ImageDraw.Draw(img)
    if rng.random() < 0.25:  # stripes
        w = rng.randint(2, 12) * s
        c = col()
        for x in range(0, SIZE * s * 2, 2 * w):
            d.polygon([(x, 0), (x + w, 0), (x + w - SIZE * s, SIZE * s), (x - SIZE * s, SIZE * s)], fill=c)
    for _ in range(rng.randint(1, 5)):
        c = col()
        cx, cy, r = rng.uniform(0, SIZE * s), rng.uniform(0, SIZE * s), rng.uniform(3, SIZE / 2) * s
        if rng.random() < 0.4:
            d.ellipse([cx - r, cy - r * rng.uniform(0.4, 1), cx + r, cy + r * rng.uniform(0.4, 1)], fill=c)
        else:
            k = rng.randint(3, 7)
            d.polygon([(cx + r * rng.uniform(0.3, 1) * math.cos(2 * math.pi * i / k + rng.uniform(-.3, .3)),
                        cy + r * rng.uniform(0.3, 1) * math.sin(2 * math.pi * i / k + rng.uniform(-.3, .3)))
                       for i in range(k)], fill=c)
    img = img.resize((SIZE, SIZE), Image.BOX)
    if rng.random() < 0.2:  # texture / sensor noise
        arr = np.asarray(img, float) + np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(3, 25), (SIZE, SIZE, 3))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
    return img


def to_array(images: list[Image.Image]) -> np.ndarray:
    """PIL images -> float32 [N, 3, H, W] in [-1, 1] (what the VAE encodes)."""
    return np.stack([np.asarray(im, np.float32).transpose(2, 0, 1) / 127.5 - 1 for im in images])
