"""Tests for hollownet.evaluation.metrics: metric math, extractors, folder scoring, errors.

Models are tiny random ViT / CLIP checkpoints written with save_pretrained into a
temporary folder, so nothing is downloaded and the whole file runs in seconds.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers_models import build_tiny_clip, build_tiny_vit
from hollownet.evaluation import metrics as ev


# Silence the "requires torchvision, falling back to the PIL backend" notices.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# --------------------------------------------------------------------------
# Tiny offline models (built by helpers_models.py).
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return build_tiny_vit(root / "vit"), build_tiny_clip(root / "clip")


@pytest.fixture(scope="module")
def extractors(models):
    vit, clip = models
    return ev.DinoExtractor(vit, batch_size=16), ev.ClipExtractor(clip, batch_size=16)


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def write_manifest(folder: Path, entries: list[tuple[str, str]]):
    (folder / "manifest.json").write_text(json.dumps({"images": [{"file": f, "prompt": p} for f, p in entries]}))


@pytest.fixture
def folders(tmp_path):
    """generated/ with 3 images over 2 prompts (+ manifest) and reference/ with 2 photos."""
    gen, ref = tmp_path / "generated", tmp_path / "reference"
    gen.mkdir()
    ref.mkdir()
    prompts = ["a photo of sks dog", "a photo of sks dog", "a sks dog on the beach"]
    for i, (w, h) in enumerate([(37, 53), (300, 120), (64, 64)]):
        noise_image(w, h, seed=i).save(gen / f"{i:03d}.png")
    write_manifest(gen, [(f"{i:03d}.png", p) for i, p in enumerate(prompts)])
    noise_image(40, 40, seed=10).save(ref / "00.jpg")
    noise_image(50, 30, seed=11).save(ref / "01.webp")
    (ref / "notes.txt").write_text("not an image")
    return gen, ref


# --------------------------------------------------------------------------
# Pure math.
# --------------------------------------------------------------------------


def test_mean_pairwise_cosine_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unnormalized on purpose
    b = torch.tensor([[3.0, 3.0], [1.0, 0.0]])
    # pairs: (a0,b0)=1/sqrt2, (a0,b1)=1, (a1,b0)=1/sqrt2, (a1,b1)=0
    expected = (2 / math.sqrt(2) + 1 + 0) / 4
    assert ev.mean_pairwise_cosine(a, b) == pytest.approx(expected)
    assert ev.cosine_matrix(a, b).shape == (2, 2)
    assert ev.mean_pairwise_cosine(a[:1], a[:1]) == pytest.approx(1.0)


def test_mean_matched_cosine_matches_hand_computation():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[2.0, 0.0], [4.0, 3.0]])
    assert ev.mean_matched_cosine(a, b) == pytest.approx((1.0 + 24 / 25) / 2)


def test_cosine_functions_reject_bad_shapes():
    with pytest.raises(ValueError, match="expected"):
        ev.cosine_matrix(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="equal shape"):
        ev.mean_matched_cosine(torch.ones(2, 3), torch.ones(3, 3))
    with pytest.raises(ValueError, match="at least one"):
        ev.mean_pairwise_cosine(torch.zeros(0, 3), torch.ones(2, 3))


@pytest.mark.parametrize(
    "prompt, identifier, expected",
    [
        ("a photo of sks dog on the beach", "sks", "a photo of dog on the beach"),
        ("sks dog", "sks", "dog"),
        ("A photo of SKS dog", "sks", "A photo of dog"),
        ("a photo of sks, a dog", "sks", "a photo of , a dog"),
        ("tasks for sksdog", "sks", "tasks for sksdog"),  # only whole words
        ("a <v> toy", "<v>", "a toy"),
        ("a photo of zwx cat", "zwx", "a photo of cat"),
        ("a photo of sks dog", None, "a photo of sks dog"),
    ],
)
def test_strip_identifier(prompt, identifier, expected):
    assert ev.strip_identifier(prompt, identifier) == expected


# --------------------------------------------------------------------------
# Extractors.
# --------------------------------------------------------------------------


def test_extractor_shapes_and_norms_for_odd_sizes(extractors):
    dino, clip = extractors
    images = [noise_image(37, 53, 0), noise_image(300, 120, 1), noise_image(8, 9, 2)]
    for extractor, dim in ((dino, 32), (clip, 16)):
        f = extractor.images(images)
        assert f.shape == (3, dim)
        assert f.dtype == torch.float32
        assert torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
        assert not extractor.model.training
        assert not any(p.requires_grad for p in extractor.model.parameters())
    t = clip.texts(["a photo of dog", "a dog", "x"])
    assert t.shape == (3, 16)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_small_batches_give_same_features_as_one_batch(models, extractors):
    vit, clip_path = models
    images = [noise_image(37, 53, s) if s % 2 else noise_image(300, 120, s) for s in range(5)]
    texts = ["a photo of dog", "a dog on the beach", "dog", "a red dog", "a very long prompt " * 5]
    dino_big, clip_big = extractors
    dino_small = ev.DinoExtractor(vit, batch_size=2)
    clip_small = ev.ClipExtractor(clip_path, batch_size=2)
    assert torch.allclose(dino_small.images(images), dino_big.images(images), atol=1e-5)
    assert torch.allclose(clip_small.images(images), clip_big.images(images), atol=1e-5)
    # Padding differs per batch; the attention mask must make it irrelevant.
    assert torch.allclose(clip_small.texts(texts), clip_big.texts(texts), atol=1e-5)


def test_identical_image_scores_one_and_distinct_sets_do_not(extractors):
    dino, clip = extractors
    imgs = [noise_image(37, 53, 0), noise_image(300, 120, 1), noise_image(64, 64, 2)]
    for extractor in (dino, clip):
        f = extractor.images(imgs)
        # One image against itself is exactly 1.
        assert ev.mean_pairwise_cosine(f[:1], extractor.images(imgs[:1])) == pytest.approx(1.0, abs=1e-5)
        # A set of distinct images against itself: diagonal 1, mean strictly below 1.
        m = ev.cosine_matrix(f, f)
        assert torch.allclose(m.diagonal(), torch.ones(3, dtype=m.dtype), atol=1e-5)
        assert ev.mean_pairwise_cosine(f, f) < 1.0 - 1e-6


# --------------------------------------------------------------------------
# evaluate_folder / format_markdown.
# --------------------------------------------------------------------------


def test_evaluate_folder_result_structure(folders, models, extractors):
    gen, ref = folders
    vit, clip_path = models
    res = ev.evaluate_folder(gen, ref, dino_model=vit, clip_model=clip_path, batch_size=2)
    json.dumps(res)  # JSON-able
    assert res["n_generated"] == 3 and res["n_reference"] == 2  # notes.txt ignored, .webp accepted
    assert res["scale"] == "raw cosine"
    assert res["dino_model"] == str(vit) and res["clip_model"] == str(clip_path)
    assert [r["prompt"] for r in res["per_prompt"]] == ["a photo of sks dog", "a sks dog on the beach"]
    assert [r["n_images"] for r in res["per_prompt"]] == [2, 1]
    assert [r["clip_t_prompt"] for r in res["per_prompt"]] == ["a photo of dog", "a dog on the beach"]
    for key in ("dino", "clip_i", "clip_t"):
        assert -1.0 <= res[key] <= 1.0
        # Overall scores are image-weighted means of the per-prompt scores.
        weighted = sum(r[key] * r["n_images"] for r in res["per_prompt"]) / res["n_generated"]
        assert res[key] == pytest.approx(weighted, abs=1e-6)

    # Same numbers with prebuilt extractors (no reload) and a different batch size.
    res2 = ev.evaluate_folder(gen, ref, dino_model=extractors[0], clip_model=extractors[1])
    for key in ("dino", "clip_i", "clip_t"):
        assert res2[key] == pytest.approx(res[key], abs=1e-5)


def test_clip_t_uses_prompt_without_identifier(folders, extractors):
    gen, ref = folders
    dino, clip = extractors
    res = ev.evaluate_folder(gen, ref, dino_model=dino, clip_model=clip)
    imgs = clip.images([gen / "000.png", gen / "001.png"])
    stripped = ev.mean_pairwise_cosine(imgs, clip.texts(["a photo of dog"]))
    with_id = ev.mean_pairwise_cosine(imgs, clip.texts(["a photo of sks dog"]))
    assert res["per_prompt"][0]["clip_t"] == pytest.approx(stripped, abs=1e-5)
    assert abs(stripped - with_id) > 1e-4  # the stripping actually changes the score

    # A custom identifier is honoured; "sks" is then kept.
    res_v = ev.evaluate_folder(gen, ref, identifier="zwx", dino_model=dino, clip_model=clip)
    assert res_v["per_prompt"][0]["clip_t_prompt"] == "a photo of sks dog"
    assert res_v["per_prompt"][0]["clip_t"] == pytest.approx(with_id, abs=1e-5)


def test_identical_generated_and_reference_image_scores_one(tmp_path, extractors):
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    noise_image(45, 61, 3).save(gen / "000.png")
    shutil.copy(gen / "000.png", ref / "photo.png")
    res = ev.evaluate_folder(gen, ref, prompt="a photo of sks dog", dino_model=extractors[0], clip_model=extractors[1])
    assert res["dino"] == pytest.approx(1.0, abs=1e-5)
    assert res["clip_i"] == pytest.approx(1.0, abs=1e-5)


def test_manifest_csv_and_prompt_override(folders, extractors):
    gen, ref = folders
    kw = dict(dino_model=extractors[0], clip_model=extractors[1])
    json_res = ev.evaluate_folder(gen, ref, **kw)
    (gen / "manifest.json").unlink()
    with open(gen / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "prompt"])
        w.writerows([["000.png", "a photo of sks dog"], ["001.png", "a photo of sks dog"], ["002.png", "a sks dog on the beach"]])
    csv_res = ev.evaluate_folder(gen, ref, **kw)
    assert csv_res["per_prompt"] == json_res["per_prompt"]

    # Override: every manifest image gets the given prompt.
    over = ev.evaluate_folder(gen, ref, prompt="a sks dog in the snow", **kw)
    assert [(r["prompt"], r["n_images"]) for r in over["per_prompt"]] == [("a sks dog in the snow", 3)]

    # Override without any manifest: every image in the folder is scored.
    (gen / "manifest.csv").unlink()
    bare = ev.evaluate_folder(gen, ref, prompt="a sks dog in the snow", **kw)
    assert bare["n_generated"] == 3
    assert bare["clip_t"] == pytest.approx(over["clip_t"], abs=1e-6)


def test_format_markdown(folders, extractors):
    gen, ref = folders
    write_manifest(gen, [("000.png", "a sks dog | left"), ("001.png", "a photo of sks dog"), ("002.png", "a photo of sks dog")])
    res = ev.evaluate_folder(gen, ref, dino_model=extractors[0], clip_model=extractors[1])
    md = ev.format_markdown(res)
    lines = md.splitlines()
    assert lines[0] == "| prompt | images | DINO | CLIP-I | CLIP-T |"
    assert any(line.startswith("| a sks dog \\| left | 1 |") for line in lines)
    assert any(line.startswith("| a photo of sks dog | 2 |") for line in lines)
    assert any(line.startswith("| **overall** | **3** |") and f"{res['dino']:.4f}" in line for line in lines)
    assert "raw cosine" in md
    assert "identifier 'sks' removed" in md
    # Every table row has the same number of (unescaped) columns.
    rows = [line.replace("\\|", "") for line in lines if line.startswith("|")]
    assert len({row.count("|") for row in rows}) == 1


# --------------------------------------------------------------------------
# Errors: one ValueError line naming the problem.
# --------------------------------------------------------------------------


def test_error_generated_folder_without_manifest(folders, models):
    gen, ref = folders
    (gen / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"no manifest\.json or manifest\.csv.*--prompt"):
        ev.evaluate_folder(gen, ref, dino_model=models[0], clip_model=models[1])


def test_error_manifest_names_missing_files(folders, models):
    gen, ref = folders
    write_manifest(gen, [("000.png", "a sks dog"), ("gone.png", "a sks dog")])
    with pytest.raises(ValueError, match=r"1 missing file.*gone\.png"):
        ev.evaluate_folder(gen, ref, dino_model=models[0], clip_model=models[1])


def test_error_reference_folder_without_photos(folders, models):
    gen, ref = folders
    for p in ref.iterdir():
        if p.suffix != ".txt":
            p.unlink()
    with pytest.raises(ValueError, match="contains no photos"):
        ev.evaluate_folder(gen, ref, dino_model=models[0], clip_model=models[1])
    with pytest.raises(ValueError, match="does not exist"):
        ev.evaluate_folder(gen, ref / "nope", dino_model=models[0], clip_model=models[1])


def test_error_empty_generated_folder(tmp_path, folders, models):
    _, ref = folders
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no generated images"):
        ev.evaluate_folder(empty, ref, prompt="a sks dog", dino_model=models[0], clip_model=models[1])


def test_error_wrong_model_type(tmp_path, models):
    from transformers import BertConfig

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(bert)
    with pytest.raises(ValueError) as e:
        ev.ClipExtractor(bert)
    assert str(e.value) == f"{str(bert)!r} is a 'bert' model, expected a CLIP model (e.g. openai/clip-vit-base-patch32)"
    with pytest.raises(ValueError, match=r"is a 'bert' model, expected a DINO ViT model"):
        ev.DinoExtractor(bert)
    # Swapped arguments are caught the same way.
    with pytest.raises(ValueError, match=r"is a 'clip' model, expected a DINO ViT model"):
        ev.DinoExtractor(models[1])
    with pytest.raises(ValueError, match=r"is a 'vit' model, expected a CLIP model"):
        ev.ClipExtractor(models[0])


def test_error_model_folder_without_config(tmp_path):
    empty = tmp_path / "not_a_model"
    empty.mkdir()
    with pytest.raises(ValueError, match="could not load a model config"):
        ev.DinoExtractor(empty)


def test_errors_are_one_line(folders, models):
    gen, ref = folders
    (gen / "manifest.json").unlink()
    with pytest.raises(ValueError) as e:
        ev.evaluate_folder(gen, ref, dino_model=models[0], clip_model=models[1])
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------
# Image loading and real photos.
# --------------------------------------------------------------------------


def test_load_image_applies_exif_orientation_and_rgb(tmp_path):
    im = Image.new("L", (40, 20), 128)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(tmp_path / "rot.jpg", exif=exif)
    loaded = ev.load_image(tmp_path / "rot.jpg")
    assert loaded.mode == "RGB"
    assert loaded.size == (20, 40)


def test_real_photos(tmp_path, extractors, dog_photos):
    photos = sorted(dog_photos.glob("*.jpg"))[:2]
    assert len(photos) == 2
    gen, ref = tmp_path / "gen", tmp_path / "ref"
    gen.mkdir()
    ref.mkdir()
    for p in photos:
        shutil.copy(p, ref / p.name)
    # A generated image identical to one reference photo, saved as PNG like `hollownet generate` does.
    ev.load_image(photos[0]).save(gen / "000.png")
    write_manifest(gen, [("000.png", "a photo of sks dog")])
    dino, clip = extractors
    res = ev.evaluate_folder(gen, ref, dino_model=dino, clip_model=clip)
    assert res["n_reference"] == 2 and res["n_generated"] == 1
    # Mean over (self, other photo): above the other-photo cosine, below 1.
    for key, ex in (("dino", dino), ("clip_i", clip)):
        f = ex.images(photos)
        other = float(ev.cosine_matrix(f[:1], f[1:2]))
        assert res[key] == pytest.approx((1.0 + other) / 2, abs=1e-4)
    assert res["per_prompt"][0]["clip_t_prompt"] == "a photo of dog"
    # The photo itself as the only reference scores exactly 1.
    for p in photos[1:]:
        (ref / p.name).unlink()
    res1 = ev.evaluate_folder(gen, ref, dino_model=dino, clip_model=clip)
    assert res1["dino"] == pytest.approx(1.0, abs=1e-4)
    assert res1["clip_i"] == pytest.approx(1.0, abs=1e-4)


def test_error_missing_model_folder_processor_or_tokenizer(tmp_path, models):
    vit, clip_path = models
    with pytest.raises(ValueError, match=r"model folder .*does not exist"):
        ev.DinoExtractor(tmp_path / "missing")
    no_proc = tmp_path / "vit_no_processor"
    shutil.copytree(vit, no_proc)
    (no_proc / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match="has no usable image processor"):
        ev.DinoExtractor(no_proc)
    no_tok = tmp_path / "clip_no_tokenizer"
    shutil.copytree(clip_path, no_tok)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (no_tok / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no usable tokenizer"):
        ev.ClipExtractor(no_tok)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        ev.DinoExtractor(vit, batch_size=0)


def test_error_unreadable_image(folders, models):
    gen, ref = folders
    (gen / "broken.png").write_bytes(b"not a png")
    write_manifest(gen, [("000.png", "a sks dog"), ("broken.png", "a sks dog")])
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        ev.evaluate_folder(gen, ref, dino_model=models[0], clip_model=models[1])


def test_eval_without_dino_clip_weights_offline_refuses_at_once(capsys, tmp_path, monkeypatch):
    """Hub ids that are neither cached nor reachable: one line naming the fix (a local copy, or --model toy),
    before the hub client's retries."""
    import huggingface_hub.constants

    from hollownet.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for d in ("gen", "ref"):
        (tmp_path / d).mkdir()
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "gen" / "000.png")
    Image.new("RGB", (32, 32), (200, 0, 0)).save(tmp_path / "ref" / "a.png")
    (tmp_path / "gen" / "manifest.json").write_text(json.dumps({"images": [{"file": "000.png", "prompt": "a sks dog"}]}))
    code = main(["eval", "--generated", str(tmp_path / "gen"), "--reference", str(tmp_path / "ref"),
                 "--dino-model", "nobody/no-dino", "--clip-model", "nobody/no-clip"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "'nobody/no-dino' is not on this machine" in err[0] and "--model toy" in err[0]
