"""Stage 2's, inference's and generation's peaks without weights: the stages' own code on fake tensors
(see ``memory/planner.py`` for how each stage is modelled)."""

from __future__ import annotations

import torch

from hollownet.builder import lora_outside
from hollownet.cut import HollowPlan, lora_size, lora_target_modules, make_plan, meta_unet, resolve_plan
from hollownet.errors import HollownetError
from hollownet.families import ADDED_COND_KEYS, family_of_config
from hollownet.loading import vae_scale_factor
from hollownet.lowmem.quant import frozen_weight_bytes
from hollownet.lowmem.sdxl_text import build as build_text_encoder
from hollownet.lowmem.stream import FakeSource
from hollownet.memory.configs import ModelConfigs
from hollownet.memory.fake import (FakeScalars, WithAddedCond, added_cond_inputs, fake_mode, hollow_out_shape_of, latent_size,
                                   materialize, request_cut)
from hollownet.memory.tracker import MemoryReport, MemoryTracker, PartMeter
from hollownet.optimizers import make_optimizer
from hollownet.requests import PlanRequest
from hollownet.settings import Modes, torch_dtype
from hollownet.stages import generate as G
from hollownet.stages.train import TrainConfig, train_step

INFERENCE_DEFINITION = (
    "one U-Net denoising step, no gradients: all U-Net weights in the chosen precision + the activations of "
    "unet(latents, t, text); text encoder and VAE not resident"
)


def predict_train(mc: ModelConfigs, req: PlanRequest) -> tuple[MemoryReport, dict]:
    """The peak of a training step (stage 2), as ``run_train`` measures it; and weight accounting."""
    plan = request_cut(meta_unet(mc.unet), req, rank=req.rank)
    report, extra = predict_step(mc.unet, req.train_config(), resolution=req.resolution, text_len=mc.text_len,
                                 text_dim=mc.text_dim, hollow_blocks=plan.hollow_blocks if plan else None,
                                 batch=req.per_step, prompts=req.prompts, vae_factor=vae_scale_factor(mc.vae),
                                 added_cond=mc.added_cond)
    info = param_info(mc, req, plan, None)
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
        shapes["hollow_out"] = (batch, *hollow_out_shape_of(unet_config, plan, (h, h), text_len, text_dim))
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
    with source.mode, FakeScalars():
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


def param_info(mc: ModelConfigs, req: PlanRequest, plan: HollowPlan | None, params) -> dict:
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
    with fake_mode():
        materialize(unet, dtype)
        x = torch.empty(batch, unet.config.in_channels, h, w, dtype=dtype)
        t = torch.zeros((), dtype=torch.long)
        text = torch.empty(batch, mc.text_len, mc.text_dim, dtype=dtype)
        added = added_cond_inputs(mc.added_cond, batch, dtype)
        model = unet if added is None else WithAddedCond(unet, added)
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
    cut = request_cut(skeleton, req, rank=req.rank)
    lora = None
    if req.method != "full":
        targets = lora_outside(skeleton, cut.hollow_prefixes(skeleton) if cut else [], req.lora_targets)
        lora = G.LoraWeights(targets, req.rank, float(req.lora_alpha or req.rank))
    with torch.device("meta"):
        models = {"unet": skeleton, "vae": AutoencoderKL.from_config(mc.vae),
                  **{folder: build_text_encoder(config, family.pools(folder)) for folder, config in configs.items()}}
    mode = fake_mode()
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
