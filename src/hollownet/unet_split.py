"""The U-Net forward, split at the hollow: encode (kept down) -> hollow -> decode (kept up).

This follows the numbered stages of diffusers' ``UNet2DConditionModel.forward`` but walks the
ladder unit by unit (see ``plan.py``), so a cut may fall inside a block. Composed, the three parts
are the full U-Net forward (tested against ``unet(...)``). Training runs ``encode`` and ``decode``
with the stored hollow output in between; inference runs the hollow live.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hollownet.errors import HollownetError
from hollownet.cut import HollowPlan, Unit


@dataclass
class Context:
    """What every unit needs besides its input: time embedding and text conditioning."""

    emb: torch.Tensor
    text: torch.Tensor
    upsample: bool  # latent size not a multiple of 2**num_upsamplers: pass sizes explicitly
    grad_checkpointing: bool = False
    # ``unit_weights(unit)``: a context manager around each unit's forward (and its recomputation in
    # backward) that brings the unit's frozen weights in and out (``stream.StreamedWeights``).
    unit_weights: Callable | None = None


def make_context(unet: nn.Module, sample: torch.Tensor, timestep, text: torch.Tensor, grad_checkpointing=False,
                 added_cond_kwargs: dict | None = None, unit_weights: Callable | None = None) -> Context:
    """Stage 1 of diffusers' forward: time, class and added embeddings, text projection."""
    check_supported(unet)
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs or {})
    if aug is not None:
        emb = emb + aug
    if unet.time_embed_act is not None:
        emb = unet.time_embed_act(emb)
    factor = 2**unet.num_upsamplers
    upsample = any(d % factor for d in sample.shape[-2:])
    text = unet.process_encoder_hidden_states(encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs)
    return Context(emb=emb, text=text, upsample=upsample, grad_checkpointing=grad_checkpointing,
                   unit_weights=unit_weights)


# What the split forward follows of diffusers' forward. Anything else would be computed silently
# wrong, so it is refused (tested against unet(...) for each supported variant).
SUPPORTED_ADDED_EMBEDDINGS = (None, "text")


def check_supported(unet: nn.Module) -> None:
    cfg = unet.config
    if cfg.addition_embed_type not in SUPPORTED_ADDED_EMBEDDINGS:
        raise HollownetError(f"U-Nets with addition_embed_type={cfg.addition_embed_type!r} are not supported yet "
                             "(supported: none, 'text'); use an SD 1.x/2.x-style model")
    if cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
        raise HollownetError("U-Nets with class embeddings are not supported (the pipelines pass no class labels); "
                             "use an SD 1.x/2.x-style model")
    if cfg.time_cond_proj_dim is not None:
        raise HollownetError("U-Nets with a timestep_cond projection (LCM-style) are not supported yet")


def _run_unit(unet: nn.Module, unit: Unit, h: torch.Tensor, ctx: Context, skip=None, size=None) -> torch.Tensor:
    if ctx.unit_weights is not None:
        with ctx.unit_weights(unit):
            return _unit_forward(unet, unit, h, ctx, skip, size)
    return _unit_forward(unet, unit, h, ctx, skip, size)


def _unit_forward(unet: nn.Module, unit: Unit, h: torch.Tensor, ctx: Context, skip=None, size=None) -> torch.Tensor:
    blocks = unet.down_blocks if unit.side == "down" else unet.up_blocks
    block = blocks[unit.block]
    if unit.index is None:
        if unit.side == "down":
            for down in block.downsamplers:
                h = down(h)
        else:
            for up in block.upsamplers:
                h = up(h, size)
        return h
    if skip is not None:
        h = torch.cat([h, skip], dim=1)
    h = block.resnets[unit.index](h, ctx.emb)
    attentions = getattr(block, "attentions", None)
    if attentions is not None:
        h = attentions[unit.index](h, encoder_hidden_states=ctx.text, return_dict=False)[0]
    return h


def run_unit(unet, unit, h, ctx, skip=None, size=None):
    """One unit, recomputed in backward instead of stored when gradient checkpointing is on."""
    if ctx.grad_checkpointing and torch.is_grad_enabled():
        return checkpoint(_run_unit, unet, unit, h, ctx, skip, size, use_reentrant=False)
    return _run_unit(unet, unit, h, ctx, skip, size)


def run_down(unet, units: list[Unit], h, ctx: Context, skips: list[torch.Tensor]) -> torch.Tensor:
    """Down units in order; each appends its output to ``skips``."""
    for unit in units:
        h = run_unit(unet, unit, h, ctx)
        skips.append(h)
    return h


def run_up(unet, units: list[Unit], h, ctx: Context, skips: list[torch.Tensor], next_size=None) -> torch.Tensor:
    """Up units in order; pairs pop the last skip. ``next_size``: skip size after ``skips`` runs out."""
    for i, unit in enumerate(units):
        if unit.index is not None:
            h = run_unit(unet, unit, h, ctx, skip=skips.pop())
        else:
            last_block = unit.block == len(unet.up_blocks) - 1
            size = None
            if ctx.upsample and not last_block:
                size = skips[-1].shape[2:] if skips else next_size
            h = run_unit(unet, unit, h, ctx, size=size)
    return h


def run_mid(unet, h, ctx: Context) -> torch.Tensor:
    if getattr(unet.mid_block, "has_cross_attention", False):
        return unet.mid_block(h, ctx.emb, encoder_hidden_states=ctx.text)
    return unet.mid_block(h, ctx.emb)


def encode(unet, plan: HollowPlan, sample, ctx: Context) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """conv_in and the kept down units: the hollow's input and the kept skips."""
    if unet.config.center_input_sample:
        sample = 2 * sample - 1.0
    h = unet.conv_in(sample)
    skips = [h]
    h = run_down(unet, plan.kept_down, h, ctx, skips)
    return h, skips


def hollow(unet, plan: HollowPlan, h, ctx: Context, kept_skips: list[torch.Tensor]) -> torch.Tensor:
    """The hollow: inner down units, mid block, inner up units. Its own skips never leave it."""
    inner: list[torch.Tensor] = []
    h = run_down(unet, plan.hollow_down, h, ctx, inner)
    h = run_mid(unet, h, ctx)
    next_size = kept_skips[-1].shape[2:] if kept_skips else None
    return run_up(unet, plan.hollow_up, h, ctx, inner, next_size=next_size)


def decode(unet, plan: HollowPlan, h, ctx: Context, skips: list[torch.Tensor]) -> torch.Tensor:
    """The kept up units and the output head, from the hollow's output."""
    skips = list(skips)
    h = run_up(unet, plan.kept_up, h, ctx, skips)
    if unet.conv_norm_out is not None:
        h = unet.conv_act(unet.conv_norm_out(h))
    return unet.conv_out(h)


def full_forward(unet, plan: HollowPlan, sample, timestep, text) -> torch.Tensor:
    """encode -> hollow -> decode: the U-Net's output, computed the split way."""
    ctx = make_context(unet, sample, timestep, text)
    h, skips = encode(unet, plan, sample, ctx)
    h = hollow(unet, plan, h, ctx, skips)
    return decode(unet, plan, h, ctx, skips)


def hollowed_forward(unet, plan: HollowPlan, sample, timestep, text, hollow_out, grad_checkpointing=False,
                     unit_weights: Callable | None = None):
    """The network that is trained: kept layers (with LoRA), the stored hollow output in between;
    ``unit_weights``: see :class:`Context` (streamed frozen weights)."""
    ctx = make_context(unet, sample, timestep, text, grad_checkpointing, unit_weights=unit_weights)
    _, skips = encode(unet, plan, sample, ctx)
    return decode(unet, plan, hollow_out.to(skips[-1].dtype), ctx, skips)


def hollow_output(unet, plan: HollowPlan, sample, timestep, text) -> torch.Tensor:
    """Stage 1's product: what the hollow hands to the first kept up unit (no outer up layers run)."""
    ctx = make_context(unet, sample, timestep, text)
    h, skips = encode(unet, plan, sample, ctx)
    return hollow(unet, plan, h, ctx, skips)
