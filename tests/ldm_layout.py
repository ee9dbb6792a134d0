"""Write a diffusers SD 1.x/2.x folder as ONE original-layout (LDM / CompVis) checkpoint, for the tests.

The inverse of the documented single-file layout diffusers' ``from_single_file`` reads:
``model.diffusion_model.`` (U-Net in input_blocks / middle_block / output_blocks numbering),
``first_stage_model.`` (VAE: encoder.down.i.block.j, mid.block_1 / attn_1, decoder.up numbered from the
bottom, 1x1-conv attention q/k/v/proj_out) and ``cond_stage_model.transformer.`` (the CLIP text model under
its transformers names). Written from those rules, not copied from a conversion script.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def _unet_key(k: str, per_block: int) -> str:
    """diffusers U-Net tensor name -> LDM name (without the model.diffusion_model. prefix)."""
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2"}
    for a, b in fixed.items():
        if k.startswith(a + "."):
            return b + k[len(a):]

    def resnet(rest: str) -> str:
        name, tail = rest.split(".", 1)
        return RESNET[name] + "." + tail

    m = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = per_block * i + j + 1
        return f"input_blocks.{n}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{n}.1.{rest}"
    m = re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", k)
    if m:
        return f"input_blocks.{per_block * (int(m[1]) + 1)}.0.op.{m[2]}"
    m = re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        return f"middle_block.{2 * int(m[2])}.{resnet(m[3])}" if m[1] == "resnets" else f"middle_block.1.{m[3]}"
    m = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", k)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        n = per_block * i + j
        return f"output_blocks.{n}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{n}.1.{rest}"
    raise KeyError(k)


def unet_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    per_block = config["layers_per_block"] + 1  # up blocks have one resnet more than down blocks
    out = {}
    has_attn = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    for k, v in state.items():
        m = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", k)
        if m:  # the upsampler sits after the last resnet (and its attention, if the block has them)
            i = int(m[1])
            out[f"model.diffusion_model.output_blocks.{per_block * i + per_block - 1}.{2 if i in has_attn else 1}.conv.{m[2]}"] = v
            continue
        out["model.diffusion_model." + _unet_key(k, per_block)] = v
    return out


def vae_to_ldm(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n_up = len(config["up_block_types"])
    attn = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
    out = {}
    for k, v in state.items():
        new = k.replace("conv_norm_out", "norm_out")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)", r"encoder.down.\1.block.\2", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0", r"encoder.down.\1.downsample", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)", lambda m: f"mid.block_{int(m[1]) + 1}", new)
        new = new.replace("conv_shortcut", "nin_shortcut")
        m = re.match(r"(.*)mid_block\.attentions\.0\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(.*)", new)
        if m:
            new = f"{m[1]}mid.attn_1.{attn[m[2]]}.{m[3]}"
            if m[2] != "group_norm" and v.ndim == 2:
                v = v[:, :, None, None]  # LDM's attention is 1x1 convolutions
        out["first_stage_model." + new] = v
    return out


def write_single_file(model_dir: Path, path: Path) -> dict[str, torch.Tensor]:
    """The diffusers folder ``model_dir`` as one LDM-layout .safetensors file; returns what was written."""
    import json

    from safetensors.torch import load_file, save_file

    unet_cfg = json.loads((model_dir / "unet" / "config.json").read_text())
    vae_cfg = json.loads((model_dir / "vae" / "config.json").read_text())
    state = {}
    state.update(unet_to_ldm(load_file(model_dir / "unet" / "diffusion_pytorch_model.safetensors"), unet_cfg))
    state.update(vae_to_ldm(load_file(model_dir / "vae" / "diffusion_pytorch_model.safetensors"), vae_cfg))
    for k, v in load_file(model_dir / "text_encoder" / "model.safetensors").items():
        # transformers >= 5.6 saves CLIPTextModel flat; the original layout has the text_model. level
        state["cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k)] = v
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return state
