"""Model families: everything that differs between Stable Diffusion 1.x/2.x and SDXL, in one place.

diffusers has one pipeline per model family and kohya's sd-scripts one ``strategy_*.py`` per model;
here a :class:`Family` answers the same questions for the stages, which never branch on the model:

* how prompts become the U-Net's conditioning (SD: the text encoder's last hidden state; SDXL: the
  penultimate hidden states of both encoders, concatenated, and the second one's pooled projection);
* the added conditioning of a sample (SDXL's ``text_embeds`` and ``time_ids`` from original size,
  crop corner and target size, as diffusers' SDXL DreamBooth script and kohya make them);
* the diffusers pipeline that generates, and the default resolution.

Data still flows one way: stage 1 asks the family for the prompt tensors (``prompts.safetensors``) and
each sample's added inputs (kept in the store's shards), stage 2 feeds the stored inputs to the U-Net,
generation asks the family for the same conditioning from the pipeline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hollownet import encoders as E
from hollownet.errors import HollownetError
from hollownet.lowmem import layerwise as LW
from hollownet.lowmem import sdxl_text
from hollownet.memory.tracker import PartMeter
from hollownet.settings import SD_DEFAULTS, SDXL_DEFAULTS, is_sdxl_unet

#: Per-sample U-Net inputs besides latents, timestep and text (diffusers' ``added_cond_kwargs``), as stored.
ADDED_COND_KEYS = ("text_embeds", "time_ids")


def added_cond_shapes(unet_config) -> dict[str, tuple[int, ...]] | None:
    """Per sample, the shapes of the ``added_cond_kwargs`` a U-Net needs (SDXL: pooled text, 6 time ids); None if none."""
    config = dict(unet_config)
    if not is_sdxl_unet(config):
        return None
    time_dim = int(config["addition_time_embed_dim"])
    pooled = int(config["projection_class_embeddings_input_dim"]) - 6 * time_dim
    return {"text_embeds": (pooled,), "time_ids": (6,)}


def added_cond_kwargs(batch: dict, device, dtype) -> dict | None:
    """The U-Net's ``added_cond_kwargs`` of a store batch (None when the model takes none)."""
    added = {k: batch[k].to(device, dtype) for k in ADDED_COND_KEYS if k in batch}
    return added or None


@dataclass(frozen=True)
class Family:
    """SD 1.x / 2.x: one CLIP text encoder, its last hidden state; no added conditioning."""

    name: str = "sd"
    pipeline: str = "StableDiffusionPipeline"
    text_encoders: tuple[str, ...] = ("text_encoder",)
    default_resolution: int = SD_DEFAULTS["resolution"]

    @property
    def sample_keys(self) -> tuple[str, ...]:
        """What each store sample carries for this family besides the common keys."""
        return ()

    def pipeline_class(self):
        import diffusers  # lazily, like every model library here: it takes seconds to import

        return getattr(diffusers, self.pipeline)

    def encode_prompts(self, model_dir: Path, prompts: list[str], dtype, device, meter: PartMeter) -> dict[str, torch.Tensor]:
        """``{"embeds": [P, L, D]}``: exactly what ``StableDiffusionPipeline.encode_prompt`` computes, fp32 on the CPU."""
        from transformers import CLIPTextModel  # lazily: see pipeline_class

        encoder = CLIPTextModel.from_pretrained(model_dir / "text_encoder", dtype=dtype).to(device).eval()
        embeds = E.embed(encoder, E.prompt_ids(model_dir, prompts), device, meter)
        del encoder
        return {"embeds": embeds}

    def encode_prompts_layer_major(self, model_dir: Path, prompts: list[str], dtype, device, meter: PartMeter, *,
                                   budget=None, batch_size: int = 4, scratch=None) -> tuple[dict[str, torch.Tensor], dict]:
        """:meth:`encode_prompts`, one layer in memory at a time (``lowmem/layerwise.py``): ``(tensors, stats by part)``."""
        embeds, stats = LW.embed_prompts(model_dir, prompts, dtype, device, meter, batch_size=batch_size,
                                         scratch=scratch, budget=budget)
        return {"embeds": embeds}, {"text encoder": stats}

    def sample_inputs(self, prompts: dict[str, torch.Tensor], prompt_index: torch.Tensor,
                      time_ids: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """A shard's extra per-sample tensors (``sample_keys``), from the prompt tensors and the photos' time ids."""
        return {}

    def photo_time_ids(self, sizes: list[tuple[int, int]], resolution: int) -> torch.Tensor | None:
        """Per photo, the micro-conditioning its crop gets (SDXL); None for families without it."""
        return None

    def conditioning(self, pipe, prompt: str, negative_prompt: str | None, guidance: bool, resolution: int, device):
        """``(text, added_cond_kwargs)`` for one prompt as the family's pipeline computes them; with
        ``guidance`` the unconditional row first (classifier-free guidance's order)."""
        cond, uncond = pipe.encode_prompt(prompt, device, 1, guidance, negative_prompt)
        return (torch.cat([uncond, cond]) if guidance else cond), None

    def text_modules(self, pipe) -> list[nn.Module]:
        return [getattr(pipe, name) for name in self.text_encoders]

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE runs in for a run in ``dtype`` (SD's VAE runs in any)."""
        return dtype


@dataclass(frozen=True)
class SDXL(Family):
    """SDXL: two CLIP text encoders (the second with a projection) and ``text_time`` added embeddings."""

    name: str = "sdxl"
    pipeline: str = "StableDiffusionXLPipeline"
    text_encoders: tuple[str, ...] = ("text_encoder", "text_encoder_2")
    default_resolution: int = SDXL_DEFAULTS["resolution"]

    @property
    def sample_keys(self) -> tuple[str, ...]:
        return ADDED_COND_KEYS

    def encode_prompts(self, model_dir, prompts, dtype, device, meter):
        """``{"embeds": [P, L, D1 + D2], "text_embeds": [P, Dp]}``, as ``StableDiffusionXLPipeline.encode_prompt``
        (clip_skip None): each encoder's penultimate hidden state, concatenated; encoder 2's pooled projection."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection  # lazily: see pipeline_class

        states, pooled = [], None
        for folder, tokenizer, cls in (("text_encoder", "tokenizer", CLIPTextModel),
                                       ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)):
            encoder = cls.from_pretrained(model_dir / folder, dtype=dtype).to(device).eval()
            hidden, proj = E.embed_penultimate(encoder, E.prompt_ids(model_dir, prompts, tokenizer), device, meter,
                                               part=folder.replace("_", " "))
            states.append(hidden)
            pooled = proj if proj is not None else pooled
            del encoder
        if pooled is None:
            raise HollownetError(f"'{model_dir / 'text_encoder_2'}' gives no pooled projection: SDXL needs a "
                                 "CLIPTextModelWithProjection there")
        return {"embeds": torch.cat(states, dim=-1), "text_embeds": pooled}

    def encode_prompts_layer_major(self, model_dir, prompts, dtype, device, meter, *, budget=None, batch_size=4,
                                   scratch=None):
        return sdxl_text.encode_prompts(model_dir, prompts, dtype, device, meter, budget=budget, batch_size=batch_size,
                                        scratch=scratch)

    def sample_inputs(self, prompts, prompt_index, time_ids):
        return {"text_embeds": prompts["text_embeds"][prompt_index], "time_ids": time_ids}

    def photo_time_ids(self, sizes, resolution):
        """(original height, width, crop top, left, target height, width) per photo, as diffusers' SDXL
        DreamBooth script computes them: the short side resized to ``resolution``, then center-cropped
        (``photos.load_photos`` does exactly that crop)."""
        rows = []
        for height, width in sizes:  # torchvision's Resize(int): the long side truncated; then CenterCrop's rounding
            h, w = (resolution, int(resolution * width / height)) if height <= width else (int(resolution * height / width), resolution)
            rows.append([height, width, round((h - resolution) / 2), round((w - resolution) / 2), resolution, resolution])
        return torch.tensor(rows, dtype=torch.float32)

    def vae_dtype(self, dtype):
        """fp32 for an fp16 run: SDXL's VAE overflows in fp16 (its config's ``force_upcast``; diffusers' SDXL
        pipeline decodes in fp32, its DreamBooth script keeps the VAE in fp32); bf16 has fp32's range."""
        return torch.float32 if dtype == torch.float16 else dtype

    def conditioning(self, pipe, prompt, negative_prompt, guidance, resolution, device):
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            prompt=prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
            negative_prompt=negative_prompt)
        size = (resolution, resolution)  # generation's micro-conditioning: uncropped, at the target size
        time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype,
                                          text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        if guidance:
            return torch.cat([uncond, cond]), {"text_embeds": torch.cat([pooled_uncond, pooled]),
                                               "time_ids": torch.cat([time_ids, time_ids]).to(device)}
        return cond, {"text_embeds": pooled, "time_ids": time_ids.to(device)}


@dataclass
class SampleConditioning:
    """What stage 1 knows about every sample's conditioning: the family, the prompt tensors
    (``prompts.safetensors``) and each photo's time ids (SDXL; None otherwise)."""

    family: Family
    prompts: dict[str, torch.Tensor]
    time_ids: torch.Tensor | None = None

    @property
    def embeds(self) -> torch.Tensor:
        return self.prompts["embeds"]

    def unet_cond(self, rows: list[dict]) -> dict:
        """The rows' U-Net conditioning beyond the text, as ``unet_split.make_context`` takes it (one row per sample)."""
        added = self.sample_inputs(rows)
        return {"added_cond_kwargs": added} if added else {}

    def sample_inputs(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """The rows' extra per-sample tensors (``family.sample_keys``): what a shard stores beside the common keys."""
        prompt_index = torch.tensor([r["prompt"] for r in rows], dtype=torch.long)
        time_ids = self.time_ids[[r["latent"] for r in rows]] if self.time_ids is not None else None
        return self.family.sample_inputs(self.prompts, prompt_index, time_ids)


SD_FAMILY, SDXL_FAMILY = Family(), SDXL()
FAMILIES = {f.name: f for f in (SD_FAMILY, SDXL_FAMILY)}


def family_of_config(unet_config) -> Family:
    """The family of a U-Net config (dict or diffusers' FrozenDict): SDXL by its ``text_time`` added embedding."""
    return SDXL_FAMILY if is_sdxl_unet(dict(unet_config)) else SD_FAMILY


def detect_family(model_dir: Path) -> Family:
    """The family of a diffusers model folder, from its U-Net config; an SDXL U-Net without SDXL's second
    text encoder is refused (its conditioning could not be made)."""
    unet = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    family = family_of_config(unet)
    missing = [name for name in family.text_encoders if not (Path(model_dir) / name).is_dir()]
    if missing:
        raise HollownetError(f"'{model_dir}' has an {family.name.upper()} U-Net but no {', '.join(missing)}/: "
                             f"point --model at a folder saved by {family.pipeline}.save_pretrained")
    return family
