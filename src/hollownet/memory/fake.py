"""Shapes without storage: a model's tensors made fake (``FakeTensorMode``) as a stage loads them, and
the placeholder inputs and shapes the predictions feed the stages' own code."""

from __future__ import annotations

import torch
from torch import nn
from torch._subclasses import FakeTensorMode
from torch._subclasses.fake_tensor import DataDependentOutputException
from torch.utils._python_dispatch import TorchDispatchMode

from hollownet import unet_split as H
from hollownet.cut import HollowPlan, meta_unet, resolve_plan
from hollownet.families import SampleConditioning, family_of_config
from hollownet.loading import is_under, vae_scale_factor
from hollownet.memory.configs import ModelConfigs
from hollownet.requests import PlanRequest


def request_cut(unet: nn.Module, req: PlanRequest, rank: int = 0) -> HollowPlan | None:
    if req.method != "hollow":
        return None
    return resolve_plan(unet, fraction=req.hollow, blocks=req.hollow_blocks, depth=req.depth, rank=rank,
                        lora_targets=tuple(req.lora_targets))


# ------------------------------------------------------------------------------- fake models


def fake_mode():
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


class FakeScalars:
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


class WithAddedCond:
    """``unet(x, t, text)`` for SDXL-style U-Nets, with their extra inputs made beforehand."""

    def __init__(self, unet, added: dict):
        self.unet, self.added = unet, added

    def __call__(self, x, t, text):
        return self.unet(x, t, text, added_cond_kwargs=self.added)



def fake_encoder_loader(built: dict, dtype: torch.dtype):
    """``load(folder, cls)`` for ``Family.encode_with``: the text encoder built on meta for ``folder`` (checked to
    be the class the family loads), given fake weights as it loads."""

    def load(folder: str, cls):
        encoder = built.pop(folder)  # dropped by encode_with after use, as stage 1 drops each encoder
        if type(encoder) is not cls:
            raise TypeError(f"{folder}: the family loads a {cls.__name__}, the planner built a {type(encoder).__name__}")
        materialize(encoder.eval(), dtype, persistent_only=False)  # from_pretrained makes every buffer
        return encoder

    return load

def added_cond_inputs(shapes: dict | None, batch: int, dtype) -> dict | None:
    """SDXL-style extra inputs of ``shapes`` (``ModelConfigs.added_cond``) for ``batch`` samples."""
    if shapes is None:
        return None
    return {k: torch.empty((batch, *s), dtype=dtype) for k, s in shapes.items()}


def sample_conditioning(mc: ModelConfigs, embeds: torch.Tensor, photos: int) -> SampleConditioning | None:
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
    return hollow_out_shape_of(mc.unet, plan, latent_size(mc, resolution), mc.text_len, mc.text_dim)


def hollow_out_shape_of(unet_config: dict, plan: HollowPlan, latent_hw: tuple[int, int], text_len: int, text_dim: int):
    unet = meta_unet(unet_config)
    with torch.device("meta"), torch.no_grad():
        x = torch.empty(1, unet.config.in_channels, *latent_hw)
        out = H.hollow_output(unet, plan, x, torch.zeros(1, dtype=torch.long), torch.empty(1, text_len, text_dim),
                              **H.example_cond(unet, 1, latent_hw))
    return tuple(out.shape[1:])
