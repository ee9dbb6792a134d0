"""Defaults that tie the two stages' settings together; plain Python (the CLI imports it for --help).

A personalization run picks one frozen-weight ``precision`` for stage 2. Stage 1 always runs the
original, unquantized weights, so it needs a float dtype: the precision itself, or for int8/nf4 the
dtype those weights are computed in. And a run that asks for a low-memory stage 2 (quantized or
streamed frozen weights) should not spend more memory in stage 1 than in stage 2: by default its
stage 1 runs layer-major under :data:`LOW_MEMORY_STAGE1_BUDGET`.
"""

from __future__ import annotations

from hollownet.errors import HollownetError

FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZED_PRECISIONS = ("int8", "nf4")
#: Every frozen-weight precision, from least to most fidelity cost (the planner's order).
PRECISIONS = (*FLOAT_PRECISIONS, *QUANTIZED_PRECISIONS)
OPTIMIZERS = ("adamw", "adamw-in-backward")  # torch's AdamW; the same applied per tensor inside backward
DEFAULT_QUANTIZED_COMPUTE = "bf16"  # QLoRA's choice; fp32 is faster on CPUs without native bf16, but larger
# Layer-major stage 1 peaks at about its budget; 700 MiB keeps it under the nf4 / streamed stage 2
# of SD 2.x at 512 px, r=128 (0.70-0.72 GiB, benchmarks/modes.py).
LOW_MEMORY_STAGE1_BUDGET = "700MiB"


def torch_dtype(name: str):
    """The torch dtype of a float precision name (``fp32``, ``bf16``, ``fp16``)."""
    import torch  # here, not at the top: the CLI imports this module for --help

    if name not in FLOAT_PRECISIONS:
        raise HollownetError(f"precision {name!r} is not a float dtype: one of {', '.join(FLOAT_PRECISIONS)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def compute_precision(precision: str, compute_dtype: str | None = None) -> str:
    """The float dtype (name) that activations and (dequantized) frozen weights use."""
    if compute_dtype is not None:
        return compute_dtype
    return precision if precision in FLOAT_PRECISIONS else DEFAULT_QUANTIZED_COMPUTE


def is_low_memory(precision: str, stream_weights: bool) -> bool:
    return precision in QUANTIZED_PRECISIONS or bool(stream_weights)


def stage1_layout(layer_major: bool | None, memory_budget, *, precision: str, stream_weights: bool):
    """``(layer_major, memory_budget)`` for stage 1; ``layer_major=None`` means: decide by the mode."""
    if layer_major is None:
        if memory_budget is not None:
            return True, memory_budget  # a budget only means something layer-major (as the help says)
        layer_major = is_low_memory(precision, stream_weights)
        return layer_major, (LOW_MEMORY_STAGE1_BUDGET if layer_major else None)
    if memory_budget is not None and not layer_major:
        raise HollownetError("--memory-budget applies to layer-major pre-compute: drop --no-layer-major or the budget")
    return layer_major, memory_budget


# Run defaults by base model. Stable Diffusion's are the paper's (512 px, r=32 as diffusers' scripts,
# lr 1e-4, batch 1); the toy model (64 px, 10x narrower blocks than SD) gets its own: the LoRA rank
# scaled with the channel width, a larger learning rate and batch. ``--model toy`` picks these for any
# flag left unset; an explicit flag always wins.
SD_DEFAULTS = {"resolution": 512, "rank": 32, "lr": 1e-4, "batch": 1, "steps": 400, "guidance": 7.5, "gen_steps": 30}
TOY_DEFAULTS = {"resolution": 64, "rank": 8, "lr": 1e-3, "batch": 4, "steps": 300, "guidance": 1.5, "gen_steps": 25}


def model_defaults(model) -> dict:
    from hollownet.toy import is_toy

    return dict(TOY_DEFAULTS if is_toy(model) else SD_DEFAULTS)
