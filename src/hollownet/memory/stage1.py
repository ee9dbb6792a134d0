"""Stage 1's peak without weights, and its layout (sample- or layer-major) decided before it runs: the one
decision ``hollownet train`` and ``hollownet plan`` both take (:func:`settle_stage1`)."""

from __future__ import annotations

from dataclasses import replace

import torch

from hollownet import encoders as E
from hollownet.cut import meta_unet
from hollownet.families import family_of_config
from hollownet.lowmem.layerwise import predict_peak
from hollownet.lowmem.sdxl_text import predict_peak as predict_sdxl_text
from hollownet.memory.configs import ModelConfigs
from hollownet.memory.fake import (fake_encoder_loader, fake_mode, latent_size, materialize, request_cut,
                                   sample_conditioning)
from hollownet.memory.sizes import parse_size
from hollownet.memory.tracker import PartMeter
from hollownet.requests import PlanRequest
from hollownet.settings import LOW_MEMORY_STAGE1_BUDGET, torch_dtype
from hollownet.stages.precompute import budget_bytes, kept_up_modules, make_shard, sample_table, validation_count

PARTS = ("text encoder", "VAE encoder", "U-Net encoder + hollow")  # stage 1's parts, as precompute.py names them


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


def plan_stage1(mc: ModelConfigs, req: PlanRequest) -> dict:
    """Stage 1 as ``hollownet train`` runs it for ``req``: its layout decided first (:func:`settle_stage1`, which
    ``workflow`` calls before stage 1 starts and passes down in ``PrecomputeConfig.modes``), then predicted."""
    settled, sample_major = settle_stage1(mc, req)
    if sample_major is not None and not settled.modes.layer_major:
        return sample_major  # the decision's own prediction: this one
    return predict_precompute(mc, settled)


def predict_precompute(mc: ModelConfigs, req: PlanRequest, parts: tuple[str, ...] = PARTS) -> dict:
    """Stage 1's peak, part by part, as ``run_precompute`` measures it (``PartMeter.summary``): stage 1's
    own steps (``encoders``, ``precompute.make_shard``) on fake weights.

    ``parts``: which of :data:`PARTS` to predict (the text encoder and VAE do not depend on the cut).
    The U-Net part runs ``make_shard`` on the first shard, chunk by chunk, exactly as stage 1 does.
    """
    from diffusers import AutoencoderKL, DDPMScheduler

    if req.modes.stage1_unsettled:  # else PrecomputeConfig would take layer-major, which a run may not
        raise ValueError("stage 1's layout is not decided: predict settle_stage1's request (plan_stage1 does)")
    pcfg = req.precompute_config()  # stage 1's own validation and defaults
    if pcfg.layer_major:
        return predict_precompute_layer_major(mc, req, parts)
    dtype = torch_dtype(pcfg.precision)
    meter = PartMeter(True, pcfg.device)
    n_photos = req.photos + req.class_photos
    h, w = latent_size(mc, req.resolution)
    if "text encoder" in parts and None not in mc.text_configs.values():  # precompute.embed_prompts
        _predict_text(mc, req.prompts, dtype, pcfg.device, meter)
    if mc.vae is not None and "VAE encoder" in parts:  # precompute.encode_photos (no decoder, no post_quant_conv)
        with torch.device("meta"):
            vae = AutoencoderKL.from_config(mc.vae)
        with fake_mode():
            vae_dtype = family_of_config(mc.unet).vae_dtype(dtype)  # SDXL's VAE in fp32 for fp16, as stage 1 runs it
            materialize(vae.eval(), vae_dtype, skip=["decoder", "post_quant_conv"])
            pixels = torch.empty(n_photos, vae.config.in_channels, req.resolution, req.resolution)
            E.encode_latents(vae, pixels, pcfg.seed, vae_dtype, pcfg.device, pcfg.batch_size, meter)
    if "U-Net encoder + hollow" not in parts:
        return _summary(meter)
    unet = plan = None  # the first shard through precompute.make_shard itself
    if req.method == "hollow":
        unet = meta_unet(mc.unet).requires_grad_(False).eval()
        plan = request_cut(unet, req)
        skip = kept_up_modules(unet, plan)
    sched_cfg = mc.scheduler or {"prediction_type": "epsilon"}
    table = sample_table(req.photos, req.class_photos, pcfg, int(sched_cfg.get("num_train_timesteps", 1000)))
    with fake_mode():
        scheduler = DDPMScheduler.from_config(sched_cfg)
        if unet is not None:
            materialize(unet, dtype, skip=skip)
        latents = torch.empty(n_photos, mc.unet.get("in_channels", 4), h, w)
        embeds = torch.empty(req.prompts, mc.text_len, mc.text_dim)
        with meter.measure("U-Net encoder + hollow", *([unet] if unet is not None else [])):
            make_shard(table[: pcfg.shard_size], latents, embeds, scheduler, unet, plan, dtype, pcfg,
                       cond=sample_conditioning(mc, embeds, n_photos))
    return _summary(meter)


def _predict_text(mc: ModelConfigs, prompts: int, dtype, device, meter: PartMeter) -> None:
    """Stage 1's text encoder part(s): the family's own ``encode_with`` (what stage 1's ``encode_prompts`` runs),
    each encoder built as the family loads it and given fake weights when it loads."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # lazily: seconds to import

    family = family_of_config(mc.unet)
    with torch.device("meta"):
        built = {folder: (CLIPTextModelWithProjection if family.pools(folder) else CLIPTextModel)(CLIPTextConfig(**config))
                 for folder, config in mc.text_configs.items()}

    with fake_mode():
        tokens = lambda tokenizer: torch.zeros(prompts, mc.text_len, dtype=torch.long)  # noqa: E731
        family.encode_with(fake_encoder_loader(built, dtype), tokens, device, meter)


def predict_precompute_layer_major(mc: ModelConfigs, req: PlanRequest, parts: tuple[str, ...] = PARTS) -> dict:
    """Layer-major stage 1's peak (``layerwise.predict_peak``: its own loop on fake weights), in
    ``predict_precompute``'s format; ``parts`` holds each part's largest layer, ``peak_phase`` names the layer."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    pcfg = req.precompute_config()
    budget, dtype = budget_bytes(pcfg), torch_dtype(pcfg.precision)
    unet = meta_unet(mc.unet).requires_grad_(False).eval()
    plan = request_cut(unet, req) if "U-Net encoder + hollow" in parts else None
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
