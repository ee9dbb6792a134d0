"""Every use of peft beyond its public API, in one place.

Written against peft 0.22.0 (pyproject allows peft>=0.17). ``tests/test_peft_internals.py`` checks
each item below on a tiny LoRA layer and fails naming it when a peft release changes it. Why each:

- ``LoraLayer`` (``peft.tuners.lora``): the class of every LoRA-wrapped layer. Its ``lora_A`` /
  ``lora_B`` ModuleDicts, keyed by adapter name (``"default"``), hold the down / up layers.
- ``init_empty_weights`` (``peft.utils.integrations``): LoRA's tensors made on meta, so ``add_adapter``
  runs on a U-Net whose frozen weights are not loaded yet (the builder loads them after the cut, and
  peft cannot move fake tensors).
- ``LoraLayer.reset_lora_parameters(adapter, "gaussian")``: peft's own init of A and B, run once their
  tensors are real -- the same random draws as ``add_adapter`` on a loaded model.
- the A / B layers' ``_parameters`` (torch's dict): a tensor replaced by a new Parameter (meta -> real,
  or a file's values) without a copy and without swapping the module peft holds.
- ``LoraLayer._disable_adapters``: the flag peft's forward reads, set directly: the public
  ``disable_adapters()`` walks every module twice per call and toggles ``requires_grad``, a quarter of
  a toy two-path step.
- the layer forward's ``adapter_names`` keyword, ``"__base__"`` = no adapter: peft's mixed-adapter
  batches, handed to each layer by a forward pre-hook (the model-level keyword is ``PeftModel``'s,
  which diffusers' U-Net is not).
- ``get_pattern_key`` (``peft.utils.other``): the ``rank_pattern`` / ``alpha_pattern`` key a module
  name matches, peft's rule exactly.

Not moved here, but checked by the same test: peft's tensor names in a wrapped model (``<layer>.base_layer.weight``,
``<layer>.lora_A.<adapter>.weight``), which ``lowmem/stream.file_key`` and the ``"lora_" in name`` filters (builder,
quant, stream) read as plain strings.

Also here, though not peft's: the list of a model's LoRA layers cached in the model's ``__dict__``
(a walk over every module costs more than a small model's step; ``__dict__``, not an attribute, so
``nn.Module.__setattr__`` does not register a list of modules as submodules).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.integrations import init_empty_weights
from peft.utils.other import get_pattern_key
from torch import nn

__all__ = ["ADAPTER", "BASE", "LoraLayer", "init_empty_weights", "lora_modules", "lora_parts", "make_lora_tensors",
           "set_weight", "cached_lora_layers", "adapters_disabled", "adapter_names", "merge_all", "pattern_key"]

ADAPTER = "default"  # the adapter name diffusers' ``add_adapter`` gives a LoRA without one
BASE = "__base__"  # peft's adapter name for "no adapter" in a mixed batch
_CACHE = "_lora_layers"


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """``(name, layer)`` for every peft LoRA layer of ``model``, in module order."""
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer))


def lora_parts(layer: LoraLayer, adapter: str = ADAPTER) -> tuple[nn.Module, nn.Module]:
    """The adapter's down (A) and up (B) layers."""
    return layer.lora_A[adapter], layer.lora_B[adapter]


def make_lora_tensors(layer: LoraLayer, device, adapter: str = ADAPTER) -> None:
    """The adapter's A and B tensors made real in fp32 on ``device`` (they were on meta), then
    initialized as peft initializes them: each layer's own ``reset_parameters``, then A ~ N(0, 1/r), B = 0."""
    for part in lora_parts(layer, adapter):
        for k, p in part._parameters.items():
            if p is not None:  # bias=None
                part._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=torch.float32, device=device))
        part.reset_parameters()
    layer.reset_lora_parameters(adapter, "gaussian")


def set_weight(part: nn.Module, value: torch.Tensor) -> None:
    """``part.weight`` becomes a frozen Parameter holding ``value`` itself (no copy)."""
    part._parameters["weight"] = nn.Parameter(value, requires_grad=False)


def cached_lora_layers(model: nn.Module) -> list[LoraLayer]:
    """``model``'s LoRA layers, found once per model (see the module docstring)."""
    if _CACHE not in model.__dict__:
        model.__dict__[_CACHE] = [m for m in model.modules() if isinstance(m, LoraLayer)]
    return model.__dict__[_CACHE]


@contextmanager
def adapters_disabled(layers: Sequence[LoraLayer]):
    """Inside, ``layers`` run as their base layers alone; enabled again after."""
    for m in layers:
        m._disable_adapters = True
    try:
        yield
    finally:
        for m in layers:
            m._disable_adapters = False


@contextmanager
def adapter_names(layers: Sequence[LoraLayer], names: list[str]):
    """Inside, every call of ``layers`` gets ``adapter_names=names``: sample ``i`` of a batch runs
    adapter ``names[i]`` (:data:`BASE`: none)."""

    def hook(module, args, kwargs):
        return args, {**kwargs, "adapter_names": names}

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def merge_all(model: nn.Module) -> None:
    """Every LoRA layer's delta fused into its base layer's weight."""
    for mod in model.modules():
        if isinstance(mod, LoraLayer):
            mod.merge()


def pattern_key(keys: Sequence[str], name: str) -> str:
    """The first of ``keys`` (regexes) matching the end of module ``name`` at a dot, else ``name``."""
    return get_pattern_key(keys, name)
