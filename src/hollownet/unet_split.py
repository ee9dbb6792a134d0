"""The U-Net forward, split at the hollow: encode (kept down) -> hollow -> decode (kept up).

This follows the numbered stages of diffusers' ``UNet2DConditionModel.forward`` but walks the
ladder unit by unit (see ``cut.py``), so a cut may fall inside a block. Composed, the three parts
are the full U-Net forward (tested against ``unet(...)`` for every conditioning variant diffusers'
forward has: time embedding with ``timestep_cond``, class embeddings, the added embeddings ``text``,
``text_time`` (SDXL), ``image``, ``text_image``, ``image_hint``, ``encoder_hid_proj``, attention
masks, ``cross_attention_kwargs`` with a LoRA ``scale``). What it does not follow is refused in one
line before anything runs (``cut.check_supported``, when the cut is planned; missing inputs at the
first call, :func:`check_inputs`). Training runs ``encode`` and ``decode`` with the
stored hollow output in between; inference runs the hollow live.

The conditioning beyond ``sample`` and ``timestep`` travels as keyword arguments named as diffusers
names them (``class_labels``, ``timestep_cond``, ``added_cond_kwargs``, ``attention_mask``,
``encoder_attention_mask``, ``cross_attention_kwargs``), gathered in a :class:`Cond`; one function
(:func:`embed`) turns it into what the units read, for the split forward and stage 1's steps alike.

Stage 1 (the hollow's output, no grad) walks the same ladder one layer at a time instead
(:func:`hollow_steps`: a resnet and its attention are two steps, the mid block is split into its
resnets and attentions): the sample-major stage 1 runs the steps on a batch (:func:`hollow_output`),
the layer-major one (``lowmem/layerwise.py``) runs each step over every sample before the next.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace

import torch
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from torch import nn
from torch.utils.checkpoint import checkpoint

from hollownet.errors import HollownetError
from hollownet.cut import HollowPlan, Unit, check_supported, unit_modules

# ------------------------------------------------------------------------- the conditioning

#: What each added embedding / encoder_hid_proj type reads from ``added_cond_kwargs``
#: (diffusers' ``get_aug_embed`` / ``process_encoder_hidden_states``).
ADDED_KEYS = {"text": (), "text_time": ("text_embeds", "time_ids"), "image": ("image_embeds",),
              "text_image": ("image_embeds",), "image_hint": ("image_embeds", "hint")}
HID_PROJ_KEYS = {"text_proj": (), "text_image_proj": ("image_embeds",), "image_proj": ("image_embeds",)}


@dataclass
class Cond:
    """What diffusers' forward takes besides ``sample`` and ``timestep``, under its names. Tensors
    have one row per sample (``rows`` picks some), except ``cross_attention_kwargs`` (shared)."""

    text: torch.Tensor  # encoder_hidden_states, before encoder_hid_proj
    added_cond_kwargs: dict[str, torch.Tensor] = field(default_factory=dict)
    class_labels: torch.Tensor | None = None
    timestep_cond: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # 1 keep, 0 discard (made a bias where used)
    encoder_attention_mask: torch.Tensor | None = None
    cross_attention_kwargs: dict | None = None  # its "scale" scales the LoRA layers, as in diffusers

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Cond:
        """``fn`` applied to every per-sample tensor (the text included)."""
        pick = lambda t: None if t is None else fn(t)  # noqa: E731
        return replace(self, text=fn(self.text), added_cond_kwargs={k: fn(v) for k, v in self.added_cond_kwargs.items()},
                       class_labels=pick(self.class_labels), timestep_cond=pick(self.timestep_cond),
                       attention_mask=pick(self.attention_mask), encoder_attention_mask=pick(self.encoder_attention_mask))

    def rows(self, sl) -> Cond:
        return self.map(lambda t: t[sl])

    def tensors(self) -> list[torch.Tensor]:
        """Every per-sample tensor but the text."""
        return [t for t in (*self.added_cond_kwargs.values(), self.class_labels, self.timestep_cond, self.attention_mask,
                            self.encoder_attention_mask) if t is not None]

    @property
    def lora_scale(self) -> float:
        return float((self.cross_attention_kwargs or {}).get("scale", 1.0))

    def attention_kwargs(self, dtype: torch.dtype) -> dict:
        """What every cross-attention block gets besides the text: the masks as biases, the kwargs
        without ``scale`` (diffusers' forward pops it to scale the LoRA layers instead)."""
        kwargs = {k: v for k, v in (self.cross_attention_kwargs or {}).items() if k != "scale"} or None
        return dict(attention_mask=_bias(self.attention_mask, dtype), encoder_attention_mask=_bias(self.encoder_attention_mask, dtype),
                    cross_attention_kwargs=kwargs)


def _bias(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """diffusers' forward: a (batch, keys) keep-mask becomes an additive bias with a query axis."""
    return None if mask is None else ((1 - mask.to(dtype)) * -10000.0).unsqueeze(1)


def make_cond(text: torch.Tensor, *, added_cond_kwargs=None, class_labels=None, timestep_cond=None, attention_mask=None,
              encoder_attention_mask=None, cross_attention_kwargs=None) -> Cond:
    return Cond(text, dict(added_cond_kwargs or {}), class_labels, timestep_cond, attention_mask, encoder_attention_mask,
                cross_attention_kwargs)


def example_cond(unet: nn.Module, n: int, latent_hw, dtype=torch.float32) -> dict:
    """Placeholder conditioning of the right shapes for ``n`` samples (memory prediction and shape
    runs: values are zeros). ``text_time`` splits its input as SDXL base does: 6 time ids."""
    cfg, kw = unet.config, {}
    zeros = lambda *shape: torch.zeros(n, *shape, dtype=dtype)  # noqa: E731
    added = {}
    if cfg.addition_embed_type == "text_time":
        ids = 6
        added = dict(text_embeds=zeros(cfg.projection_class_embeddings_input_dim - ids * cfg.addition_time_embed_dim),
                     time_ids=zeros(ids))
    elif cfg.addition_embed_type in ("image", "image_hint"):
        added = dict(image_embeds=zeros(cfg.encoder_hid_dim))
        if cfg.addition_embed_type == "image_hint":  # the hint is in pixels: 8x the latent
            added["hint"] = zeros(3, *(8 * d for d in latent_hw))
    elif cfg.addition_embed_type == "text_image":
        added = dict(image_embeds=zeros(cfg.cross_attention_dim))
    if cfg.encoder_hid_dim_type in HID_PROJ_KEYS and HID_PROJ_KEYS[cfg.encoder_hid_dim_type]:
        width = cfg.encoder_hid_dim if cfg.encoder_hid_dim_type == "image_proj" else cfg.cross_attention_dim
        added.setdefault("image_embeds", zeros(width))
    if added:
        kw["added_cond_kwargs"] = added
    if unet.class_embedding is not None:
        emb = unet.class_embedding
        if cfg.class_embed_type in (None, "timestep"):  # an index / a timestep
            kw["class_labels"] = torch.zeros(n, dtype=torch.long)
        else:
            width = (emb.linear_1.in_features if hasattr(emb, "linear_1") else
                     emb.in_features if isinstance(emb, nn.Linear) else unet.time_embedding.linear_2.out_features)
            kw["class_labels"] = zeros(width)
    return kw


def check_inputs(unet: nn.Module, cond: Cond) -> None:
    """The inputs this U-Net's forward needs, named in one line (diffusers would fail mid-forward)."""
    check_supported(unet)
    cfg, have = unet.config, cond.added_cond_kwargs
    needed = ADDED_KEYS.get(cfg.addition_embed_type, ()) + HID_PROJ_KEYS.get(cfg.encoder_hid_dim_type, ())
    missing = [k for k in dict.fromkeys(needed) if k not in have]
    if missing:
        kind = cfg.addition_embed_type or cfg.encoder_hid_dim_type
        raise HollownetError(f"this U-Net ({kind!r} conditioning) needs added_cond_kwargs {', '.join(missing)}; "
                             "pass them (SDXL: text_embeds = the pooled text embedding, time_ids = size/crop/target)")
    if unet.class_embedding is not None and cond.class_labels is None:
        raise HollownetError("this U-Net has class embeddings and needs class_labels; pass them")
    if "gligen" in (cond.cross_attention_kwargs or {}):
        raise HollownetError("cross_attention_kwargs['gligen'] is not supported by the split forward")


def embed(unet: nn.Module, sample: torch.Tensor, timestep, cond: Cond) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stage 1 of diffusers' forward ("1. time"): the embedding every resnet gets (time, with
    ``timestep_cond``, class and added embeddings) and, for ``image_hint``, the hint conv_in reads."""
    t_emb = unet.get_time_embed(sample=sample, timestep=timestep)
    emb = unet.time_embedding(t_emb, cond.timestep_cond)
    class_emb = unet.get_class_embed(sample=sample, class_labels=cond.class_labels)
    if class_emb is not None:
        emb = torch.cat([emb, class_emb], dim=-1) if unet.config.class_embeddings_concat else emb + class_emb
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=cond.text, added_cond_kwargs=cond.added_cond_kwargs)
    hint = None
    if unet.config.addition_embed_type == "image_hint":
        aug, hint = aug
    if aug is not None:
        emb = emb + aug
    return (unet.time_embed_act(emb) if unet.time_embed_act is not None else emb), hint


def cross_text(unet: nn.Module, cond: Cond):
    """The cross-attention conditioning: the text through ``encoder_hid_proj`` where the U-Net has one."""
    return unet.process_encoder_hidden_states(encoder_hidden_states=cond.text, added_cond_kwargs=cond.added_cond_kwargs)


#: The submodules :func:`embed` runs (those the U-Net has).
EMBED_MODULES = ("time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding")


def embed_modules(unet: nn.Module) -> list[str]:
    return [n for n in EMBED_MODULES if getattr(unet, n, None) is not None]


@contextmanager
def lora_scaled(unet: nn.Module, scale: float):
    """diffusers' forward scales the LoRA layers by ``cross_attention_kwargs["scale"]`` while it runs."""
    scale_lora_layers(unet, scale)
    try:
        yield
    finally:
        unscale_lora_layers(unet, scale)


def _scaled(unet: nn.Module, scale: float):
    return nullcontext() if scale == 1.0 else lora_scaled(unet, scale)


# ---------------------------------------------------------------------------- the split forward


@dataclass
class Context:
    """What every unit needs besides its input: the embedding, the cross-attention conditioning."""

    emb: torch.Tensor
    text: torch.Tensor
    upsample: bool  # latent size not a multiple of 2**num_upsamplers: pass sizes explicitly
    grad_checkpointing: bool = False
    # ``unit_weights(unit)``: a context manager around each unit's forward (and its recomputation in
    # backward) that brings the unit's frozen weights in and out (``stream.StreamedWeights``).
    unit_weights: Callable | None = None
    attn: dict = field(default_factory=dict)  # Cond.attention_kwargs: masks as biases, cross_attention_kwargs
    hint: torch.Tensor | None = None  # image_hint: concatenated to the sample before conv_in
    lora_scale: float = 1.0


def make_context(unet: nn.Module, sample: torch.Tensor, timestep, text: torch.Tensor, grad_checkpointing=False,
                 unit_weights: Callable | None = None, **cond) -> Context:
    """Stage 1 of diffusers' forward: the embeddings, the text projection, the masks. ``cond``:
    diffusers' keyword arguments (``added_cond_kwargs``, ``class_labels``, ``timestep_cond``,
    ``attention_mask``, ``encoder_attention_mask``, ``cross_attention_kwargs``)."""
    c = make_cond(text, **cond)
    check_inputs(unet, c)
    with _scaled(unet, c.lora_scale):
        emb, hint = embed(unet, sample, timestep, c)
        text = cross_text(unet, c)
    return Context(emb=emb, text=text, upsample=needs_sizes(unet, sample.shape[-2:]), grad_checkpointing=grad_checkpointing,
                   unit_weights=unit_weights, attn=c.attention_kwargs(sample.dtype), hint=hint, lora_scale=c.lora_scale)


def needs_sizes(unet: nn.Module, latent_hw) -> bool:
    """A latent size not a multiple of 2**num_upsamplers: the upsamplers need the skips' sizes passed."""
    return any(d % 2**unet.num_upsamplers for d in latent_hw)


def _run_unit(unet: nn.Module, unit: Unit, h: torch.Tensor, ctx: Context, skip=None, size=None) -> torch.Tensor:
    with _scaled(unet, ctx.lora_scale):  # inside: checkpointing's recomputation scales too
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
        h = attentions[unit.index](h, encoder_hidden_states=ctx.text, **ctx.attn, return_dict=False)[0]
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
    with _scaled(unet, ctx.lora_scale):
        if getattr(unet.mid_block, "has_cross_attention", False):
            return unet.mid_block(h, ctx.emb, encoder_hidden_states=ctx.text, **ctx.attn)
        return unet.mid_block(h, ctx.emb)


def encode(unet, plan: HollowPlan, sample, ctx: Context) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """conv_in and the kept down units: the hollow's input and the kept skips."""
    with _scaled(unet, ctx.lora_scale):
        h = conv_in(unet, sample, ctx.hint)
    skips = [h]
    h = run_down(unet, plan.kept_down, h, ctx, skips)
    return h, skips


def conv_in(unet, sample: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
    """diffusers' "0. center input" and "2. pre-process" (``image_hint``: the hint joins the sample)."""
    sample = 2 * sample - 1.0 if unet.config.center_input_sample else sample
    return unet.conv_in(sample if hint is None else torch.cat([sample, hint], dim=1))


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
    with _scaled(unet, ctx.lora_scale):
        if unet.conv_norm_out is not None:
            h = unet.conv_act(unet.conv_norm_out(h))
        return unet.conv_out(h)


def full_forward(unet, plan: HollowPlan, sample, timestep, text, **cond) -> torch.Tensor:
    """encode -> hollow -> decode: the U-Net's output, computed the split way (``cond``: see make_context)."""
    ctx = make_context(unet, sample, timestep, text, **cond)
    h, skips = encode(unet, plan, sample, ctx)
    h = hollow(unet, plan, h, ctx, skips)
    return decode(unet, plan, h, ctx, skips)


def hollowed_forward(unet, plan: HollowPlan, sample, timestep, text, hollow_out, grad_checkpointing=False,
                     unit_weights: Callable | None = None, **cond):
    """The network that is trained: kept layers (with LoRA), the stored hollow output in between;
    ``unit_weights``: see :class:`Context` (streamed frozen weights); ``cond``: see make_context."""
    ctx = make_context(unet, sample, timestep, text, grad_checkpointing, unit_weights=unit_weights, **cond)
    _, skips = encode(unet, plan, sample, ctx)
    return decode(unet, plan, hollow_out.to(skips[-1].dtype), ctx, skips)


def hollow_output(unet, plan: HollowPlan, sample, timestep, text, **cond) -> torch.Tensor:
    """Stage 1's product: what the hollow hands to the first kept up unit (no outer up layers run).

    :func:`hollow_steps` on the whole batch, each step's inputs dropped after their last reader;
    ``cond``: see :func:`make_context`."""
    c = make_cond(text, **cond)
    shapes: dict[str, tuple[int, ...]] = {}
    steps = hollow_steps(unet, plan, lambda rows: c, sample.shape[-2:], sample.dtype, shapes.__getitem__)
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
    for the samples ``rows`` (a slice: it picks their conditioning), running only the submodules
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


def mid_steps(mid, prefix: str, add, temb: bool, text=None, attn_kwargs=None, text_inputs=()) -> None:
    """``UNetMidBlock2DCrossAttn`` / ``UNetMidBlock2D`` forward, one resnet or attention a step:
    resnets[0], then for each (attention, resnet) pair the attention, then the resnet. ``add(name,
    modules, fn, extra_inputs)`` appends a step reading the previous output; ``temb``: the resnets
    take the time embedding (input ``emb``); ``text(rows, *t)``: the cross-attention conditioning from
    the values named ``text_inputs``; ``attn_kwargs(rows)``: the masks and cross_attention_kwargs."""
    cross = getattr(mid, "has_cross_attention", False)
    ins_t = ["emb"] if temb else []

    def res_fn(res):
        if not temb:
            return lambda rows, x: res(x, None)
        return lambda rows, x, emb: res(x, emb)

    def attn_fn(attn):
        if cross:
            return lambda rows, x, *t: attn(x, encoder_hidden_states=text(rows, *t), **attn_kwargs(rows), return_dict=False)[0]
        if not temb:
            return lambda rows, x: attn(x, temb=None)
        return lambda rows, x, emb: attn(x, temb=emb)

    add(f"{prefix}.resnets.0", [f"{prefix}.resnets.0"], res_fn(mid.resnets[0]), ins_t)
    for j, (attn, res) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        if attn is not None:
            add(f"{prefix}.attentions.{j}", [f"{prefix}.attentions.{j}"], attn_fn(attn),
                ins_t if not cross else list(text_inputs))
        add(f"{prefix}.resnets.{j + 1}", [f"{prefix}.resnets.{j + 1}"], res_fn(res), ins_t)


def hollow_steps(unet: nn.Module, plan: HollowPlan, cond: Callable[[slice], Cond], latent_hw, dtype: torch.dtype,
                 shape_of: Callable[[str], tuple[int, ...]]) -> list[Step]:
    """Stage 1's U-Net part as steps: embeddings, ``encoder_hid_proj``, ``conv_in``, the kept down
    units, the hollow.

    Inputs ``noisy`` and ``timestep``; ``cond(rows)``: the rows' conditioning (:class:`Cond`);
    ``shape_of(name)``: the shape of a step's output once computed (the upsamplers' sizes). The last
    step's output is what the hollow hands to the first kept up unit. The kept down units' skips are
    never read: only the kept up units consume them, and those never run in stage 1.
    """
    probe = cond(slice(0, 1))
    check_inputs(unet, probe)
    scale = probe.lora_scale

    def step(name, modules, inputs, output, fn):  # every step's forward under the LoRA scale, as diffusers'
        return Step(name, modules, inputs, output, fn if scale == 1.0 else _scaled_fn(unet, scale, fn))

    def attn_kwargs(rows):
        return cond(rows).attention_kwargs(dtype)

    steps = [step("time_embedding", embed_modules(unet), ["noisy", "timestep"], "emb",
                  lambda rows, x, t: embed(unet, x.to(dtype), t, cond(rows))[0])]
    text_inputs = []  # what the attentions read besides their input: "text" where it is projected
    if unet.encoder_hid_proj is not None:  # projected once per sample, read by every attention
        steps.append(step("encoder_hid_proj", ["encoder_hid_proj"], [], "text",
                          lambda rows: cross_text(unet, cond(rows)).to(dtype)))
        text_inputs = ["text"]

    def text(rows, *projected):
        return projected[0] if projected else cond(rows).text.to(dtype)

    if unet.config.addition_embed_type == "image_hint":  # the hint joins the sample before conv_in
        steps.append(step("conv_in", ["conv_in", "add_embedding"], ["noisy"], "conv_in",
                          lambda rows, x: conv_in(unet, x.to(dtype), embed_hint(unet, cond(rows)).to(dtype))))
    else:
        steps.append(step("conv_in", ["conv_in"], ["noisy"], "conv_in", lambda rows, x: conv_in(unet, x.to(dtype))))

    def add(name, modules, fn, extra=()):  # the previous step's output first, then extra inputs
        steps.append(step(name, modules, [steps[-1].output, *extra], name, fn))

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
            add(names[1], [names[1]], lambda rows, x, *t: attn(x, encoder_hidden_states=text(rows, *t), **attn_kwargs(rows),
                                                               return_dict=False)[0], text_inputs)

    for unit in plan.kept_down:
        add_unit(unit)
    hollow_in = steps[-1].output
    inner: list[str] = []
    for unit in plan.hollow_down:
        add_unit(unit)
        inner.append(steps[-1].output)
    mid_steps(unet.mid_block, "mid_block", add, temb=True, text=text, attn_kwargs=attn_kwargs, text_inputs=text_inputs)
    for unit in plan.hollow_up:
        if unit.index is not None:
            add_unit(unit, skip=inner.pop())
            continue
        size = None
        if needs_sizes(unet, latent_hw) and unit.block != len(unet.up_blocks) - 1:
            ref = inner[-1] if inner else hollow_in
            size = lambda ref=ref: tuple(shape_of(ref)[2:])  # noqa: E731
        add_unit(unit, size=size)
    return steps


def embed_hint(unet: nn.Module, cond: Cond) -> torch.Tensor:
    """``image_hint``'s hint alone (its time-embedding half is :func:`embed`'s)."""
    return unet.get_aug_embed(emb=None, encoder_hidden_states=cond.text, added_cond_kwargs=cond.added_cond_kwargs)[1]


def _scaled_fn(unet, scale, fn):
    def scaled(*args):
        with lora_scaled(unet, scale):
            return fn(*args)
    return scaled
