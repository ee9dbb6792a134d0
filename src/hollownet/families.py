"""Model families: everything that differs between Stable Diffusion 1.x/2.x and SDXL, in one place.

diffusers has one pipeline per model family and kohya's sd-scripts one ``strategy_*.py`` per model;
here a :class:`Family` answers the same questions for the stages, which never branch on the model:

* how prompts become the U-Net's conditioning (SD: the text encoder's last hidden state; SDXL: the
  penultimate hidden states of both encoders, concatenated, and the second one's pooled projection);
* the added conditioning of a sample (SDXL's ``text_embeds`` and ``time_ids`` from original size,
  crop corner and target size, as diffusers' SDXL DreamBooth script and kohya make them);
* generation's conditioning without a pipeline (the same tensors as its ``encode_prompt`` and time ids),
  the VAE's dtype, the diffusers pipeline LoRA files are saved for, and the default resolution.

Data still flows one way: stage 1 asks the family for the prompt tensors (``prompts.safetensors``) and
each sample's added inputs (kept in the store's shards), stage 2 feeds the stored inputs to the U-Net,
generation's text-encoder part asks the family what each encoder gives and how they combine.
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
from hollownet.settings import SD3_DEFAULTS, SD_DEFAULTS, SDXL_DEFAULTS, is_sd3_folder, is_sdxl_unet

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
    default_resolution: int = SD_DEFAULTS["resolution"]
    #: the denoiser's folder and kind: ``unet`` (a centre cut, ``cut.py``) or ``transformer`` (a prefix cut, ``dit_cut.py``)
    backbone: str = "unet"
    #: (folder, tokenizer folder, measured part, pooled projection?) of each text encoder, in the order they run
    encoders: tuple[tuple[str, str, str, bool], ...] = (("text_encoder", "tokenizer", "text encoder", False),)

    @property
    def text_encoders(self) -> tuple[str, ...]:
        """The text encoders' folders, in the order they run."""
        return tuple(folder for folder, _, _, _ in self.encoders)

    def pools(self, folder: str) -> bool:
        """Whether the text encoder in ``folder`` gives a pooled projection (a ``CLIPTextModelWithProjection``)."""
        return dict((f, p) for f, _, _, p in self.encoders)[folder]

    @property
    def sample_keys(self) -> tuple[str, ...]:
        """What each store sample carries for this family besides the common keys."""
        return ()

    def pipeline_class(self):
        import diffusers  # lazily, like every model library here: it takes seconds to import

        return getattr(diffusers, self.pipeline)

    def encode_prompts(self, model_dir: Path, prompts: list[str], dtype, device, meter: PartMeter) -> dict[str, torch.Tensor]:
        """The prompt tensors of :meth:`encode_with`, from the model's files."""
        def load(folder: str, cls) -> nn.Module:
            return cls.from_pretrained(model_dir / folder, dtype=dtype).to(device).eval()

        return self.encode_with(load, lambda tokenizer: E.prompt_ids(model_dir, prompts, tokenizer), device, meter)

    def encode_with(self, load, ids, device, meter: PartMeter) -> dict[str, torch.Tensor]:
        """``{"embeds": [P, L, D]}``: exactly what ``StableDiffusionPipeline.encode_prompt`` computes, fp32 on the CPU.
        ``load(folder, cls)``: the encoder, loaded; ``ids(tokenizer folder)``: the prompts' token ids. Stage 1 loads
        from files (:meth:`encode_prompts`), the planner fake weights (``memory/stage1.py``): one computation."""
        from transformers import CLIPTextModel  # lazily: see pipeline_class

        encoder = load("text_encoder", CLIPTextModel)
        embeds = E.embed(encoder, ids("tokenizer"), device, meter)
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

    # generation without a pipeline (``stages/generate.py``'s text-encoder part): the same tensors as the
    # pipeline's ``encode_prompt``, from encoders built and loaded one at a time

    def zero_negative(self, negative_prompt: str | None, pipeline_config: dict) -> bool:
        """Whether guidance's unconditional row is zeros rather than the encoded negative prompt (SD: never, ``""``)."""
        return False

    def prompt_states(self, encoder: nn.Module, ids: torch.Tensor, pooled: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One encoder's output for generation, in its dtype on its device: ``(states, pooled projection or None)``."""
        return encoder(ids)[0], None

    def joined(self, outputs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(text, pooled)`` of every encoder's :meth:`prompt_states` (SD: the one encoder's last hidden state)."""
        return outputs[0]

    def generation_added(self, pooled: torch.Tensor | None, resolution: int) -> dict | None:
        """The U-Net's ``added_cond_kwargs`` of generation's rows (SD: none)."""
        return None

    def generation_conditioning(self, outputs, *, guided: bool, zero_negative: bool, resolution: int,
                                dtype) -> list[tuple[torch.Tensor, dict | None]]:
        """Per prompt (the encoded texts: the negative one first if ``guided`` and not ``zero_negative``, then the
        prompts), ``(text, added_cond_kwargs)`` in ``dtype``, the unconditional row first when ``guided``."""
        text, pooled = self.joined(outputs)
        text, pooled = text.to(dtype), (pooled.to(dtype) if pooled is not None else None)
        if guided and zero_negative:  # the pipeline's torch.zeros_like(prompt_embeds) (and of the pooled embeds)
            text = torch.cat([torch.zeros_like(text[:1]), text])
            pooled = torch.cat([torch.zeros_like(pooled[:1]), pooled]) if pooled is not None else None
        first = 1 if guided else 0
        rows = [slice(0, 1)] if guided else []
        out = []
        for j in range(first, text.shape[0]):
            pick = [*rows, slice(j, j + 1)]
            t = torch.cat([text[r] for r in pick])
            p = torch.cat([pooled[r] for r in pick]) if pooled is not None else None
            out.append((t, self.generation_added(p, resolution)))
        return out

    def vae_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the VAE runs in for a run in ``dtype`` (SD's VAE runs in any)."""
        return dtype


@dataclass(frozen=True)
class SDXL(Family):
    """SDXL: two CLIP text encoders (the second with a projection) and ``text_time`` added embeddings."""

    name: str = "sdxl"
    pipeline: str = "StableDiffusionXLPipeline"
    default_resolution: int = SDXL_DEFAULTS["resolution"]
    encoders: tuple[tuple[str, str, str, bool], ...] = sdxl_text.ENCODERS

    @property
    def sample_keys(self) -> tuple[str, ...]:
        return ADDED_COND_KEYS

    def encode_with(self, load, ids, device, meter):
        """``{"embeds": [P, L, D1 + D2], "text_embeds": [P, Dp]}``, as ``StableDiffusionXLPipeline.encode_prompt``
        (clip_skip None): each encoder's penultimate hidden state, concatenated; encoder 2's pooled projection."""
        from transformers import CLIPTextModel, CLIPTextModelWithProjection  # lazily: see pipeline_class

        states, pooled = [], None
        for folder, tokenizer, cls in (("text_encoder", "tokenizer", CLIPTextModel),
                                       ("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection)):
            encoder = load(folder, cls)
            hidden, proj = E.embed_penultimate(encoder, ids(tokenizer), device, meter, part=folder.replace("_", " "))
            states.append(hidden)
            pooled = proj if proj is not None else pooled
            del encoder
        if pooled is None:
            raise HollownetError("the model's text_encoder_2 gives no pooled projection: SDXL needs a "
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

    def zero_negative(self, negative_prompt, pipeline_config):
        """No negative prompt: zeros, as ``StableDiffusionXLPipeline`` does when its config's
        ``force_zeros_for_empty_prompt`` (the pipeline's default, true for SDXL base) is set."""
        return negative_prompt is None and bool(pipeline_config.get("force_zeros_for_empty_prompt", True))

    def prompt_states(self, encoder, ids, pooled):
        """The penultimate hidden state (clip_skip None), and the pooled projection of a ``CLIPTextModelWithProjection``."""
        out = encoder(ids, output_hidden_states=True)
        return out.hidden_states[-2], (out[0] if pooled else None)

    def joined(self, outputs):
        """Both encoders' states concatenated on the features; the last encoder's pooled projection."""
        pooled = outputs[-1][1]
        if pooled is None:
            raise HollownetError("SDXL's second text encoder gives no pooled projection: it must be a CLIPTextModelWithProjection")
        return torch.cat([states for states, _ in outputs], dim=-1), pooled

    def generation_added(self, pooled, resolution):
        """``text_embeds`` and generation's time ids: uncropped at the target size, ``(r, r, 0, 0, r, r)`` per row
        (``StableDiffusionXLPipeline._get_add_time_ids``; the negative row gets the same)."""
        row = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=pooled.dtype)
        return {"text_embeds": pooled, "time_ids": row.to(pooled.device).expand(pooled.shape[0], 6).contiguous()}


@dataclass(frozen=True)
class SD3(Family):
    """SD3 / SD3.5 (``StableDiffusion3Pipeline``): two CLIP text encoders with projections, T5 left out
    (``text_encoder_3=None``: its slot is zeros, as the pipeline makes it), an MMDiT denoiser trained with the
    rectified-flow objective (``flow.py``). Stage 1 and 2 are ``stages/dit.py``; generation is the stock pipeline."""

    name: str = "sd3"
    pipeline: str = "StableDiffusion3Pipeline"
    default_resolution: int = SD3_DEFAULTS["resolution"]
    encoders: tuple[tuple[str, str, str, bool], ...] = (("text_encoder", "tokenizer", "text encoder", True),
                                                        ("text_encoder_2", "tokenizer_2", "text encoder 2", True))
    backbone: str = "transformer"
    #: the T5 slot's length: ``StableDiffusion3Pipeline.__call__``'s ``max_sequence_length`` default, which
    #: ``hollownet generate`` (the stock pipeline) uses, so training sees the same number of (zero) T5 tokens
    max_sequence_length: int = 256

    def check_folder(self, model_dir: Path) -> None:
        """Refuse, in one line, what this family does not run yet: a T5 encoder, a transformer not SD3's."""
        if (Path(model_dir) / "text_encoder_3").is_dir():
            raise HollownetError(f"'{model_dir}' has a T5 text encoder (text_encoder_3/), which hollownet does not support "
                                 "for SD3 yet: use a copy saved without it (StableDiffusion3Pipeline with text_encoder_3=None)")
        missing = [name for name in ("transformer", "vae", "scheduler", *self.text_encoders,
                                     *(t for _, t, _, _ in self.encoders)) if not (Path(model_dir) / name).is_dir()]
        if missing:
            raise HollownetError(f"'{model_dir}' has an SD3 transformer but no {', '.join(missing)}/: point --model at a "
                                 "folder saved by StableDiffusion3Pipeline.save_pretrained")

    def encode_prompts(self, model_dir, prompts, dtype, device, meter):
        """The prompt tensors of :meth:`encode_with`, from the model's files."""
        self.check_folder(model_dir)

        def load(folder: str, cls) -> nn.Module:
            return cls.from_pretrained(model_dir / folder, dtype=dtype).to(device).eval()

        width = json.loads((Path(model_dir) / "transformer" / "config.json").read_text())["joint_attention_dim"]
        return self.encode_with(load, lambda tokenizer: E.prompt_ids(model_dir, prompts, tokenizer), device, meter,
                                width=width, dtype=dtype)

    def encode_with(self, load, ids, device, meter, *, width: int, dtype=torch.float32):
        """``{"embeds": [P, L + 256, width], "pooled_projections": [P, D1 + D2]}``, as
        ``StableDiffusion3Pipeline.encode_prompt`` (clip_skip None, no T5) computes them: each CLIP encoder's
        penultimate state, concatenated, zero-padded to the transformer's ``joint_attention_dim`` (``width``),
        then the T5 slot's zeros; both pooled projections concatenated. ``load`` / ``ids`` as
        :meth:`Family.encode_with`'s: stage 1 loads from files, the planner fake weights (``memory/dit.py``)."""
        from transformers import CLIPTextModelWithProjection  # lazily: see pipeline_class

        states, pooled = [], []
        for folder, tokenizer, part, _ in self.encoders:
            encoder = load(folder, CLIPTextModelWithProjection)
            hidden, proj = E.embed_penultimate(encoder, ids(tokenizer), device, meter, part=part)
            if proj is None:
                raise HollownetError(f"'{folder}' gives no pooled projection: SD3 needs a CLIPTextModelWithProjection there")
            states.append(hidden.to(dtype))  # the pipeline casts each to the first encoder's dtype
            pooled.append(proj)
            del encoder
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, width - clip.shape[-1]))
        t5 = torch.zeros(clip.shape[0], self.max_sequence_length, width, dtype=clip.dtype)
        return {"embeds": torch.cat([clip, t5], dim=-2).float(), "pooled_projections": torch.cat(pooled, dim=-1)}

    def encode_prompts_layer_major(self, *args, **kwargs):
        raise HollownetError("layer-major pre-compute is not supported for SD3 yet: drop --layer-major / --memory-budget")


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


SD_FAMILY, SDXL_FAMILY, SD3_FAMILY = Family(), SDXL(), SD3()
FAMILIES = {f.name: f for f in (SD_FAMILY, SDXL_FAMILY, SD3_FAMILY)}


def family_of_config(unet_config) -> Family:
    """The family of a denoiser's config (dict or diffusers' FrozenDict): SD3's for an SD3 transformer, SDXL's by
    its U-Net's ``text_time`` added embedding, else SD's."""
    config = dict(unet_config)
    if config.get("_class_name") == "SD3Transformer2DModel":
        return SD3_FAMILY
    return SDXL_FAMILY if is_sdxl_unet(config) else SD_FAMILY


def folder_family(model_dir: Path) -> Family:
    """The family of any diffusers folder hollownet runs: SD3's for an SD3 transformer (checked:
    :meth:`SD3.check_folder`), else the U-Net's (:func:`detect_family`)."""
    if is_sd3_folder(model_dir):
        SD3_FAMILY.check_folder(Path(model_dir))
        return SD3_FAMILY
    return detect_family(model_dir)


def detect_family(model_dir: Path) -> Family:
    """The family of a diffusers model folder, from its U-Net config; an SDXL U-Net without SDXL's second
    text encoder is refused (its conditioning could not be made). The U-Net stages call it: an SD3 folder is
    refused in one line (``hollownet train`` / ``generate`` take it: :func:`folder_family`)."""
    if is_sd3_folder(model_dir):
        raise HollownetError(f"'{model_dir}' is an SD3 / SD3.5 folder (a transformer, no U-Net): this step runs U-Nets "
                             "only; 'hollownet train' and 'hollownet generate' take SD3 folders")
    unet = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    family = family_of_config(unet)
    missing = [name for name in family.text_encoders if not (Path(model_dir) / name).is_dir()]
    if missing:
        raise HollownetError(f"'{model_dir}' has an {family.name.upper()} U-Net but no {', '.join(missing)}/: "
                             f"point --model at a folder saved by {family.pipeline}.save_pretrained")
    return family
