"""The U-Net forward, split at the hollow: encode (kept down) -> hollow -> decode (kept up).

This follows the numbered stages of diffusers' ``UNet2DConditionModel.forward`` but walks the
ladder unit by unit (see ``cut.py``), so a cut may fall inside a block. Composed, the three parts
are the full U-Net forward (tested against ``unet(...)``). Training runs ``encode`` and ``decode``
with the stored hollow output in between; inference runs the hollow live.

Stage 1 (the hollow's output, no grad) walks the same ladder one layer at a time instead
(:func:`hollow_steps`: a resnet and its attention are two steps, the mid block is split into its
resnets and attentions): the sample-major stage 1 runs the steps on a batch (:func:`hollow_output`),
the layer-major one (``lowmem/layerwise.py``) runs each step over every sample before the next.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hollownet.errors import HollownetError
from hollownet.cut import HollowPlan, Unit, unit_modules


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
    emb = time_embedding(unet, sample, timestep, text, added_cond_kwargs)
    text = unet.process_encoder_hidden_states(encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs)
    return Context(emb=emb, text=text, upsample=needs_sizes(unet, sample.shape[-2:]), grad_checkpointing=grad_checkpointing,
                   unit_weights=unit_weights)


def time_embedding(unet: nn.Module, sample: torch.Tensor, timestep, text: torch.Tensor, added_cond_kwargs=None):
    """The time embedding every resnet gets, with the added (e.g. text) embedding."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, None)
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=text, added_cond_kwargs=added_cond_kwargs or {})
    if aug is not None:
        emb = emb + aug
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def needs_sizes(unet: nn.Module, latent_hw) -> bool:
    """A latent size not a multiple of 2**num_upsamplers: the upsamplers need the skips' sizes passed."""
    return any(d % 2**unet.num_upsamplers for d in latent_hw)


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
    h = conv_in(unet, sample)
    skips = [h]
    h = run_down(unet, plan.kept_down, h, ctx, skips)
    return h, skips


def conv_in(unet, sample: torch.Tensor) -> torch.Tensor:
    return unet.conv_in(2 * sample - 1.0 if unet.config.center_input_sample else sample)


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
    """Stage 1's product: what the hollow hands to the first kept up unit (no outer up layers run).

    :func:`hollow_steps` on the whole batch, each step's inputs dropped after their last reader."""
    shapes: dict[str, tuple[int, ...]] = {}
    steps = hollow_steps(unet, plan, lambda rows: text, sample.shape[-2:], sample.dtype, shapes.__getitem__)
    values = {"noisy": sample, "timestep": timestep}
    last = {name: i for i, step in enumerate(steps) for name in step.inputs}
    for i, step in enumerate(steps):
        values[step.output] = step.fn(slice(None), *(values[name] for name in step.inputs))
        shapes[step.output] = tuple(values[step.output].shape)
        for name in set(step.inputs):
            if last[name] == i:
                del values[name]
    return values[steps[-1].output]


# ------------------------------------------------------------------ stage 1's walk, step by step


@dataclass
class Step:
    """One layer of a walk: ``fn(rows, *inputs)`` computes ``output`` from the values named in ``inputs``
    for the samples ``rows`` (a slice: it picks their text conditioning), running only the submodules
    ``modules``. ``rows``: tensor name -> the rows of it to load (layer-major: the token embedding)."""

    name: str
    modules: list[str]
    inputs: list[str]
    output: str
    fn: Callable[..., torch.Tensor]
    rows: dict[str, torch.Tensor] = field(default_factory=dict)


def seq(modules, x, *args):
    for m in modules:
        x = m(x, *args)
    return x


def mid_steps(mid, prefix: str, add, temb: bool, text) -> None:
    """``UNetMidBlock2DCrossAttn`` / ``UNetMidBlock2D`` forward, one resnet or attention a step:
    resnets[0], then for each (attention, resnet) pair the attention, then the resnet. ``add(name,
    modules, fn, extra_inputs)`` appends a step reading the previous output; ``temb``: the resnets
    take the time embedding (input ``emb``); ``text(rows)``: the cross-attention conditioning."""
    cross = getattr(mid, "has_cross_attention", False)
    ins_t = ["emb"] if temb else []

    def res_fn(res):
        if not temb:
            return lambda rows, x: res(x, None)
        return lambda rows, x, emb: res(x, emb)

    def attn_fn(attn):
        if cross:
            return lambda rows, x: attn(x, encoder_hidden_states=text(rows), cross_attention_kwargs=None, attention_mask=None,
                                        encoder_attention_mask=None, return_dict=False)[0]
        if not temb:
            return lambda rows, x: attn(x, temb=None)
        return lambda rows, x, emb: attn(x, temb=emb)

    add(f"{prefix}.resnets.0", [f"{prefix}.resnets.0"], res_fn(mid.resnets[0]), ins_t)
    for j, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            add(f"{prefix}.attentions.{j}", [f"{prefix}.attentions.{j}"], attn_fn(attn), ins_t if not cross else [])
        add(f"{prefix}.resnets.{j + 1}", [f"{prefix}.resnets.{j + 1}"], res_fn(res), ins_t)


def hollow_steps(unet: nn.Module, plan: HollowPlan, text: Callable[[slice], torch.Tensor], latent_hw, dtype: torch.dtype,
                 shape_of: Callable[[str], tuple[int, ...]]) -> list[Step]:
    """Stage 1's U-Net part as steps: time embedding, ``conv_in``, the kept down units, the hollow.

    Inputs ``noisy`` and ``timestep``; ``text(rows)``: the rows' text conditioning; ``shape_of(name)``:
    the shape of a step's output once computed (the upsamplers' sizes). The last step's output is
    what the hollow hands to the first kept up unit. The kept down units' skips are never read: only
    the kept up units consume them, and those never run in stage 1.
    """
    check_supported(unet)
    cond = text if unet.encoder_hid_proj is None else (lambda rows: unet.process_encoder_hidden_states(text(rows), {}))
    upsample = needs_sizes(unet, latent_hw)
    time_modules = ["time_embedding"] + (["add_embedding"] if getattr(unet, "add_embedding", None) is not None else [])
    added_text = unet.config.addition_embed_type == "text"  # the one added embedding that reads the text
    steps = [Step("time_embedding", time_modules, ["noisy", "timestep"], "emb",
                  lambda rows, x, t: time_embedding(unet, x.to(dtype), t, text(rows) if added_text else None)),
             Step("conv_in", ["conv_in"], ["noisy"], "conv_in", lambda rows, x: conv_in(unet, x.to(dtype)))]

    def add(name, modules, fn, extra=()):  # the previous step's output first, then extra inputs
        steps.append(Step(name, modules, [steps[-1].output, *extra], name, fn))

    def add_unit(unit: Unit, skip=None, size=None):
        names = unit_modules(unet, unit)
        block = (unet.down_blocks if unit.side == "down" else unet.up_blocks)[unit.block]
        if unit.index is None:
            mods = block.downsamplers if unit.side == "down" else block.upsamplers
            if unit.side == "down":
                add(names[0], names, lambda rows, x: seq(mods, x))
            else:
                add(names[0], names, lambda rows, x: seq(mods, x, size() if size else None))
            return
        res = block.resnets[unit.index]
        if skip is None:
            add(names[0], [names[0]], lambda rows, x, emb: res(x, emb), ["emb"])
        else:
            add(names[0], [names[0]], lambda rows, x, s, emb: res(torch.cat([x, s], dim=1), emb), [skip, "emb"])
        if len(names) > 1:
            attn = block.attentions[unit.index]
            add(names[1], [names[1]], lambda rows, x: attn(x, encoder_hidden_states=cond(rows), return_dict=False)[0])

    for unit in plan.kept_down:
        add_unit(unit)
    hollow_in = steps[-1].output
    inner: list[str] = []
    for unit in plan.hollow_down:
        add_unit(unit)
        inner.append(steps[-1].output)
    mid_steps(unet.mid_block, "mid_block", add, temb=True, text=cond)
    for unit in plan.hollow_up:
        if unit.index is not None:
            add_unit(unit, skip=inner.pop())
            continue
        size = None
        if upsample and unit.block != len(unet.up_blocks) - 1:
            ref = inner[-1] if inner else hollow_in
            size = lambda ref=ref: tuple(shape_of(ref)[2:])  # noqa: E731
        add_unit(unit, size=size)
    return steps
