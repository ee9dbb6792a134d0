"""Watching a run (issue 27): progress lines off a terminal, LoRA snapshots, held-out validation loss, sample rows,
and that none of it changes what is trained, raises the memory plan, or is redone after a resume."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import RES, error_line, run

pytestmark = pytest.mark.usefixtures("one_thread")

LORA = "pytorch_lora_weights.safetensors"
KOHYA = "pytorch_lora_weights_kohya.safetensors"
PROMPTS = ["a sks dog on the beach", "a sks dog in the snow"]


def train_args(model, photos, out, *extra):
    return ["train", "--model", model, "--images", photos, "--prompt", "a photo of sks dog", "--output", out,
            "--resolution", RES, "--rank", 2, "--lr", 1e-2, "--batch", 2, "--num-samples", 12, "--device", "cpu", *extra]


def watched_args(steps: int = 6, checkpoint_every: int = 0) -> list:
    return ["--steps", steps, "--checkpoint-every", checkpoint_every, *WATCHED]


WATCHED = ["--save-every", 3, "--validate-every", 2, "--log-every", 2,
           "--sample-every", 3, "--sample-steps", 2, "--sample-guidance", 2.0, "--sample-seed", 7,
           *[a for p in PROMPTS for a in ("--sample-prompt", p)]]


@pytest.fixture(scope="module")
def watched(tiny_model, dog_photos, tmp_path_factory):
    """One watched run (6 steps: snapshots at 3 and 6, validation at 2, 4, 6, sample rows at 3 and 6): its folder,
    stdout and stderr."""
    import contextlib

    from hollownet.cli import main

    out = tmp_path_factory.mktemp("watched") / "run"
    stdout, stderr = io.StringIO(), io.StringIO()  # not terminals, as under nohup or CI
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        assert main([str(a) for a in train_args(tiny_model, dog_photos, out, *watched_args())]) == 0
    return out, stdout.getvalue(), stderr.getvalue()


# ------------------------------------------------------------------------------------------------ progress lines


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_progress_lines_every_n_steps_or_seconds():
    from hollownet.stages.progress import ProgressLog

    stream, clock = io.StringIO(), Clock()
    log = ProgressLog("train (hollow)", 100, 0, every=10, seconds=30, stream=stream, clock=clock)
    printed = []
    for step in range(1, 101):
        clock.t += 0.5 if step <= 50 else 4.0  # slower after step 50: the 30-second rule takes over
        if log.update(step, loss=1.0 / step):
            printed.append(step)
    assert printed[:5] == [10, 20, 30, 40, 50]  # every 10 steps (5 s apart)
    assert printed[5:] == [58, 66, 74, 82, 90, 98, 100]  # every 8 steps (32 s >= 30 s apart), and the last
    lines = stream.getvalue().splitlines()
    assert lines[0] == "train (hollow): step 10/100, loss 0.1000 (mean 0.2929), 0.500 s/step, ETA 0:00:45"
    assert lines[-1].startswith("train (hollow): step 100/100, loss 0.0100") and lines[-1].endswith("done in 0:03:45")


def test_no_progress_lines_on_a_terminal():
    from hollownet.stages.progress import ProgressLog

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    log = ProgressLog("train", 4, every=1, stream=stream)
    for step in range(1, 5):
        log.update(step, loss=0.5)
    assert stream.getvalue() == ""  # tqdm's bar is there instead


def test_a_watched_run_prints_lines_for_both_stages(watched):
    _, stdout, stderr = watched
    assert "pre-compute: sample" not in stdout and "train (hollow): step" not in stdout  # stdout keeps the results
    pre = [line for line in stderr.splitlines() if line.startswith("pre-compute: sample")]
    assert pre and pre[-1].startswith("pre-compute: sample 20/20,")  # 12 training + 8 held-out samples
    train = [line for line in stderr.splitlines() if line.startswith("train (hollow): step")]
    number = r"\d+\.\d{4}"
    for line, step in zip(train, (2, 4, 6)):
        assert re.fullmatch(rf"train \(hollow\): step {step}/6, loss {number} \(mean {number}\), \d+\.\d{{3}} s/step, "
                            rf"(ETA \d+:\d\d:\d\d|done in \d+:\d\d:\d\d), validation loss {number}", line), line
    assert len(train) == 3


@pytest.mark.parametrize("flags, message", [
    (["--save-every", -1], "--save-every must be 0 (off) or a number of steps"),
    (["--method", "full", "--sample-every", 2], "--sample-every draws with a LoRA: use --method hollow or lora"),
])
def test_bad_watch_flags_are_one_line(tiny_model, dog_photos, tmp_path, capsys, flags, message):
    code, _, err = run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "run", "--steps", 2, *flags))
    assert code == 2 and message in error_line(err) and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------- snapshots


def test_snapshots_are_the_lora_at_their_step(watched, tiny_model):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    out = watched[0]
    assert sorted(p.name for p in (out / "snapshots").iterdir()) == ["step-0003", "step-0006"]
    for name in ("step-0003", "step-0006"):
        assert (out / "snapshots" / name / LORA).is_file() and (out / "snapshots" / name / KOHYA).is_file()
        assert json.loads((out / "snapshots" / name / "hollownet.json").read_text())["step"] == int(name[5:])
    final, last, mid = (load_file(p / LORA) for p in (out, out / "snapshots" / "step-0006", out / "snapshots" / "step-0003"))
    assert final.keys() == last.keys() == mid.keys()
    assert all(torch.equal(final[k], last[k]) for k in final)  # the last step's snapshot is the final LoRA
    assert any(not torch.equal(final[k], mid[k]) for k in final)  # step 3's is not
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    kw = dict(prompt="a photo of sks dog", num_inference_steps=2, height=RES, width=RES, output_type="pt")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out / "snapshots" / "step-0003")  # loadable as the final one
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert (after - before).abs().max() > 1e-4


def test_generate_step_uses_a_snapshot_or_lists_them(watched, tiny_model, tmp_path, capsys):
    out = watched[0]
    gen = ["generate", "--model", tiny_model, "--lora", out, "--prompt", PROMPTS[0], "--steps", 2, "--guidance", 2.0,
           "--seed", 7, "--num-images", 1, "--device", "cpu"]
    code, _, _ = run(capsys, *gen, "--step", 3, "--output", tmp_path / "g3")
    assert code == 0
    record = json.loads((tmp_path / "g3" / "generate.json").read_text())
    assert record["settings"]["lora"] == str(out / "snapshots" / "step-0003") and record["mode"] == "two-path"
    # the sample row of step 3 is exactly what generate draws from that snapshot (same seed, steps, guidance)
    drawn, sampled = (np.asarray(Image.open(p)) for p in (tmp_path / "g3" / "000.png", out / "samples" / "step-0003" / "00.png"))
    assert drawn.shape == (RES, RES, 3) and np.array_equal(drawn, sampled)
    code, _, err = run(capsys, *gen, "--step", 4, "--output", tmp_path / "g4")
    assert code == 2
    assert error_line(err).endswith("has no snapshot at step 4; the snapshots there are at steps: 3, 6")
    code, _, err = run(capsys, *gen[:3], *gen[5:], "--step", 3, "--output", tmp_path / "g5")  # no --lora
    assert code == 2 and "--step picks a snapshot of a LoRA: give --lora OUTPUT as well" in error_line(err)


# ---------------------------------------------------------------------------------------------------- validation


def test_validation_loss_is_recorded_plotted_and_its_best_step_named(watched, capsys):
    out, stdout, _ = watched
    record = json.loads((out / "train.json").read_text())
    val = record["validation"]
    assert [s for s, _ in val["history"]] == [2, 4, 6] and val["samples"] == 8 and val["every"] == 2
    best = min(val["history"], key=lambda h: h[1])
    assert (val["best_step"], val["best_loss"]) == tuple(best)
    assert f"validation loss lowest at step {best[0]} ({best[1]:.4f}" in stdout
    assert val["history"][-1][1] < val["history"][0][1]  # lr 1e-2 on one dog: the held-out loss falls too
    assert Image.open(out / "loss.png").size[0] > 0


def test_validation_samples_are_held_out_and_fixed(tiny_model, hollow_store):
    """Same photos; noise never drawn for training; timesteps spread over the schedule; the store's file is them."""
    from hollownet.stages.precompute import (VALIDATION_FILE, PrecomputeConfig, noisy_and_target, sample_table,
                                             validation_table)
    from hollownet.stages.store import Store

    store = Store(hollow_store)
    manifest = store.manifest()
    cfg = PrecomputeConfig(model="", images="", prompt="", output="", num_samples=manifest["num_samples"],
                           shard_size=manifest["shard_size"])
    rows = validation_table(len(manifest["photo_files"]), cfg, 1000)
    train_seeds = {r["noise_seed"] for r in sample_table(len(manifest["photo_files"]), 0, cfg, 1000)}
    assert len(rows) == 5 and not train_seeds & {r["noise_seed"] for r in rows}  # min(8, shard size 5)
    assert [r["timestep"] for r in rows] == [100, 300, 500, 700, 900]
    assert {r["latent"] for r in rows} == set(range(min(5, len(manifest["photo_files"]))))
    saved = store.tensors(VALIDATION_FILE)
    assert set(saved) >= {"noisy", "target", "timestep", "hollow_out"}  # the hollow's output too
    from diffusers import DDPMScheduler

    latents = store.tensors("latents.safetensors")["latents"]
    scheduler = DDPMScheduler.from_pretrained(tiny_model / "scheduler")
    noisy, target, t = noisy_and_target(latents[[r["latent"] for r in rows]], rows, scheduler)
    assert torch.equal(noisy.to(saved["noisy"].dtype), saved["noisy"]) and torch.equal(t, saved["timestep"])


# ------------------------------------------------------------------------------------------------------- samples


def test_sample_rows_and_sheet(watched):
    out = watched[0]
    for step in ("step-0003", "step-0006"):
        entries = json.loads((out / "samples" / step / "manifest.json").read_text())["images"]
        assert [(e["prompt"], e["seed"]) for e in entries] == [(p, 7) for p in PROMPTS]
        assert all(Image.open(out / "samples" / step / e["file"]).size == (RES, RES) for e in entries)
    sheet = Image.open(out / "samples" / "sheet.png")
    assert sheet.size == (110 + 2 * 132, 2 * 132 + 24)  # contact_sheet: 2 rows (steps) x 2 columns (prompts)
    record = json.loads((out / "train.json").read_text())
    assert record["samples"]["steps"] == [3, 6] and record["samples"]["prompts"] == PROMPTS


def test_sampling_changes_nothing_trained_and_stays_in_the_plan(watched, tiny_model, dog_photos, tmp_path, capsys):
    """The same run without watching: the same losses and LoRA to the bit (the training state freed for the
    samples is rebuilt exactly); a sample step's measured peak is what `plan` reports for generation, to the byte."""
    from safetensors.torch import load_file

    out = watched[0]
    code, _, _ = run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "plain", "--steps", 6, "--checkpoint-every", 0,
                                         "--validate-every", 0))
    assert code == 0
    plain = json.loads((tmp_path / "plain" / "train.json").read_text())
    record = json.loads((out / "train.json").read_text())
    assert plain["loss"]["history"] == record["loss"]["history"] and "validation" not in plain
    a, b = load_file(out / LORA), load_file(tmp_path / "plain" / LORA)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not list((out / "checkpoints").glob("*.pt"))  # --checkpoint-every 0: the break's checkpoints are removed
    code, stdout, _ = run(capsys, "plan", "--model", tiny_model, "--rank", 2, "--resolution", RES, "--batch", 2,
                          "--steps", 6, "--gen-steps", 2, "--guidance", 2.0, "--json")
    assert code == 0
    plan = json.loads(stdout)
    measured = record["samples"]["memory"]
    assert measured["peak_bytes"] == plan["generate_peak_bytes"] and measured["parts"] == plan["breakdown"]["generate_parts"]
    assert plan["whole_run_peak_bytes"] == max(plan["precompute_peak_bytes"], plan["train_peak_bytes"],
                                               plan["generate_peak_bytes"])
    assert record["memory"]["train"]["peak_bytes"] == plan["train_peak_bytes"]


# -------------------------------------------------------------------------------------------------------- resume


def test_resume_keeps_validation_snapshots_and_samples(watched, tiny_model, dog_photos, tmp_path, capsys):
    """Stopped at step 4 (checkpoints at 2 and 3), resumed to 6: the held-out set is the same file, its losses the
    straight run's; rows and snapshots already written are not redone."""
    out = tmp_path / "run"
    assert run(capsys, *train_args(tiny_model, dog_photos, out, *watched_args(4, 2)))[0] == 0
    val_file = (out / "store" / "validation.safetensors").read_bytes()
    kept = {p: p.stat().st_mtime_ns for p in [*(out / "samples" / "step-0003").iterdir(),
                                              *(out / "snapshots" / "step-0003").iterdir()]}
    first_record = json.loads((out / "train.json").read_text())
    assert [s for s, _ in first_record["validation"]["history"]] == [2, 4]
    code, _, err = run(capsys, *train_args(tiny_model, dog_photos, out, *watched_args(6, 2)))
    assert code == 0 and "resuming from step 3" in err  # the checkpoint made for the samples of step 3
    assert (out / "store" / "validation.safetensors").read_bytes() == val_file
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())  # not redone
    resumed = json.loads((out / "train.json").read_text())["validation"]["history"]
    straight = json.loads((watched[0] / "train.json").read_text())["validation"]["history"]
    assert resumed == straight  # step 2's kept from before the break, 4 and 6 recomputed: the same numbers
    assert sorted(p.name for p in (out / "samples").glob("step-*")) == ["step-0003", "step-0004", "step-0006"]


# ----------------------------------------------------------------------------------------------------------- app


def test_app_shows_the_growing_sheet_and_generates_from_a_snapshot(tmp_path):
    """The app's handlers (no browser): the run's sample sheet and snapshots in the view; step 4 draws from one."""
    from hollownet.app import handlers as h
    from hollownet.app.jobs import DONE, Jobs
    from hollownet.toy import world as W

    folder = tmp_path / "p"
    folder.mkdir()
    for i, img in enumerate(W.subject_photos("plus", 3)):
        img.save(folder / f"{i:02d}.png")
    jobs = Jobs(tmp_path / "app")
    s = {"model": "toy", "prompt": "a sks shape", "method": "hollow", "precision": "fp32", "steps": 4, "rank": 2,
         "resolution": 64, "lr": 1e-3, "batch": 1, "seed": 0, "device": "cpu", "sample_every": 2, "save_every": 2,
         "sample_steps": 2}
    assert h.start_training(jobs, sorted(str(p) for p in folder.iterdir()), s).startswith("started training")
    jobs.wait(300)
    assert jobs.latest["train"].status == DONE, jobs.latest["train"].error
    v = h.view(jobs)
    assert v["snapshots"] == [h.FINAL, "step 2", "step 4"]
    assert Image.open(v["sheet"][0]).size[1] == 2 * 132 + 24  # rows at steps 2 and 4
    g = {"prompt": "a sks shape on a black background", "seed": 0, "steps": 2, "guidance": 1.5, "num_images": 1,
         "path": "two-path", "lora": "step 2"}
    assert h.start_generation(jobs, g).startswith("started generation")
    jobs.wait(300)
    gen = jobs.latest["generate"]
    assert gen.status == DONE, gen.error
    record = json.loads((Path(gen.settings["output"]) / "generate.json").read_text())
    assert record["settings"]["lora"].endswith("lora/snapshots/step-0002")


def test_validation_peaks_below_a_training_step(tiny_model, hollow_store):
    """The held-out loss (no grad, a training batch per forward, its samples read for it) never raises stage 2's peak."""
    from hollownet.memory.tracker import MemoryTracker
    from hollownet.optimizers import make_optimizer
    from hollownet.stages import watch as W
    from hollownet.stages.store import Store
    from hollownet.stages.train import TrainConfig, build_model, loss_fn, predict, train_step

    store = Store(hollow_store)
    cfg = TrainConfig(model=str(tiny_model), store=str(hollow_store), output="unused", rank=2, batch=2)
    net = build_model(tiny_model, store.manifest(), cfg)
    optimizer = make_optimizer(net.params, "adamw", 1e-3, 1.0)
    embeds = store.tensors("prompts.safetensors")["embeds"]
    keys = ("noisy", "target", "timestep", "prompt_index", "weight", "hollow_out")
    peaks = {}
    for what in ("train", "train again", "validation"):  # the second step: AdamW's state exists
        tracker = MemoryTracker(device="cpu").add_resident(net.unet, optimizer)
        if what == "validation":
            with tracker:
                value = W.validation_loss(net, W.load_validation(store, keys), embeds, cfg, cfg.batch, predict, loss_fn)
        else:
            train_step(net, store.samples([0, 1], keys=keys), embeds, optimizer, cfg, tracker)
        peaks[what] = tracker.report.peak_bytes
    assert 0 < peaks["validation"] < peaks["train again"] and value > 0, peaks
    assert net.unet.training  # back in train mode
