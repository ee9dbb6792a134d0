"""The bundled toy model: it loads as a Stable Diffusion pipeline, draws what it is asked, and a short
personalization (the demo itself, and LoRA FT) makes it draw a subject it has never seen. The toy's figures only."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hollownet import unet_split as H
from hollownet.cut import all_plans
from hollownet.toy import model_dir
from hollownet.toy import world as W
from hollownet.toy.evaluator import (_augment, box_fill, classify, load_evaluator, score_images, shape_of, subject_colours,
                                     subject_present)

GUIDANCE, GEN_STEPS = 1.5, 20


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusionPipeline

    p = StableDiffusionPipeline.from_pretrained(model_dir(), dtype=torch.float32, safety_checker=None,
                                                requires_safety_checker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def evaluator():
    return load_evaluator()


def test_bundled_model_is_small_fp16_and_in_the_sd_layout():
    folder = model_dir()
    for part in ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
                 "tokenizer/vocab.json", "scheduler/scheduler_config.json"):
        assert (folder / part).is_file(), part
    weights = list(folder.rglob("*.safetensors"))
    assert sum(f.stat().st_size for f in weights) <= 16 * 2**20
    from safetensors import safe_open

    with safe_open(folder / "unet" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype == torch.float16


def test_a_continued_pretraining_keeps_the_evaluator(tmp_path):
    """The evaluator is the ruler: continuing the U-Net keeps the continued model's (scores stay comparable)."""
    from hollownet.toy.pretrain import evaluator_source

    assert evaluator_source(None, model_dir()) == model_dir() / "evaluator.safetensors"
    assert evaluator_source(tmp_path / "e.safetensors", model_dir()) == tmp_path / "e.safetensors"  # the flag wins
    assert evaluator_source(None, None) is None  # from scratch: trained
    assert evaluator_source(None, tmp_path) is None  # a folder without one: trained


def test_world_words_are_single_tokens(pipe):
    for word in W.vocabulary():
        assert len(pipe.tokenizer(word, add_special_tokens=False).input_ids) == 1, word


def test_paper_cut_applies_and_split_forward_equals_unet(pipe):
    from hollownet.cut import make_plan

    unet = pipe.unet
    default = make_plan(unet)
    assert default.hollow_blocks == ["down_blocks.2.downsamplers", "down_blocks.3", "mid_block", "up_blocks.0"]
    x, t, text = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 16, 64)
    with torch.no_grad():
        ref = unet(x, t, text).sample
        for plan in all_plans(unet):
            torch.testing.assert_close(H.full_forward(unet, plan, x, t, text), ref, rtol=0, atol=0)


def test_evaluator_reads_world_renders(evaluator):
    rng = random.Random(7)
    scenes = [W.random_scene(rng) for _ in range(60)]
    got = classify(evaluator, [W.render(s) for s in scenes])
    for key in ("background", "colour", "shape"):
        acc = np.mean([g[key] == getattr(s, key) for g, s in zip(got, scenes)])
        assert acc >= 0.9, (key, acc)


def test_shape_rule_reads_blurred_renders_and_calls_blobs_what_they_fill():
    # The geometric rule must hold on renders as generated images look (blurred, noisy), and a blob
    # is read by how much of its box it fills, not guessed.
    rng = random.Random(11)
    scenes = [W.random_scene(rng) for _ in range(60)]
    assert np.mean([shape_of(_augment(W.render(s), rng)) == s.shape for s in scenes]) >= 0.97
    blob = Image.new("RGB", (64, 64), W.BACKGROUNDS["gray"])
    ImageDraw.Draw(blob).rounded_rectangle([20, 20, 44, 44], radius=3, fill=W.COLOURS["red"])
    assert shape_of(blob) == "square" and 0.9 < box_fill(blob) <= 1.0
    assert box_fill(Image.new("RGB", (64, 64), W.BACKGROUNDS["gray"])) == 0.0


def test_presence_rule_tells_subjects_from_world_shapes():
    photos = W.subject_photos("plus", 5)
    colours = subject_colours(photos)
    assert all(subject_present(p, colours) for p in W.subject_photos("plus", 4, seed=3))
    rng = random.Random(1)
    assert not any(subject_present(W.render(W.random_scene(rng)), colours) for _ in range(30))
    assert not any(subject_present(p, colours) for p in W.subject_photos("ring", 4))


@pytest.mark.parametrize("name", sorted(W.SUBJECTS))
def test_identity_metric_sees_the_subject_not_its_colours(name):
    """The identity metric separates the subject (on unseen backgrounds, moved and resized) from blobs in its
    colours, its shape in world colours, its colours swapped, half of it and the other subjects
    (benchmarks/toy_identity.py: the same cases, more of them, also through the VAE)."""
    from hollownet.toy.identity import IdentityReference, auc, identity_rate, separation_cases

    ref = IdentityReference(W.subject_photos(name))
    scores = {k: ref.scores(v) for k, v in separation_cases(name, n=6, seed=1).items()}
    others = [x for k, v in scores.items() if k != "subject" for x in v]
    assert auc(scores["subject"], others) > 0.99, scores
    assert identity_rate(scores["subject"]) == 1.0, scores
    for case in ("its shape in world colours", "its colours swapped", "half of it", "other subjects"):
        assert identity_rate(scores[case]) == 0.0, (case, scores[case])
    assert identity_rate(scores["blob in its colours"]) <= 1 / 6, scores["blob in its colours"]


def test_eval_scores_a_toy_run_with_the_toy_metrics(capsys, tmp_path):
    """``hollownet eval --model toy``: the subject drawn scores identity 1 and its background; blobs in its colours 0."""
    from hollownet.cli import main
    from hollownet.toy.identity import separation_cases

    (tmp_path / "photos").mkdir()
    for i, im in enumerate(W.subject_photos("plus", 4)):
        im.save(tmp_path / "photos" / f"{i}.png")
    cases = separation_cases("plus", n=3, seed=2)
    got = {}
    for case in ("subject", "blob in its colours"):
        folder = tmp_path / case.replace(" ", "_")
        folder.mkdir()
        entries = [{"file": f"{i:03d}.png", "prompt": f"a sks shape on a {bg} background"}
                   for i, bg in enumerate(W.UNSEEN_BACKGROUNDS)]
        for e, im in zip(entries, cases[case]):
            im.save(folder / e["file"])
        (folder / "manifest.json").write_text(json.dumps({"images": entries}))
        assert main(["eval", "--model", "toy", "--generated", str(folder), "--reference", str(tmp_path / "photos"), "--json"]) == 0
        got[case] = json.loads(capsys.readouterr().out)
    assert got["subject"]["identity"] == 1.0 and got["subject"]["background"] == 1.0, got
    assert got["blob in its colours"]["identity"] == 0.0 and got["blob in its colours"]["presence"] > 0.5, got


def test_prompt_following_well_above_chance(pipe, evaluator):
    """A small sample of new captions: background, colour and shape named in the prompt are drawn (chance
    0.2, 0.2 and 0.33; 1.00 each on 100 captions at guidance 3, benchmarks/README.md)."""
    rng = random.Random(123)
    scenes = [W.random_scene(rng) for _ in range(12)]
    images = pipe([s.caption() for s in scenes], num_inference_steps=GEN_STEPS, guidance_scale=GUIDANCE,
                  generator=torch.Generator().manual_seed(0), height=64, width=64).images
    got = classify(evaluator, images)
    acc = {k: np.mean([g[k] == getattr(s, k) for g, s in zip(got, scenes)]) for k in ("background", "colour", "shape")}
    assert acc["background"] >= 0.75 and acc["colour"] >= 0.75 and acc["shape"] >= 0.66, acc


@pytest.fixture(scope="module")
def personalized(tmp_path_factory):
    """``hollownet demo`` itself, at its defaults (Hollowed Net on 'plus'), shared by the tests below, and a
    2-step LoRA FT run on its photos for the memory comparison (a LoRA FT run's peak does not depend on its steps)."""
    from hollownet.workflow import TrainRequest, personalize, run_demo

    root = tmp_path_factory.mktemp("toy-demo")
    demo = run_demo(root / "demo")
    photos = root / "demo" / "photos"
    read = lambda folder: [Image.open(f).convert("RGB") for f in sorted(folder.glob("*.png"))]  # noqa: E731
    out = {"photos": photos, "demo": demo, "demo_dir": root / "demo", "hollow_record": demo["train"]}
    for method, folder in (("base", "base"), ("hollow", "personalized")):
        out[method] = [im for j in range(len(W.evaluation_prompts())) for im in read(root / "demo" / "images" / folder / f"p{j}")]
    out["lora_record"] = personalize(TrainRequest(model="toy", images=str(photos), prompt=W.INSTANCE_PROMPT,
                                                  output=str(root / "lora"), method="lora", steps=2, checkpoint_every=0))
    return out


def test_personalization_draws_the_novel_subject(personalized, evaluator):
    """The subject itself (its shape, colours and their layout: toy.identity) is drawn on backgrounds its photos
    never showed by the demo's Hollowed Net run; the base model never draws it."""
    from hollownet.toy.identity import IdentityReference, identity_rate
    from hollownet.workflow import DEMO_IMAGES_PER_PROMPT

    photos = [Image.open(p).convert("RGB") for p in sorted(personalized["photos"].iterdir())]
    ref = IdentityReference(photos)
    bgs = [bg for bg in W.UNSEEN_BACKGROUNDS for _ in range(DEMO_IMAGES_PER_PROMPT)]
    s = {m: score_images(evaluator, personalized[m], photos, backgrounds=bgs) for m in ("base", "hollow")}
    identity = {m: identity_rate(ref.scores(personalized[m])) for m in ("base", "hollow")}
    assert identity["base"] <= 0.1 and s["base"]["presence"] == 0.0, (identity, s)  # it never drew it
    assert identity["hollow"] >= 0.5 and s["hollow"]["background_followed"] >= 0.5, (identity, s)
    # the demo's own scores are these (the same images, the same metrics)
    demo = personalized["demo"]["toy_scores"]
    assert demo["personalized"]["identity"] == identity["hollow"] and demo["base model"]["identity"] == identity["base"]
    assert demo["personalized"]["toy_subject_score"] == pytest.approx(s["hollow"]["toy_subject_score"])


def test_demo_writes_its_sheet_and_record(personalized):
    """What ``hollownet demo`` promises beside its scores: the sheet (photos | base model | personalized),
    demo.json, the LoRA, two-path generation."""
    demo, folder = personalized["demo"], personalized["demo_dir"]
    sheet = Image.open(folder / "sheet.png")
    assert sheet.height >= 3 * 128 and sheet.width >= 12 * 128  # three rows of 12 images, 128 px cells
    record = json.loads((folder / "demo.json").read_text())
    assert record["toy_scores"]["personalized"]["identity"] == demo["toy_scores"]["personalized"]["identity"]
    assert (folder / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert demo["train"]["settings"]["method"] == "hollow" and demo["generate"]["mode"] == "two-path"


def test_hollow_run_trains_less_than_lora(personalized):
    hollow, lora = personalized["hollow_record"], personalized["lora_record"]
    assert hollow["plan"]["fraction"] > 0.3
    assert hollow["memory"]["train"]["peak_bytes"] < lora["memory"]["train"]["peak_bytes"]


def test_bench_runs_on_the_toy_model_with_toy_scores(tmp_path):
    """The bench runner end to end on --model toy --dataset toy (plumbing: a few steps, one image each)."""
    from hollownet.cli import main

    out = tmp_path / "bench"
    rc = main(["bench", "--model", "toy", "--dataset", "toy", "--subjects", "ring", "--methods", "hollow:infer=merged",
               "--steps", "6", "--images-per-prompt", "1", "--gen-steps", "4", "--output", str(out)])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == ["identity", "identity_score", "toy_subject", "presence", "background", "drift"]
    row = summary["methods"][0]
    assert row["method"] == "hollow:infer=merged" and row["n_ok"] == 1
    cell = json.loads(next((out / "cells").rglob("result.json")).read_text())
    assert cell["config"]["scorer"] == "toy" and cell["config"]["resolution"] == 64  # the toy's defaults
    assert cell["scores"]["n_generated"] == 3 and 0 <= cell["scores"]["drift"] <= 1
    assert "identity" in (out / "summary.md").read_text() and (out / "tradeoffs.png").is_file()
