"""Stage 1's text-encoder and VAE-encoder steps, as functions of a model already loaded (or fake).

The sample-major stage 1 (``stages/precompute.py``), the layer-major one (``lowmem/layerwise.py``,
which runs the models layer by layer but samples the posterior here) and the planner
(``memory/stage1.py``, on fake tensors) all call these: one computation, measured one way.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from hollownet.memory.tracker import PartMeter


def prompt_ids(model_dir: Path, prompts: list[str], tokenizer: str = "tokenizer") -> torch.Tensor:
    """Token ids per prompt, padded to the tokenizer's length, as the pipelines' ``encode_prompt`` makes them."""
    from transformers import AutoTokenizer  # lazily, like every model library here: it takes seconds to import

    tokenizer = AutoTokenizer.from_pretrained(model_dir / tokenizer)
    warn_cut_prompts(tokenizer, prompts)
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def warn_cut_prompts(tokenizer, prompts: list[str]) -> None:
    """One warning per prompt the text encoder cannot read whole: the pipelines cut it without a word."""
    limit = tokenizer.model_max_length
    fits = lambda words: len(tokenizer(" ".join(words)).input_ids) <= limit  # noqa: E731
    for prompt, ids in zip(prompts, tokenizer(prompts, truncation=False).input_ids):
        if len(ids) <= limit:
            continue
        words, lo, hi = prompt.split(), 0, len(prompt.split())
        while lo < hi:  # the most whole words that fit
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(words[:mid]) else (lo, mid - 1)
        warnings.warn(f'prompt "{prompt[:60]}{"..." if len(prompt) > 60 else ""}" is {len(ids)} tokens, more than the '
                      f"{limit} the text encoder reads: it is cut after \"{' '.join(words[max(0, lo - 3):lo])}\" "
                      f"(\"{' '.join(words[lo:lo + 5])}...\" is ignored); shorten it")


def embed(encoder: nn.Module, ids: torch.Tensor, device, meter: PartMeter) -> torch.Tensor:
    """The text encoder's last hidden state per prompt, in fp32 on the CPU (what the store keeps)."""
    with torch.no_grad(), meter.measure("text encoder", encoder):
        return encoder(ids.to(device))[0].float().cpu()


def embed_penultimate(encoder: nn.Module, ids: torch.Tensor, device, meter: PartMeter,
                      part: str = "text encoder") -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDXL's conditioning from one encoder: its penultimate hidden state, and its pooled projection if it
    has one (``CLIPTextModelWithProjection``), both fp32 on the CPU (``StableDiffusionXLPipeline.encode_prompt``)."""
    with torch.no_grad(), meter.measure(part, encoder):
        out = encoder(ids.to(device), output_hidden_states=True)
        pooled = out[0] if out[0].ndim == 2 else None  # the pipeline's own test: text_embeds, not a sequence
        return out.hidden_states[-2].float().cpu(), (pooled.float().cpu() if pooled is not None else None)


def vae_moments(vae: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE encoder's output: the posterior's mean and log-variance, stacked on the channels."""
    h = vae.encoder(pixels)
    return vae.quant_conv(h) if vae.quant_conv is not None else h


def posterior_sample(moments: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One draw of the diagonal Gaussian posterior per row (diffusers' ``DiagonalGaussianDistribution``), fp32, CPU."""
    mean, logvar = moments.float().cpu().chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    return mean + std * torch.randn(mean.shape, generator=generator)


def scale_latents(samples: list[torch.Tensor], vae_config) -> torch.Tensor:
    """Posterior samples (chunks, in order) as the U-Net's latents: shifted and scaled by the VAE's factors."""
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (torch.cat(samples) - shift) * vae_config.scaling_factor


def encode_latents(vae: nn.Module, pixels: torch.Tensor, seed: int, dtype, device, batch_size: int,
                   meter: PartMeter) -> torch.Tensor:
    """Scaled latents, one posterior sample per photo, the noise seeded by ``seed`` and drawn chunk by
    chunk of ``batch_size`` photos (the layer-major stage 1 draws it the same way).

    The encoder sees one photo at a time: its activations at full resolution are stage 1's largest
    (4 photos at once made the VAE the peak of the whole run: SD 2.1 fp32 2.64 GiB against 2.57 for
    stage 2, SDXL bf16 5.13 against 3.83), and batching a handful of photos, once, saves nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad(), meter.measure("VAE encoder", vae):
        samples = [posterior_sample(torch.cat([vae_moments(vae, photo.to(device, dtype)) for photo in chunk.split(1)]), g)
                   for chunk in pixels.split(batch_size)]
    return scale_latents(samples, vae.config)
