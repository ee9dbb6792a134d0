"""hollownet analyze: per-block size of a LoRA update, exact on hand-made LoRAs, and on a trained one."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import RES
from hollownet.evaluation import analyze as A
from hollownet.cli import main
from hollownet.errors import HollownetError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ATTN = "attentions.0.transformer_blocks.0.attn1"
# A = [[1,0,0,0],[0,1,0,0]], B = [[1,0],[0,2],[0,0]] -> B @ A = [[1,0,0,0],[0,2,0,0],[0,0,0,0]] (12 entries)
A1 = torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]])
B1 = torch.tensor([[1.0, 0], [0, 2], [0, 0]])
# A = [[1,1]] (rank 1 stored as rank 2 with a zero row), B = [[3,0],[0,0]] -> B @ A = [[3,3],[0,0]] (4 entries)
A2 = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
B2 = torch.tensor([[3.0, 0.0], [0.0, 0.0]])


def write_lora(folder, layers: dict, info: dict | None = None, metadata: dict | None = None):
    """layers: module -> (A, B), written with diffusers' key names."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, (a, b) in layers.items():
        tensors[f"unet.{name}.lora.down.weight"] = a.clone()
        tensors[f"unet.{name}.lora.up.weight"] = b.clone()
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"), metadata=metadata)
    if info is not None:
        (folder / "hollownet.json").write_text(json.dumps(info))
    return folder


def hand_layers(factor: float = 1.0) -> dict:
    return {
        f"up_blocks.1.{ATTN}.to_v": (A1, factor * B1),
        f"mid_block.{ATTN}.to_q": (A2, B2),
        f"down_blocks.1.{ATTN}.to_k": (A1, B1),
        f"down_blocks.1.{ATTN}.to_out.0": (A2, B2),
        # conv LoRA: A [2, 1, 3, 3] -> [2, 9], B [2, 2, 1, 1] -> [2, 2]
        "down_blocks.1.resnets.0.conv1": (torch.ones(2, 1, 3, 3), torch.tensor([[1.0, 0.0], [0.0, -1.0]]).view(2, 2, 1, 1)),
        "down_blocks.0.attentions.1.proj_in": (A2, B2),
        "down_blocks.0.downsamplers.0.conv": (A2, -B2),
        "conv_in": (A2, B2),
    }


def test_per_block_numbers_are_exact(tmp_path):
    lora = A.load_lora(write_lora(tmp_path / "l", hand_layers(), info={"lora_alpha": 4, "rank": 2, "method": "lora"}))
    assert lora.scale_source.startswith("hollownet.json")
    res = A.significance([lora], "block")
    rows = {r["name"]: r for r in res["groups"]}
    # U-Net order, whatever the file order
    assert [r["name"] for r in res["groups"]] == ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1"]
    assert {scale for _, _, scale in lora.layers.values()} == {2.0}  # alpha / rank
    up = rows["up_blocks.1"]  # scale * BA = [[2,0,0,0],[0,4,0,0],0]: sum|.| = 6, sum sq = 20, numel 12
    assert (up["layers"], up["numel"]) == (1, 12)
    assert up["mean_abs"]["mean"] == pytest.approx(6 / 12)
    assert up["rms"]["mean"] == pytest.approx(math.sqrt(20 / 12))
    assert up["mean_abs"]["std"] is None and up["mean_abs"]["n"] == 1
    mid = rows["mid_block"]  # [[6,6],[0,0]]: sum 12, sq 72, numel 4
    assert mid["mean_abs"]["mean"] == pytest.approx(3.0) and mid["rms"]["mean"] == pytest.approx(math.sqrt(18))
    # down_blocks.1 pools to_k (6, 20, 12) + to_out (12, 72, 4) + conv (BA = [[2]*9, [-2]*9]: 36, 72, 18)
    d1 = rows["down_blocks.1"]
    assert (d1["layers"], d1["numel"]) == (3, 34)
    assert d1["mean_abs"]["mean"] == pytest.approx((6 + 12 + 36) / 34)
    assert d1["rms"]["mean"] == pytest.approx(math.sqrt((20 + 72 + 72) / 34))
    assert rows["down_blocks.0"]["mean_abs"]["mean"] == pytest.approx(3.0)  # |ΔW| ignores the sign
    top = max(r["mean_abs"]["mean"] for r in res["groups"])
    assert up["relative"] == pytest.approx(0.5 / top) and max(r["relative"] for r in res["groups"]) == 1.0

    units = [r["name"] for r in A.significance([lora], "unit")["groups"]]
    assert units == ["conv_in", "down_blocks.0.attentions.1", "down_blocks.0.downsamplers",
                     "down_blocks.1.resnets.0", "down_blocks.1.attentions.0", "mid_block.attentions.0",
                     "up_blocks.1.attentions.0"]
    layers = A.significance([lora], "layer")["groups"]
    assert layers[3]["name"] == "down_blocks.1.resnets.0.conv1"
    assert {r["name"]: r["mean_abs"]["mean"] for r in layers}[f"down_blocks.1.{ATTN}.to_out.0"] == pytest.approx(3.0)


def test_scale_from_metadata_and_average_over_loras(tmp_path):
    meta = {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": 8, "unet.r": 2, "unet.use_rslora": False,
                                                  "unet.alpha_pattern": {"to_v": 2}})}
    first = A.load_lora(write_lora(tmp_path / "a", hand_layers(), metadata=meta))
    assert first.scale_source.startswith("safetensors metadata")
    assert first.layers[f"mid_block.{ATTN}.to_q"][2] == 4.0  # 8 / 2
    assert first.layers[f"up_blocks.1.{ATTN}.to_v"][2] == 1.0  # alpha_pattern: 2 / 2
    # no alpha anywhere: scale 1, said in a note
    second = A.load_lora(write_lora(tmp_path / "b", hand_layers(factor=3.0)))
    assert second.layers[f"mid_block.{ATTN}.to_q"][2] == 1.0 and "assuming alpha = rank" in second.notes[0]
    res = A.significance([first, second], "block")
    up = {r["name"]: r for r in res["groups"]}["up_blocks.1"]
    # first: scale 1 -> 3/12; second: scale 1, B x3 -> 9/12
    assert up["mean_abs"]["mean"] == pytest.approx((3 / 12 + 9 / 12) / 2)
    assert up["mean_abs"]["std"] == pytest.approx(statistics.stdev([3 / 12, 9 / 12]))
    assert up["mean_abs"]["n"] == 2 and up["per_lora"] == [pytest.approx(0.25), pytest.approx(0.75)]
    table = A.format_table(res)
    assert table.splitlines()[0].startswith("| block | LoRA layers | ΔW entries | mean abs ΔW |")
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:7]] == \
        ["conv_in", "down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1"]
    assert "2 LoRA files (mean ± std over them)" in table


def test_bad_lora_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "full" / "unet").mkdir(parents=True)
    with pytest.raises(HollownetError, match="no pytorch_lora_weights.safetensors"):
        A.load_lora(tmp_path / "empty")
    with pytest.raises(HollownetError, match="full run has no LoRA"):
        A.load_lora(tmp_path / "full")
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(HollownetError, match="no U-Net LoRA layers"):
        A.load_lora(tmp_path / "other.safetensors")
    save_file({"unet.a.lora.down.weight": torch.zeros(2, 2)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(HollownetError, match="only one of its two factors"):
        A.load_lora(tmp_path / "half.safetensors")
    for argv, why in ((["analyze", tmp_path / "empty", "--output", tmp_path / "o"], "no pytorch_lora_weights"),
                      (["analyze", tmp_path / "missing", "--output", tmp_path / "o"], "does not exist"),
                      (["analyze", "--output", tmp_path / "o"], "nothing to analyze"),
                      (["analyze", "--train", "--output", tmp_path / "o"], "--train needs --model, --images, --prompt")):
        assert main([str(a) for a in argv]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hollownet analyze: error:")]
        assert len(err) == 1 and why in err[0], err


def test_analyze_a_trained_plain_lora(tiny_model, dog_photos, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "sig"
    argv = ["analyze", "--train", "--model", tiny_model, "--images", dog_photos, "--prompt", "a photo of sks dog",
            "--steps", 2, "--rank", 2, "--lr", 1e-2, "--resolution", RES, "--device", "cpu", "--output", out]
    assert main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "significance.json").read_text())
    assert (out / "significance.png").stat().st_size > 1000 and (out / "significance.md").exists()
    assert not (out / "lora" / "store").exists()
    names = [r["name"] for r in res["groups"]]
    # the tiny U-Net has attention in down 0-2, mid, up 1-3 (down_blocks.3 / up_blocks.0 have none)
    assert names == ["down_blocks.0", "down_blocks.1", "down_blocks.2", "mid_block", "up_blocks.1", "up_blocks.2",
                     "up_blocks.3"]
    assert all(r["mean_abs"]["mean"] > 0 for r in res["groups"])
    assert res["loras"][0]["method"] == "lora" and "alpha 2, rank 2" in res["loras"][0]["scale_source"]
    assert printed.index("| down_blocks.0 |") < printed.index("| mid_block |") < printed.index("| up_blocks.3 |")

    # ΔW is the very change that diffusers makes to the weight when it fuses the LoRA
    lora = A.load_lora(out / "lora")
    stats = A.layer_stats(lora)
    name = max((n for n in stats if n.startswith("mid_block.")), key=lambda n: stats[n]["abs_sum"] / stats[n]["numel"])
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    before = dict(pipe.unet.named_modules())[name].weight.detach().clone()
    pipe.load_lora_weights(out / "lora")
    pipe.fuse_lora()
    after = dict(pipe.unet.named_modules())[name].base_layer.weight.detach()
    torch.testing.assert_close(A.delta_weight(*lora.layers[name]).float(), after - before, rtol=1e-4, atol=1e-6)
    assert (after - before).abs().max() > 1e-3
    assert set(load_file(out / "lora" / "pytorch_lora_weights.safetensors")) >= {f"unet.{name}.lora.up.weight"}

    # the same LoRA folder analysed directly, at unit level
    assert main(["analyze", str(out / "lora"), "--level", "unit", "--output", str(tmp_path / "units")]) == 0
    units = [r["name"] for r in json.loads((tmp_path / "units" / "significance.json").read_text())["groups"]]
    assert units[:2] == ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1"] and "mid_block.attentions.0" in units
