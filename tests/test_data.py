"""Tests for hollownet.photos (photo loading, bundled demo photos) and hollownet.evaluation.datasets (benchmark layouts).

Real photos come from the DreamBooth subset next to the repository
(``../shared/data/dreambooth``); where it is absent (a fresh clone) the same tests run on a
stand-in of its layout made from the bundled demo photos (``tests/standin.py``), and the checks
of the real data's own facts (its prompts, its photo counts) are the only part left out.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hollownet.evaluation.datasets import (
    CustomConcept101Dataset,
    DatasetError,
    DatasetWarning,
    DreamBoothDataset,
    load_benchmark_dataset,
    load_customconcept101_dataset,
    load_dreambooth_dataset,
)
from hollownet.photos import (
    IMAGE_EXTENSIONS,
    PhotoError,
    PhotoWarning,
    demo_photos_dir,
    list_photos,
    load_photo,
    load_photos,
    make_demo_photos,
)

from conftest import is_real_dreambooth

ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the stored pixels upright (EXIF 2.3 spec).
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def _reference(image: Image.Image, resolution: int) -> torch.Tensor:
    """Independent reference: center square crop, Lanczos resize, [-1, 1] CHW tensor."""
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    square = image.convert("RGB").crop((left, top, left + side, top + side))
    square = square.resize((resolution, resolution), Image.Resampling.LANCZOS)
    array = np.asarray(square, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def _rgb(width=40, height=30, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


# ----------------------------------------------------------------------------- photos


def test_real_photos_shape_range_and_order(dreambooth):
    DREAMBOOTH = dreambooth
    pixels, names = load_photos(DREAMBOOTH / "dog", 64)
    assert pixels.shape == (5, 3, 64, 64) and pixels.dtype == torch.float32
    assert names == ["00.jpg", "01.jpg", "02.jpg", "03.jpg", "04.jpg"]
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert pixels.min() < -0.5 and pixels.max() > 0.5  # real contrast, not a constant
    expected = _reference(Image.open(DREAMBOOTH / "dog" / "00.jpg"), 64)
    assert (pixels[0] - expected).abs().mean() < 0.01


def test_real_photos_with_orientation_tag_and_mpo_frames(dreambooth):
    DREAMBOOTH = dreambooth
    # The subset's camera photos (candle, poop_emoji, ...) are 2-frame MPO files carrying an
    # EXIF Orientation tag. Find them by inspecting the tags, as a loader sees them.
    tagged = {}
    for path in sorted(DREAMBOOTH.glob("*/*.jpg")):
        with Image.open(path) as image:
            value = image.getexif().get(ORIENTATION)
            if value is not None:
                tagged[path] = value
    assert tagged, "expected photos with an EXIF Orientation tag in the DreamBooth subset"
    path, value = next(iter(tagged.items()))
    with Image.open(path) as image:
        assert getattr(image, "n_frames", 1) >= 1
        reference = image.transpose(UPRIGHT[value]) if value in UPRIGHT else image.copy()
    loaded = load_photo(path, 48)
    assert loaded.shape == (3, 48, 48)
    assert (loaded - _reference(reference, 48)).abs().mean() < 0.01


@pytest.mark.parametrize("orientation", [3, 6, 8, 5])
def test_exif_orientation_is_honoured(tmp_path, orientation, dog_photos):
    # A real photo cropped to landscape (so the orientation changes the shape) and saved with
    # an EXIF Orientation tag, as a phone camera stores a rotated shot.
    source = Image.open(dog_photos / "00.jpg").convert("RGB")
    w, h = source.size
    stored = source.crop((0, round(h * 100 / 780), w, round(h * 520 / 780)))  # the same band at any size
    stored = stored.resize((156, 84), Image.Resampling.LANCZOS)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = _save(stored, tmp_path / "rotated.jpg", quality=95, exif=exif.tobytes())
    with Image.open(path) as check:
        assert check.getexif()[ORIENTATION] == orientation

    decoded = Image.open(path).convert("RGB")  # stored pixels, tag ignored
    upright = decoded.transpose(UPRIGHT[orientation])  # manual transposition
    if orientation in (5, 6, 7, 8):
        assert upright.size == (84, 156)  # portrait once honoured

    loaded = load_photo(path, 64)
    assert loaded.shape == (3, 64, 64)
    correct = (loaded - _reference(upright, 64)).abs().mean().item()
    ignored = (loaded - _reference(decoded, 64)).abs().mean().item()
    assert correct < 0.02, correct
    assert ignored > 5 * correct, (correct, ignored)


def test_grayscale_rgba_cmyk_palette_convert(tmp_path):
    gray = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1)), "L")
    _save(gray, tmp_path / "a_gray.png")

    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (0, 0, 32, 16))  # top half fully transparent blue
    _save(rgba, tmp_path / "b_rgba.png")

    _save(Image.new("CMYK", (32, 32), (255, 0, 0, 0)), tmp_path / "c_cmyk.jpg", quality=95)

    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 255, 0] + [255, 255, 0] + [0, 0, 0] * 254)
    palette.paste(0, (0, 0, 32, 16))  # top half: index 0, declared transparent
    _save(palette, tmp_path / "d_palette.png", transparency=0)

    opaque = Image.new("P", (32, 32), 1)
    opaque.putpalette([0, 0, 0, 10, 20, 30] + [0, 0, 0] * 254)
    _save(opaque, tmp_path / "e_palette_opaque.png")

    sixteen = Image.fromarray(np.full((32, 32), 65535 // 2, dtype=np.uint16))
    _save(sixteen, tmp_path / "f_gray16.png")

    _save(Image.new("LA", (32, 32), (100, 0)), tmp_path / "g_la.png")
    _save(Image.new("1", (32, 32), 1), tmp_path / "h_bilevel.png")
    _save(_rgb(32, 32), tmp_path / "i_rgb.webp", lossless=True)

    pixels, names = load_photos(tmp_path, 32)
    assert pixels.shape == (9, 3, 32, 32)
    as_uint8 = ((pixels + 1) * 127.5).round()

    g = as_uint8[names.index("a_gray.png")]
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])
    assert torch.equal(g[0, 0], torch.arange(0, 256, 8, dtype=torch.float32))

    r = as_uint8[names.index("b_rgba.png")]
    assert (r[:, :16] == 255).all()  # transparent -> white, not the hidden blue
    assert (r[:, 16:, :] == torch.tensor([255.0, 0, 0]).view(3, 1, 1)).all()

    c = as_uint8[names.index("c_cmyk.jpg")]
    assert (c.mean(dim=(1, 2)) - torch.tensor([0.0, 255, 255])).abs().max() < 4  # cyan

    p = as_uint8[names.index("d_palette.png")]
    assert (p[:, :16] == 255).all()
    assert (p[:, 16:, :] == torch.tensor([255.0, 255, 0]).view(3, 1, 1)).all()

    o = as_uint8[names.index("e_palette_opaque.png")]
    assert (o == torch.tensor([10.0, 20, 30]).view(3, 1, 1)).all()

    s = as_uint8[names.index("f_gray16.png")]
    assert (s - 127).abs().max() <= 1  # scaled from 16 bits, not clipped to white

    la = as_uint8[names.index("g_la.png")]
    assert (la == 255).all()  # fully transparent gray -> white
    assert (as_uint8[names.index("h_bilevel.png")] == 255).all()
    webp = as_uint8[names.index("i_rgb.webp")]
    assert torch.equal(webp, torch.from_numpy(np.array(_rgb(32, 32))).permute(2, 0, 1).float())


def test_small_photo_warns_and_upscales(tmp_path):
    _save(_rgb(48, 32), tmp_path / "tiny.png")
    _save(_rgb(100, 80, seed=1), tmp_path / "big.png")
    with pytest.warns(PhotoWarning, match=r"tiny\.png is 48x32, smaller than 64x64") as record:
        pixels, names = load_photos(tmp_path, 64)
    assert pixels.shape == (2, 3, 64, 64) and names == ["big.png", "tiny.png"]
    small = [w for w in record if "smaller than" in str(w.message)]
    assert len(small) == 1 and "\n" not in str(small[0].message)  # only the small one
    assert small[0].filename == __file__  # attributed to the caller, not photos.py


def test_extensions_case_insensitive_hidden_silent_others_warn(tmp_path):
    for name, fmt in [("b.JPG", "JPEG"), ("a.jpeg", "JPEG"), ("c.Png", "PNG"), ("d.WEBP", "WEBP")]:
        _save(_rgb(), tmp_path / name, format=fmt)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "._a.jpeg").write_bytes(b"AppleDouble junk")  # hidden: silently skipped
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.name for p in list_photos(tmp_path)] == ["a.jpeg", "b.JPG", "c.Png", "d.WEBP"]

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "raw").mkdir()
    with pytest.warns(PhotoWarning, match=r"notes\.txt, raw/") as record:
        pixels, names = load_photos(tmp_path, 16)
    assert names == ["a.jpeg", "b.JPG", "c.Png", "d.WEBP"] and pixels.shape[0] == 4
    assert all(".DS_Store" not in str(w.message) for w in record)


def test_folder_errors(tmp_path):
    with pytest.raises(PhotoError, match="Photo folder not found") as excinfo:
        load_photos(tmp_path / "nope", 64)
    assert "nope" in _one_line(excinfo)

    file = _save(_rgb(), tmp_path / "single.png")
    with pytest.raises(PhotoError, match="Not a folder.*single.png") as excinfo:
        load_photos(file, 64)
    _one_line(excinfo)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PhotoError, match="No photos in") as excinfo:
        load_photos(empty, 64)
    message = _one_line(excinfo)
    assert all(ext in message for ext in IMAGE_EXTENSIONS)

    only_text = tmp_path / "text"
    only_text.mkdir()
    (only_text / "readme.txt").write_text("x")
    with pytest.warns(PhotoWarning, match="readme.txt"):
        with pytest.raises(PhotoError, match="No photos in"):
            load_photos(only_text, 64)

    iphone = tmp_path / "iphone"
    iphone.mkdir()
    (iphone / "IMG_0001.HEIC").write_bytes(b"\0\0\0\x18ftypheic")
    with pytest.warns(PhotoWarning, match="IMG_0001.HEIC"):
        with pytest.raises(PhotoError, match="HEIC/HEIF photos must be converted to JPEG"):
            load_photos(iphone, 64)


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("corrupt.jpg", b"\xff\xd8\xff\xe0 this is not really a jpeg", "corrupt.jpg"),
        ("empty.png", b"", "empty.png"),
        ("notes.png", b"just some text, not an image\n", "notes.png"),
        ("truncated.jpg", None, "truncated.jpg"),
    ],
)
def test_unreadable_photo_is_named(tmp_path, name, content, expected):
    _save(_rgb(), tmp_path / "good.png")
    if content is None:  # a real JPEG cut in half
        _save(_rgb(200, 200), tmp_path / "full.jpg", quality=90)
        data = (tmp_path / "full.jpg").read_bytes()
        (tmp_path / "full.jpg").unlink()
        content = data[: len(data) // 2]
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PhotoError, match=f"Cannot read {expected}") as excinfo:
        load_photos(tmp_path, 16)
    assert "Remove it" in _one_line(excinfo) and "replace it" in str(excinfo.value)


def test_count_limits_and_bad_resolution(tmp_path):
    for i in range(3):
        _save(_rgb(seed=i), tmp_path / f"{i}.png")
    with pytest.raises(PhotoError, match="Only 3 photos.*at least 4") as excinfo:
        load_photos(tmp_path, 16, min_count=4)
    _one_line(excinfo)
    with pytest.raises(PhotoError, match="3 photos.*at most 2") as excinfo:
        load_photos(tmp_path, 16, max_count=2)
    _one_line(excinfo)
    assert load_photos(tmp_path, 16, min_count=3, max_count=3)[0].shape == (3, 3, 16, 16)
    for bad in (0, -8, 1.5, True):
        with pytest.raises(ValueError):
            load_photos(tmp_path, bad)
    assert isinstance(PhotoError("x"), ValueError)


def test_load_photo_single_file_errors(tmp_path):
    with pytest.raises(PhotoError, match="Photo not found"):
        load_photo(tmp_path / "missing.jpg", 16)
    with pytest.raises(PhotoError, match="is a folder"):
        load_photo(tmp_path, 16)


# ----------------------------------------------------------------------------- benchmarks


def test_dreambooth_real_layout(dreambooth):
    DREAMBOOTH = dreambooth
    with pytest.warns(DatasetWarning, match="skipping 10 of 30 subjects") as record:
        dataset = load_dreambooth_dataset(DREAMBOOTH)
    assert isinstance(dataset, DreamBoothDataset) and dataset.layout == "dreambooth"
    assert len(dataset) == 20 and len(dataset.classes) == 30
    assert "teapot" in dataset.missing and "wolf_plushie" in dataset.missing
    assert "teapot" in str(record[0].message) and "\n" not in str(record[0].message)
    assert record[0].filename == __file__  # attributed to the caller, not datasets.py
    assert len(dataset.object_prompt_templates) == len(dataset.live_prompt_templates) == 25

    expected_classes = {
        "dog": "dog", "dog8": "dog", "cat": "cat", "backpack_dog": "backpack",
        "grey_sloth_plushie": "stuffed animal", "pink_sunglasses": "glasses",
        "berry_bowl": "bowl", "red_cartoon": "cartoon", "duck_toy": "toy",
    }
    for name, noun in expected_classes.items():
        assert dataset[name].class_noun == noun, name
    live = {s.name for s in dataset if s.is_live}
    assert live == {"cat", "dog", "dog2", "dog5", "dog6", "dog8"}

    for subject in dataset:
        assert len(subject.prompts) == 25, subject.name
        assert len(set(subject.prompts)) == 25
        assert all("{" not in p and "}" not in p and "format" not in p for p in subject.prompts)
        assert all(f"sks {subject.class_noun}" in p for p in subject.prompts)
        assert 4 <= len(subject.photo_paths) <= 6 and all(p.is_file() for p in subject.photo_paths)
        assert subject.instance_prompt == f"a photo of sks {subject.class_noun}"

    if not is_real_dreambooth(dreambooth):
        return  # the rest are facts of the real benchmark's prompt lists
    dog, sloth = dataset["dog"], dataset["grey_sloth_plushie"]
    assert dog.prompts[0] == "a sks dog in the jungle"
    assert "a sks dog wearing a red hat" in dog.prompts  # live-subject list
    assert "a sks dog in a purple wizard outfit" in dog.prompts
    assert "a sks stuffed animal with a wheat field in the background" in sloth.prompts  # object
    assert not any("hat" in p for p in sloth.prompts)
    assert dog.prompts[-1] == "a cube shaped sks dog"
    assert dataset[0].name == "backpack" and dataset.names[:2] == ["backpack", "backpack_dog"]


def test_dreambooth_identifier_and_autodetect(dreambooth):
    DREAMBOOTH = dreambooth
    with pytest.warns(DatasetWarning):
        dataset = load_benchmark_dataset(DREAMBOOTH, identifier="zwx")
    assert isinstance(dataset, DreamBoothDataset)
    assert dataset["cat"].prompts[1] == "a zwx cat in the snow"
    with pytest.warns(DatasetWarning):  # the path of the index file works too
        assert len(load_benchmark_dataset(DREAMBOOTH / "prompts_and_classes.txt")) == 20


def test_dreambooth_malformed_file(tmp_path):
    (tmp_path / "prompts_and_classes.txt").write_text("Classes\n\nsubject_name,class\ndog,dog\n")
    with pytest.raises(DatasetError, match="has no 'Object Prompts' list") as exc:
        load_dreambooth_dataset(tmp_path)
    _one_line(exc)


def _fake_customconcept101(root: Path) -> Path:
    entries = [
        {
            "instance_prompt": "photo of a <new1> dog",
            "class_prompt": "dog",
            "instance_data_dir": "./benchmark_dataset/pet_dog1",
            "class_data_dir": "./regularization/pet_dog",
            "prompt_filename": "prompts/dog.txt",
        },
        {  # photos not downloaded: skipped
            "instance_prompt": "photo of a <new1> barn",
            "class_prompt": "barn",
            "instance_data_dir": "./benchmark_dataset/scene_barn",
            "prompt_filename": "prompts/barn.txt",
        },
        {  # no class_prompt; data dir found by its basename under root/benchmark_dataset
            "instance_prompt": "photo of a <new1> teddybear",
            "instance_data_dir": "/elsewhere/plushie_teddybear",
            "prompt_filename": "/elsewhere/prompts/teddybear.txt",
        },
        [{"instance_prompt": "multi-concept entry"}],
    ]
    (root / "prompts").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps(entries))
    (root / "prompts" / "dog.txt").write_text(
        "Photo of a {}.\n{} swimming in a pool.\n\n{0} and {1} together.\na sleeping {}.\n"
    )
    (root / "prompts" / "teddybear.txt").write_text("a {} on a shelf.\n")
    for folder, count in [("pet_dog1", 3), ("plushie_teddybear", 2)]:
        for i in range(count):
            _save(_rgb(seed=i), root / "benchmark_dataset" / folder / f"{i:02d}.jpg")
    return root


def test_customconcept101_fake_layout(tmp_path):
    root = _fake_customconcept101(tmp_path / "cc101")
    with pytest.warns(DatasetWarning, match="scene_barn") as record:
        dataset = load_customconcept101_dataset(root)
    assert "multi-concept" in str(record[0].message)
    assert isinstance(dataset, CustomConcept101Dataset) and dataset.layout == "customconcept101"
    assert dataset.names == ["pet_dog1", "plushie_teddybear"]
    dog = dataset["pet_dog1"]
    assert dog.class_noun == "dog" and dog.is_live
    assert dog.prompts == (
        "Photo of a sks dog.",
        "sks dog swimming in a pool.",
        "a sleeping sks dog.",  # the two-concept "{0} and {1}" line is dropped
    )
    assert dog.instance_prompt == "photo of a sks dog" and dog.class_prompt == "a photo of dog"
    assert [p.name for p in dog.photo_paths] == ["00.jpg", "01.jpg", "02.jpg"]
    bear = dataset["plushie_teddybear"]
    assert bear.class_noun == "teddybear" and not bear.is_live
    assert bear.prompts == ("a sks teddybear on a shelf.",)
    assert "scene_barn" in dataset.missing
    pixels, _ = bear.load_photos(16)
    assert pixels.shape == (2, 3, 16, 16)

    with pytest.warns(DatasetWarning):
        detected = load_benchmark_dataset(root, identifier="zwx")
    assert isinstance(detected, CustomConcept101Dataset)
    assert detected["pet_dog1"].prompts[0] == "Photo of a zwx dog."


def test_customconcept101_bad_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(DatasetError, match="Cannot parse") as excinfo:
        load_customconcept101_dataset(tmp_path)
    _one_line(excinfo)


def test_unknown_folder_raises_dataset_error(tmp_path):
    (tmp_path / "photos").mkdir()
    _save(_rgb(), tmp_path / "photos" / "a.jpg")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a benchmark folder") as excinfo:
        load_benchmark_dataset(tmp_path)
    message = _one_line(excinfo)
    assert "prompts_and_classes.txt" in message and "dataset.json" in message
    with pytest.raises(DatasetError, match="not found"):
        load_benchmark_dataset(tmp_path / "missing")
    with pytest.raises(DatasetError):
        load_benchmark_dataset(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match="prompts_and_classes.txt is missing"):
        load_dreambooth_dataset(tmp_path)
    assert isinstance(DatasetError("x"), ValueError)


# ----------------------------------------------------------------------------- demo photos


def test_bundled_demo_photos_load():
    folder = demo_photos_dir()
    assert folder.is_dir()
    files = list_photos(folder)
    assert len(files) == 4
    assert sum(f.stat().st_size for f in files) < 1_000_000
    pixels, names = load_photos(folder, 128)
    assert pixels.shape == (4, 3, 128, 128) and names == [f.name for f in files]
    attribution = (folder.parent / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "unsplash.com/@alvannee" in attribution
    assert "creativecommons.org/licenses/by/4.0" in attribution


def test_make_demo_photos_reproduces_bundle(tmp_path, dreambooth):
    source = dreambooth / "dog"
    if not is_real_dreambooth(dreambooth):  # the originals, as far as the bundle keeps them: 4x upscaled
        source = tmp_path / "originals"
        source.mkdir()
        for p in list_photos(demo_photos_dir()):
            Image.open(p).resize((512, 512), Image.Resampling.LANCZOS).save(source / p.name, quality=95)
    written = make_demo_photos(source, tmp_path / "made", size=128)
    assert [p.name for p in written] == [p.name for p in list_photos(demo_photos_dir())]
    for new in written:
        with Image.open(new) as image:
            assert image.size == (128, 128) and not image.getexif()
            fresh = np.asarray(image, dtype=np.int16)
        bundled = np.asarray(Image.open(demo_photos_dir() / new.name), dtype=np.int16)
        assert np.abs(fresh - bundled).mean() < 2.0
