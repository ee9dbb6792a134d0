"""Tiny Stable Diffusion models (SD 1.x/2.x and SDXL layouts) in the real diffusers layout, built offline.

Used by the demo and the tests. Its weights are random, so its images are noise; everything else
(folder layout, loading code, shapes, the SD 1.x/2.x block structure with 4 down blocks) is real.
The tokenizer is CLIP's byte-level BPE format with a byte-only vocabulary and no merges, written
in code, so no download is needed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from hollownet.singlefile import bytes_to_unicode

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(16, 32, 32, 32),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_VAE = dict(
    block_out_channels=(8, 8, 16, 16),  # 4 blocks: SD's 8x downscale, so 64 px photos give 8x8 latents
    layers_per_block=1,
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
)


# SDXL's layout in miniature (diffusers' tests/pipelines/stable_diffusion_xl get_dummy_components, with SDXL's
# three levels): a DownBlock2D then two cross-attention levels, linear projections, text_time added embeddings.
# The two text encoders' penultimate states (32 + 32) are the cross-attention input; the pooled projection (32)
# and 6 time ids x 8 make the added embedding's input (80).
TINY_SDXL_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(16, 32, 32),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 1, 2),
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 32,
    cross_attention_dim=64,
    norm_num_groups=8,
)


def byte_symbols() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (printable bytes map to themselves), by byte."""
    return dict(sorted(bytes_to_unicode().items()))


def byte_vocab() -> tuple[dict[str, int], str]:
    """CLIP BPE vocabulary of the 256 byte symbols (plain and end-of-word) and no merges."""
    symbols = list(byte_symbols().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, "#version: 0.2\n"


def save_tokenizer(folder: Path, max_length: int = 77):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = byte_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(merges)
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def build_tiny_model(folder: str | Path, *, prediction_type: str = "epsilon", seed: int = 0, max_length: int = 32) -> Path:
    """Write a tiny random-weight StableDiffusionPipeline to ``folder`` (diffusers layout)."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(folder / "_tokenizer_tmp", max_length)
    text_encoder = CLIPTextModel(text_config(tokenizer, max_length))
    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type=prediction_type, clip_sample=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=text_encoder, tokenizer=tokenizer,
        unet=UNet2DConditionModel(**TINY_UNET), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer_tmp")
    return folder


def text_config(tokenizer, max_length: int, num_hidden_layers: int = 2, projection_dim: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=num_hidden_layers,
        num_attention_heads=4, max_position_embeddings=max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=projection_dim,
    )


def build_tiny_sdxl(folder: str | Path, *, seed: int = 0, max_length: int = 32) -> Path:
    """Write a tiny random-weight StableDiffusionXLPipeline to ``folder``: two text encoders (the second
    with a projection), two tokenizers, a text_time U-Net, SD's VAE layout and SDXL's Euler scheduler."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = save_tokenizer(folder / "_tokenizer_tmp", max_length)
    # 3 layers: the penultimate hidden state (what SDXL conditions on) differs from the last one
    text_encoder = CLIPTextModel(text_config(tokenizer, max_length, num_hidden_layers=3))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer, max_length, num_hidden_layers=3))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        prediction_type="epsilon", steps_offset=1, timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL(**TINY_VAE), text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer, unet=UNet2DConditionModel(**TINY_SDXL_UNET), scheduler=scheduler,
        add_watermarker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    shutil.rmtree(folder / "_tokenizer_tmp")
    return folder
