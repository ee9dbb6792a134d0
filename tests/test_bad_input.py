"""Each bad input of issue 12, for real: one line naming the problem and the fix, exit code 2, no
folder left behind; doubtful input gives one ``warning: ...`` line and goes on."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from hollownet.cli import build_parser, main

from conftest import RES, error_line, run


def warning_lines(err: str) -> list[str]:
    assert "Warning:" not in err and ".py:" not in err, err  # no raw Python warnings (file path, source line)
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def train_args(model, images, out, *extra, prompt="a photo of sks dog"):
    return ["train", "--model", model, "--images", images, "--prompt", prompt, "--output", out,
            "--steps", 2, "--resolution", RES, "--rank", 2, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def lora(tiny_model, dog_photos, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    assert main([str(a) for a in train_args(tiny_model, dog_photos, out)]) == 0
    return out


def gen_args(model, lora, out, *extra):
    return ["generate", "--model", model, "--lora", lora, "--prompt", "a sks dog", "--output", out, "--steps", 1,
            "--num-images", 1, "--device", "cpu", *extra]


def missing_devices() -> list[str]:
    from hollownet.devices import available_devices

    have = available_devices()
    return [d for d in ("cuda", "cuda:3", "mps", "xpu") if d not in have]


@pytest.mark.parametrize("device", missing_devices() + ["gpu"])
def test_device_this_torch_lacks_is_refused_before_loading(capsys, tiny_model, dog_photos, tmp_path, device):
    code, _, err = run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "run")[:-2], "--device", device)
    assert code == 2
    line = error_line(err)
    assert device in line and "cpu" in line, line
    assert not (tmp_path / "run").exists()


def test_default_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    import hollownet.devices as D

    assert D.resolve_device(None) in ("cuda", "mps", "cpu")
    for have, want in (({"cuda", "mps"}, "cuda"), ({"mps"}, "mps"), (set(), "cpu")):
        monkeypatch.setattr(D, "_backend_available", lambda kind, have=have: int(kind in have or kind == "cpu"))
        assert D.default_device() == want


@pytest.mark.parametrize("resolution", [0, -64, 63])
def test_bad_resolution_one_line(capsys, tiny_model, dog_photos, lora, tmp_path, resolution):
    argv = train_args(tiny_model, dog_photos, tmp_path / "run")
    argv[argv.index("--resolution") + 1] = resolution
    code, _, err = run(capsys, *argv)
    assert code == 2 and "positive multiple of 8" in error_line(err)
    assert not (tmp_path / "run").exists()
    code, _, err = run(capsys, *gen_args(tiny_model, lora, tmp_path / "gen", "--resolution", resolution))
    assert code == 2 and "positive multiple of 8" in error_line(err)


def test_output_that_is_a_file(capsys, tiny_model, dog_photos, lora, tmp_path):
    f = tmp_path / "taken"
    f.write_text("x")
    code, _, err = run(capsys, *train_args(tiny_model, dog_photos, f))
    assert code == 2 and "is an existing file" in error_line(err)
    code, _, err = run(capsys, *gen_args(tiny_model, lora, f))
    assert code == 2 and "is an existing file" in error_line(err)
    assert f.read_text() == "x"


def test_mistyped_model_path_is_a_missing_folder(capsys, dog_photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: patch it too
    (tmp_path / "some").mkdir()
    for model in ("some/dir", "./models/sd15", str(tmp_path / "nope" / "sd")):
        code, _, err = run(capsys, *train_args(model, dog_photos, tmp_path / "run"))
        assert code == 2
        line = error_line(err)
        assert f"model folder '{model}' does not exist" in line, line
    code, _, err = run(capsys, *train_args("nobody/nothing", dog_photos, tmp_path / "run"))  # a hub id, offline
    assert code == 2 and "not a local folder" in error_line(err) and "hub" in error_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("fraction", ["1.0", "1.7", "0"])
def test_refused_train_leaves_no_folder(capsys, tiny_model, dog_photos, tmp_path, fraction):
    code, _, err = run(capsys, *train_args(tiny_model, dog_photos, tmp_path / "run", "--hollow", fraction))
    assert code == 2 and "outside what this U-Net allows" in error_line(err)  # a whole U-Net cannot be hollowed
    assert not (tmp_path / "run").exists()


def test_doubtful_input_warns_in_one_line_and_trains(capsys, tiny_model, tmp_path):
    from diffusers import UNet2DConditionModel

    from hollownet.cut import all_plans, meta_unet

    photos = tmp_path / "one"
    photos.mkdir()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(photos / "tiny.png")
    hi = all_plans(meta_unet(UNet2DConditionModel.load_config(tiny_model / "unet")))[-1].fraction
    beyond = round(min(hi + 0.02, 0.99), 2)  # past the deepest cut but near enough to be taken, with a warning
    assert hi < beyond
    code, _, err = run(capsys, *train_args(tiny_model, photos, tmp_path / "run", "--hollow", beyond, "--steps", 1,
                                          prompt="   "))
    assert code == 0, err
    warnings = warning_lines(err)
    text = "\n".join(warnings)
    assert "--prompt is empty" in text and "only 1 photo" in text and f"--hollow {beyond:g} is beyond" in text, err
    assert "tiny.png" in text  # the 1x1 photo is upscaled, with a warning naming it


def test_prompt_without_identifier_and_many_photos_warn(tmp_path):
    from hollownet.checks import check_instance_prompt, check_photo_folder

    with pytest.warns(UserWarning, match="no rare identifier"):
        check_instance_prompt("a photo of a dog")
    for ok in ("a photo of sks dog", "photo of a <new1> dog", "ohwx man"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            check_instance_prompt(ok)
    for i in range(21):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i:02d}.png")
    with pytest.warns(UserWarning, match="21 photos"):
        check_photo_folder(tmp_path)


def test_lora_from_another_base_model_is_refused(capsys, tiny_model, tiny_model_v, lora, tmp_path):
    code, _, err = run(capsys, *gen_args(tiny_model_v, lora, tmp_path / "gen"))
    assert code == 2
    line = error_line(err)
    assert "trained on another base model" in line and "--force" in line, line
    assert not (tmp_path / "gen").exists()
    # another architecture: refused on the shapes even with --force, before the weights load
    from diffusers import UNet2DConditionModel

    from hollownet.tiny import TINY_UNET

    other = tmp_path / "wide"
    shutil.copytree(tiny_model, other)
    shutil.rmtree(other / "unet")
    UNet2DConditionModel(**{**TINY_UNET, "block_out_channels": (24, 32, 32, 32)}).save_pretrained(other / "unet")
    code, _, err = run(capsys, *gen_args(other, lora, tmp_path / "gen", "--force"))
    assert code == 2 and "does not fit" in error_line(err) and "shape" in error_line(err)


def test_generate_is_quiet_and_records_the_resolution(capsys, tiny_model, lora, tmp_path):
    code, _, err = run(capsys, *gen_args(tiny_model, lora, tmp_path / "gen", "--resolution", 128))
    assert code == 0
    assert "Loading" not in err and "it/s" not in err, err  # the libraries' progress bars stay quiet
    assert Image.open(tmp_path / "gen" / "000.png").size == (128, 128)
    assert json.loads((tmp_path / "gen" / "generate.json").read_text())["resolution"] == 128


def test_help_has_no_stray_percent_or_broken_names_and_every_flag_helps(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "%%" not in out and "down_blocks.3,mid_block,up_blocks.0" in out
    assert "--no-resume" in out
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for name in ("train", "generate"):
        missing = [a.option_strings for a in sub[name]._actions if a.help is None]
        assert not missing, (name, missing)
