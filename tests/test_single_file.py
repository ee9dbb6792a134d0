"""Single-file checkpoints (original SD layout) as --model: converted once, offline, then a normal folder."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hollownet import singlefile
from hollownet.cli import main

from conftest import RES
from ldm_layout import write_single_file


@pytest.fixture(scope="module")
def single_file(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-sd.safetensors"
    write_single_file(tiny_model, path)
    return path


@pytest.fixture
def cache(tmp_path_factory, monkeypatch):
    root = tmp_path_factory.getbasetemp() / "hollownet-cache"  # shared by the tests of this module
    monkeypatch.setenv("HOLLOWNET_CACHE", str(root))
    return root


@pytest.mark.parametrize("kind", ["sd15", "sd21"])
def test_bundled_configs_and_clip_tokenizer_load_offline(kind, tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    folder = singlefile.write_bundled_config(kind, "epsilon", tmp_path / kind)
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    ids = tok("a photo of a dog").input_ids
    assert ids == [49406, 320, 1125, 539, 320, 1929, 49407]  # CLIP's ids: a, photo, of, a, dog
    assert tok.pad_token == ("<|endoftext|>" if kind == "sd15" else "!")
    assert UNet2DConditionModel.load_config(folder / "unet")["cross_attention_dim"] == (768 if kind == "sd15" else 1024)
    assert AutoencoderKL.load_config(folder / "vae")["latent_channels"] == 4
    assert CLIPTextConfig.from_pretrained(folder / "text_encoder").vocab_size == 49408
    assert DDPMScheduler.load_config(folder / "scheduler")["prediction_type"] == "epsilon"


def test_single_file_converts_once_to_the_same_weights(single_file, tiny_model, cache, capsys):
    shapes, _ = singlefile.checkpoint_shapes(single_file)
    assert singlefile.detect_kind(shapes) == "sd15"  # diffusers' rule: SD 1.x keys, 32-wide cross-attention
    with pytest.raises(singlefile.HollownetError, match="not the bundled config"):
        singlefile.convert_single_file(single_file)  # the tiny U-Net is no SD 1.5: refused before any work
    folder = singlefile.convert_single_file(single_file, config=tiny_model)
    assert folder.parent == cache / "single-file" and "converting" in capsys.readouterr().err
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        ref, got = load_file(tiny_model / part), load_file(folder / part)
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), part
    assert json.loads((folder / singlefile.SOURCE_FILE).read_text())["prediction_type"] == "epsilon"
    assert singlefile.convert_single_file(single_file) == folder and capsys.readouterr().err == ""  # cached


def test_train_generate_plan_take_a_single_file(single_file, tiny_model, dog_photos, cache, tmp_path, capsys):
    from hollownet.loading import load_unet, resolve_model_dir
    from hollownet.cut import meta_unet, plan_for_blocks

    folder = singlefile.convert_single_file(single_file, config=tiny_model)  # as the previous test left it
    assert resolve_model_dir(single_file) == folder
    code = main(["train", "--model", str(single_file), "--images", str(dog_photos), "--prompt", "a photo of sks dog",
                 "--output", str(tmp_path / "run"), "--steps", "2", "--resolution", str(RES), "--rank", "2",
                 "--lora-alpha", "4", "--device", "cpu", "--format", "kohya"])
    assert code == 0, capsys.readouterr().err
    info = json.loads((tmp_path / "run" / "hollownet.json").read_text())
    assert info["lora_files"] == ["pytorch_lora_weights_kohya.safetensors"]  # --format kohya: that file only
    assert sorted(p.name for p in (tmp_path / "run").glob("*.safetensors")) == info["lora_files"]
    # stage 2 on the converted folder reads no tensor of the hollow
    skeleton = meta_unet(json.loads((folder / "unet" / "config.json").read_text()))
    hollow = plan_for_blocks(skeleton, info["hollow_blocks"]).hollow_prefixes(skeleton)
    _, read = load_unet(folder, skip=hollow)
    assert read and not any(k == p or k.startswith(p + ".") for k in read for p in hollow)
    # generate from a folder holding only the kohya file (diffusers' load_lora_weights reads it)
    code = main(["generate", "--model", str(single_file), "--lora", str(tmp_path / "run"), "--prompt", "a sks dog",
                 "--output", str(tmp_path / "gen"), "--steps", "2", "--num-images", "1", "--device", "cpu"])
    assert code == 0 and (tmp_path / "gen" / "000.png").exists()
    assert main(["plan", "--model", str(single_file), "--rank", "2", "--resolution", str(RES), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_files_that_are_no_sd_checkpoint_are_refused_in_one_line(dog_photos, tmp_path, capsys, cache):
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(1, 4)}, tmp_path / "lora.safetensors")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    for bad, hint in (("lora.safetensors", "not a Stable Diffusion checkpoint"), ("junk.ckpt", "cannot read")):
        code = main(["train", "--model", str(tmp_path / bad), "--images", str(dog_photos), "--prompt", "a photo of sks dog",
                     "--output", str(tmp_path / "run"), "--steps", "1", "--resolution", str(RES), "--device", "cpu"])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hollownet ")]
        assert code == 2 and len(err) == 1 and hint in err[0], err
