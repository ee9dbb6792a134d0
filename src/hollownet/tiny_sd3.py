"""Tiny SD3 / SD3.5-Medium-shaped transformers and a tiny StableDiffusion3Pipeline, built offline.

Random weights (its images are noise); the layout, configs and code paths are SD3's: joint MMDiT blocks
with a ``context_pre_only`` last block, two CLIP text encoders with projections (their pooled outputs,
32 + 32, are the transformer's ``pooled_projection_dim``; their penultimate states, 32 + 32, fill
``joint_attention_dim``), no T5 (``text_encoder_3=None``: its slot is zeros, as diffusers does), a
16-channel VAE with SD3's shift and scale, the flow-matching Euler scheduler. SD3.5 Medium's shape adds
dual attention in the first blocks and RMS qk-norm.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from hollownet.tiny import save_tokenizer, text_config

TINY_SD3 = dict(
    sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=8,
    num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
    pos_embed_max_size=16,
)
#: SD3.5 Medium's shape: dual attention (a second, image-only attention) in the first blocks, RMS qk-norm.
TINY_SD35M = dict(TINY_SD3, num_layers=5, dual_attention_layers=(0, 1, 2), qk_norm="rms_norm")
TINY_SD3_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
    sample_size=32, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
)


def tiny_transformer(config: dict = TINY_SD3, seed: int = 0):
    """A random-weight SD3Transformer2DModel (diffusers' default initialisation), in eval mode."""
    # diffusers is heavy to import: only the builders need it
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(**config).eval()


def build_tiny_sd3(folder: str | Path, *, config: dict = TINY_SD3, seed: int = 0, max_length: int = 16) -> Path:
    """Write a tiny random-weight StableDiffusion3Pipeline (diffusers layout, no T5) to ``folder``."""
    # diffusers is heavy to import: only the builders need its pipeline classes
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    folder = Path(folder)
    tokenizer = save_tokenizer(folder / "_tokenizer_tmp", max_length)
    transformer = tiny_transformer(config, seed)
    # 3 layers: the penultimate hidden state (what SD3 conditions on) differs from the last one
    text_encoder = CLIPTextModelWithProjection(text_config(tokenizer, max_length, num_hidden_layers=3))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, max_length, num_hidden_layers=3))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**TINY_SD3_VAE),
        text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer_tmp")
    return folder
