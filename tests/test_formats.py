"""LoRA files for ComfyUI / Forge / A1111 (kohya layout) beside the diffusers one, and `hollownet convert`.

The kohya rule checked here is the one the loaders document: a LoRA name is ``lora_unet_`` + the U-Net
module path with ``.`` replaced by ``_``, with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``
(scale alpha / rank) under it.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from hollownet.stages import formats
from hollownet.cli import main
from hollownet.stages.export import save_lora

# alpha != rank, and a per-module alpha (peft alpha_pattern) on the resnets' conv1. Not on an attention
# projection: diffusers' own kohya reader (0.42) names those alphas '...processor.to_k_lora.down.weight.alpha',
# which match no module, so load_lora_weights gives them the most common alpha (ComfyUI and A1111 read
# each .alpha by its module name).
RANK, ALPHA, ALPHA_K = 4, 8.0, 2.0
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj")
CUT = ["down_blocks.3", "mid_block", "up_blocks.0"]


def lora_unet(model_dir, seed=0):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet")
    targets = [n for n, _ in unet.named_modules() if n.endswith(TARGETS)]
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, alpha_pattern={"conv1": ALPHA_K}, target_modules=targets,
                                init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_B" in n:  # B starts at zero: give the LoRA an effect
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return unet


@pytest.fixture(scope="module")
def lora_dir(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("fmt")
    save_lora(lora_unet(tiny_model), out, {"method": "hollow", "hollow_blocks": CUT})
    return out


def trained_alpha(module: str) -> float:
    return ALPHA_K if module.endswith("conv1") else ALPHA


def test_kohya_keys_follow_the_loaders_rule(lora_dir, tiny_model):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tiny_model / "unet"))
    layers = {n: m for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    rule = {"lora_unet_" + n.replace(".", "_"): n for n in layers}
    assert len(rule) == len(layers)  # the rule is one to one on this U-Net
    kohya = load_file(lora_dir / formats.KOHYA_FILE)
    names = {}
    for key, t in kohya.items():
        name, part = key.split(".", 1)
        assert part in ("lora_down.weight", "lora_up.weight", "alpha"), key
        assert name in rule, key
        names.setdefault(name, {})[part] = t
    assert len(names) == len(load_file(lora_dir / formats.DIFFUSERS_FILE)) // 2  # every module, nothing more
    for name, parts in names.items():
        layer = layers[rule[name]]
        down, up, alpha = parts["lora_down.weight"], parts["lora_up.weight"], parts["alpha"]
        assert alpha.ndim == 0 and alpha.item() == trained_alpha(rule[name]), name
        if isinstance(layer, torch.nn.Linear):
            assert down.shape == (RANK, layer.in_features) and up.shape == (layer.out_features, RANK)
        else:
            assert down.shape == (RANK, layer.in_channels, *layer.kernel_size) and up.shape == (layer.out_channels, RANK, 1, 1)
    with safe_open(lora_dir / formats.KOHYA_FILE, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(RANK)
    assert meta["ss_network_alpha"] == str(ALPHA)  # the most common alpha; per-module ones are in .alpha
    assert meta["hollownet_method"] == "hollow" and json.loads(meta["hollownet_hollow_blocks"]) == CUT
    assert "lora_adapter_metadata" not in meta  # diffusers refuses metadata together with kohya alphas
    assert "ss_base_model_version" not in meta  # the tiny U-Net is none of SD 1.x / 2.x / SDXL


def test_base_model_version_of_the_bundled_configs():
    from importlib.resources import files

    cfg = lambda name: json.loads((files("hollownet") / "configs" / f"{name}_unet.json").read_text())  # noqa: E731
    assert [formats.base_model_version(cfg(n)) for n in ("sd15", "sd21", "sdxl")] == ["sd_v1", "sd_v2", "sdxl_base_v1-0"]


def test_kohya_file_gives_the_images_of_the_diffusers_file(lora_dir, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of sks dog", num_inference_steps=3, height=64, width=64, output_type="pt")
    images = {}
    # the kohya file as diffusers' converter alone writes it: every alpha = rank
    wrong = {k: (torch.tensor(float(RANK)) if k.endswith(".alpha") else v) for k, v in load_file(lora_dir / formats.KOHYA_FILE).items()}
    save_file(wrong, tmp_path / "alpha_is_rank.safetensors")
    for label, weight in (("base", None), ("diffusers", lora_dir / formats.DIFFUSERS_FILE),
                          ("kohya", lora_dir / formats.KOHYA_FILE), ("alpha=rank", tmp_path / "alpha_is_rank.safetensors")):
        if weight is not None:
            pipe.load_lora_weights(weight.parent, weight_name=weight.name)
        images[label] = pipe(generator=torch.Generator().manual_seed(0), **kw).images
        pipe.unload_lora_weights()
    diff = lambda a, b: (images[a] - images[b]).abs().max().item()  # noqa: E731
    assert diff("diffusers", "base") > 1e-2  # the LoRA changes the images...
    # ...and the kohya file the same way (its scale alpha / rank rounds apart: 1.4e-6 seen with one thread)
    assert diff("kohya", "diffusers") < 1e-5, diff("kohya", "diffusers")
    assert diff("alpha=rank", "diffusers") > 1e-3  # the true alpha matters


def test_convert_round_trips_losslessly_both_ways(lora_dir, tmp_path, capsys):
    original, layout = formats.read_lora(lora_dir / formats.DIFFUSERS_FILE)
    assert layout == "diffusers"
    assert original.alphas == {m: trained_alpha(m) for m in original.modules()}
    # diffusers -> kohya -> diffusers
    assert main(["convert", str(lora_dir / formats.DIFFUSERS_FILE), str(tmp_path / "k.safetensors")]) == 0
    assert "diffusers -> kohya" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "d"), "--to", "diffusers"]) == 0
    back, layout = formats.read_lora(tmp_path / "d")
    assert layout == "diffusers" and back.alphas == original.alphas and back.tensors.keys() == original.tensors.keys()
    assert all(torch.equal(back.tensors[k], original.tensors[k]) for k in original.tensors)
    # kohya -> diffusers -> kohya, file to file: the same tensors, alphas and metadata
    assert main(["convert", str(lora_dir / formats.KOHYA_FILE), str(tmp_path / "d2.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "d2.safetensors"), str(tmp_path / "k2.safetensors")]) == 0
    a, b = load_file(lora_dir / formats.KOHYA_FILE), load_file(tmp_path / "k2.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a hollownet folder: its hollownet.json gives the cut for the kohya metadata
    r = formats.convert(lora_dir, tmp_path / "k3.safetensors")
    assert r["from"] == "diffusers" and r["max_abs_diff"] == 0.0
    with safe_open(tmp_path / "k3.safetensors", "pt") as f:
        assert json.loads(f.metadata()["hollownet_hollow_blocks"]) == CUT


def test_convert_refuses_unknown_layouts_in_one_line(tmp_path, capsys):
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, tmp_path / "ckpt.safetensors")
    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    for bad in ("ckpt.safetensors", "notes.safetensors", "missing.safetensors"):
        assert main(["convert", str(tmp_path / bad), str(tmp_path / "out.safetensors")]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("hollownet convert: error:"), err
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 2)}, tmp_path / "te.safetensors")
    with pytest.raises(formats.HollownetError, match="outside the U-Net"):
        formats.read_lora(tmp_path / "te.safetensors")
