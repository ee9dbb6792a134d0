"""``hollownet plan`` on SD3 / SD3.5 (memory/dit.py): the plan of a tiny SD3 folder against a real run of its
stages, measured exactly; the bundled SD3.5 configs plan with the U-Net plan's JSON keys; what the DiT branch
cannot predict is refused in one line."""

from __future__ import annotations

import json

import pytest

from conftest import error_line, run
from hollownet.memory.planner import plan_memory
from hollownet.requests import PlanRequest
from hollownet.settings import SD3_LORA_TARGETS, Modes
from hollownet.tiny_sd3 import build_tiny_sd3

pytestmark = pytest.mark.usefixtures("one_thread")
RES, RANK = 32, 2
#: What ``plan --json`` gives for a U-Net (``MemoryPlan.to_json``), the keys scripts read.
UNET_PLAN_KEYS = {
    "model", "method", "hollow_blocks", "fraction", "depth", "cut_why", "lora_targets_removed_share", "rank", "resolution",
    "batch", "precision", "compute_dtype", "grad_checkpointing", "stream_weights", "optimizer", "units",
    "precompute_peak_bytes", "train_peak_bytes", "inference_peak_bytes", "inference_peak_bytes_by_batch", "peak_bytes",
    "generate_peak_bytes", "whole_run_peak_bytes", "generate_peak_part", "generate", "train_over_inference_bytes",
    "train_over_inference_ratio", "breakdown", "train_peak_phase", "train_phase_peaks", "precompute_peak_part", "params",
    "hollow_out_shape", "stage1", "largest_streamed_unit_bytes", "inference_definition", "notes", "seconds",
}


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def _photos(folder) -> int:
    return len([p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")])


def _measured_generation(model, lora) -> dict:
    """The stock pipeline's call (what ``hollownet generate`` runs for SD3), every model resident, tracked exactly."""
    from diffusers import StableDiffusion3Pipeline

    from hollownet.memory.tracker import MemoryTracker

    pipe = StableDiffusion3Pipeline.from_pretrained(model, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(lora)
    pipe.set_progress_bar_config(disable=True)
    tracker = MemoryTracker(device="cpu").add_resident(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
    with tracker:
        pipe(prompt="a photo of sks dog", height=RES, width=RES, num_inference_steps=3, guidance_scale=7.0, output_type="pt")
    return tracker.report


def test_plan_of_a_tiny_sd3_folder_is_its_measured_run(tiny_sd3, dog_photos, tmp_path, capsys):
    """``hollownet train`` on the tiny SD3 folder (stage 1 every part, stage 2 two tracked steps), then ``plan --json``
    with the same flags: the peaks and breakdowns to the byte; with gradient checkpointing too (stage 2 rerun on the
    same store); generation (modelled) within 2% of the stock pipeline's call, its weights to the byte."""
    from hollownet.stages.dit import run_dit_train
    from hollownet.stages.train import TrainConfig

    flags = ["--model", tiny_sd3, "--rank", RANK, "--resolution", RES, "--steps", 2]
    code, _, err = run(capsys, "train", *flags, "--images", dog_photos, "--prompt", "a photo of sks dog",
                       "--output", tmp_path / "run", "--checkpoint-every", 0, "--device", "cpu", "--format", "diffusers")
    assert code == 0, err
    record = json.loads((tmp_path / "run" / "train.json").read_text())["memory"]
    pre, train = record["precompute"], record["train"]
    code, out, err = run(capsys, "plan", *flags, "--photos", _photos(dog_photos), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["precompute_peak_bytes"] == pre["peak_bytes"] and d["breakdown"]["precompute_parts"] == pre["parts"]
    assert set(pre["parts"]) == {"text encoder", "text encoder 2", "VAE encoder", "transformer prefix"}
    assert d["train_peak_bytes"] == train["peak_bytes"] and d["breakdown"]["train"] == train["breakdown"]
    assert d["train_peak_phase"] == train["peak_phase"]
    w = d["breakdown"]["train_weights"]
    assert w["frozen"] + w["trainable"] == train["breakdown"]["weights"]
    assert d["backbone"] == "transformer" and d["prefix_k"] == 1 and d["hollow_blocks"][-1] == "transformer_blocks.0"

    ckpt = run_dit_train(TrainConfig(model=str(tiny_sd3), store=str(tmp_path / "run" / "store"), output=str(tmp_path / "ckpt"),
                                     rank=RANK, lora_targets=list(SD3_LORA_TARGETS), steps=2, track_memory_steps=2,
                                     checkpoint_every=0, modes=Modes(grad_checkpointing=True), lora_format="diffusers")).memory
    plan = plan_memory(PlanRequest(model=str(tiny_sd3), rank=RANK, resolution=RES, steps=2,
                                   modes=Modes(grad_checkpointing=True)), stages=("train",))
    assert plan.train_peak == ckpt["peak_bytes"] < train["peak_bytes"] and plan.train.breakdown == ckpt["breakdown"]

    real = _measured_generation(tiny_sd3, tmp_path / "run")
    assert d["breakdown"]["generate"]["weights"] == real.breakdown["weights"]
    assert abs(d["generate_peak_bytes"] - real.peak_bytes) <= 0.02 * real.peak_bytes, (d["generate_peak_bytes"], real.peak_bytes)
    assert d["whole_run_peak_bytes"] == max(pre["peak_bytes"], train["peak_bytes"], d["generate_peak_bytes"])


def test_sd35m_plan_json_has_the_unet_plans_keys(capsys):
    """The bundled SD3.5 Medium plans (a deep prefix and one stored sample keep it quick) with every key a U-Net
    plan has; LoRA FT's peak is above the prefix cut's, and is labelled a prediction."""
    code, out, err = run(capsys, "plan", "--model", "sd35m", "--hollow", "0.9", "--steps", "1", "--photos", "1",
                         "--rank", "16", "--json")
    assert code == 0, err
    d = json.loads(out)
    assert UNET_PLAN_KEYS <= set(d), UNET_PLAN_KEYS - set(d)
    assert None not in (d["fraction"], d["cut_why"], d["hollow_blocks"], d["lora_targets_removed_share"])
    assert d["hollow_out_shape"] == [64 * 64, 24 * 64]  # the stored image tokens: 1024 px / 8 / patch 2, a side
    assert set(d["params"]) == {"unet_params", "hollow_params", "kept_params", "trainable_params", "lora_bytes_fp32"}
    assert d["resolution"] == 1024 and d["rank"] == 16 and d["backbone"] == "transformer" and d["prefix_k"] >= 20
    for key in ("precompute_peak_bytes", "train_peak_bytes", "inference_peak_bytes", "generate_peak_bytes",
                "whole_run_peak_bytes"):
        assert d[key] > 2**30, key  # SD3.5 Medium's 2.2B parameters in fp32 are 8.4 GiB; its prefix alone is more
    assert d["whole_run_peak_bytes"] == max(d["precompute_peak_bytes"], d["train_peak_bytes"], d["generate_peak_bytes"])
    assert any("generation (SD3) is modelled" in n for n in d["notes"])


@pytest.mark.parametrize("flags, words", [(["--precision", "nf4"], "--precision nf4 is not planned for SD3"),
                                          (["--stream-weights", "--optimizer", "adamw-in-backward"], "--stream-weights"),
                                          (["--budget", "8GB"], "--budget is not supported for SD3")])
def test_what_the_sd3_plan_cannot_predict_is_refused_in_one_line(capsys, flags, words):
    code, out, err = run(capsys, "plan", "--model", "sd35m", *flags)
    assert code == 2 and out == "" and words in error_line(err)
