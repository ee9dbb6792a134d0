"""Issue 25, for real: LoRA files holding NaN / inf, foreign kohya / OneTrainer LoRAs (per-module alpha,
text-encoder layers), damaged records, store shards and checkpoints, and the smaller one-line refusals.
Every file is written with safetensors (or damaged with real bytes) and every command is the real one.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import RES, error_line, run
from hollownet.stages import formats

pytestmark = pytest.mark.usefixtures("one_thread")
RANK = 4


# ---- foreign LoRAs built here, in the layouts kohya's sd-scripts and OneTrainer write ---------------------


def unet_layers(model_dir) -> dict:
    from diffusers import UNet2DConditionModel

    from hollownet.cut import meta_unet

    unet = meta_unet(UNet2DConditionModel.load_config(model_dir / "unet"))
    return {n: m for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0", "conv1"))}


def kohya_lora(model_dir, alpha_of, rank_of=lambda m: RANK, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    """A kohya file's tensors: ``lora_unet_<module>.lora_down/.lora_up/.alpha`` with each module's own alpha."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    layers = unet_layers(model_dir)
    names = formats.kohya_names(sorted(layers))
    for name in sorted(layers):
        mod, layer, r = layers[name], names[name], rank_of(name)
        if isinstance(mod, torch.nn.Linear):
            down, up = torch.randn(r, mod.in_features, generator=g), torch.randn(mod.out_features, r, generator=g)
        else:
            down = torch.randn(r, mod.in_channels, *mod.kernel_size, generator=g)
            up = torch.randn(mod.out_channels, r, 1, 1, generator=g)
        out[f"{layer}.lora_down.weight"] = (down * 0.3).to(dtype)
        out[f"{layer}.lora_up.weight"] = (up * 0.3).to(dtype)
        if alpha_of(name) is not None:
            out[f"{layer}.alpha"] = torch.tensor(float(alpha_of(name)), dtype=dtype)
    return out


def folded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same LoRA with each scale alpha / rank multiplied into lora_up and no .alpha (alpha = rank: scale 1)."""
    out = {}
    for k, v in tensors.items():
        if k.endswith(".lora_up.weight"):
            name = k[: -len(".lora_up.weight")]
            a = tensors.get(f"{name}.alpha")
            rank = v.shape[1]
            out[k] = v.float() * (float(a.float()) / rank if a is not None else 1.0)
        elif k.endswith(".lora_down.weight"):
            out[k] = v.float()
    return out


def lora_folder(path, tensors, metadata=None):
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / formats.KOHYA_FILE, metadata=metadata or {"ss_network_module": "networks.lora"})
    return path


def gen(capsys, model, lora, out, *extra):
    code, _, err = run(capsys, "generate", "--model", model, "--prompt", "a sks dog", "--output", out, "--steps", 2,
                       "--num-images", 1, "--resolution", RES, "--guidance", 1.0, "--device", "cpu",
                       *(["--lora", lora] if lora else []), *extra)
    return code, err


def image(folder) -> np.ndarray:
    return np.asarray(Image.open(folder / "000.png"), dtype=np.int16)


# ---- 1. non-finite values ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan-up", "inf-alpha"])
def test_non_finite_lora_is_refused_by_generate_and_convert(tiny_model, tmp_path, capsys, bad):
    tensors = kohya_lora(tiny_model, lambda m: 8.0)
    key = sorted(k for k in tensors if k.endswith(".lora_up.weight" if bad == "nan-up" else ".alpha"))[3]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan") if bad == "nan-up" else float("inf")
    folder = lora_folder(tmp_path / "lora", tensors)
    code, err = gen(capsys, tiny_model, folder, tmp_path / "gen")
    assert code == 2
    line = error_line(err)
    assert "non-finite" in line and key in line and formats.KOHYA_FILE in line, line
    assert not list((tmp_path / "gen").glob("*.png"))  # no black image written
    code, out, err = run(capsys, "convert", folder / formats.KOHYA_FILE, tmp_path / "d.safetensors")
    assert code == 2 and "nan" not in out.lower(), out
    assert key in error_line(err)
    assert not (tmp_path / "d.safetensors").exists()


def test_the_apps_generation_reads_through_the_same_check(tiny_model, tmp_path):
    """The app's generate job is ``run_generate``: the same one-line refusal reaches its status line."""
    from hollownet.app.jobs import generate_config, generate_work, Job

    tensors = kohya_lora(tiny_model, lambda m: 8.0)
    key = sorted(tensors)[0]
    tensors[key] = torch.full_like(tensors[key], float("nan"))
    folder = lora_folder(tmp_path / "lora", tensors)
    settings = {"model": str(tiny_model), "lora": str(folder), "prompt": "a sks dog", "output": str(tmp_path / "gen"),
                "steps": 1, "num_images": 1, "resolution": RES, "device": "cpu"}
    generate_config(settings)  # the app's own settings are valid
    job = Job(kind="generate", folder=str(tmp_path), settings=settings)
    with pytest.raises(formats.HollownetError, match=f"non-finite .*{key}"):
        generate_work(job)


# ---- 2. foreign kohya / OneTrainer LoRAs -----------------------------------------------------------------


@pytest.mark.parametrize("writer", ["kohya fp16", "onetrainer bf16"])
def test_per_module_alpha_is_honoured(tiny_model, tmp_path, capsys, writer):
    """The issue's file: alpha 8 on the first module, 1 on all the others (and one module of another rank).
    It must draw what the same LoRA with every scale folded into lora_up draws, not what all-8 draws."""
    dtype = torch.float16 if "fp16" in writer else torch.bfloat16
    first = sorted(unet_layers(tiny_model))[0]
    other_rank = sorted(unet_layers(tiny_model))[5]
    tensors = kohya_lora(tiny_model, lambda m: 8.0 if m == first else 1.0, lambda m: 2 if m == other_rank else RANK, dtype)
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(RANK), "ss_network_alpha": "1.0"}
    if "onetrainer" in writer:
        meta = {"ot_branch": "master", "modelspec.architecture": "stable-diffusion-v1/lora"}
    lora_folder(tmp_path / "foreign", tensors, meta)
    lora_folder(tmp_path / "folded", folded(tensors))
    all_first = {k: (torch.tensor(8.0, dtype=dtype) if k.endswith(".alpha") else v) for k, v in tensors.items()}
    lora_folder(tmp_path / "all8", all_first)
    for name in ("foreign", "folded", "all8"):
        code, err = gen(capsys, tiny_model, tmp_path / name, tmp_path / f"gen-{name}")
        assert code == 0, err
    gen(capsys, tiny_model, None, tmp_path / "gen-base")
    foreign, fold, all8, base = (image(tmp_path / f"gen-{n}") for n in ("foreign", "folded", "all8", "base"))
    assert np.abs(foreign - base).max() > 20  # the LoRA draws something else
    assert np.abs(foreign - fold).max() <= 1  # the exact function (rounding of one uint8 level at most)
    assert np.abs(foreign - all8).max() > 20  # the first module's alpha is not everyone's
    lora, layout = formats.read_lora(tmp_path / "foreign")
    assert layout == "kohya" and lora.rank(other_rank) == 2
    assert {m: lora.alphas[m] for m in (first, sorted(lora.modules())[1])} == {first: 8.0, sorted(lora.modules())[1]: 1.0}


def test_converted_foreign_lora_equals_diffusers_own_reader(tiny_model, tmp_path, capsys):
    """``convert`` of a per-module-alpha kohya file, loaded by diffusers' ``load_lora_weights``, draws what the
    folded file (no alphas: nothing for a reader to get wrong) draws through the same diffusers call."""
    from diffusers import StableDiffusionPipeline

    first = sorted(unet_layers(tiny_model))[0]
    tensors = kohya_lora(tiny_model, lambda m: 8.0 if m == first else 1.0)
    lora_folder(tmp_path / "foreign", tensors)
    lora_folder(tmp_path / "folded", folded(tensors))
    code, out, err = run(capsys, "convert", tmp_path / "foreign", tmp_path / "conv", "--to", "diffusers")
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    images = {}
    for name, folder, weight in (("converted", tmp_path / "conv", formats.DIFFUSERS_FILE),
                                 ("folded", tmp_path / "folded", formats.KOHYA_FILE), ("base", None, None)):
        if folder is not None:
            pipe.load_lora_weights(folder, weight_name=weight)
        images[name] = pipe("a photo of sks dog", num_inference_steps=2, height=RES, width=RES, output_type="pt",
                            generator=torch.Generator().manual_seed(0)).images
        pipe.unload_lora_weights()
    assert (images["converted"] - images["base"]).abs().max() > 1e-2
    assert (images["converted"] - images["folded"]).abs().max() < 1e-5


@pytest.mark.parametrize("prefix", ["lora_te_", "lora_te1_", "lora_te2_"])
def test_text_encoder_layers_are_refused_not_dropped(tiny_model, tmp_path, capsys, prefix):
    tensors = kohya_lora(tiny_model, lambda m: 4.0)
    te = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj"
    tensors.update({f"{te}.lora_down.weight": torch.ones(RANK, 32), f"{te}.lora_up.weight": torch.ones(32, RANK),
                    f"{te}.alpha": torch.tensor(4.0)})
    folder = lora_folder(tmp_path / "lora", tensors)
    code, err = gen(capsys, tiny_model, folder, tmp_path / "gen")
    assert code == 2
    line = error_line(err)
    assert te in line and "U-Net LoRAs only" in line and "--network_train_unet_only" in line, line
    code, _, err = run(capsys, "convert", folder, tmp_path / "x.safetensors")
    assert code == 2 and te in error_line(err)


def test_diffusers_layout_text_encoder_layers_are_refused(tiny_model, tmp_path, capsys):
    lora, _ = formats.read_lora(lora_folder(tmp_path / "k", kohya_lora(tiny_model, lambda m: 4.0)))
    formats.write_diffusers(lora, tmp_path / "d" / formats.DIFFUSERS_FILE)
    t = load_file(tmp_path / "d" / formats.DIFFUSERS_FILE)
    t["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"] = torch.ones(RANK, 32)
    t["text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight"] = torch.ones(32, RANK)
    save_file(t, tmp_path / "d" / formats.DIFFUSERS_FILE)
    code, err = gen(capsys, tiny_model, tmp_path / "d", tmp_path / "gen")
    assert code == 2 and "text_encoder" in error_line(err)


# ---- 3. damaged records, LoRA files, store shards and checkpoints ------------------------------------------

LORA = formats.DIFFUSERS_FILE


@pytest.fixture(scope="module")
def trained(tiny_model, dog_photos, tmp_path_factory):
    """A finished 6-step run (store of one shard, checkpoints at steps 2 and 4): every fault below damages a copy."""
    from test_faults import train_argv

    from hollownet.cli import main

    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(train_argv(tiny_model, dog_photos, out)[3:]) == 0
    return out


def copy_run(trained, tmp_path):
    """The finished run, copied, less its train.json: a rerun then resumes (a finished run is otherwise 'already done',
    and at another --output refused as one with other settings), reading the copy's store and checkpoints."""
    out = shutil.copytree(trained, tmp_path / "run")
    (out / "train.json").unlink()
    return out


def retrain(capsys, tiny_model, dog_photos, out, *extra):
    from test_faults import train_argv

    return run(capsys, *train_argv(tiny_model, dog_photos, out, *extra)[3:])


def warning_lines(err: str) -> list[str]:
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.startswith("warning: ")]


GARBAGE = b"\x00\xff{ not json \xfe"


def test_garbage_records_are_one_line(trained, tiny_model, dog_photos, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    (out / "hollownet.json").write_bytes(GARBAGE)
    code, err = gen(capsys, tiny_model, out, tmp_path / "gen")
    assert code == 2
    line = error_line(err)
    assert "hollownet.json' is damaged" in line and "rerun 'hollownet train'" in line, line
    code, _, err = run(capsys, "convert", out, tmp_path / "k.safetensors")
    assert code == 2 and "hollownet.json' is damaged" in error_line(err)
    (out / "store" / "manifest.json").write_bytes(b'{"done_shards": [0, 1')  # cut off mid-write by another tool
    code, _, err = retrain(capsys, tiny_model, dog_photos, out)
    assert code == 2
    line = error_line(err)
    assert "manifest.json' is damaged" in line and "delete the store folder" in line, line


def test_a_damaged_app_record_does_not_stop_the_app(tmp_path):
    from hollownet.app.jobs import Jobs

    (tmp_path / "runs" / "a").mkdir(parents=True)
    (tmp_path / "runs" / "a" / "app-train.json").write_bytes(GARBAGE)
    with pytest.warns(UserWarning, match="app-train.json' is damaged .*delete it"):
        jobs = Jobs(tmp_path)
    assert "train" not in jobs.latest


def test_truncated_lora_is_one_line(trained, tiny_model, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    data = (out / LORA).read_bytes()
    (out / LORA).write_bytes(data[: len(data) // 2])
    code, err = gen(capsys, tiny_model, out, tmp_path / "gen")
    assert code == 2
    line = error_line(err)
    assert LORA in line and "damaged or incomplete" in line, line


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "truncated, store without checksums"])
def test_damaged_store_shard_is_computed_again(trained, tiny_model, dog_photos, tmp_path, capsys, damage):
    out = copy_run(trained, tmp_path)
    shard = out / "store" / "shard-00000.safetensors"
    if damage == "flipped":
        flip(shard, shard.stat().st_size - 100)  # inside the tensors: same size, same header
    else:
        shard.write_bytes(shard.read_bytes()[:-1000])
    if "without" in damage:  # made before checksums were recorded: the header's own sizes still tell
        manifest = json.loads((out / "store" / "manifest.json").read_text())
        manifest.pop("files")
        (out / "store" / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = retrain(capsys, tiny_model, dog_photos, out)
    assert code == 0, err
    (line,) = warning_lines(err)
    assert "shard-00000.safetensors is damaged" in line and "computing it again" in line, line
    assert shard.read_bytes() == (trained / "store" / shard.name).read_bytes()
    assert (out / LORA).read_bytes() == (trained / LORA).read_bytes()
    code, _, err = retrain(capsys, tiny_model, dog_photos, out)  # and the next rerun finds nothing wrong
    assert code == 0 and not warning_lines(err), err


def tensor_offset(path, member: str) -> int:
    """Where a torch.save zip member's bytes start (torch stores them uncompressed)."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(member))
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
    return info.header_offset + 30 + n + m


def test_flipped_checkpoint_is_skipped_for_the_older_one(trained, tiny_model, dog_photos, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    ckpt = out / "checkpoints" / "step-000004.pt"
    flip(ckpt, tensor_offset(ckpt, "/data/0") + 1)  # torch.load would read this without a word
    code, _, err = retrain(capsys, tiny_model, dog_photos, out)
    assert code == 0, err
    (line,) = warning_lines(err)
    assert "step-000004.pt is damaged (its checksum" in line, line
    assert "resuming from step 2" in err
    assert (out / LORA).read_bytes() == (trained / LORA).read_bytes()


# ---- 4. NaN loss: the likely cause first ---------------------------------------------------------------


def test_nan_loss_from_the_store_names_the_store(trained, tiny_model, dog_photos, tmp_path, capsys):
    out = copy_run(trained, tmp_path)
    shutil.rmtree(out / "checkpoints")
    shard = out / "store" / "shard-00000.safetensors"
    t = load_file(shard)
    t["noisy"][0].view(-1)[:10] = float("nan")  # damage made before the checksum was taken (bad RAM, say)
    save_file(t, shard)
    from hollownet.stages.store import Store

    Store(out / "store").record(shard.name)
    code, _, err = retrain(capsys, tiny_model, dog_photos, out)
    assert code == 2
    line = error_line(err)
    assert "loss became nan at step 0" in line and "store" in line and "delete that folder" in line, line
    assert "--lr" not in line


def test_nan_loss_right_after_a_resume_names_the_checkpoint_first(trained, tiny_model, dog_photos, tmp_path, capsys):
    from hollownet.files import tensor_digest

    out = copy_run(trained, tmp_path)
    ckpt = out / "checkpoints" / "step-000004.pt"
    state = torch.load(ckpt, weights_only=True)
    state["params"] = [p * 1e30 for p in state["params"]]  # finite, checksum re-taken: only the loss can tell
    state["sha256"] = tensor_digest([state["params"], state["optimizer"]])
    torch.save(state, ckpt)
    code, _, err = retrain(capsys, tiny_model, dog_photos, out)
    assert code == 2
    line = error_line(err)
    assert "after resuming from step 4" in line and "checkpoint" in line and "--no-resume" in line, line
    assert line.index("checkpoint") < line.index("--lr"), line


# ---- 5. smaller ones -----------------------------------------------------------------------------------


@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lora-alpha", "nan")])
def test_non_finite_train_numbers_are_one_line(tiny_model, dog_photos, tmp_path, capsys, flag, value):
    from test_faults import train_argv

    argv = [a for a in train_argv(tiny_model, dog_photos, tmp_path / "run")[3:]]
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    code, _, err = run(capsys, *argv)
    assert code == 2
    line = error_line(err)
    assert f"{flag} {float(value)} must be a finite number" in line, line
    assert not (tmp_path / "run").exists()


def test_guidance_nan_is_one_line(tiny_model, tmp_path, capsys):
    code, err = gen(capsys, tiny_model, None, tmp_path / "gen", "--guidance", "nan")
    assert code == 2 and "--guidance nan must be a finite number" in error_line(err)


def test_identifier_is_the_rare_token_not_the_first_word(dog_photos, tmp_path):
    from hollownet.errors import HollownetError
    from hollownet.stages.precompute import photo_captions

    photo = sorted(p for p in dog_photos.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[0]
    shutil.copy(photo, tmp_path / photo.name)
    caption = tmp_path / (photo.stem + ".txt")
    caption.write_text("sks thing, asleep on a sofa")  # no 'my': still the subject
    assert photo_captions(tmp_path, [photo.name], "a photo of my sks thing") == ["sks thing, asleep on a sofa"]
    caption.write_text("a photo of my thing on a sofa")
    with pytest.raises(HollownetError, match="lacks the identifier 'sks'"):
        photo_captions(tmp_path, [photo.name], "a photo of my sks thing")


def test_long_prompt_warns_that_it_was_cut(tiny_model, tmp_path, capsys):
    words = " ".join(f"word{i}" for i in range(60))
    code, _, err = run(capsys, "generate", "--model", tiny_model, "--prompt", f"a sks dog {words}", "--output",
                       tmp_path / "gen", "--steps", 1, "--num-images", 1, "--resolution", RES, "--device", "cpu")
    assert code == 0, err
    cut = [line for line in warning_lines(err) if "more than the 32 the text encoder reads" in line]
    assert len(cut) == 1 and 'cut after "word1 word2 word3" ("word4 word5 word6 word7 word8..." is ignored)' in cut[0], err
    code, _, err = run(capsys, "generate", "--model", tiny_model, "--prompt", "a sks dog", "--output",
                       tmp_path / "gen2", "--steps", 1, "--num-images", 1, "--resolution", RES, "--device", "cpu")
    assert code == 0 and not any("text encoder reads" in line for line in warning_lines(err)), err


def test_train_many_with_invalid_utf8_is_one_line(tmp_path, capsys):
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b'{"model": "toy", "images": "x", "prompt": "a sks dog", "output": "o1"}\n{"prompt": "caf\xe9"}\n')
    code, _, err = run(capsys, "train-many", jobs)
    assert code == 2
    line = error_line(err)
    assert "jobs.jsonl line 2 is not UTF-8" in line and "0xe9" in line, line


# ---- 6. Ctrl-C and SIGTERM in stage 2: a checkpoint of the last step, then exit 130 / 143 ------------------


def long_argv(tiny_model, dog_photos, out) -> list[str]:
    from test_faults import train_argv

    argv = train_argv(tiny_model, dog_photos, out)
    argv[argv.index("--steps") + 1] = "40"
    argv[argv.index("--checkpoint-every") + 1] = "5"
    return argv


@pytest.fixture(scope="module")
def long_reference(tiny_model, dog_photos, tmp_path_factory):
    from hollownet.cli import main

    out = tmp_path_factory.mktemp("long") / "run"
    assert main(long_argv(tiny_model, dog_photos, out)[3:]) == 0
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_in_stage2_saves_a_checkpoint_and_the_rerun_resumes_exactly(tiny_model, dog_photos, long_reference,
                                                                          tmp_path, sig):
    from test_faults import cli_env, run_cli

    out = tmp_path / "run"
    argv = long_argv(tiny_model, dog_photos, out)
    proc = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (out / "checkpoints" / "step-000005.pt").exists():  # in the training loop
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() - t0 < 300
        time.sleep(0.005)
    proc.send_signal(sig)
    err = proc.communicate(timeout=300)[1]
    assert proc.returncode == 128 + sig, err
    name = signal.Signals(sig).name
    (line,) = [x for x in err.splitlines() if x.startswith("hollownet train: ")]
    m = re.match(rf"hollownet train: {name}: stopped at step (\d+) of 40; the checkpoint is kept", line)
    assert m and "Traceback" not in err, err
    step = int(m.group(1))
    assert 5 < step < 40 and (out / "checkpoints" / f"step-{step:06d}.pt").exists(), err
    assert not (out / LORA).exists()
    r = run_cli(argv)  # the same command
    assert r.returncode == 0, r.stderr
    assert f"resuming from step {step} " in r.stderr, r.stderr
    assert (out / LORA).read_bytes() == (long_reference / LORA).read_bytes()


# ---- one writer per output folder ----------------------------------------------------------------------


def test_second_train_on_one_output_is_refused_and_a_dead_owners_lock_taken_over(tiny_model, dog_photos, long_reference,
                                                                                   tmp_path, capsys):
    from test_faults import cli_env

    from hollownet.lock import LOCK_NAME

    out = tmp_path / "run"
    argv = long_argv(tiny_model, dog_photos, out)
    first = subprocess.Popen(argv, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not (out / "store" / "manifest.json").exists():
            assert first.poll() is None and time.monotonic() - t0 < 300
            time.sleep(0.005)
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == first.pid
        code, _, err = run(capsys, *argv[3:])  # the same command again, while the first runs
        assert code == 2
        line = error_line(err)
        assert f"is in use by another hollownet run (PID {first.pid} on " in line and "pick another --output" in line, line
        assert first.poll() is None  # and the first run was left alone
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / LOCK_NAME).exists()  # kill -9 leaves the lock
    code, _, err = run(capsys, *argv[3:])
    assert code == 0, err
    assert any(f"took over the lock of '{out}' from PID {first.pid}, which is no longer running" in x
               for x in warning_lines(err)), err
    assert not (out / LOCK_NAME).exists()
    assert (out / LORA).read_bytes() == (long_reference / LORA).read_bytes()


def test_only_dead_writers_temp_files_are_removed(tmp_path):
    from hollownet.files import remove_stale_temps, temp_name

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        files = {"live": tmp_path / f".shard-00000.safetensors.pid{live.pid}-0.tmp",
                 "dead": tmp_path / f".shard-00001.safetensors.pid{dead.pid}-3.tmp",
                 "old": tmp_path / ".manifest.json.tmp",  # an older version's name: its writer is gone
                 "mine": temp_name(tmp_path / "x.safetensors")}
        for f in files.values():
            f.write_bytes(b"partial")
        remove_stale_temps(tmp_path)
        assert {k for k, f in files.items() if f.exists()} == {"live", "mine"}
        assert temp_name(tmp_path / "a") != temp_name(tmp_path / "a")  # never shared, even within a process
    finally:
        live.kill()
        live.wait()
