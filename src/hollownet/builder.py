"""The one builder of the network stage 2 trains: the trainer, the benchmarks and the planner all call it.

``build_unet(config, source, hollow_blocks, ...)``: the U-Net's structure on the meta device, the cut,
LoRA on the kept layers (still on meta), then the frozen weights from ``source`` -- a
:class:`~hollownet.lowmem.stream.SafetensorsSource` (the model's file) or a
:class:`~hollownet.lowmem.stream.FakeSource` (shapes only, inside a ``FakeTensorMode``: the planner) --
as ``modes`` says: in a float precision, quantized (``quant.py``) or left for streaming
(``stream.StreamedWeights``); last, LoRA's own tensors in fp32. The hollow stays on meta and is
never read. The order is the same for every source: the structure and LoRA are made on the meta
device first (peft cannot move modules whose tensors are fake), then the tensors are made inside
``source.loading()`` (nothing for a file, the ``FakeTensorMode`` for the fake source), LoRA's
initialized as peft initializes it on a loaded model (the same random draws for the same seed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn

from hollownet.cut import DEFAULT_LORA_TARGETS, HollowPlan, lora_target_modules, meta_unet, plan_for_blocks, unit_modules
from hollownet.errors import HollownetError
from hollownet.loading import is_under
from hollownet.lowmem.quant import quantizable, quantize_model
from hollownet.lowmem.stream import StreamedWeights, file_key, kept_units, state_tensors
from hollownet.peft_internals import init_empty_weights, lora_modules, make_lora_tensors
from hollownet.settings import DEFAULT_RANK, Modes, torch_dtype


@dataclass
class Network:
    """What stage 2 trains: the U-Net (hollow on meta), its cut, the trained parameters, and how it runs."""

    unet: nn.Module
    plan: HollowPlan | None  # None: lora / full, the whole U-Net
    params: list[nn.Parameter]
    dtype: torch.dtype  # activations and (dequantized) frozen weights
    checkpointing: bool = False
    streamer: StreamedWeights | None = None  # brings each kept unit's frozen weights in while it runs

    def __iter__(self):  # ``unet, plan, params = build_unet(...)``
        return iter((self.unet, self.plan, self.params))


def build_unet(unet_config: dict, source, hollow_blocks: list[str] | None, *, method: str = "hollow",
               modes: Modes = Modes(), rank: int = DEFAULT_RANK, lora_alpha: float | None = None,
               lora_targets=DEFAULT_LORA_TARGETS, device="cpu") -> Network:
    """The network stage 2 trains, with frozen weights from ``source`` (see the module docstring)."""
    modes.check_method(method)
    device = torch.device(device)
    dtype = torch_dtype(modes.compute)
    unet = meta_unet(unet_config)
    plan = plan_for_blocks(unet, hollow_blocks, rank=rank, lora_targets=tuple(lora_targets)) if method == "hollow" else None
    skip = plan.hollow_prefixes(unet) if plan else []
    if method != "full":
        add_lora(unet, lora_outside(unet, skip, lora_targets), rank, lora_alpha)
    unet.requires_grad_(False).eval()
    with source.loading():  # the fake source's FakeTensorMode: only what is meta so far can be built outside it
        load_frozen(unet, source, skip, modes, dtype, device, plan)
        streamer = StreamedWeights(unet, plan, source, dtype, device) if modes.stream_weights else None
        params = list(unet.requires_grad_(True).parameters()) if method == "full" else init_lora(unet, dtype, device)
    if plan is None and modes.checkpointing:
        unet.enable_gradient_checkpointing()  # diffusers' own, per block; the split forward checkpoints per unit
    return Network(unet, plan, params, dtype, modes.checkpointing, streamer)


def load_frozen(unet: nn.Module, source, skip: list[str], modes: Modes, dtype, device, plan: HollowPlan | None) -> None:
    """Every frozen tensor outside the hollow from ``source``: quantized layers read and quantized one at
    a time, the kept units' tensors left on meta when they are streamed."""
    streamed = [n for u in kept_units(plan) for n in unit_modules(unet, u)] if modes.stream_weights else []
    wanted = [k for k, _ in state_tensors(unet) if "lora_" not in k and not is_under(k, skip)]
    missing = [file_key(k) for k in wanted if file_key(k) not in source]
    if missing:
        raise HollownetError(f"the U-Net checkpoint lacks {len(missing)} tensors (e.g. {missing[0]}); is it complete?")
    scheme = modes.precision if modes.quantized else None
    qkeys = {n + ".weight" for n, m in unet.named_modules() if scheme and quantizable(n, m) and not is_under(n, skip)}
    plain = [k for k in wanted if k not in qkeys and not (streamed and is_under(k, streamed))]
    unet.load_state_dict({k: source.read(file_key(k), dtype, device) for k in plain}, strict=False, assign=True)
    if scheme:
        quantize_model(unet, scheme, dtype, skip=skip,
                       weight_of=lambda n: source.read(file_key(n + ".weight"), torch.float32, device))


def lora_outside(unet: nn.Module, skip: list[str], targets) -> list[str]:
    """The ``targets`` layers (name suffixes) outside the ``skip`` prefixes (the hollow)."""
    names = lora_target_modules(unet, skip, tuple(targets))
    if not names:
        raise HollownetError(f"no layer outside the hollow matches --lora-targets {','.join(targets)}")
    return names


def add_lora(unet: nn.Module, targets: list[str], rank: int, alpha: float | None = None,
             rank_pattern: dict[str, int] | None = None, alpha_pattern: dict[str, float] | None = None) -> None:
    """peft LoRA on exactly ``targets`` (full module names), its tensors on meta until :func:`init_lora`;
    ``rank_pattern`` / ``alpha_pattern``: full module names whose rank / alpha differ (a foreign LoRA's)."""
    # peft reads pattern keys as regexes matched at a name's end: escaped full names match their module only
    escape = lambda p: {re.escape(k): v for k, v in (p or {}).items()}  # noqa: E731
    with init_empty_weights():
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian",
                                    rank_pattern=escape(rank_pattern), alpha_pattern=escape(alpha_pattern)))


def init_lora(unet: nn.Module, dtype: torch.dtype, device) -> list[nn.Parameter]:
    """LoRA's tensors in fp32 on ``device``, as peft's ``add_adapter`` makes them on a loaded model: per
    layer, in module order, the A and B layers' own init, then A ~ N(0, 1/r), B = 0, rounded to the
    frozen weights' compute ``dtype`` (peft casts to it). B = 0: the network starts as the base model.
    Returns the LoRA parameters, the only ones trained."""
    for _, mod in lora_modules(unet):
        make_lora_tensors(mod, device)
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    with torch.no_grad():
        for p in params:
            p.copy_(p.to(dtype))
            p.requires_grad_(True)
    return params
