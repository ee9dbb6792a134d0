"""Stage 5: generate images with the LoRA on the full, original U-Net.

Two-path (default, the paper's): at every denoising step the original U-Net with LoRA off runs up
to the hollow's output, then the LoRA layers run from that activation -- the very function that was
trained. Both passes through the kept down blocks run as ONE batched forward (batch ``[x, x]``, the
LoRA delta applied to the second half only: peft's mixed-adapter batches, ``__base__`` = none), the
LoRA-off half goes on through the hollow only. ``merged``: LoRA fused into the weights, one ordinary
U-Net pass (cheaper, approximate); refused with quantized weights, which cannot hold it.

Generation is three parts, each model built only for its part and dropped before the next
(:func:`generate`): the text encoder embeds every prompt once; the U-Net denoises every image's
latents; the VAE decoder (its encoder never loaded) turns them into pixels. Each is built from its
safetensors file by the stage-2 builder's own loader (``builder.load_frozen``), so ``--precision``
(fp32 | bf16 | fp16 | int8 | nf4) and ``--compute-dtype`` mean what they mean for ``train``, for all
three models; the LoRA stays unmerged, in fp32, beside quantized weights. The planner runs the very
same :func:`generate` on fake tensors (:meth:`Parts.fake`), so ``hollownet plan`` predicts the peak
``hollownet generate`` measures (every image, every part) to the byte.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler
from PIL import Image
from safetensors.torch import load_file
from torch import nn
from tqdm.auto import tqdm

from hollownet import unet_split as H
from hollownet.builder import add_lora, load_frozen
from hollownet.checks import check_lora_matches, preflight_generate
from hollownet.cut import HollowPlan, make_plan, meta_unet, plan_for_blocks
from hollownet.encoders import prompt_ids
from hollownet.errors import HollownetError
from hollownet.families import Family, detect_family, family_of_config, folder_family
from hollownet.loading import release_memory, resolve_model_dir, vae_scale_factor
from hollownet.lowmem import sdxl_text
from hollownet.lowmem.stream import SafetensorsSource, StreamedWeights
from hollownet.memory.tracker import PartMeter
from hollownet.peft_internals import (ADAPTER, BASE, adapter_names, adapters_disabled, cached_lora_layers, lora_modules,
                                      lora_parts, merge_all, set_weight)
from hollownet.settings import DEFAULT_SCHEDULER, SCHEDULERS, Modes, fill_model_defaults, torch_dtype
from hollownet.stages.dit_generate import run_dit_generate
from hollownet.stages.export import read_info, snapshot_dir
from hollownet.stages.formats import lora_file, read_lora
from hollownet.files import save_image, save_json, save_tensors

PARTIAL = ".partial"  # OUTPUT/.partial: an interrupted run's progress (class Progress)
GENERATION_PARTS = ("text encoder", "U-Net", "VAE decoder")  # in the order they run; never two at once
# (SDXL's text-encoder part is two: "text encoder", then "text encoder 2", as in stage 1)
MERGED_QUANTIZED = ("--merged fuses the LoRA into the weights, which int8/nf4 cannot hold: drop --merged "
                    "(the LoRA then runs unmerged beside the quantized weights) or use --precision fp32|bf16|fp16")


@dataclass
class GenerateConfig:
    model: str
    lora: str | None
    prompt: str
    output: str
    steps: int | None = None  # denoising steps; None: the model's (settings.model_defaults' gen_steps)
    resolution: int | None = None  # default: the training resolution
    guidance: float | None = None  # None: the model's
    negative_prompt: str | None = None
    seed: int = 0
    num_images: int = 4
    merged: bool = False
    scheduler: str = DEFAULT_SCHEDULER
    precision: str = Modes.precision  # the weights of all three models, as train's --precision (settings.Modes)
    device: str = "cpu"
    force: bool = False  # load a LoRA recorded for another base model anyway
    compute_dtype: str | None = None  # with int8 | nf4: the dtype weights are dequantized to (default: the device's)
    stream_weights: bool = False
    step: int | None = None  # the LoRA's snapshot at this step (OUTPUT/snapshots/step-XXXX) instead of the final one
    ignore_memory_check: bool = False  # run even where the planner predicts more memory than the device has

    def __post_init__(self):
        fill_model_defaults(self, (), steps="gen_steps", guidance="guidance")
        if self.step is not None:
            if not self.lora:
                raise HollownetError("--step picks a snapshot of a LoRA: give --lora OUTPUT as well")
            self.lora = str(snapshot_dir(self.lora, self.step))
        if self.scheduler not in SCHEDULERS:
            raise HollownetError(f"--scheduler {self.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
        if self.steps < 1 or self.num_images < 1:
            raise HollownetError("--steps and --num-images must be at least 1")
        check_generation_modes(self.modes, self.merged)

    @property
    def modes(self) -> Modes:
        return Modes(precision=self.precision, compute_dtype=self.compute_dtype, stream_weights=self.stream_weights).on(self.device)


def check_generation_modes(modes: Modes, merged: bool) -> None:
    """What generation supports of train's modes, refused in one line otherwise."""
    if merged and modes.quantized:
        raise HollownetError(MERGED_QUANTIZED)
    if merged and modes.stream_weights:
        raise HollownetError("--merged fuses the LoRA into the weights, which --stream-weights reads from disk unchanged: "
                             "drop --merged (the LoRA then runs unmerged)")


# ------------------------------------------------------------------------------------- the models


@dataclass
class LoraWeights:
    """A LoRA for the U-Net: peft's module names, rank and alpha, and its tensors (None: fake, shapes only).
    ``rank_pattern`` / ``alpha_pattern``: the modules whose rank / alpha differ from ``rank`` / ``alpha``."""

    targets: list[str]
    rank: int
    alpha: float
    state: dict[str, torch.Tensor] | None = None  # peft keys ``<module>.lora_A.weight`` ...
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    @classmethod
    def read(cls, lora_dir: str | Path, info: dict) -> LoraWeights:
        """The diffusers file, else the kohya one, by hollownet's one LoRA reader (``formats.read_lora``): every
        module's own alpha and rank; non-finite values and text-encoder layers refused in one line."""
        lora, _ = read_lora(lora_file(lora_dir))
        if not lora.modules():
            raise HollownetError(f"the LoRA in '{lora_dir}' has no U-Net layers")
        rank, alpha, rank_pattern, alpha_pattern = lora.common()
        return cls(sorted(lora.modules()), rank, float(alpha), dict(lora.tensors), rank_pattern, alpha_pattern)


@dataclass
class Parts:
    """Where generation's three models and its scheduler come from: the model's files (:meth:`real`), or
    shapes only inside a ``FakeTensorMode`` (:meth:`fake`, the planner). Each model is built when its part
    starts and dropped when it ends; everything else in :func:`generate` is the same for both."""

    unet_config: dict
    text_configs: dict[str, dict]  # text encoder folder (the family's ``encoders``) -> its config
    vae_config: dict
    source: Callable[[str], object]  # component (unet, text_encoder[_2], vae) -> tensor source
    token_ids: Callable[[list[str], str], torch.Tensor]  # (texts, tokenizer folder) -> padded ids
    scheduler_config: dict
    scheduler: str = DEFAULT_SCHEDULER
    lora: LoraWeights | None = None
    modes: Modes = field(default_factory=Modes)
    device: str = "cpu"
    merged: bool = False
    mode: object | None = None  # the FakeTensorMode everything runs in (fake parts only)
    to_fake: Callable[[torch.Tensor], torch.Tensor] | None = None  # a real scheduler tensor as a fake one
    pipeline_config: dict = field(default_factory=dict)  # model_index.json (SDXL's force_zeros_for_empty_prompt)
    streamer: StreamedWeights | None = field(default=None, init=False)  # set by unet() with --stream-weights
    every_unit: HollowPlan | None = field(default=None, init=False)  # the split forward that streaming walks

    @classmethod
    def real(cls, model_dir: Path, lora: LoraWeights | None, modes: Modes, device: str, scheduler: str,
             unet_dir: Path | None = None) -> Parts:
        """``unet_dir``: a fine-tuned ``unet/`` folder (full fine-tuning) in place of the model's U-Net."""
        read = lambda p: json.loads(p.read_text())  # noqa: E731
        family = detect_family(model_dir)  # an SDXL U-Net without text_encoder_2/ is refused here
        sources = {"unet": (unet_dir.parent, "unet") if unet_dir else (model_dir, "unet"), "vae": (model_dir, "vae"),
                   **{folder: (model_dir, folder) for folder in family.text_encoders}}
        index = model_dir / "model_index.json"
        return cls(unet_config=read((unet_dir or model_dir / "unet") / "config.json"),
                   text_configs={folder: read(model_dir / folder / "config.json") for folder in family.text_encoders},
                   vae_config=read(model_dir / "vae" / "config.json"),
                   source=lambda c: SafetensorsSource(*sources[c]),
                   token_ids=lambda prompts, tokenizer: prompt_ids(model_dir, prompts, tokenizer),
                   scheduler_config=read(model_dir / "scheduler" / "scheduler_config.json"),
                   scheduler=scheduler, lora=lora, modes=modes.on(device), device=device,
                   pipeline_config=read(index) if index.is_file() else {})

    @property
    def family(self) -> Family:
        """SD or SDXL, by the U-Net: what the text-encoder part computes and the VAE's dtype (``families.py``)."""
        return family_of_config(self.unet_config)

    @property
    def dtype(self) -> torch.dtype:
        return torch_dtype(self.modes.compute)

    @property
    def vae_dtype(self) -> torch.dtype:
        """The VAE decoder's dtype: the run's, except where the family's VAE needs more (SDXL's in fp16: fp32)."""
        return self.family.vae_dtype(self.dtype)

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae_config)

    def running(self):
        """The context generation runs in: the fake mode for fake parts."""
        return self.mode if self.mode is not None else nullcontext()

    def _load(self, module: nn.Module, component: str, skip=(), streamed: HollowPlan | None = None,
              modes: Modes | None = None) -> nn.Module:
        """Frozen weights of ``module`` (built on meta) from the component's file, as the modes say
        (``builder.load_frozen``: quantized layer by layer for int8/nf4); ``skip``: prefixes never read;
        ``streamed``: the units whose weights stay on disk (``--stream-weights``, the U-Net only);
        ``modes``: instead of the run's (fp32 for a VAE that must not run in the run's dtype)."""
        source = self.source(component)
        modes = modes or self.modes
        modes = modes if streamed is not None else replace(modes, stream_weights=False)
        dtype = torch_dtype(modes.compute)
        with source.loading():
            load_frozen(module, source, list(skip), modes, dtype, self.device, streamed)
            if streamed is not None:
                self.streamer = StreamedWeights(module, streamed, source, self.dtype, self.device)
        for name, buf in module.named_buffers():  # non-persistent buffers (CLIP's position ids) are not in the file
            if buf.is_meta and not any(name.startswith(s + ".") for s in skip):
                if not name.endswith("position_ids"):
                    raise HollownetError(f"generation cannot make the {component} buffer '{name}'")
                owner = module.get_submodule(name.rsplit(".", 1)[0])
                with self.running():
                    owner._buffers["position_ids"] = torch.arange(buf.shape[-1], device=self.device).expand((1, -1))
        return module.requires_grad_(False).eval()

    def text_encoder(self, folder: str = "text_encoder") -> nn.Module:
        """One of the family's text encoders (``CLIPTextModelWithProjection`` where it pools: SDXL's second)."""
        return self._load(sdxl_text.build(_config(self.text_configs[folder]), self.family.pools(folder)), folder)

    def vae_decoder(self) -> nn.Module:
        """The VAE with its decoder only (the encoder stays on meta, never read), in :attr:`vae_dtype`: where
        that is not the run's dtype (SDXL's VAE in an fp16 run), in fp32 as diffusers' ``upcast_vae``."""
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(_config(self.vae_config))
        modes = None if self.vae_dtype == self.dtype else Modes(precision="fp32")
        return self._load(vae, "vae", skip=["encoder", "quant_conv"], modes=modes)

    def unet(self) -> nn.Module:
        """The full U-Net in the modes' precision, the LoRA on its layers unmerged in fp32 (merged if asked).
        ``--stream-weights``: every unit's weights (all but the mid block, time embedding and ``conv_in/out``)
        stay in the file, read while the unit runs (:attr:`streamer`; the split forward walks them all)."""
        unet = meta_unet(_config(self.unet_config))
        if self.lora is not None:
            add_lora(unet, self.lora.targets, self.lora.rank, self.lora.alpha, self.lora.rank_pattern, self.lora.alpha_pattern)
        unet.requires_grad_(False).eval()
        self.streamer = self.every_unit = None
        if self.modes.stream_weights:
            cut = make_plan(unet)  # any cut: its units, kept and hollow, are every unit of the U-Net
            self.every_unit = replace(cut, kept_down=[*cut.kept_down, *cut.hollow_down], kept_up=[*cut.hollow_up, *cut.kept_up])
        self._load(unet, "unet", streamed=self.every_unit)
        if self.lora is not None:
            with self.running():
                set_lora(unet, self.lora, self.device)
                if self.merged:
                    merge_all(unet)
        return unet

    def fresh_scheduler(self, steps: int):
        """The sampler with its timesteps set (on real tensors: its set-up reads numpy), to be copied per image."""
        own = getattr(diffusers, self.scheduler_config.get("_class_name", "DDPMScheduler"), diffusers.DDPMScheduler)
        cls = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}.get(self.scheduler, own)
        sched = cls.from_config(self.scheduler_config)
        sched.set_timesteps(steps, device=self.device)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(0)  # the first timestep, without the data-dependent lookup (fake tensors have no data)
        if self.to_fake is not None:
            for k, v in list(vars(sched).items()):
                if isinstance(v, torch.Tensor):
                    setattr(sched, k, self.to_fake(v))
        return sched


def _config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def set_lora(unet: nn.Module, lora: LoraWeights, device) -> None:
    """LoRA's tensors in fp32 on ``device``: the file's values, or (fake parts) empty tensors of their shapes."""
    for name, mod in lora_modules(unet):
        for part, layer in zip(("lora_A", "lora_B"), lora_parts(mod)):
            key = f"{name}.{part}.weight"
            if lora.state is not None and key not in lora.state:
                raise HollownetError(f"the LoRA file lacks '{key}'; is it complete?")
            shape = layer.weight.shape
            value = lora.state[key].to(device, torch.float32) if lora.state is not None else \
                torch.empty(shape, dtype=torch.float32, device=device)
            if tuple(value.shape) != tuple(shape):
                raise HollownetError(f"the LoRA tensor '{key}' has shape {tuple(value.shape)}, the model needs {tuple(shape)}")
            set_weight(layer, value)


# ------------------------------------------------------------------------------------ the U-Net call


def lora_layers(unet) -> list:
    """The U-Net's LoRA layers, found once (a walk over every module costs more than a small model's step)."""
    return cached_lora_layers(unet)


@contextmanager
def lora_off(unet):
    """The original U-Net: adapters disabled inside, re-enabled after (by peft's flag, set directly:
    ``unet.disable_adapters()`` costs a quarter of a toy two-path step; see ``peft_internals``)."""
    with adapters_disabled(lora_layers(unet)):
        yield


def one_pass(unet, plan: HollowPlan, sample, timestep, text, added_cond_kwargs=None, unit_weights=None) -> torch.Tensor:
    """``unet(...)`` computed the split way (encode, hollow, decode: every unit through ``unit_weights``)."""
    ctx = H.make_context(unet, sample, timestep, text, added_cond_kwargs=added_cond_kwargs, unit_weights=unit_weights)
    h, skips = H.encode(unet, plan, sample, ctx)
    h = H.hollow(unet, plan, h, ctx, skips)
    return H.decode(unet, plan, h, ctx, skips)


def two_path_forward(unet, plan: HollowPlan, sample, timestep, text, added_cond_kwargs=None) -> torch.Tensor:
    """Path A (LoRA off): encode + hollow. Path B (LoRA on): encode, then decode from A's hollow output.
    The reference for :func:`two_path_batched` (which generation runs)."""
    with lora_off(unet):
        ctx = H.make_context(unet, sample, timestep, text, added_cond_kwargs=added_cond_kwargs)
        h, skips = H.encode(unet, plan, sample, ctx)
        hollow_out = H.hollow(unet, plan, h, ctx, skips)
    return H.hollowed_forward(unet, plan, sample, timestep, text, hollow_out, added_cond_kwargs=added_cond_kwargs)


@contextmanager
def mixed_lora(unet, n_off: int, n_on: int):
    """Inside, every LoRA layer applies its delta to the last ``n_on`` samples of a batch only (the first
    ``n_off`` get the base layer alone): peft's mixed-adapter batches, its adapter name ``__base__`` = none."""
    with adapter_names(lora_layers(unet), [BASE] * n_off + [ADAPTER] * n_on):
        yield


def _rows(ctx: H.Context, rows: slice) -> H.Context:
    return replace(ctx, emb=ctx.emb[rows], text=ctx.text[rows])


def two_path_batched(unet, plan: HollowPlan, sample, timestep, text, added_cond_kwargs=None,
                     unit_weights=None) -> torch.Tensor:
    """:func:`two_path_forward` with both passes through the time embedding, ``conv_in`` and the kept down
    units as one forward of the batch ``[x, x]`` (LoRA on the second half only); the first half alone
    goes on through the hollow, whose output the second half's kept up units decode from."""
    b = sample.shape[0]
    both = torch.cat([sample, sample])
    if isinstance(timestep, torch.Tensor) and timestep.dim() > 0:  # one per sample
        timestep = torch.cat([timestep, timestep])
    added = {k: torch.cat([v, v]) for k, v in added_cond_kwargs.items()} if added_cond_kwargs else None
    with mixed_lora(unet, b, b):
        ctx = H.make_context(unet, both, timestep, torch.cat([text, text]), added_cond_kwargs=added,
                             unit_weights=unit_weights)
        h, skips = H.encode(unet, plan, both, ctx)
    off, on = slice(0, b), slice(b, 2 * b)
    with lora_off(unet):
        hollow_out = H.hollow(unet, plan, h[off], _rows(ctx, off), [s[off] for s in skips])
    del h
    return H.decode(unet, plan, hollow_out, _rows(ctx, on), [s[on] for s in skips])


def unet_call(unet, plan: HollowPlan | None, batched: bool = True, streamer: StreamedWeights | None = None,
              every_unit: HollowPlan | None = None) -> Callable:
    """``f(x, t, cond)``: the U-Net's prediction, two-path for a hollow LoRA (``plan``), else one pass;
    ``streamer``: streamed unit weights (the split forward, ``every_unit`` its cut for one pass)."""
    if streamer is not None:
        if plan is None:
            return lambda x, t, cond: one_pass(unet, every_unit, x, t, cond.text, cond.added, streamer)
        return lambda x, t, cond: two_path_batched(unet, plan, x, t, cond.text, cond.added, streamer)
    if plan is None:
        return lambda x, t, cond: unet(x, t, cond.text, added_cond_kwargs=cond.added).sample
    two_path = two_path_batched if batched else two_path_forward
    return lambda x, t, cond: two_path(unet, plan, x, t, cond.text, cond.added)


# ------------------------------------------------------------------------------- the three parts


@dataclass
class Conditioning:
    """What the U-Net reads of one prompt: text embeddings (negative first when guided) and, for
    U-Nets with added embeddings (SDXL), their extra inputs."""

    text: torch.Tensor
    added: dict | None = None

    def tensors(self) -> list[torch.Tensor]:
        return [self.text, *(self.added or {}).values()]


def encode_prompts(parts: Parts, prompts: list[str], negative_prompt: str | None, guided: bool, resolution: int,
                   meter: PartMeter) -> dict[str, Conditioning]:
    """Part 1: the family's text encoders, each built, run once over every distinct prompt (and the negative
    one), dropped before the next. The conditioning is the pipeline's ``encode_prompt`` (and, for SDXL, its
    time ids): the family (``families.py``) says what each encoder gives and how they combine."""
    family = parts.family
    distinct = list(dict.fromkeys(prompts))
    zeros = guided and family.zero_negative(negative_prompt, parts.pipeline_config)
    texts = ([negative_prompt or ""] if guided and not zeros else []) + distinct
    outputs: list = []
    for k, (folder, tokenizer, part, pooled) in enumerate(family.encoders):
        with parts.running():
            ids = parts.token_ids(texts, tokenizer)
        encoder = parts.text_encoder(folder)
        held = [t for o in outputs for t in o if t is not None]  # the earlier encoders' outputs
        with parts.running(), torch.no_grad(), meter.measure(part, encoder, held):
            outputs.append(family.prompt_states(encoder, ids.to(parts.device), pooled))
            if k == len(family.encoders) - 1:  # combined while the last encoder's part is measured
                rows = family.generation_conditioning(outputs, guided=guided, zero_negative=zeros,
                                                      resolution=resolution, dtype=parts.dtype)
                out = {p: Conditioning(text, added) for p, (text, added) in zip(distinct, rows)}
                del outputs, rows
        del encoder, held
        release_memory()
    return out


def restart(scheduler):
    """A fresh copy of a scheduler whose timesteps are set: its state copied, its tensors (never changed in
    place by ``step``) shared, so the copy allocates nothing."""
    return copy.deepcopy(scheduler, memo={id(v): v for v in vars(scheduler).values() if isinstance(v, torch.Tensor)})


def denoise(forward: Callable, scheduler, cond: Conditioning, seed: int, *, shape, guidance: float, device, dtype,
            run_steps: int | None = None):
    """One image's latents: StableDiffusionPipeline's loop, the U-Net call being ``forward``; ``run_steps``:
    only the first ones (the planner: the peak repeats after them)."""
    guided = guidance > 1.0
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    latents = noise.to(device, dtype) * scheduler.init_noise_sigma
    del noise
    for t in scheduler.timesteps[:run_steps]:
        x = torch.cat([latents] * 2) if guided else latents
        x = scheduler.scale_model_input(x, t)
        pred = forward(x, t, cond)
        del x
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance * (pred_cond - pred_uncond)
            del pred_uncond, pred_cond
        latents = scheduler.step(pred, t, latents).prev_sample
        del pred
    return latents


def decode(vae, latents: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Part 3 for one image: pixels as ``uint8`` (height, width, 3), as the pipeline's postprocess rounds them."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    image = vae.decode(latents.to(dtype) / vae.config.scaling_factor + shift).sample
    return ((image[0].float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def generate(parts: Parts, plan: HollowPlan | None, jobs: list[tuple[str, int]], *, steps: int, resolution: int,
             guidance: float, negative_prompt: str | None = None, meter: PartMeter | None = None,
             on_image: Callable[[int, torch.Tensor], None] | None = None, batched: bool = True, bar: bool = False,
             run_steps: int | None = None, denoised: dict[int, torch.Tensor] | None = None,
             on_latents: Callable[[int, torch.Tensor], None] | None = None) -> None:
    """Every ``(prompt, noise seed)`` job, part by part (see the module docstring): ``on_image(i, pixels)`` per
    image (``run_steps``: of the ``steps``, run only the first). ``meter``: each part's exact peak over all images (the parts never overlap: the run's peak is the
    largest part's). Run by ``hollownet generate`` on the model's files and by the planner on fake parts.
    ``denoised``: latents of jobs denoised before (an interrupted run's), not denoised again (no job left: no text
    encoder, no U-Net); ``on_latents(i, latents)``: each job's latents as soon as they are denoised."""
    meter = meter or PartMeter(False)
    guided = guidance > 1.0
    latents = [None if denoised is None else denoised.get(i) for i in range(len(jobs))]
    todo = [i for i, x in enumerate(latents) if x is None]
    if todo:
        conds = encode_prompts(parts, [jobs[i][0] for i in todo], negative_prompt, guided, resolution, meter)
        side = resolution // parts.vae_scale_factor
        shape = (1, parts.unet_config["in_channels"], side, side)
        unet = parts.unet()
        forward = unet_call(unet, plan, batched, parts.streamer, parts.every_unit)
        template = parts.fresh_scheduler(steps)
        with parts.running(), torch.no_grad(), meter.measure("U-Net", unet, [t for c in conds.values() for t in c.tensors()]):
            for i in tqdm(todo, desc="denoise", unit="image", disable=not bar or None):
                prompt, seed = jobs[i]
                latents[i] = denoise(forward, restart(template), conds[prompt], seed, shape=shape,
                                     guidance=guidance, device=parts.device, dtype=parts.dtype, run_steps=run_steps)
                if on_latents is not None:
                    on_latents(i, latents[i])
        del unet, forward, conds
        parts.streamer = None
        release_memory()
    vae = parts.vae_decoder()
    with parts.running(), torch.no_grad(), meter.measure("VAE decoder", vae, latents):
        for i in range(len(latents)):
            pixels = decode(vae, latents[i], parts.vae_dtype)
            latents[i] = None  # decoded: dropped
            if on_image is not None:
                on_image(i, pixels)
            del pixels
    del vae
    release_memory()


# ----------------------------------------------------------------------- hollownet generate, the bench


def load_pipeline(model: str, lora: str | None, precision: str, device: str, scheduler: str, force: bool = False,
                  unet: str | Path | None = None, modes: Modes | None = None) -> tuple[Parts, dict]:
    """The parts of generation with ``lora`` (and its ``hollownet.json``), nothing loaded yet; ``unet``: a
    fine-tuned U-Net folder (full fine-tuning) in place of the model's; ``modes`` (default: ``precision``)."""
    model_dir = resolve_model_dir(model)
    info = read_info(lora) if lora else {}
    if lora:  # before the 459-line size-mismatch traceback a wrong base model would give
        check_lora_matches(model_dir, lora, info, force=force)
    if unet is not None and not Path(unet).is_dir():
        raise HollownetError(f"no fine-tuned unet/ in '{Path(unet).parent}'")
    weights = LoraWeights.read(lora, info) if lora else None
    parts = Parts.real(model_dir, weights, modes or Modes(precision=precision), device, scheduler,
                       Path(unet) if unet is not None else None)
    return parts, info


def prepare(parts: Parts, info: dict, *, lora: bool, merged: bool, resolution: int | None) -> tuple[HollowPlan | None, int]:
    """``(plan, resolution)``: the cut for two-path generation of a hollow LoRA, or None for one U-Net pass (the
    LoRA fused into the weights if ``merged``); the resolution defaults to the training one."""
    check_generation_modes(parts.modes, merged and lora)
    plan = None
    if info.get("method") == "hollow" and not merged:
        plan = plan_for_blocks(meta_unet(_config(parts.unet_config)), info["hollow_blocks"])
    parts.merged = bool(lora and merged)
    size = resolution or info.get("resolution") or parts.unet_config["sample_size"] * parts.vae_scale_factor
    return plan, size


def render(parts: Parts, plan: HollowPlan | None, jobs: list[tuple[str, int, str]], out: Path, *, steps: int, resolution: int,
           guidance: float, negative_prompt: str | None = None, measure: bool = False,
           progress: Progress | None = None):
    """One PNG per ``(prompt, noise seed, file name)`` job in ``out``, each written as soon as it is decoded, and
    ``manifest.json`` (file, prompt, seed: what ``hollownet eval`` reads). Returns ``(entries, memory)``; ``memory``:
    the exact peak of the whole run if ``measure`` (every image; per part in ``parts``). ``progress``: an interrupted
    run's finished images are skipped and its denoised latents decoded, and this run's are recorded as they finish."""
    out.mkdir(parents=True, exist_ok=True)
    entries = [{"file": name, "prompt": prompt, "seed": seed} for prompt, seed, name in jobs]
    todo = [i for i in range(len(jobs)) if progress is None or entries[i]["file"] not in progress.written]

    def save(k, pixels):
        save_image(out / entries[todo[k]]["file"], Image.fromarray(pixels.cpu().numpy()))
        if progress is not None:
            progress.image_written(entries[todo[k]]["file"])

    meter = PartMeter(measure, parts.device)
    if todo:
        kept = {k: progress.latents[entries[i]["file"]] for k, i in enumerate(todo)
                if progress is not None and entries[i]["file"] in progress.latents}
        generate(parts, plan, [jobs[i][:2] for i in todo], steps=steps, resolution=resolution, guidance=guidance,
                 negative_prompt=negative_prompt, meter=meter, on_image=save, bar=True, denoised=kept,
                 on_latents=(lambda k, x: progress.denoised(entries[todo[k]]["file"], x)) if progress else None)
    save_json(out / "manifest.json", {"images": entries})
    return entries, (memory_record(meter) if measure else None)


class Progress:
    """What an unfinished ``hollownet generate`` keeps in ``OUTPUT/.partial`` so that a rerun of the same command
    redoes nothing finished: its settings and the PNGs written so far (``state.json``), and each image's latents as
    soon as they are denoised (``NNN.png.safetensors``, kilobytes; the U-Net part denoises every image before the
    VAE decoder part decodes any, see the module docstring). A rerun with other settings starts over (a warning
    says so); a finished run removes the folder."""

    def __init__(self, out: Path, settings: dict, files: list[str]):
        self.out, self.dir, self.files = out, out / PARTIAL, files
        self.settings = json.loads(json.dumps(settings, default=str))
        self.written: list[str] = []  # PNGs finished, by an earlier run of these settings or this one
        self.latents: dict[str, torch.Tensor] = {}  # denoised, not yet written
        self.resumed = (0, 0)  # (images, latents) found from an earlier run
        state = self.dir / "state.json"
        if self.dir.exists():
            try:
                old = json.loads(state.read_bytes().decode("utf-8"))
            except (OSError, ValueError):
                old = None
            if isinstance(old, dict) and old.get("settings") == self.settings:
                self.written = [f for f in old.get("written", []) if f in files and (out / f).is_file()]
                for f in files:
                    if f not in self.written and (self.dir / f"{f}.safetensors").is_file():
                        try:
                            self.latents[f] = load_file(self.dir / f"{f}.safetensors")["latents"]
                        except Exception:  # a damaged file (a crash mid-write): that image is denoised again
                            pass
                self.resumed = (len(self.written), len(self.latents))
            else:
                warnings.warn(f"{self.dir} holds an unfinished run with other settings: starting over")
                shutil.rmtree(self.dir)
        self.save()

    def save(self) -> None:
        save_json(self.dir / "state.json", {"settings": self.settings, "written": self.written})

    def denoised(self, file: str, latents: torch.Tensor) -> None:
        save_tensors(self.dir / f"{file}.safetensors", {"latents": latents.detach().cpu().contiguous()})
        self.latents[file] = latents

    def image_written(self, file: str) -> None:
        self.written.append(file)
        self.latents.pop(file, None)
        self.save()
        (self.dir / f"{file}.safetensors").unlink(missing_ok=True)

    def finish(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def kept(self) -> str:
        """What an interruption leaves, in words: the images written, the latents kept, what a rerun does."""
        n, done, more = len(self.files), len(self.written), len(self.latents)
        said = f"{done} of {n} images written to {self.out}" + (f" ({', '.join(self.written)})" if done else "")
        if more:
            said += f"; {more} more denoised, kept in {self.dir}"
        if done or more:
            return said + f": rerun the same command to finish the other {n - done} without redoing those"
        return said + "; rerun the same command to start again"


def memory_record(meter: PartMeter) -> dict:
    s = meter.summary(always=True)
    return {"peak_bytes": s["peak_bytes"], "peak_part": s["peak_phase"], "breakdown": s["breakdown"], "parts": s["parts"]}


def run_generate(cfg: GenerateConfig, memory_check: Callable | None = None) -> dict:
    """Write ``num_images`` PNGs, ``manifest.json`` (file + prompt, read by ``hollownet eval``) and ``generate.json``.

    ``memory_check(cfg, model_dir, info, resolution)``: called before anything loads (the CLI's is
    ``memory.machine.check_generate``, passed in: the planner runs this module's code, so it cannot be imported here)."""
    preflight_generate(cfg)  # paths and resolution: before any model loads
    model_dir = resolve_model_dir(cfg.model)
    if folder_family(model_dir).backbone == "transformer":  # SD3: the stock pipeline, one path (stages/dit_generate.py)
        return run_dit_generate(cfg, model_dir)
    t0 = time.perf_counter()
    parts, info = load_pipeline(cfg.model, cfg.lora, cfg.precision, cfg.device, cfg.scheduler, force=cfg.force,
                                modes=cfg.modes)
    plan, resolution = prepare(parts, info, lora=bool(cfg.lora), merged=cfg.merged, resolution=cfg.resolution)
    if memory_check is not None:  # nothing is loaded yet
        memory_check(cfg, model_dir, info, resolution)
    if cfg.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    jobs = [(cfg.prompt, cfg.seed + i, f"{i:03d}.png") for i in range(cfg.num_images)]
    progress = Progress(Path(cfg.output), resume_settings(cfg), [name for _, _, name in jobs])
    if any(progress.resumed):
        print(f"resuming: {progress.resumed[0]} of {cfg.num_images} images already written, {progress.resumed[1]} more "
              f"already denoised (an interrupted run's, kept in {progress.dir})", file=sys.stderr)
    try:
        entries, memory = render(parts, plan, jobs, Path(cfg.output), steps=cfg.steps, resolution=resolution,
                                 guidance=cfg.guidance, negative_prompt=cfg.negative_prompt,
                                 measure=True, progress=progress)
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: the record made whole (the signal may have cut its write)
        progress.save()
        e.kept = progress.kept()  # and the CLI says what was kept
        raise
    record = {
        "settings": asdict(cfg),
        "modes": {"precision": cfg.modes.precision, "compute_dtype": cfg.modes.compute, "stream_weights": cfg.stream_weights},
        "mode": "two-path" if plan is not None else ("merged" if cfg.lora and cfg.merged else ("lora" if cfg.lora else "base model")),
        "resolution": resolution,
        "lora_info": info,
        "seconds": round(time.perf_counter() - t0, 3),
        "seconds_per_image": round((time.perf_counter() - t0) / cfg.num_images, 3),
        "memory": memory,  # the whole run: every image, every part (text encoder, U-Net, VAE decoder)
        "cuda_max_memory_allocated": torch.cuda.max_memory_allocated() if cfg.device.startswith("cuda") else None,
        "images": [e["file"] for e in entries],
    }
    save_json(Path(cfg.output) / "generate.json", json.loads(json.dumps(record, default=str)))
    progress.finish()
    return record


def resume_settings(cfg: GenerateConfig) -> dict:
    """What makes an interrupted run's images this run's: every setting (``--force`` and ``--ignore-memory-check`` aside) and the LoRA file's
    size and time (a retrained LoRA makes other images)."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("force", "ignore_memory_check")}
    if cfg.lora:
        stat = lora_file(cfg.lora).stat()
        settings["lora_file"] = [str(lora_file(cfg.lora)), stat.st_size, stat.st_mtime_ns]
    return settings
