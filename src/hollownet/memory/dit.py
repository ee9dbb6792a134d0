"""``hollownet plan`` for a diffusion transformer (SD3 / SD3.5): the planner's DiT branch.

``planner.plan_memory`` hands a model whose family's backbone is a transformer (``families.SD3``) here. As for
the U-Nets, each stage's own code runs on fake tensors (``FakeTensorMode``: shapes, no storage) under the
:class:`~hollownet.memory.tracker.MemoryTracker` a run measures with:

* **stage 1** (``stages/dit.py``'s ``run_dit_precompute``): its parts in turn, each loaded, used and dropped: the
  two CLIP encoders (``SD3.encode_with``, what stage 1's ``encode_prompts`` runs), the VAE encoder
  (``encoders.encode_latents``), the transformer's prefix on the first shard (``stages.dit.make_shard``; only the
  prefix's weights exist). LoRA FT has no prefix part.
* **stage 2**: the trainer's own ``stages.dit.train_step`` (forward, flow loss, backward, clipping, AdamW) on a
  store-shaped batch, the suffix's weights only (the prefix stays on the meta device) with LoRA in fp32; the
  step measured is a run's second (AdamW's state made by a step on zero gradients), its peak.
* **inference**: one no-grad step of the whole transformer (``dit_memory.predict_forward``), batch 1 and 2 (CFG).

What ``hollownet train`` does not run for SD3 yet -- ``--method lora`` (LoRA FT: the whole transformer from the
latent), ``--precision bf16|fp16`` -- is predicted by the same code with those settings and labelled in the
plan's notes as a prediction of a run hollownet cannot make yet. What this branch cannot predict exactly
(quantized or streamed weights, ``adamw-in-backward``, layer-major stage 1, prior preservation, full fine-tuning,
``--merged``) is refused in one line: no number for another run. Generation is *modelled* (:data:`GENERATE_NOTE`),
not the stock pipeline's own call: said so in every plan's notes.
"""

from __future__ import annotations

import time

import torch

from hollownet import encoders as E
from hollownet.builder import add_lora, init_lora
from hollownet.dit_cut import make_prefix_plan, meta_transformer, suffix_lora_targets
from hollownet.dit_memory import predict_forward
from hollownet.dit_split import num_blocks, prefix_modules, suffix_modules
from hollownet.errors import HollownetError
from hollownet.families import SD3_FAMILY
from hollownet.loading import vae_scale_factor
from hollownet.memory.configs import ModelConfigs
from hollownet.memory.fake import FakeScalars, fake_encoder_loader, fake_mode, materialize
from hollownet.memory.report import MemoryPlan
from hollownet.memory.tracker import MemoryReport, MemoryTracker, PartMeter
from hollownet.optimizers import make_optimizer
from hollownet.requests import PlanRequest
from hollownet.settings import FLOAT_PRECISIONS, torch_dtype
from hollownet.stages import dit as S

STAGE1_PARTS = ("text encoder", "text encoder 2", "VAE encoder", "transformer prefix")  # as run_dit_precompute meters them
NOT_TRAINED_YET = ("{what} is a prediction: 'hollownet train' does not run it for SD3 yet (fp32 prefix cuts only); "
                   "the same trainer code, on fake tensors, with those settings")


def check_request(req: PlanRequest) -> None:
    """Refuse, in one line, what the DiT branch cannot predict exactly (before anything is built)."""
    modes = req.modes
    if req.method == "full":
        raise HollownetError("--method full is not planned for SD3: use --method hollow (the prefix cut) or lora (LoRA FT)")
    if modes.precision not in FLOAT_PRECISIONS:
        raise HollownetError(f"--precision {modes.precision} is not planned for SD3: hollownet's SD3 path holds float "
                             f"weights only, so there is no run to predict; use --precision {'|'.join(FLOAT_PRECISIONS)}")
    if modes.stream_weights:
        raise HollownetError("--stream-weights is not planned for SD3: its path streams no blocks; drop it")
    if modes.optimizer == "adamw-in-backward":
        raise HollownetError("--optimizer adamw-in-backward is not planned for SD3: use adamw or adamw-foreach")
    if modes.layer_major or modes.memory_budget is not None:
        raise HollownetError("layer-major stage 1 (--layer-major / --memory-budget) is not planned for SD3: drop it")
    if req.class_photos:
        raise HollownetError("prior preservation (class photos) is not planned for SD3: drop it")
    if req.merged:
        raise HollownetError("--merged is not planned for SD3: its generation is one path already; drop --merged")
    if req.depth is not None:
        raise HollownetError("--depth names a U-Net cut: for SD3 give --hollow FRACTION or --hollow-blocks")


def request_k(skeleton, req: PlanRequest) -> int | None:
    """The prefix cut ``k`` of ``req`` (``None``: LoRA FT), as ``hollownet train`` picks it (``stages.dit.prefix_k``)."""
    if req.method == "lora":
        return None
    return S.prefix_k(skeleton, req.hollow, req.hollow_blocks)


def geometry(mc: ModelConfigs, resolution: int) -> tuple[tuple[int, int], int]:
    """``(latent height and width, text tokens)`` of a sample; a resolution the position table cannot cover is refused."""
    side = resolution // vae_scale_factor(mc.vae)
    patch, most = mc.unet["patch_size"], mc.unet.get("pos_embed_max_size")
    if side % patch:
        raise HollownetError(f"--resolution {resolution} gives a {side}-pixel latent, not a multiple of the patch size {patch}")
    if most is not None and side // patch > most:
        raise HollownetError(f"--resolution {resolution} is beyond this transformer's position table ({most} patches a "
                             f"side): use --resolution {most * patch * vae_scale_factor(mc.vae)} or less")
    return (side, side), mc.text_len + SD3_FAMILY.max_sequence_length


# ------------------------------------------------------------------------------------------- stage 2


def train_batch(net, k: int | None, batch: int, latent_hw, text_tokens: int, dtype) -> dict:
    """A store batch of these shapes (``Store.samples``' keys): the sample's latent, flow target and scalars (fp32),
    and the stored prefix in the run's dtype; LoRA FT reads the prompt tensors (fp32, as stored) instead."""
    cfg, width = net.config, net.inner_dim
    latent = (batch, cfg.in_channels, *latent_hw)
    out = dict(noisy=torch.empty(latent), target=torch.empty(latent), sigma=torch.empty(batch), timestep=torch.empty(batch),
               prompt_index=torch.zeros(batch, dtype=torch.long), weight=torch.empty(batch), loss_weight=torch.empty(batch))
    if k is None:
        out.update(embeds=torch.empty(batch, text_tokens, cfg.joint_attention_dim),
                   pooled_projections=torch.empty(batch, cfg.pooled_projection_dim))
    else:
        patches = (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)
        out.update(hidden_states=torch.empty(batch, patches, width, dtype=dtype), temb=torch.empty(batch, width, dtype=dtype))
        if k < num_blocks(net):
            out["encoder_hidden_states"] = torch.empty(batch, text_tokens, cfg.caption_projection_dim, dtype=dtype)
    return out


def predict_train(mc: ModelConfigs, req: PlanRequest, k: int | None) -> tuple[MemoryReport, dict]:
    """Stage 2's peak at prefix cut ``k`` (``None``: LoRA FT) and its weight accounting: the trainer's own step."""
    cfg = req.train_config()
    dtype = torch_dtype(req.modes.compute)
    latent_hw, text_tokens = geometry(mc, req.resolution)
    net = meta_transformer(mc.unet)
    add_lora(net, suffix_lora_targets(net, k or 0, tuple(req.lora_targets)), req.rank, req.lora_alpha)  # on meta
    net.requires_grad_(False)
    with fake_mode(), FakeScalars():
        materialize(net, dtype, skip=prefix_modules(net, k) if k is not None else ())  # the prefix is never loaded
        params = init_lora(net, dtype, "cpu")  # fp32, as peft makes them
        if req.modes.checkpointing:
            net.enable_gradient_checkpointing()
        optimizer = make_optimizer(params, req.modes.optimizer, cfg.lr, cfg.max_grad_norm)
        for p in params:  # the first step makes AdamW's state: the measured step is the run's peak
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        batch = train_batch(net, k, req.per_step, latent_hw, text_tokens, dtype)
        net.train()
        tracker = MemoryTracker(device="cpu").add_resident(net, optimizer)
        S.train_step(net, k, batch, params, optimizer, cfg, tracker)
        trainable = sum(p.numel() * p.element_size() for p in params)
        weights = sum(t.untyped_storage().nbytes() for t in [*net.parameters(), *net.buffers()] if not t.is_meta)
    return tracker.report, dict(trainable_weight_bytes=trainable, frozen_weight_bytes=weights - trainable)


def param_info(mc: ModelConfigs, req: PlanRequest, k: int | None) -> dict:
    """The plan's parameter accounting (the U-Net plan's keys: ``hollow`` is the frozen prefix)."""
    skeleton = meta_transformer(mc.unet)
    plan = make_prefix_plan(skeleton, k or 0, rank=req.rank, lora_targets=tuple(req.lora_targets))
    total, frozen = plan.total_params, plan.prefix_params if k is not None else 0
    removed = 1 - len(plan.lora_targets) / plan.lora_targets_total if k is not None else 0.0
    why = (f"prefix cut k={k} of {plan.num_blocks} blocks ({plan.frozen_blocks} frozen, {frozen / total:.1%} of the "
           "transformer's parameters): a plain DiT has no long skips, so its frozen part is a prefix")
    return {"unet_params": total, "hollow_params": frozen, "kept_params": total - frozen,
            "trainable_params": plan.lora_params, "lora_bytes_fp32": plan.lora_params * 4,
            "fraction": round(frozen / total, 4), "hollow_blocks": prefix_modules(skeleton, k) if k is not None else None,
            "depth": None, "prefix_k": k, "hollow_out_shape": _stored_tokens(mc, req) if k is not None else None, "num_blocks": plan.num_blocks, "cut_why": why if k is not None else None,
            "lora_targets_removed_share": round(removed, 4) if k is not None else None}


def _stored_tokens(mc: ModelConfigs, req: PlanRequest) -> list[int]:
    """Per sample, the shape of the image tokens stage 1 stores (beside the text tokens and ``temb``)."""
    (h, w), _ = geometry(mc, req.resolution)
    patch = mc.unet["patch_size"]
    return [(h // patch) * (w // patch), mc.unet["num_attention_heads"] * mc.unet["attention_head_dim"]]


# ------------------------------------------------------------------------------------------- stage 1


def predict_stage1(mc: ModelConfigs, req: PlanRequest, k: int | None) -> dict:
    """Stage 1's peak, part by part (:data:`STAGE1_PARTS`), as ``run_dit_precompute`` meters it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler  # lazily: seconds to import

    pcfg = req.precompute_config()
    dtype = torch_dtype(pcfg.precision)
    latent_hw, text_tokens = geometry(mc, req.resolution)
    meter = PartMeter(True, "cpu")
    _predict_text(mc, req.prompts, dtype, meter)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(mc.vae)
    with fake_mode():  # stages.precompute.encode_photos: the encoder only
        vae_dtype = SD3_FAMILY.vae_dtype(dtype)
        materialize(vae.eval(), vae_dtype, skip=["decoder", "post_quant_conv"])
        pixels = torch.empty(req.photos, vae.config.in_channels, req.resolution, req.resolution)
        latents = E.encode_latents(vae, pixels, pcfg.seed, vae_dtype, "cpu", pcfg.batch_size, meter)
    if k is not None:  # the prefix on the first shard, as run_dit_precompute computes it
        net = meta_transformer(mc.unet)
        table = S.sample_table(req.photos, pcfg, FlowMatchEulerDiscreteScheduler.from_config(mc.scheduler), [0] * req.photos)
        with fake_mode():
            materialize(net, dtype, skip=suffix_modules(net, k))
            net.requires_grad_(False).eval()
            prompts = {"embeds": torch.empty(req.prompts, text_tokens, mc.unet["joint_attention_dim"]),
                       "pooled_projections": torch.empty(req.prompts, mc.unet["pooled_projection_dim"])}
            latents = torch.empty(latents.shape)  # as stage 1 reads them back from the store
            with meter.measure("transformer prefix", net):
                S.make_shard(table[: pcfg.shard_size], latents, prompts, net, k, dtype, pcfg)
    return {**meter.summary(always=True), "reports": dict(meter.parts)}


def _predict_text(mc: ModelConfigs, prompts: int, dtype, meter: PartMeter) -> None:
    """Both CLIP encoders through the family's own ``encode_with``, each given fake weights as it loads."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection  # lazily: seconds to import

    with torch.device("meta"):
        built = {folder: CLIPTextModelWithProjection(CLIPTextConfig(**config))
                 for folder, config in (("text_encoder", mc.text_encoder), ("text_encoder_2", mc.text_encoder_2))}

    with fake_mode():
        tokens = lambda tokenizer: torch.zeros(prompts, mc.text_len, dtype=torch.long)  # noqa: E731
        SD3_FAMILY.encode_with(fake_encoder_loader(built, dtype), tokens, "cpu", meter,
                               width=mc.unet["joint_attention_dim"], dtype=dtype)


# ------------------------------------------------------------------------------------------- generation

#: What the generation figure is, in the plan's notes: a model of the stock pipeline's call, not the call itself.
GENERATE_NOTE = ("generation (SD3) is modelled, not the stock StableDiffusion3Pipeline's own call: every model resident at "
                 "--precision as the pipeline holds them (both CLIP encoders, the transformer with the LoRA in fp32, the "
                 "VAE), then the prompt and negative prompt encoded, one CFG-batch (2) transformer step, one VAE decode, "
                 "counted exactly on fake tensors; the scheduler's latent-sized temporaries are not. On the tiny SD3 pipeline "
                 "it is within 2% of the stock call, measured (tests/test_dit_plan.py)")


def predict_generate(mc: ModelConfigs, req: PlanRequest, k: int | None) -> dict:
    """``hollownet generate``'s peak, modelled (:data:`GENERATE_NOTE`), with each phase's peak as a part."""
    from diffusers import AutoencoderKL  # lazily: seconds to import
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    dtype = torch_dtype(req.modes.precision)
    latent_hw, text_tokens = geometry(mc, req.resolution)
    net = meta_transformer(mc.unet)
    add_lora(net, suffix_lora_targets(net, k or 0, tuple(req.lora_targets)), req.rank, req.lora_alpha)
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(mc.vae)
        encoders = [CLIPTextModelWithProjection(CLIPTextConfig(**c)) for c in (mc.text_encoder, mc.text_encoder_2)]
    with fake_mode(), torch.no_grad():
        for module in (net, vae, *encoders):
            materialize(module.requires_grad_(False).eval(), dtype, persistent_only=module is net or module is vae)
        init_lora(net, dtype, "cpu")
        tracker = MemoryTracker(device="cpu").add_resident(net, vae, *encoders)
        with tracker:
            with tracker.phase("text encoders"):
                embeds, pooled, each = _generation_prompts(encoders, mc, text_tokens, dtype)
            with tracker.phase("transformer"):
                latents = torch.empty(1, net.config.in_channels, *latent_hw, dtype=dtype)
                out = net(hidden_states=torch.cat([latents] * 2), encoder_hidden_states=embeds, pooled_projections=pooled,
                          timestep=torch.empty(2, dtype=dtype)).sample
                uncond, cond = out.chunk(2)
                latents = latents + (uncond + req.guidance * (cond - uncond)) * 0.1
                del out, uncond, cond, embeds, pooled, each
            with tracker.phase("VAE decoder"):
                image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
                del image
    report = tracker.report
    return {"peak_bytes": report.peak_bytes, "peak_part": report.peak_phase, "breakdown": dict(report.breakdown),
            "parts": dict(report.phase_peaks)}


def _generation_prompts(encoders, mc: ModelConfigs, text_tokens: int, dtype):
    """The pipeline's ``encode_prompt`` with CFG: each encoder on the prompt, then on the negative prompt; the CFG
    batch (negative first) and each prompt's own tensors, which the pipeline keeps while it denoises."""
    rows = []
    for _ in ("prompt", "negative"):
        states, pooled = [], []
        for encoder in encoders:
            out = encoder(torch.zeros(1, mc.text_len, dtype=torch.long), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, mc.unet["joint_attention_dim"] - clip.shape[-1]))
        t5 = torch.zeros(1, text_tokens - mc.text_len, clip.shape[-1], dtype=dtype)
        rows.append((torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)))
    return torch.cat([rows[1][0], rows[0][0]]), torch.cat([rows[1][1], rows[0][1]]), rows


# ------------------------------------------------------------------------------------------- the plan


def plan_dit(req: PlanRequest, mc: ModelConfigs, stages=("precompute", "train", "inference", "generate")) -> MemoryPlan:
    """``plan_memory`` for an SD3 / SD3.5 model (see the module docstring)."""
    t0 = time.perf_counter()
    check_request(req)
    req.train_config()
    req.precompute_config()
    k = request_k(meta_transformer(mc.unet), req)
    latent_hw, text_tokens = geometry(mc, req.resolution)
    dtype = torch_dtype(req.modes.compute)
    info = param_info(mc, req, k)
    train = None
    if "train" in stages:
        train, weights = predict_train(mc, req, k)
        info.update(weights)
    pre = predict_stage1(mc, req, k) if "precompute" in stages else None
    inference = {b: predict_forward(mc.unet, None, latent_hw=latent_hw, batch=b, dtype=dtype, text_tokens=text_tokens)
                 for b in req.inference_batches} if "inference" in stages else {}
    untrained = [what for what, yes in (("LoRA FT (--method lora)", req.method == "lora"),
                                        (f"--precision {req.modes.precision}", req.modes.precision != "fp32")) if yes]
    if untrained:
        mc.notes.append(NOT_TRAINED_YET.format(what=" and ".join(untrained)))
    gen = None
    if "generate" in stages:
        gen = predict_generate(mc, req, k)
        mc.notes.append(GENERATE_NOTE)
    return MemoryPlan(request=req, model=mc, precompute=pre, train=train, inference=inference, info=info,
                      seconds=time.perf_counter() - t0, generate=gen)
