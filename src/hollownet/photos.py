"""Subject photos: what stage 1 reads.

:func:`load_photos` turns a folder of a person's (or an object's) 3-6 photos into the
``[N, 3, R, R]`` tensor in ``[-1, 1]`` that the Stable Diffusion VAE encodes. It honours
EXIF orientation, converts any colour mode to RGB, resizes the short side to ``R`` and
center-crops. Every problem with the folder or a file raises :class:`PhotoError` with one
line that names the problem and the fix. Also the bundled demo photos: :func:`demo_photos_dir`
and :func:`make_demo_photos`, the script that made them from the DreamBooth ``dog`` subject
(see ``assets/demo/ATTRIBUTION.md``). The benchmark datasets are ``evaluation/datasets.py``.
"""

from __future__ import annotations

import sys
import warnings
from os import PathLike
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hollownet.errors import HollownetError

__all__ = [
    "IMAGE_EXTENSIONS",
    "PhotoError",
    "PhotoWarning",
    "list_photos",
    "load_photo",
    "load_photos",
    "demo_photos_dir",
    "make_demo_photos",
]

StrPath = str | PathLike[str]

#: File extensions :func:`load_photos` reads (compared case-insensitively).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp")

_ACCEPTED = ", ".join(IMAGE_EXTENSIONS)
_RESAMPLE = Image.Resampling.LANCZOS


class PhotoError(HollownetError):
    """A photo folder or photo file cannot be used; the message says which and how to fix it."""


class PhotoWarning(UserWarning):
    """Something about the photos was tolerated (ignored files, upscaled small photos)."""


def warn_from_caller(message: str, category: type[Warning], *files: str) -> None:
    """``warnings.warn`` attributed to the first caller outside this module (and ``files``)."""
    skip = {__file__, *files}
    frame = sys._getframe(0)
    level = 1
    while frame is not None and frame.f_code.co_filename in skip:
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)


def one_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else ""


# --------------------------------------------------------------------------------------
# Photos
# --------------------------------------------------------------------------------------


def list_photos(folder: StrPath) -> list[Path]:
    """The photo files in ``folder``, sorted by file name.

    A file is a photo if its extension is one of :data:`IMAGE_EXTENSIONS` (any case). Hidden
    entries (names starting with ``.``, e.g. ``.DS_Store`` or macOS ``._IMG_1.jpg`` resource
    forks) and a photo's caption (``NAME.txt`` beside ``NAME.jpg``) are skipped silently; other files
    and sub-folders are skipped with one
    :class:`PhotoWarning` naming them. Sub-folders are not searched.

    Raises :class:`PhotoError` if the folder does not exist or is not a directory. An empty
    result is not an error here (:func:`load_photos` raises for it).
    """
    path = Path(folder).expanduser()
    if not path.exists():
        raise PhotoError(
            f"Photo folder not found: {path}. Check the path, or create it and put 3-6 photos "
            f"of the subject ({_ACCEPTED}) in it."
        )
    if not path.is_dir():
        raise PhotoError(
            f"Not a folder: {path} is a file. Pass the folder that contains the photos, "
            f"not a single photo."
        )
    photos: list[Path] = []
    ignored: list[str] = []
    for entry in sorted(path.iterdir(), key=lambda p: p.name):
        if entry.name.startswith("."):
            continue
        if entry.suffix.lower() == ".txt" and any(entry.with_suffix(e).exists() for e in IMAGE_EXTENSIONS):
            continue  # a photo's caption (kohya's convention, read by precompute.photo_captions)
        if entry.is_dir():
            ignored.append(entry.name + "/")
        elif entry.suffix.lower() in IMAGE_EXTENSIONS:
            photos.append(entry)
        else:
            ignored.append(entry.name)
    if ignored:
        warn_from_caller(
            f"Ignoring {len(ignored)} non-photo entr{'y' if len(ignored) == 1 else 'ies'} in "
            f"{path}: {', '.join(ignored)} (only {_ACCEPTED} files are loaded; sub-folders "
            f"are not searched).",
            PhotoWarning,
        )
    return photos


def _open_rgb(path: Path, min_side: int | None = None) -> Image.Image:
    """Open one photo: first frame, EXIF orientation applied, RGB (alpha on white).

    ``min_side``: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides
    at least this long (libjpeg DCT scaling) — a 4000 px photo for 512 px training decodes
    ~10x faster, and the resize that follows still has at least ``min_side`` pixels to work from.
    """
    fix = "Remove it from the folder or replace it with a valid JPEG, PNG or WebP photo."
    try:
        with Image.open(path) as opened:
            opened.seek(0)  # multi-frame files (camera MPO, animated WebP): the first frame
            if min_side and opened.format in ("JPEG", "MPO"):
                opened.draft("RGB", (min_side, min_side))
            opened.load()
            try:
                image = ImageOps.exif_transpose(opened)
            except Exception as exc:  # malformed EXIF must not make a usable photo unusable
                warn_from_caller(
                    f"{path.name}: could not apply its EXIF orientation ({one_line(exc)}); "
                    f"using the pixels as stored.",
                    PhotoWarning,
                )
                image = opened.copy()
    except UnidentifiedImageError:
        raise PhotoError(
            f"Cannot read {path.name} in {path.parent}: not a recognisable image (corrupt, "
            f"empty, or another kind of file with an image extension). {fix}"
        ) from None
    except Image.DecompressionBombError as exc:
        raise PhotoError(
            f"Cannot read {path.name} in {path.parent}: image too large ({one_line(exc)}). "
            f"Downscale it or replace it with a smaller photo."
        ) from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise PhotoError(
            f"Cannot read {path.name} in {path.parent}: {one_line(exc) or type(exc).__name__} "
            f"(corrupt or truncated file?). {fix}"
        ) from None
    return _to_rgb(image, path)


def _to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I", "F") or mode.startswith("I;"):
        # 16/32-bit grayscale (e.g. 16-bit PNG): PIL's convert would clip at 255, so rescale.
        array = np.asarray(image, dtype=np.float64)
        if mode == "F":
            peak = 1.0 if array.max(initial=0.0) <= 1.0 else 255.0
        else:
            peak = 255.0 if array.max(initial=0) <= 255 else 65535.0
        array = np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array).convert("RGB")  # 2-D uint8 -> mode L
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, ...
    except (ValueError, OSError) as exc:
        raise PhotoError(
            f"Cannot convert {path.name} (colour mode {mode}) to RGB: {one_line(exc)}. "
            f"Re-save it as an ordinary RGB JPEG or PNG."
        ) from None


def _square(image: Image.Image, resolution: int) -> Image.Image:
    """Resize the short side to ``resolution`` and center-crop to a square, in one resample."""
    width, height = image.size
    side = min(width, height)
    left = (width - side) / 2.0
    top = (height - side) / 2.0
    if width == height == resolution:
        return image
    return image.resize(
        (resolution, resolution), _RESAMPLE, box=(left, top, left + side, top + side)
    )


def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)  # [H, W, 3]
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def _check_resolution(resolution: int) -> int:
    integer = isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool)
    if not integer or resolution < 1:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    return int(resolution)


def _prepare(path: Path, resolution: int) -> Image.Image:
    image = _open_rgb(path, min_side=2 * resolution)  # 2x: room for an antialiased resize
    width, height = image.size
    if min(width, height) < resolution:
        warn_from_caller(
            f"{path.name} is {width}x{height}, smaller than {resolution}x{resolution}: "
            f"upscaling it, which blurs it; use a photo at least {resolution} px on its "
            f"short side for better results.",
            PhotoWarning,
        )
    return _square(image, resolution)


def load_photo(path: StrPath, resolution: int) -> torch.Tensor:
    """One photo as a ``[3, R, R]`` float tensor in ``[-1, 1]``; see :func:`load_photos`."""
    resolution = _check_resolution(resolution)
    file = Path(path).expanduser()
    if not file.exists():
        raise PhotoError(f"Photo not found: {file}. Check the path.")
    if file.is_dir():
        raise PhotoError(f"{file} is a folder, not a photo; use load_photos() for a folder.")
    return _to_tensor(_prepare(file, resolution))


def load_photos(
    folder: StrPath,
    resolution: int,
    *,
    min_count: int = 1,
    max_count: int | None = None,
) -> tuple[torch.Tensor, list[str]]:
    """Load every photo in ``folder`` for training, as the VAE expects them.

    Returns ``(pixels, names)``: ``pixels`` is a float32 tensor ``[N, 3, R, R]`` with values in
    ``[-1, 1]`` (the range the Stable Diffusion VAE encodes) and ``names`` the file names, in
    the same order (sorted by name).

    Which files: see :func:`list_photos` -- ``.jpg``, ``.jpeg``, ``.png``, ``.webp`` in any
    case; hidden files are skipped silently, other files with a warning. Only the folder
    itself is read, not sub-folders.

    Per photo:

    * the EXIF orientation tag is applied (``ImageOps.exif_transpose``), so phone photos come
      out upright; multi-frame files (camera MPO, animated WebP) use their first frame;
    * grayscale, palette, CMYK and 16-bit images are converted to RGB; transparency
      (RGBA, LA, palette with transparency) is composited on a white background;
    * the short side is resized to ``resolution`` and the image center-cropped to
      ``resolution x resolution`` (one Lanczos resample of the central square).

    **Photos smaller than the resolution** (short side < ``resolution``) are *upscaled*, with a
    :class:`PhotoWarning` naming the file and its size: a blurry subject is still better than
    refusing a user's only photos, and the warning tells them what to fix.

    Errors raise :class:`PhotoError` (a ``ValueError``) with one line naming the problem and the
    fix: the folder is missing or is a file, there are no photos (or fewer than ``min_count``,
    or more than ``max_count`` -- nothing is dropped silently), or a file with an image
    extension cannot be decoded (the message names it: remove or replace it). A bad
    ``resolution`` is a plain ``ValueError``.
    """
    resolution = _check_resolution(resolution)
    if min_count < 0 or (max_count is not None and max_count < max(min_count, 1)):
        raise ValueError(f"bad photo count limits: min_count={min_count}, max_count={max_count}")
    root = Path(folder).expanduser()
    paths = list_photos(root)
    if not paths:
        heic = any(p.suffix.lower() in (".heic", ".heif") for p in root.iterdir())
        raise PhotoError(
            f"No photos in {root}: put 3-6 photos of the subject there as {_ACCEPTED} files "
            + ("(HEIC/HEIF photos must be converted to JPEG first)."
               if heic else "(any case; other files and sub-folders are ignored).")
        )
    if len(paths) < min_count:
        raise PhotoError(
            f"Only {len(paths)} photo{'s' if len(paths) != 1 else ''} in {root}, at least "
            f"{min_count} needed: add more photos of the subject ({_ACCEPTED})."
        )
    if max_count is not None and len(paths) > max_count:
        raise PhotoError(
            f"{len(paths)} photos in {root}, at most {max_count} allowed: move the extra "
            f"ones out of the folder (keep the sharpest, most varied {max_count})."
        )
    tensors = [_to_tensor(_prepare(path, resolution)) for path in paths]
    return torch.stack(tensors), [path.name for path in paths]


def photo_sizes(folder: StrPath) -> list[tuple[int, int]]:
    """``(height, width)`` of every photo :func:`load_photos` loads, in its order, upright (EXIF orientation
    applied), read from the headers only: SDXL conditions on each photo's original size and crop."""
    sizes = []
    for path in list_photos(Path(folder).expanduser()):
        with Image.open(path) as image:
            width, height = image.size
            if image.getexif().get(0x0112) in (5, 6, 7, 8):  # the orientations that turn the photo by 90 degrees
                width, height = height, width
        sizes.append((height, width))
    return sizes


# --------------------------------------------------------------------------------------
# Demo photos
# --------------------------------------------------------------------------------------


def demo_photos_dir() -> Path:
    """The bundled demo photos: 4 downscaled DreamBooth ``dog`` photos (CC BY 4.0, see
    ``assets/demo/ATTRIBUTION.md`` next to them)."""
    return Path(__file__).resolve().parent / "assets" / "demo" / "photos"


def make_demo_photos(
    src_folder: StrPath,
    dst_folder: StrPath,
    size: int = 128,
    *,
    count: int = 4,
    quality: int = 85,
) -> list[Path]:
    """Write the first ``count`` photos of ``src_folder`` (by name) to ``dst_folder`` as
    ``size x size`` center crops, JPEG ``quality``, without metadata, keeping their names
    (with a ``.jpg`` extension). Returns the written paths.

    This is how ``assets/demo/photos`` was made::

        make_demo_photos("../shared/data/dreambooth/dog", demo_photos_dir())
    """
    size = _check_resolution(size)
    paths = list_photos(src_folder)
    if len(paths) < count:
        raise PhotoError(
            f"Only {len(paths)} photos in {src_folder}, {count} needed for the demo set."
        )
    out = Path(dst_folder)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in paths[:count]:
        target = out / (path.stem + ".jpg")
        _prepare(path, size).save(target, "JPEG", quality=quality, optimize=True)
        written.append(target)
    return written
