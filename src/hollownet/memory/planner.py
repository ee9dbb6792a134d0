"""Predict the memory of every stage without weights: ``hollownet plan``.

The prediction *runs the real code path* -- the trainer's builder and ``train_step`` (forward,
loss, backward, clipping, AdamW), stage 1's ``make_shard`` and the same text-encoder and VAE calls
-- on models whose tensors are fake (:class:`torch._subclasses.FakeTensorMode`: shapes and dtypes,
no storage) and counts live bytes with the same :class:`~hollownet.memory.tracker.MemoryTracker` that
``hollownet train`` uses to measure. So prediction and measurement are one code path: on the tiny
test model they agree to the byte, and an SD 2.x prediction takes seconds on a laptop CPU.

How each stage is modelled (exactly what ``precompute.py`` / ``train.py`` do, see there):

* **pre-compute** (stage 1) is three parts, each loaded, used and dropped before the next, so its
  peak is the largest part's: the text encoder embedding the prompts; the VAE *encoder* (decoder
  never loaded) encoding all photos in chunks of ``precompute_batch``; the U-Net encoder + hollow
  (the kept up blocks are never loaded) computing the first shard's hollow outputs, no grad.
* **training** (stage 2) is one optimizer step after the first (AdamW's state exists by then, so
  this step's peak is the run's; the first step's is never larger): the frozen weights in
  ``precision`` -- for ``hollow`` only the kept outer layers, the hollow stays on the meta device
  and costs nothing -- LoRA (or, for ``full``, every weight) in fp32 with its gradients and AdamW
  state, the store's batch (noisy latents, targets, hollow output) and prompt embeddings, and the
  activations of the forward and backward.
* **inference** is one denoising step of the U-Net alone, no gradients: every U-Net weight in
  ``precision`` + the activations of ``unet(latents, t, text)`` at batch 1 (the paper's inference
  figure) and at batch 2 (classifier-free guidance). Text encoder and VAE are not counted.

* **generation** (``hollownet generate``) is three parts, each model built, used and dropped before the
  next, so its peak is the largest part's: the text encoder (the prompt and the negative one); the
  U-Net denoising every image (two-path for a hollow LoRA, one batched forward through the kept down
  blocks; the LoRA unmerged in fp32; the CFG batch of 2); the VAE decoder (no encoder) decoding each.
  It is ``generate.generate`` itself on fake parts (``Parts`` from :class:`FakeSource` s), with the
  request's modes; at most :data:`GENERATE_PREDICT_STEPS` denoising steps are run, the peak repeating
  after them (the multistep sampler's history is full by the second step).

Counts are tensor storages (see ``memory.py``): a CUDA run adds the CUDA context, kernel workspaces
and allocator rounding/caching on top. The optimizer is torch's AdamW: ``adamw`` is its single-tensor
implementation (what the trainer runs on a CPU), ``adamw-foreach`` the multi-tensor one torch picks
by default on CUDA (larger temporaries in the step).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.utils._python_dispatch import TorchDispatchMode

from hollownet import unet_split as H
from hollownet.cut import (
    BUNDLED_UNETS,
    CONFIG_DIR,
    HollowPlan,
    all_plans,
    load_unet_config,
    lora_size,
    lora_target_modules,
    make_plan,
    meta_unet,
    resolve_plan,
)
from hollownet.errors import HollownetError
from hollownet.families import ADDED_COND_KEYS, SampleConditioning, added_cond_shapes, family_of_config
from hollownet.loading import is_under, vae_scale_factor
from hollownet.lowmem.quant import frozen_weight_bytes
from hollownet.lowmem.stream import FakeSource
from hollownet.memory.tracker import KINDS, MemoryReport, MemoryTracker, format_bytes, parse_size
from hollownet.optimizers import make_optimizer
from hollownet.requests import PlanRequest
from hollownet.settings import LOW_MEMORY_STAGE1_BUDGET, PRECISIONS, QUANTIZED_PRECISIONS, Modes, torch_dtype
from hollownet.singlefile import plan_model
from hollownet.stages.train import TrainConfig, train_step
from hollownet.toy import NAME as TOY, model_dir as toy_model_dir
from hollownet import encoders as E
from hollownet.lowmem.layerwise import predict_peak
from hollownet.lowmem.sdxl_text import build as build_text_encoder, predict_peak as predict_sdxl_text
from hollownet.memory.tracker import PartMeter
from hollownet.stages.precompute import budget_bytes, kept_up_modules, make_shard, sample_table, validation_count
from hollownet.builder import lora_outside
from hollownet.stages import generate as G

GiB = 1024**3
INFERENCE_DEFINITION = (
    "one U-Net denoising step, no gradients: all U-Net weights in the chosen precision + the activations of "
    "unet(latents, t, text); text encoder and VAE not resident"
)
PARTS = ("text encoder", "VAE encoder", "U-Net encoder + hollow")  # stage 1's parts, as precompute.py names them


# ----------------------------------------------------------------------------------------- models


@dataclass
class ModelConfigs:
    """The configs a prediction needs: a bundled name's or a diffusers folder's. No weights."""

    name: str
    unet: dict
    text_encoder: dict | None = None
    text_encoder_2: dict | None = None  # SDXL's second encoder (its states are concatenated to the first's)
    vae: dict | None = None
    scheduler: dict | None = None
    text_len: int = 77  # tokens per prompt (the tokenizer's model_max_length)
    pipeline_config: dict = field(default_factory=dict)  # model_index.json (generation: SDXL's force_zeros_for_empty_prompt)
    notes: list[str] = field(default_factory=list)

    @property
    def text_configs(self) -> dict[str, dict | None]:
        """The family's text encoders (folder -> config or None if not known)."""
        known = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {folder: known[folder] for folder in family_of_config(self.unet).text_encoders}

    @property
    def knows_generation(self) -> bool:
        """Every model generation builds has a known config (the family's text encoders and the VAE)."""
        return self.vae is not None and None not in self.text_configs.values()

    @property
    def text_dim(self) -> int:
        if self.text_encoder:
            return int(self.text_encoder["hidden_size"]) + int((self.text_encoder_2 or {}).get("hidden_size", 0))
        dim = self.unet.get("cross_attention_dim", 768)
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    @property
    def added_cond(self) -> dict | None:
        """SDXL-style U-Nets need pooled text embeddings and time ids: their shapes per sample."""
        return added_cond_shapes(self.unet)


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_note")}


def _read_json(path: Path) -> dict | None:
    return _strip(json.loads(path.read_text())) if path.is_file() else None


def load_model_configs(model: str | Path) -> ModelConfigs:
    """``sd15``, ``sd21``, ``sdxl`` (bundled configs), ``toy`` (the bundled toy model), a single-file
    checkpoint or a diffusers folder (its ``*/config.json``)."""
    name = plan_model(str(model))  # a single-file checkpoint: its converted folder, or its type's bundled configs
    if name in BUNDLED_UNETS:
        mc = ModelConfigs(
            name=name,
            unet=load_unet_config(name),
            text_encoder=_read_json(CONFIG_DIR / f"{name}_text_encoder.json"),
            text_encoder_2=_read_json(CONFIG_DIR / f"{name}_text_encoder_2.json"),
            vae=_read_json(CONFIG_DIR / f"{name}_vae.json"),
            scheduler=_read_json(CONFIG_DIR / f"{name}_scheduler.json"),
        )
        if mc.text_encoder is None:
            mc.notes.append(f"stage 1 for {name}: its text encoder(s) and VAE are not modelled (U-Net part only)")
        return mc
    path = toy_model_dir() if name == TOY else Path(name).expanduser()
    if not (path / "unet" / "config.json").is_file():
        raise HollownetError(
            f"unknown model '{name}': give sd15, sd21, sdxl or a diffusers model folder (one with unet/config.json)"
        )
    unet = _read_json(path / "unet" / "config.json")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise HollownetError(f"'{path / 'unet'}' holds a {unet.get('_class_name')}; hollownet plans UNet2DConditionModel U-Nets")
    text = _read_json(path / "text_encoder" / "config.json")
    if text is not None and text.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        text = None
    mc = ModelConfigs(
        name=str(path),
        unet=unet,
        text_encoder=text,
        text_encoder_2=_read_json(path / "text_encoder_2" / "config.json"),
        vae=_read_json(path / "vae" / "config.json"),
        scheduler=_read_json(path / "scheduler" / "scheduler_config.json"),
        pipeline_config=_read_json(path / "model_index.json") or {},
    )
    tok = _read_json(path / "tokenizer" / "tokenizer_config.json") or {}
    max_pos = int((text or {}).get("max_position_embeddings", 77))
    mc.text_len = int(tok.get("model_max_length", max_pos))
    if mc.text_len > max_pos:  # tokenizers without a limit store a huge sentinel
        mc.text_len = max_pos
    for part, cfg in (("text encoder", mc.text_encoder), ("VAE", mc.vae)):
        if cfg is None:
            mc.notes.append(f"stage 1: no usable {part} config in '{path}'; that part is not modelled")
    return mc


# ------------------------------------------------------------------------------------ request


def _cut(unet: nn.Module, req: PlanRequest, rank: int = 0) -> HollowPlan | None:
    if req.method != "hollow":
        return None
    return resolve_plan(unet, fraction=req.hollow, blocks=req.hollow_blocks, depth=req.depth, rank=rank,
                        lora_targets=tuple(req.lora_targets))


# ------------------------------------------------------------------------------- fake models


def _fake_mode():
    return FakeTensorMode()


def materialize(module: nn.Module, dtype: torch.dtype, *, skip=(), persistent_only: bool = True) -> None:
    """Inside a FakeTensorMode: give every tensor a stage loads a (fake) storage on the CPU.

    The module is built on the meta device; this is what loading its weights with
    ``load_state_dict(..., assign=True)`` does (``model.load_unet``, stage 1's VAE), minus the bytes:
    floating tensors in ``dtype``, integer buffers as they are. (Stage 2's network is built by the
    trainer's own builder from a ``FakeSource`` instead: ``predict_step``.)
    Tensors under the ``skip`` module prefixes stay on meta (never loaded: cost nothing).
    ``persistent_only``: like ``load_state_dict``, leave non-persistent buffers alone;
    ``from_pretrained`` (the text encoder) creates those too.
    """
    skip = list(skip)
    for mname, mod in module.named_modules():
        if skip and is_under(mname, skip):
            continue
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            dt = dtype if p.is_floating_point() else p.dtype
            mod._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=dt), requires_grad=p.requires_grad)
        for bname, b in list(mod._buffers.items()):
            if b is None or (persistent_only and bname in mod._non_persistent_buffers_set):
                continue
            mod._buffers[bname] = torch.empty(b.shape, dtype=dtype if b.is_floating_point() else b.dtype)


class _FakeScalars:
    """A dispatch mode under the tracker: ``.item()`` of a fake tensor that has no value answers 0.

    The trainer returns ``loss.item()`` after its measured region; a fake loss has no value. Every
    other op passes through unchanged (and a data-dependent op anywhere else still raises).
    """

    def __new__(cls):
        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                try:
                    return func(*args, **(kwargs or {}))
                except DataDependentOutputException:
                    if func is not torch.ops.aten._local_scalar_dense.default:
                        raise
                    return False if args[0].dtype == torch.bool else (0.0 if args[0].is_floating_point() else 0)

        return Mode()


class _WithAddedCond:
    """``unet(x, t, text)`` for SDXL-style U-Nets, with their extra inputs made beforehand."""

    def __init__(self, unet, added: dict):
        self.unet, self.added = unet, added

    def __call__(self, x, t, text):
        return self.unet(x, t, text, added_cond_kwargs=self.added)


def _added_cond(shapes: dict | None, batch: int, dtype) -> dict | None:
    """SDXL-style extra inputs of ``shapes`` (``ModelConfigs.added_cond``) for ``batch`` samples."""
    if shapes is None:
        return None
    return {k: torch.empty((batch, *s), dtype=dtype) for k, s in shapes.items()}


def _sample_conditioning(mc: ModelConfigs, embeds: torch.Tensor, photos: int) -> SampleConditioning | None:
    """Stage 1's per-sample conditioning (``precompute.make_shard``'s ``cond``) for SDXL-style models, shapes only."""
    if mc.added_cond is None:
        return None
    prompts = {"embeds": embeds, "text_embeds": torch.empty(embeds.shape[0], *mc.added_cond["text_embeds"])}
    return SampleConditioning(family_of_config(mc.unet), prompts, torch.empty(photos, *mc.added_cond["time_ids"]))


def latent_size(mc: ModelConfigs, resolution: int) -> tuple[int, int]:
    factor = vae_scale_factor(mc.vae)
    return resolution // factor, resolution // factor


def hollow_out_shape(mc: ModelConfigs, plan: HollowPlan, resolution: int) -> tuple[int, ...]:
    """Per sample, what stage 1 stores for this cut (run on meta tensors: shapes only)."""
    return _hollow_out_shape(mc.unet, plan, latent_size(mc, resolution), mc.text_len, mc.text_dim)


def _hollow_out_shape(unet_config: dict, plan: HollowPlan, latent_hw: tuple[int, int], text_len: int, text_dim: int):
    unet = meta_unet(unet_config)
    with torch.device("meta"), torch.no_grad():
        x = torch.empty(1, unet.config.in_channels, *latent_hw)
        out = H.hollow_output(unet, plan, x, torch.zeros(1, dtype=torch.long), torch.empty(1, text_len, text_dim),
                              **H.example_cond(unet, 1, latent_hw))
    return tuple(out.shape[1:])


# -------------------------------------------------------------------------------- predictions


def predict_train(mc: ModelConfigs, req: PlanRequest) -> tuple[MemoryReport, dict]:
    """The peak of a training step (stage 2), as ``run_train`` measures it; and weight accounting."""
    plan = _cut(meta_unet(mc.unet), req, rank=req.rank)
    report, extra = predict_step(mc.unet, req.train_config(), resolution=req.resolution, text_len=mc.text_len,
                                 text_dim=mc.text_dim, hollow_blocks=plan.hollow_blocks if plan else None,
                                 batch=req.per_step, prompts=req.prompts, vae_factor=vae_scale_factor(mc.vae),
                                 added_cond=mc.added_cond)
    info = _param_info(mc, req, plan, None)
    info.update(trainable_weight_bytes=extra["trainable_bytes"], frozen_weight_bytes=extra["resident_frozen_bytes"],
                hollow_out_shape=extra["hollow_out_shape"], **{k: v for k, v in extra.items() if k.startswith("largest_streamed")})
    return report, info


def train_batch_shapes(unet_config: dict, plan: HollowPlan | None, resolution: int, batch: int, text_len: int,
                       text_dim: int, prompts: int = 1, vae_factor: int = 8, added_cond: dict | None = None):
    """Shapes of one step's store batch: latents, hollow output (if hollow), prompt embeddings and the
    per-sample added inputs (SDXL's ``text_embeds``, ``time_ids``)."""
    h = resolution // vae_factor
    c = unet_config["in_channels"]
    shapes = {"latent": (batch, c, h, h), "embeds": (prompts, text_len, text_dim)}
    if plan is not None:
        shapes["hollow_out"] = (batch, *_hollow_out_shape(unet_config, plan, (h, h), text_len, text_dim))
    for k, shape in (added_cond or {}).items():
        shapes[k] = (batch, *shape)
    return shapes


def make_train_batch(shapes: dict, dtype: torch.dtype, generator: torch.Generator | None = None):
    """A store-like batch of the given shapes (random values; fake tensors inside a FakeTensorMode)."""
    b = shapes["latent"][0]
    batch = dict(noisy=torch.randn(shapes["latent"], generator=generator), target=torch.randn(shapes["latent"], generator=generator),
                 timestep=torch.full((b,), 500, dtype=torch.long), prompt_index=torch.zeros(b, dtype=torch.long),
                 weight=torch.ones(b))
    if "hollow_out" in shapes:
        batch["hollow_out"] = torch.randn(shapes["hollow_out"], generator=generator).to(dtype)
    for k in ADDED_COND_KEYS:  # stored as stage 1 computed them (fp32)
        if k in shapes:
            batch[k] = torch.randn(shapes[k], generator=generator)
    return batch, torch.randn(shapes["embeds"], generator=generator)


def predict_step(unet_config: dict, cfg: TrainConfig, *, resolution: int, text_len: int = 77, text_dim: int | None = None,
                 hollow_blocks: list[str] | None = None, batch: int | None = None, prompts: int = 1,
                 vae_factor: int = 8, added_cond: dict | None = None):
    """Stage 2's peak for ``cfg`` (any mode), without weights: ``(MemoryReport, info)``.

    Runs the trainer's own construction (``cfg.network``: ``builder.build_unet`` from a
    :class:`~hollownet.lowmem.stream.FakeSource`, quantization included) and its own
    ``train.train_step`` under ``FakeTensorMode``. The step measured is a run's second, its peak
    (the first step's is never larger): what the first leaves behind is the optimizer's state,
    made here by AdamW's own ``_init_group`` (shared by its implementations; the multi-tensor one
    makes it in fewer fake ops) instead of by a whole step. ``method`` hollow (default cut unless
    ``hollow_blocks``), lora or full; ``batch``: samples per step (default ``cfg.batch``; prior
    preservation doubles it). The hollow output is in the compute dtype (a store made at the
    matching precision, as ``hollownet train`` makes it). ``added_cond``: SDXL-style extra inputs.
    """
    text_dim = text_dim or unet_config["cross_attention_dim"]
    skeleton = meta_unet(unet_config)
    if cfg.method == "hollow" and hollow_blocks is None:
        hollow_blocks = make_plan(skeleton).hollow_blocks
    plan = resolve_plan(skeleton, blocks=hollow_blocks) if cfg.method == "hollow" else None
    shapes = train_batch_shapes(unet_config, plan, resolution, batch or cfg.batch, text_len, text_dim, prompts, vae_factor,
                                added_cond)
    source = FakeSource.for_module(skeleton)
    net = cfg.network(unet_config, source, hollow_blocks)
    with source.mode, _FakeScalars():
        unet, params = net.unet, net.params
        optimizer = make_optimizer(params, cfg.modes.optimizer, cfg.lr, cfg.max_grad_norm)
        for p in params:
            p.grad = torch.zeros_like(p)
        foreach = [g.get("foreach") for g in optimizer.param_groups]
        for g in optimizer.param_groups:
            g["foreach"] = True
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for g, f in zip(optimizer.param_groups, foreach):
            g["foreach"] = f
        batch_, embeds = make_train_batch(shapes, net.dtype)  # with the added inputs: train.predict passes them
        unet.train()
        tracker = MemoryTracker(device="cpu").add_resident(unet, optimizer)
        train_step(net, batch_, embeds, optimizer, cfg, tracker)
        info = dict(resident_frozen_bytes=frozen_weight_bytes(unet),
                    trainable_bytes=sum(p.numel() * p.element_size() for p in params),
                    hollow_out_shape=list(shapes["hollow_out"][1:]) if "hollow_out" in shapes else None)
    if net.streamer is not None:
        units = net.streamer.resident_unit_bytes()
        info.update(largest_streamed_unit=max(units, key=units.get), largest_streamed_unit_bytes=max(units.values()))
    return tracker.report, info


def _param_info(mc: ModelConfigs, req: PlanRequest, plan: HollowPlan | None, params) -> dict:
    skeleton = meta_unet(mc.unet)
    total = sum(p.numel() for p in skeleton.parameters())
    if req.method == "full":
        trained = total
    else:
        mods = dict(skeleton.named_modules())
        skip = plan.hollow_prefixes(skeleton) if plan else []
        trained = sum(lora_size(mods[n], req.rank) for n in lora_target_modules(skeleton, skip, tuple(req.lora_targets)))
    hollow = plan.hollow_params if plan else 0
    return {"unet_params": total, "hollow_params": hollow, "kept_params": total - hollow, "trainable_params": trained,
            "lora_bytes_fp32": trained * 4 if req.method != "full" else 0,
            "fraction": round(hollow / total, 4), "hollow_blocks": plan.hollow_blocks if plan else None,
            "depth": plan.depth if plan else None, "cut_why": plan.why if plan else None,
            "lora_targets_removed_share": round(plan.lora_targets_removed_share, 4) if plan else None}


def predict_inference(mc: ModelConfigs, req: PlanRequest, batch: int = 1) -> MemoryReport:
    """One U-Net denoising step without gradients (see INFERENCE_DEFINITION)."""
    dtype = torch_dtype(req.modes.compute)  # int8/nf4: the original weights in their compute dtype
    unet = meta_unet(mc.unet).requires_grad_(False).eval()
    h, w = latent_size(mc, req.resolution)
    with _fake_mode():
        materialize(unet, dtype)
        x = torch.empty(batch, unet.config.in_channels, h, w, dtype=dtype)
        t = torch.zeros((), dtype=torch.long)
        text = torch.empty(batch, mc.text_len, mc.text_dim, dtype=dtype)
        added = _added_cond(mc.added_cond, batch, dtype)
        model = unet if added is None else _WithAddedCond(unet, added)
        tracker = MemoryTracker(device="cpu").add_resident(unet)
        with torch.no_grad(), tracker, tracker.phase("unet"):
            model(x, t, text).sample
    return tracker.report


#: Denoising steps a generation prediction runs: from the third on, each step allocates what the one
#: before freed (DPM-Solver++'s history holds its last 2 outputs from step 2), so the peak is reached.
GENERATE_PREDICT_STEPS = 3


def generation_parts(mc: ModelConfigs, req: PlanRequest, modes: Modes | None = None) -> tuple[G.Parts, HollowPlan | None]:
    """``generate``'s parts with fake weights of ``mc``'s shapes, in one FakeTensorMode; the cut two-path runs
    (None: one U-Net pass, merged or plain LoRA or the fine-tuned U-Net) and the LoRA of ``req`` (shapes only)."""
    from diffusers import AutoencoderKL  # lazily: diffusers takes seconds to import

    if not mc.knows_generation:
        raise HollownetError(f"generation for {mc.name}: its text encoder or VAE config is not known")
    family = family_of_config(mc.unet)
    configs = mc.text_configs
    modes = modes or req.modes
    G.check_generation_modes(modes, req.merged and req.method != "full")
    skeleton = meta_unet(mc.unet)
    cut = _cut(skeleton, req, rank=req.rank)
    lora = None
    if req.method != "full":
        targets = lora_outside(skeleton, cut.hollow_prefixes(skeleton) if cut else [], req.lora_targets)
        lora = G.LoraWeights(targets, req.rank, float(req.lora_alpha or req.rank))
    with torch.device("meta"):
        models = {"unet": skeleton, "vae": AutoencoderKL.from_config(mc.vae),
                  **{folder: build_text_encoder(config, family.pools(folder)) for folder, config in configs.items()}}
    mode = _fake_mode()
    sources = {}
    for name, module in models.items():
        sources[name] = FakeSource.for_module(module)
        sources[name].mode = mode  # one mode: the parts' tensors meet in the same computation
    parts = G.Parts(unet_config=mc.unet, text_configs=configs, vae_config=mc.vae, source=sources.__getitem__,
                    token_ids=lambda prompts, tokenizer: torch.zeros(len(prompts), mc.text_len, dtype=torch.long),
                    scheduler_config=mc.scheduler or {}, lora=lora, modes=modes, device="cpu",
                    merged=req.merged and lora is not None, mode=mode, to_fake=mode.from_tensor,
                    pipeline_config=mc.pipeline_config)
    return parts, (cut if cut is not None and not req.merged else None)


def predict_generate(mc: ModelConfigs, req: PlanRequest, modes: Modes | None = None) -> dict:
    """``hollownet generate``'s peak for ``req`` (``modes``: instead of ``req.modes``), part by part, as
    ``run_generate`` measures it: ``generate.generate`` on fake parts (see the module docstring)."""
    parts, cut = generation_parts(mc, req, modes)
    meter = PartMeter(True, "cpu")
    G.generate(parts, cut, [("prompt", i) for i in range(req.num_images)], steps=req.gen_steps, run_steps=GENERATE_PREDICT_STEPS,
               resolution=req.resolution, guidance=req.guidance, meter=meter)
    return G.memory_record(meter)


def settle_stage1(mc: ModelConfigs, req: PlanRequest, peak=None) -> tuple[PlanRequest, dict | None]:
    """``(req with stage 1's layout decided, the whole sample-major prediction if it was made)``. Only the
    low-memory default is decided here (``Modes.stage1_unsettled``): sample-major if its predicted peak fits
    :data:`LOW_MEMORY_STAGE1_BUDGET`, else layer-major under it. ``hollownet train`` (``workflow``) and
    ``hollownet plan`` both decide here, so the plan is the run. ``peak``: the sample-major request's stage-1
    peak from the caller's own cache (``fit_budget``'s, per part); by default predicted whole here."""
    if not req.modes.stage1_unsettled:
        return req, None
    sample_major = replace(req, modes=replace(req.modes, layer_major=False))
    pred = predict_precompute(mc, sample_major) if peak is None else None
    if (pred["peak_bytes"] if pred else peak(sample_major)) <= parse_size(LOW_MEMORY_STAGE1_BUDGET):
        return sample_major, pred
    return replace(req, modes=replace(req.modes, layer_major=True, memory_budget=LOW_MEMORY_STAGE1_BUDGET)), pred


def predict_precompute(mc: ModelConfigs, req: PlanRequest, parts: tuple[str, ...] = PARTS) -> dict:
    """Stage 1's peak, part by part, as ``run_precompute`` measures it (``PartMeter.summary``): stage 1's
    own steps (``encoders``, ``precompute.make_shard``) on fake weights.

    ``parts``: which of :data:`PARTS` to predict (the text encoder and VAE do not depend on the cut).
    The U-Net part runs ``make_shard`` on the first shard, chunk by chunk, exactly as stage 1 does.
    """
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    req, sample_major = settle_stage1(mc, req)
    if sample_major is not None and not req.modes.layer_major and parts == PARTS:
        return sample_major  # the decision's own prediction: this one
    pcfg = req.precompute_config()  # stage 1's own validation and defaults
    if pcfg.layer_major:
        return predict_precompute_layer_major(mc, req, parts)
    dtype = torch_dtype(pcfg.precision)
    meter = PartMeter(True, pcfg.device)
    n_photos = req.photos + req.class_photos
    h, w = latent_size(mc, req.resolution)
    if mc.text_encoder is not None and mc.text_encoder_2 is not None and "text encoder" in parts:  # families.SDXL
        for part, config, cls in (("text encoder", mc.text_encoder, CLIPTextModel),
                                  ("text encoder 2", mc.text_encoder_2, CLIPTextModelWithProjection)):
            with torch.device("meta"):
                encoder = cls(CLIPTextConfig(**config))
            with _fake_mode():
                materialize(encoder.eval(), dtype, persistent_only=False)
                E.embed_penultimate(encoder, torch.zeros(req.prompts, mc.text_len, dtype=torch.long), pcfg.device, meter,
                                    part=part)
    elif mc.text_encoder is not None and "text encoder" in parts:  # precompute.embed_prompts
        with torch.device("meta"):
            encoder = CLIPTextModel(CLIPTextConfig(**mc.text_encoder))
        with _fake_mode():
            materialize(encoder.eval(), dtype, persistent_only=False)  # from_pretrained makes every buffer
            E.embed(encoder, torch.zeros(req.prompts, mc.text_len, dtype=torch.long), pcfg.device, meter)
    if mc.vae is not None and "VAE encoder" in parts:  # precompute.encode_photos (no decoder, no post_quant_conv)
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(mc.vae)
        with _fake_mode():
            vae_dtype = family_of_config(mc.unet).vae_dtype(dtype)  # SDXL's VAE in fp32 for fp16, as stage 1 runs it
            materialize(vae.eval(), vae_dtype, skip=["decoder", "post_quant_conv"])
            pixels = torch.empty(n_photos, vae.config.in_channels, req.resolution, req.resolution)
            E.encode_latents(vae, pixels, pcfg.seed, vae_dtype, pcfg.device, pcfg.batch_size, meter)
    if "U-Net encoder + hollow" not in parts:
        return _summary(meter)
    unet = plan = None  # the first shard through precompute.make_shard itself
    if req.method == "hollow":
        unet = meta_unet(mc.unet).requires_grad_(False).eval()
        plan = _cut(unet, req)
        skip = kept_up_modules(unet, plan)
    sched_cfg = mc.scheduler or {"prediction_type": "epsilon"}
    table = sample_table(req.photos, req.class_photos, pcfg, int(sched_cfg.get("num_train_timesteps", 1000)))
    with _fake_mode():
        scheduler = DDPMScheduler.from_config(sched_cfg)
        if unet is not None:
            materialize(unet, dtype, skip=skip)
        latents = torch.empty(n_photos, mc.unet.get("in_channels", 4), h, w)
        embeds = torch.empty(req.prompts, mc.text_len, mc.text_dim)
        with meter.measure("U-Net encoder + hollow", *([unet] if unet is not None else [])):
            make_shard(table[: pcfg.shard_size], latents, embeds, scheduler, unet, plan, dtype, pcfg,
                       cond=_sample_conditioning(mc, embeds, n_photos))
    return _summary(meter)


def predict_precompute_layer_major(mc: ModelConfigs, req: PlanRequest, parts: tuple[str, ...] = PARTS) -> dict:
    """Layer-major stage 1's peak (``layerwise.predict_peak``: its own loop on fake weights), in
    ``predict_precompute``'s format; ``parts`` holds each part's largest layer, ``peak_phase`` names the layer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    pcfg = req.precompute_config()
    budget, dtype = budget_bytes(pcfg), torch_dtype(pcfg.precision)
    unet = meta_unet(mc.unet).requires_grad_(False).eval()
    plan = _cut(unet, req) if "U-Net encoder + hollow" in parts else None
    vae = text = None
    with torch.device("meta"):
        if mc.vae is not None and "VAE encoder" in parts:
            vae = AutoencoderKL.from_config(mc.vae).requires_grad_(False).eval()
        if mc.text_encoder is not None and "text encoder" in parts:
            text = CLIPTextModel(CLIPTextConfig(**mc.text_encoder)).requires_grad_(False).eval()
    sdxl_text = text is not None and mc.text_encoder_2 is not None  # both encoders: lowmem/sdxl_text.py's own loop
    pred = predict_peak(unet, plan, vae=vae, text=None if sdxl_text else text, resolution=req.resolution,
                        num_samples=pcfg.num_samples + validation_count(pcfg.num_samples, pcfg.shard_size),
                        photos=req.photos + req.class_photos, prompts=req.prompts,
                        budget=budget, batch_size=pcfg.batch_size, dtype=dtype,
                        vae_dtype=family_of_config(mc.unet).vae_dtype(dtype))
    if sdxl_text:
        meter = PartMeter(True, pcfg.device)
        predict_sdxl_text(configs=(mc.text_encoder, mc.text_encoder_2), prompts=req.prompts, meter=meter, budget=budget,
                          batch_size=pcfg.batch_size, dtype=dtype, device=pcfg.device)
        pred["summary"] = _merged_summary(pred["summary"], meter.summary(always=True))
    grouped: dict[str, int] = {}
    for layer, peak in pred["summary"]["parts"].items():
        part = layer.split(":")[0]
        grouped[part] = max(grouped.get(part, 0), peak)
    return {**pred["summary"], "parts": grouped, "layer_major": True, "memory_budget": budget,
            "spilled_bytes": pred["unet_spilled_bytes"]}


def _merged_summary(a: dict, b: dict) -> dict:
    """Two ``PartMeter.summary()`` of one stage's parts as one: every part, the peak and breakdown of the largest."""
    top = a if a["peak_bytes"] >= b["peak_bytes"] else b
    cuda = max(a.get("cuda_max_allocated") or 0, b.get("cuda_max_allocated") or 0) or None
    return {**top, "cuda_max_allocated": cuda, "parts": {**a["parts"], **b["parts"]}}


def _summary(meter: PartMeter) -> dict:
    return {**meter.summary(always=True), "reports": dict(meter.parts)}


# ---------------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """Everything ``hollownet plan`` prints."""

    request: PlanRequest
    model: ModelConfigs
    precompute: dict | None
    train: MemoryReport | None
    inference: dict[int, MemoryReport]
    info: dict
    seconds: float
    generate: dict | None = None  # generate.memory_record of the prediction: peak, part, breakdown, parts

    @property
    def generate_peak(self) -> int:
        return self.generate["peak_bytes"] if self.generate else 0

    @property
    def whole_run_peak(self) -> int:
        """The whole experience: the largest of stage 1, stage 2 and generation."""
        return max(self.precompute_peak, self.train_peak, self.generate_peak)

    @property
    def precompute_peak(self) -> int:
        return self.precompute["peak_bytes"] if self.precompute else 0

    @property
    def train_peak(self) -> int:
        return self.train.peak_bytes if self.train else 0

    @property
    def inference_peak(self) -> int:
        return self.inference[min(self.inference)].peak_bytes if self.inference else 0

    @property
    def peak(self) -> int:
        """What a personalization run needs: its larger stage."""
        return max(self.precompute_peak, self.train_peak)

    def to_json(self) -> dict:
        req = self.request
        inf1 = self.inference.get(1)
        d = {
            "model": self.model.name,
            "method": req.method,
            "hollow_blocks": self.info.get("hollow_blocks"),
            "fraction": self.info.get("fraction"),
            "depth": self.info.get("depth"),
            "cut_why": self.info.get("cut_why"),
            "lora_targets_removed_share": self.info.get("lora_targets_removed_share"),  # of the modules LoRA targets
            "rank": req.rank if req.method != "full" else None,
            "resolution": req.resolution,
            "batch": req.batch,
            "precision": req.modes.precision,
            "compute_dtype": req.modes.compute,
            "grad_checkpointing": req.modes.checkpointing,  # as run: streaming turns it on
            "stream_weights": req.modes.stream_weights,
            "optimizer": req.modes.optimizer,
            "units": "bytes",
            "precompute_peak_bytes": self.precompute_peak if self.precompute else None,  # None: stage not predicted
            "train_peak_bytes": self.train_peak if self.train else None,
            "inference_peak_bytes": (inf1.peak_bytes if inf1 else self.inference_peak) if self.inference else None,
            "inference_peak_bytes_by_batch": {str(b): r.peak_bytes for b, r in self.inference.items()},
            "peak_bytes": self.peak,
            "generate_peak_bytes": self.generate_peak if self.generate else None,
            "whole_run_peak_bytes": self.whole_run_peak if self.generate else None,
            "generate_peak_part": self.generate["peak_part"] if self.generate else None,
            "generate": ({"steps": req.gen_steps, "guidance": req.guidance, "num_images": req.num_images,
                          "path": "merged" if req.merged else ("two-path" if req.method == "hollow" else "one pass"),
                          "precision": req.modes.precision, "compute_dtype": req.modes.compute}
                         if self.generate else None),
            "train_over_inference_bytes": self.train_peak - self.inference_peak if self.inference and self.train else None,
            "train_over_inference_ratio": round(self.train_peak / self.inference_peak, 4) if self.inference and self.train else None,
            "breakdown": {
                "train": dict(self.train.breakdown) if self.train else None,
                "train_weights": {"frozen": self.info.get("frozen_weight_bytes"), "trainable": self.info.get("trainable_weight_bytes")},
                "precompute": dict(self.precompute["breakdown"]) if self.precompute else None,
                "precompute_parts": dict(self.precompute["parts"]) if self.precompute else None,
                "inference": dict(inf1.breakdown) if inf1 else None,
                "generate": dict(self.generate["breakdown"]) if self.generate else None,
                "generate_parts": dict(self.generate["parts"]) if self.generate else None,
            },
            "train_peak_phase": self.train.peak_phase if self.train else None,
            "train_phase_peaks": dict(self.train.phase_peaks) if self.train else None,
            "precompute_peak_part": self.precompute["peak_phase"] if self.precompute else None,
            "params": {k: self.info.get(k) for k in ("unet_params", "hollow_params", "kept_params", "trainable_params", "lora_bytes_fp32")},
            "hollow_out_shape": self.info.get("hollow_out_shape"),
            "stage1": {"photos": req.photos, "class_photos": req.class_photos, "precompute_batch": req.precompute_batch,
                       "shard_samples": min(req.shard_size, req.num_samples), "precision": req.modes.compute,
                       "layer_major": bool(self.precompute and self.precompute.get("layer_major")),
                       "memory_budget_bytes": self.precompute.get("memory_budget") if self.precompute else None},
            "largest_streamed_unit_bytes": self.info.get("largest_streamed_unit_bytes"),
            "inference_definition": INFERENCE_DEFINITION,
            "notes": list(self.model.notes),
            "seconds": round(self.seconds, 2),
        }
        return d

    def format(self) -> str:
        req, info = self.request, self.info
        g = lambda n: f"{n / GiB:6.2f} GiB"  # noqa: E731
        if req.method == "hollow":
            what = f"hollow ({info['fraction']:.1%} of U-Net params hollowed: {', '.join(info['hollow_blocks'])}), LoRA r={req.rank}"
        elif req.method == "lora":
            what = f"LoRA r={req.rank} on the whole U-Net"
        else:
            what = "full fine-tuning"
        modes = req.modes
        weights = modes.precision + (f" (computed in {modes.compute})" if modes.precision != modes.compute else "")
        weights += ", streamed block by block" if modes.stream_weights else ""
        lines = [f"{self.model.name}: {what}"]
        if req.method == "hollow":
            lines += [f"  cut: {info['cut_why']}",
                      f"  the cut removes {info['lora_targets_removed_share']:.1%} of the layers LoRA targets "
                      f"({', '.join(req.lora_targets)})"]
        lines += [
            f"  {req.resolution} px, batch {req.batch}, frozen weights {weights}, "
            f"{'with' if modes.checkpointing else 'no'} gradient checkpointing, {modes.optimizer}",
            "",
            "predicted peak tensor memory (1 GiB = 2^30 bytes; fake tensors, no weights loaded)",
        ]
        if self.precompute:
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.precompute["parts"].items())
            how = "largest part of"
            if self.precompute.get("layer_major"):
                budget = self.precompute.get("memory_budget")
                how = ("layer-major" + (f", budget {budget / 2**20:.0f} MiB" if budget else "")
                       + f", {modes.compute}; peak at {self.precompute['peak_phase']}; largest layer per part")
            lines.append(f"  pre-compute (stage 1)  {g(self.precompute_peak)}   {how}: {parts}")
        if self.train:
            lines.append(f"  training (stage 2)     {g(self.train_peak)}   peak in {self.train.peak_phase}")
        for b, r in self.inference.items():
            label = "inference" + (f", batch {b}" if b != 1 else "")
            what = (f"U-Net only ({modes.compute}), one denoising step, no grad"
                    + (", batch 2 = classifier-free guidance" if b == 2 else ""))
            lines.append(f"  {label:<22} {g(r.peak_bytes)}   {what}")
        if self.generate:
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.generate["parts"].items())
            path = "merged" if req.merged else ("two-path" if req.method == "hollow" else "one pass")
            lines.append(f"  generation             {g(self.generate_peak)}   {modes.precision}, {path}, "
                         f"{'CFG batch 2' if req.guidance > 1 else 'no CFG'}, each part in turn: {parts}")
            lines.append(f"  whole run              {g(self.whole_run_peak)}   the largest of pre-compute, training and generation")
            lines.append("  (train --sample-every: each sample image is this generation, the training state freed meanwhile)")
        if self.train and self.inference:
            delta = self.train_peak - self.inference_peak
            lines.append(f"  training - inference   {delta / GiB:+6.2f} GiB   "
                         f"({self.train_peak / self.inference_peak - 1:+.1%} vs batch-1 inference; the paper's 'Comp. w/ Inf.')")
        if self.train:
            bd = dict(self.train.breakdown)
            frozen, trainable = info.get("frozen_weight_bytes", 0), info.get("trainable_weight_bytes", 0)
            lines += ["", "breakdown at the training peak"]
            rows = [("weights (frozen)", frozen), ("weights (trained)", trainable),
                    ("weights (other)", bd.get("weights", 0) - frozen - trainable)]
            rows += [(k, bd.get(k, 0)) for k in KINDS if k != "weights"]
            for k, v in rows:
                if k == "weights (other)" and v == 0:
                    continue
                lines.append(f"  {k:<18} {format_bytes(v):>12}  {100 * v / max(1, self.train_peak):5.1f}%")
        m = lambda n: f"{n / 1e6:.1f}M"  # noqa: E731
        lines += ["", f"parameters: U-Net {m(info['unet_params'])}"
                  + (f", hollowed {m(info['hollow_params'])} (never loaded in stage 2), kept {m(info['kept_params'])}" if req.method == "hollow" else "")
                  + (f", trained {m(info['trainable_params'])}" + (f" (LoRA file {info['lora_bytes_fp32'] / 2**20:.0f} MiB fp32)" if req.method != "full" else ""))]
        lines.append(f"inference = {INFERENCE_DEFINITION}")
        lines += [f"note: {n}" for n in self.model.notes]
        lines.append(f"({self.seconds:.1f} s)")
        return "\n".join(lines)


def plan_memory(req: PlanRequest, *, stages=("precompute", "train", "inference", "generate"),
                model: ModelConfigs | None = None) -> MemoryPlan:
    """Predict the requested stages' peaks for ``req`` (``generate``: skipped, with a note, for a model whose
    text encoder or VAE config is not known)."""
    t0 = time.perf_counter()
    mc = model or load_model_configs(req.model)
    req.train_config()  # validate the combination before spending time (e.g. full needs fp32)
    req.precompute_config()
    _cut(meta_unet(mc.unet), req)  # an impossible fraction or cut fails here, in one line
    train = info = None
    if "train" in stages:
        train, info = predict_train(mc, req)
    else:
        skeleton = meta_unet(mc.unet)
        info = _param_info(mc, req, _cut(skeleton, req, rank=req.rank), None)
    pre = predict_precompute(mc, req) if "precompute" in stages else None
    if pre is not None and req.modes.stage1_unsettled and not pre.get("layer_major"):
        mc.notes.append(f"stage 1: sample-major, as its peak fits the {LOW_MEMORY_STAGE1_BUDGET} a low-memory run's "
                        "layer-major stage 1 would fill (--layer-major to run it layer-major anyway)")
    inference = {b: predict_inference(mc, req, b) for b in req.inference_batches} if "inference" in stages else {}
    gen = None
    if "generate" in stages:
        if not mc.knows_generation:
            mc.notes.append("generation: the text encoder or VAE config is not known; not predicted")
        else:
            gen = predict_generate(mc, req)
    return MemoryPlan(request=req, model=mc, precompute=pre, train=train, inference=inference, info=info,
                      seconds=time.perf_counter() - t0, generate=gen)


# ------------------------------------------------------------------------------------ budget

#: Bytes per weight at least, per frozen-weight precision (quantization scales not counted: a lower bound).
_MIN_BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "nf4": 0.5}
IB = "adamw-in-backward"


@dataclass
class Candidate:
    method: str
    depth: int | None
    fraction: float
    hollow_blocks: list[str] | None
    precision: str
    grad_checkpointing: bool
    lower_bound: int  # weights + trained params' grads and AdamW state: the step's peak is at least this
    stream_weights: bool = False
    in_backward: bool = False  # optimizer adamw-in-backward
    precompute_peak: int | None = None
    train_peak: int | None = None
    generate_precision: str | None = None  # the best-fidelity generation precision that fits (hollownet generate --precision)
    generate_peak: int | None = None

    @property
    def peak(self) -> int | None:
        """The whole experience: stage 1, stage 2 and (where predicted) generation."""
        if self.train_peak is None:
            return None
        return max(self.train_peak, self.precompute_peak or 0, self.generate_peak or 0)

    @property
    def fidelity_key(self):
        """Expected fidelity cost, least first: nf4 weights last of all (their output error is an order of
        magnitude above the others', see benchmarks/README.md), then less hollowing, then fp32 < bf16 < int8
        weights, then global before per-tensor gradient clipping (adamw-in-backward); checkpointing and
        streaming cost only time."""
        return (self.precision == "nf4", self.fraction, PRECISIONS.index(self.precision), self.in_backward,
                self.grad_checkpointing, self.stream_weights)

    def label(self) -> str:
        if self.method == "lora":
            return "LoRA (no hollow)"
        blocks = self.hollow_blocks or []
        short = ",".join(b.replace(".downsamplers", ".ds").replace(".upsamplers", ".us").replace(".resnets.", ".r")
                         .replace(".attentions.", ".a").replace("down_blocks.", "d").replace("up_blocks.", "u")
                         .replace("mid_block", "mid") for b in blocks)
        return f"hollow {self.fraction:5.1%} [{short}]"

    def flags(self) -> list[str]:
        """``hollownet train`` flags for this setting."""
        out = ["--method lora"] if self.method == "lora" else [f"--hollow-blocks {','.join(self.hollow_blocks)}"]
        out.append(f"--precision {self.precision}")
        out += ["--stream-weights"] if self.stream_weights else (["--grad-checkpointing"] if self.grad_checkpointing else [])
        out += [f"--optimizer {IB}"] if self.in_backward else []
        return out

    def generate_flags(self) -> list[str]:
        """``hollownet generate`` flags for this setting."""
        return [f"--precision {self.generate_precision}"] if self.generate_precision else []

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_bytes"] = self.peak
        return d


#: (precision, checkpointing, streamed, in-backward) settings tried per cut: float weights as they
#: are, quantized ones with checkpointing (without it activations dominate), streamed (hollow only).
MODES = ([(p, ck, False, False) for p in ("fp32", "bf16") for ck in (False, True)]
         + [(p, True, False, ib) for p in ("int8", "nf4") for ib in (False, True)]
         + [(p, True, True, ib) for p in ("fp32", "bf16") for ib in (False, True)])


def candidates(mc: ModelConfigs, req: PlanRequest, modes=MODES) -> list[Candidate]:
    """Plain LoRA and every valid hollow cut, in each of ``modes``, best expected fidelity first."""
    skeleton = meta_unet(mc.unet)
    mods = dict(skeleton.named_modules())
    total = sum(p.numel() for p in skeleton.parameters())
    out = []
    cuts = [("lora", None, 0.0, None, [])] + [
        ("hollow", p.depth, p.fraction, p.hollow_blocks, p.hollow_prefixes(skeleton)) for p in all_plans(skeleton)
    ]
    for method, depth, fraction, blocks, skip in cuts:
        kept = total - sum(p.numel() for n in skip for p in mods[n].parameters())
        lora = sum(lora_size(mods[n], req.rank) for n in lora_target_modules(skeleton, skip, tuple(req.lora_targets)))
        for precision, ckpt, stream, ib in modes:
            if stream and method != "hollow":
                continue
            weights = 0 if stream else int(kept * _MIN_BYTES_PER_WEIGHT[precision])
            # fp32 LoRA: weight and 2 AdamW moments, plus its gradients unless they are applied inside backward
            out.append(Candidate(method, depth, fraction, blocks, precision, ckpt, stream_weights=stream, in_backward=ib,
                                 lower_bound=weights + lora * (12 if ib else 16)))
    return sorted(out, key=lambda c: c.fidelity_key)


@dataclass
class BudgetAnswer:
    budget: int
    fits: list[Candidate]
    evaluated: list[Candidate]
    smallest: Candidate | None
    seconds: float
    request: PlanRequest
    model: str
    top: int = 5

    def to_json(self) -> dict:
        return {"model": self.model, "budget_bytes": self.budget, "rank": self.request.rank,
                "resolution": self.request.resolution, "batch": self.request.batch, "optimizer": self.request.modes.optimizer,
                "fits": [c.to_dict() for c in self.fits],
                "smallest": self.smallest.to_dict() if self.smallest else None,
                "ranking": "nf4 frozen weights last; then less hollowing first, then fp32 < bf16 < int8 frozen weights, then AdamW "
                           "before adamw-in-backward (per-tensor clipping), then without checkpointing, then without streaming "
                           "(they cost time only)",
                "seconds": round(self.seconds, 2)}

    def format(self) -> str:
        req = self.request
        head = (f"{self.model}: settings whose peak (max of pre-compute, training and generation) fits in {self.budget / GiB:.2f} GiB "
                f"({self.budget:,} bytes); LoRA r={req.rank}, {req.resolution} px, batch {req.batch}, {req.modes.optimizer}")
        lines = [head, "ranked by expected fidelity cost: nf4 weights last (10x the output error of int8); then less hollowing, "
                       "then fp32 < bf16 < int8 weights, then global gradient clipping (AdamW) before per-tensor (in-backward); "
                       "checkpointing and streaming cost only time", ""]
        lines.append(f"  {'#':>2}  {'setting':<44} {'weights':<11} {'ckpt':<5} {'AdamW':<9} {'stage 1':>9} {'training':>9} "
                     f"{'generation':>16} {'peak':>9}")
        gen = lambda c: (f"{c.generate_precision} {c.generate_peak / GiB:5.2f} G" if c.generate_precision else "-")  # noqa: E731
        for i, c in enumerate(self.fits, 1):
            weights = c.precision + (" stream" if c.stream_weights else "")
            lines.append(f"  {i:>2}  {c.label():<44} {weights:<11} {'yes' if c.grad_checkpointing else 'no':<5} "
                         f"{'in-bwd' if c.in_backward else 'after':<9} "
                         f"{c.precompute_peak / GiB:7.2f} G {c.train_peak / GiB:7.2f} G {gen(c):>16} {c.peak / GiB:7.2f} G")
        best = self.fits[0]
        more = f"the {self.top} best shown (--top 0: all); " if self.top and len(self.fits) >= self.top else ""
        lines += ["", f"best fidelity that fits: hollownet train ... {' '.join(best.flags())} --rank {req.rank}"]
        if best.generate_precision:
            lines.append(f"                    then: hollownet generate ... {' '.join(best.generate_flags())}")
        lines += [f"(G = GiB; {more}{len(self.evaluated)} settings predicted, others ruled out by their weights alone; {self.seconds:.0f} s)"]
        return "\n".join(lines)


#: Generation precisions tried by ``--budget``, best fidelity first (generate does not stream weights yet).
GENERATE_PRECISIONS = ("fp32", "bf16", "int8", "nf4")


def fit_budget(req: PlanRequest, budget: int, *, top: int = 5, progress=None, model: ModelConfigs | None = None) -> BudgetAnswer:
    """Which (cut, precision, checkpointing, streaming, optimizer) settings fit ``budget``, best expected fidelity first.

    Generation is part of the experience: a setting fits only if ``hollownet generate`` fits too, in the
    best-fidelity precision of :data:`GENERATE_PRECISIONS` that does (its ``generate_precision``); a model
    whose text encoder or VAE config is not known is planned without it (a note says so).

    Candidates are tried in fidelity order; the first ``top`` that fit are returned (``top=0``: all).
    A candidate whose weights, gradients and AdamW state alone exceed the budget is ruled out without
    a prediction; otherwise its training step is predicted exactly, then (if that fits) its stage 1
    (once per cut and precision). If nothing fits, raises :class:`BudgetError` naming the smallest
    achievable peak (branch and bound on the same lower bound, so it is exact too).
    """
    t0 = time.perf_counter()
    mc = model or load_model_configs(req.model)
    cands = candidates(mc, req)
    with_generation = mc.knows_generation
    if not with_generation:
        mc.notes.append("generation: the text encoder or VAE config is not known; the budget covers training only")
    stage1: dict = {}
    evaluated: list[Candidate] = []

    plain_optimizer = "adamw" if req.modes.in_backward else req.modes.optimizer

    layouts: dict = {}  # (method, cut, compute dtype) -> stage 1's settled (layer_major, memory_budget)

    def stage1_part(r: PlanRequest, parts: tuple[str, ...]) -> int:
        """One of stage 1's part groups for ``r`` (text encoder + VAE: the same for every cut; the U-Net part
        per cut), cached per dtype and layout: the layout decision and the candidates' peaks share it."""
        pcfg = r.precompute_config()
        key = (parts, pcfg.precision, pcfg.layer_major, pcfg.memory_budget) + ((r.method, r.depth) if parts == PARTS[2:] else ())
        if key not in stage1:
            stage1[key] = predict_precompute(mc, r, parts=parts)["peak_bytes"]
        return stage1[key]

    def stage1_peak(r: PlanRequest) -> int:
        return max(stage1_part(r, PARTS[:2]), stage1_part(r, PARTS[2:]))

    def sub(c: Candidate) -> PlanRequest:
        modes = replace(req.modes, precision=c.precision, grad_checkpointing=c.grad_checkpointing,
                        stream_weights=c.stream_weights, optimizer=IB if c.in_backward else plain_optimizer,
                        compute_dtype=req.modes.compute_dtype if c.precision in QUANTIZED_PRECISIONS else None)
        r = replace(req, method=c.method, depth=c.depth, hollow=None, hollow_blocks=None, modes=modes)
        if modes.stage1_unsettled:  # decided once per what sample-major stage 1 depends on
            key = (c.method, c.depth, modes.compute)
            if key not in layouts:
                layouts[key] = settle_stage1(mc, r, peak=stage1_peak)[0].modes.stage1
            r = replace(r, modes=replace(modes, layer_major=layouts[key][0], memory_budget=layouts[key][1]))
        return r

    def train(c: Candidate) -> int:
        if c.train_peak is None:
            c.train_peak = predict_train(mc, sub(c))[0].peak_bytes
            evaluated.append(c)
            if progress:
                progress(c)
        return c.train_peak

    def front(c: Candidate) -> int:
        """Stage 1's text encoder and VAE parts: the same for every cut (cached per dtype and layout)."""
        return stage1_part(sub(c), PARTS[:2])

    def pre(c: Candidate) -> int:
        c.precompute_peak = stage1_peak(sub(c))
        return c.precompute_peak

    gen_cache: dict = {}
    unet_params = sum(p.numel() for p in meta_unet(mc.unet).parameters())

    def gen_peak(c: Candidate, precision: str) -> int:
        key = (c.method, c.depth, precision)
        if key not in gen_cache:
            gen_modes = Modes(precision=precision, compute_dtype=req.modes.compute_dtype if precision in QUANTIZED_PRECISIONS else None).on(req.device)
            gen_cache[key] = predict_generate(mc, replace(sub(c), modes=gen_modes), gen_modes)["peak_bytes"]
        return gen_cache[key]

    def generation(c: Candidate, limit: int | None) -> int | None:
        """The best-fidelity generation precision whose peak fits ``limit`` (None: the smallest), set on ``c``."""
        if not with_generation:
            return 0
        for precision in GENERATE_PRECISIONS if limit is not None else GENERATE_PRECISIONS[-1:]:
            if limit is not None and unet_params * _MIN_BYTES_PER_WEIGHT[precision] > limit:
                continue  # its U-Net weights alone are over
            peak = gen_peak(c, precision)
            if limit is None or peak <= limit:
                c.generate_precision, c.generate_peak = precision, peak
                return peak
        return None

    fits: list[Candidate] = []
    for c in cands:
        if c.lower_bound > budget or front(c) > budget or train(c) > budget or pre(c) > budget:
            continue
        if generation(c, budget) is None:
            continue
        fits.append(c)
        if top and len(fits) >= top:
            break
    if not fits:
        best, best_peak = None, None
        bound = lambda c: max(c.lower_bound, front(c))  # noqa: E731  (stage 1's first parts are cut-independent)
        for c in sorted(cands, key=lambda c: (bound(c), c.lower_bound)):
            if best_peak is not None and bound(c) >= best_peak:
                break
            peak = max(train(c), pre(c), generation(c, None))
            if best_peak is None or peak < best_peak:
                best, best_peak = c, peak
        raise BudgetError(
            f"nothing fits in {budget / GiB:.2f} GiB ({budget:,} bytes) at LoRA r={req.rank}, {req.resolution} px, batch {req.batch}: "
            f"the smallest peak is {best_peak / GiB:.2f} GiB ({best.label().strip()}: {' '.join(best.flags()[1:])}); "
            "raise --budget or lower --resolution, --batch or --rank",
            smallest=best,
        )
    return BudgetAnswer(budget=budget, fits=fits, evaluated=evaluated, smallest=None, top=top,
                        seconds=time.perf_counter() - t0, request=req, model=mc.name)


class BudgetError(HollownetError):
    def __init__(self, message: str, smallest: Candidate | None = None):
        super().__init__(message)
        self.smallest = smallest


def predict_figures(settings: dict, stages=("precompute", "train", "inference")) -> dict:
    """``plan_memory`` of a flat ``settings`` dict (PlanRequest's and Modes' names), as JSON: a picklable
    entry point for worker processes."""
    modes, settings = Modes.split(settings)
    for key in ("lora_targets", "inference_batches"):
        if key in settings and settings[key] is not None:
            settings[key] = tuple(settings[key])
    return plan_memory(PlanRequest(**settings, modes=modes), stages=tuple(stages)).to_json()


def predict_many(tasks: list[tuple[dict, tuple[str, ...]]], jobs: int = 1, progress=None) -> list[dict]:
    """``predict_figures`` for many (settings, stages) pairs, in ``jobs`` worker processes; results in order."""
    if jobs <= 1 or len(tasks) <= 1:
        out = []
        for settings, stages in tasks:
            out.append(predict_figures(settings, stages))
            if progress:
                progress(out[-1])
        return out
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(predict_figures, settings, stages) for settings, stages in tasks]
        out = []
        for f in futures:
            out.append(f.result())
            if progress:
                progress(out[-1])
        return out
