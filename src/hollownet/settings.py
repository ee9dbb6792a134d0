"""Defaults that tie the two stages' settings together; plain Python (the CLI imports it for --help).

A personalization run picks one frozen-weight ``precision`` for stage 2. Stage 1 always runs the
original, unquantized weights, so it needs a float dtype: the precision itself, or for int8/nf4 the
dtype those weights are computed in. And a run that asks for a low-memory stage 2 (quantized or
streamed frozen weights) should not spend more memory in stage 1 than in stage 2: by default its
stage 1 runs layer-major under :data:`LOW_MEMORY_STAGE1_BUDGET`, unless sample-major fits that budget
(``memory.stage1.settle_stage1`` decides, for ``hollownet train`` and ``hollownet plan`` alike).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from hollownet.devices import default_compute_dtype
from hollownet.errors import HollownetError
from hollownet.toy import is_toy

FLOAT_PRECISIONS = ("fp32", "bf16", "fp16")
QUANTIZED_PRECISIONS = ("int8", "nf4")
#: Every frozen-weight precision, from least to most fidelity cost (the planner's order).
PRECISIONS = (*FLOAT_PRECISIONS, *QUANTIZED_PRECISIONS)
#: ``adamw``: torch's AdamW (single-tensor on a CPU); ``adamw-in-backward``: the same applied per tensor
#: inside backward (optimizers.py); ``adamw-foreach``: torch's multi-tensor AdamW, its default on CUDA
#: (``hollownet plan`` offers it to predict that; ``hollownet train`` offers the first two).
OPTIMIZERS = ("adamw", "adamw-in-backward")
ALL_OPTIMIZERS = (*OPTIMIZERS, "adamw-foreach")
# int8/nf4's compute dtype when none is asked for is the device's (devices.default_compute_dtype): QLoRA's
# bf16 where the hardware has it, fp32 where bf16 would be emulated (8x slower on an AVX2 CPU); --help says so.
COMPUTE_DTYPE_HELP = ("bf16 where the device computes it natively (CUDA Ampere+, CPUs with AMX or AVX512-BF16, "
                      "MPS on macOS 14+), else fp32")
# Layer-major stage 1 peaks at about its budget; 700 MiB keeps it under the nf4 / streamed stage 2
# of SD 2.x at 512 px, r=128 (0.70-0.72 GiB, benchmarks/modes.py).
LOW_MEMORY_STAGE1_BUDGET = "700MiB"


def torch_dtype(name: str):
    """The torch dtype of a float precision name (``fp32``, ``bf16``, ``fp16``)."""
    import torch  # here, not at the top: the CLI imports this module for --help

    if name not in FLOAT_PRECISIONS:
        raise HollownetError(f"precision {name!r} is not a float dtype: one of {', '.join(FLOAT_PRECISIONS)}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass(frozen=True)
class Modes:
    """How a run holds and computes its weights: every rule that ties these settings together, and
    every value derived from them, is here (stage 1, stage 2 and the planner read them, never re-derive).

    ``precision``: the frozen weights of stage 2 (fp32 | bf16 | fp16, or int8 | nf4 quantized);
    LoRA, its gradients and AdamW state are fp32 whatever it is. ``compute_dtype``: the float dtype
    activations and dequantized weights use (only with int8 | nf4; default: the device's, :meth:`on`). ``stream_weights``:
    the kept units' frozen weights are read from the checkpoint file only while they run (needs
    per-unit gradient checkpointing, so :attr:`checkpointing` is on). ``layer_major`` /
    ``memory_budget``: stage 1's layout; ``None`` = decided by the mode (:attr:`stage1`).
    """

    precision: str = "fp32"
    compute_dtype: str | None = None
    stream_weights: bool = False
    grad_checkpointing: bool = False
    optimizer: str = "adamw"
    layer_major: bool | None = None
    memory_budget: str | int | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise HollownetError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.compute_dtype is not None and (self.compute_dtype not in FLOAT_PRECISIONS or not self.quantized):
            raise HollownetError(f"a compute dtype (one of {', '.join(FLOAT_PRECISIONS)}) goes with --precision int8|nf4 only")
        if self.optimizer not in ALL_OPTIMIZERS:
            raise HollownetError(f"--optimizer {self.optimizer!r} is not one of {', '.join(ALL_OPTIMIZERS)}")
        if self.stream_weights and self.quantized:
            raise HollownetError("--stream-weights reads weights in a float precision: use --precision fp32, bf16 or fp16 with it")
        if self.memory_budget is not None and self.layer_major is False:
            raise HollownetError("--memory-budget applies to layer-major pre-compute: drop --no-layer-major or the budget")

    @classmethod
    def split(cls, settings: dict) -> tuple[Modes, dict]:
        """``(Modes of the mode keys, the other keys)`` of a flat settings dict (flags, JSON records). A mode key
        set to None is unset (an argparse flag not given): its default, as ``None`` means for every field."""
        names = {f.name for f in fields(cls)}
        modes = {k: v for k, v in settings.items() if k in names and v is not None}
        return cls(**modes), {k: v for k, v in settings.items() if k not in names}

    def check_method(self, method: str) -> None:
        """The training method's own rules (``hollow`` | ``lora`` | ``full``)."""
        if method not in METHODS:
            raise HollownetError(f"--method {method!r} is not one of {', '.join(METHODS)}")
        if method == "full" and self.precision != "fp32":
            raise HollownetError("--method full trains every weight and needs --precision fp32")
        if method == "full" and (self.stream_weights or self.in_backward):
            raise HollownetError("--method full supports neither --stream-weights nor another optimizer than adamw")
        if self.stream_weights and method != "hollow":
            raise HollownetError("--stream-weights needs --method hollow (it streams the kept units one by one)")

    @property
    def quantized(self) -> bool:
        return self.precision in QUANTIZED_PRECISIONS

    def on(self, device: str | None) -> Modes:
        """These modes as run on ``device`` (None: the default device here), the compute dtype of int8/nf4
        filled in when not asked for (``devices.default_compute_dtype``): requests and configs that know
        their device call this once, so records, checkpoints and the planner all see the chosen value."""
        if not self.quantized or self.compute_dtype is not None:
            return self
        return replace(self, compute_dtype=default_compute_dtype(device))

    @property
    def compute(self) -> str:
        """The float dtype (name) of activations and of the (dequantized) frozen weights; stage 1 runs the
        original weights in it. int8/nf4 not yet placed on a device (:meth:`on`): the default device's."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        return default_compute_dtype(None) if self.quantized else self.precision

    @property
    def low_memory(self) -> bool:
        """Quantized or streamed frozen weights: the modes that free large tensors one after another."""
        return self.quantized or self.stream_weights

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing as run: asked for, or needed by streaming (a unit's weights must not
        stay in the autograd graph)."""
        return self.grad_checkpointing or self.stream_weights

    @property
    def in_backward(self) -> bool:
        """AdamW applied inside backward: gradients are clipped per tensor there, not globally after."""
        return self.optimizer == "adamw-in-backward"

    @property
    def stage1(self) -> tuple[bool, str | int | None]:
        """``(layer_major, memory_budget)`` of stage 1: what was asked, else by the mode. A budget only
        means something layer-major; a low-memory stage 2 should not spend more in stage 1, so its
        stage 1 runs layer-major under :data:`LOW_MEMORY_STAGE1_BUDGET` (where sample-major would
        need more: :attr:`stage1_unsettled`, and ``memory.stage1.settle_stage1``)."""
        if self.layer_major is None:
            if self.memory_budget is not None:
                return True, self.memory_budget
            return (True, LOW_MEMORY_STAGE1_BUDGET) if self.low_memory else (False, None)
        return self.layer_major, self.memory_budget

    @property
    def stage1_unsettled(self) -> bool:
        """Stage 1's layout is the low-memory default, not asked for: layer-major under its budget only where
        sample-major would exceed that budget (layer-major fills its budget, so where sample-major fits it is
        both smaller and faster: on the toy model 17 MiB against 700)."""
        return self.layer_major is None and self.memory_budget is None and self.low_memory

    def stage2(self) -> dict:
        """The settings stage 2 runs with, as records write them (``grad_checkpointing`` as run)."""
        return {"precision": self.precision, "compute_dtype": self.compute_dtype, "stream_weights": self.stream_weights,
                "grad_checkpointing": self.checkpointing, "optimizer": self.optimizer}


#: Defaults shared by several commands (written once: the CLI, the dataclasses and the app read them here).
DEFAULT_IDENTIFIER = "sks"  # the rare token of instance prompts ("a photo of sks dog")
SCHEDULERS = ("dpm", "ddim", "default")  # generation: DPM-Solver++, DDIM, or the model's own
DEFAULT_SCHEDULER = "dpm"
LORA_FORMATS = ("diffusers", "kohya", "both")  # the LoRA file(s) a run writes (stages/formats.py)
DEFAULT_LORA_FORMAT = "both"
DEFAULT_DINO_MODEL = "facebook/dino-vits16"  # the DreamBooth paper's DINO
DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"

METHODS = ("hollow", "lora", "full")  # Hollowed Net; the paper's baselines: LoRA on the whole U-Net, full fine-tuning


#: Named groups of U-Net layers for ``--lora-targets`` (a group name or a layer-name suffix, comma-separated)
#: and bench specs (``targets=attn+conv``): peft matches each name as a suffix of a module's name.
LORA_TARGET_GROUPS = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),  # attention projections, as diffusers' LoRA scripts
    "proj": ("proj_in", "proj_out"),  # the transformer blocks' in / out projections
    "ff": ("ff.net.0.proj", "ff.net.2"),  # the transformer blocks' feed-forward
    "conv": ("conv1", "conv2"),  # the resnets' 3x3 convolutions
}
LORA_TARGET_GROUPS["all"] = tuple(n for g in ("attn", "proj", "ff", "conv") for n in LORA_TARGET_GROUPS[g])
DEFAULT_LORA_TARGETS = LORA_TARGET_GROUPS["attn"]  # Stable Diffusion's (and the planner's configs')


def expand_lora_targets(names) -> list[str]:
    """``["attn", "conv1"]`` -> layer names: groups expanded, order kept, duplicates dropped."""
    out = [n for name in names for n in LORA_TARGET_GROUPS.get(name.strip(), (name.strip(),)) if n]
    if not out:
        raise HollownetError("--lora-targets names no layer; e.g. attn, or attn,conv, or to_q,to_v")
    return list(dict.fromkeys(out))


# Run defaults by base model: THE table (a request field left None takes its model's value here:
# TrainRequest / PlanRequest resolve it, and the CLI, app, bench and train-many only pass what was set).
# Stable Diffusion's are the paper's (512 px, attention LoRA r=32 as diffusers' scripts, lr 1e-4,
# batch 1). The toy model (64 px, 10x narrower blocks than SD) gets its own: a larger learning rate and
# batch, and LoRA on every layer kind -- its attention is 32-64 channels wide, too small alone to learn
# a subject's shape (benchmarks/README.md, "the toy recipe"); SD keeps attention-only LoRA.
SD_DEFAULTS = {"resolution": 512, "rank": 32, "lr": 1e-4, "batch": 1, "steps": 400, "guidance": 7.5, "gen_steps": 30,
               "lora_targets": DEFAULT_LORA_TARGETS}
TOY_DEFAULTS = {"resolution": 64, "rank": 16, "lr": 1e-3, "batch": 4, "steps": 600, "guidance": 1.5, "gen_steps": 25,
                "lora_targets": LORA_TARGET_GROUPS["all"]}
DEFAULT_RANK = SD_DEFAULTS["rank"]


# SDXL (families.SDXL) trains and generates at its native 1024 px; the rest as Stable Diffusion's.
SDXL_DEFAULTS = {**SD_DEFAULTS, "resolution": 1024}


#: diffusers' ``train_dreambooth_lora_sd3.py`` default LoRA layers: both streams' attention projections of every
#: joint block (``attn``; SD3.5 Medium's image-only ``attn2`` is not among them, as there). Written here, not in
#: ``dit_cut``, because the CLI's defaults are read without importing torch.
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")
# SD3 / SD3.5 (families.SD3): 1024 px, diffusers' SD3 DreamBooth LoRA script's rank 4 and lr 1e-4 (its batch is 4:
# kept at 1 here as for SD), and StableDiffusion3Pipeline's 28 steps at guidance 7.0.
SD3_DEFAULTS = {**SD_DEFAULTS, "resolution": 1024, "rank": 4, "guidance": 7.0, "gen_steps": 28,
                "lora_targets": SD3_LORA_TARGETS}


#: SD3 / SD3.5 transformers bundled by name (``hollownet plan --model sd35m``: configs only, no weights).
SD3_MODELS = ("sd3m", "sd35m", "sd35l")


def is_sd3_folder(model) -> bool:
    """A diffusers folder whose denoiser is an SD3 / SD3.5 transformer (``transformer/`` in place of ``unet/``)."""
    config = Path(str(model)).expanduser() / "transformer" / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("_class_name") == "SD3Transformer2DModel"


def is_sdxl_unet(unet_config: dict) -> bool:
    """SDXL's U-Net, by its ``text_time`` added embedding (pooled text + size / crop micro-conditioning)."""
    return unet_config.get("addition_embed_type") == "text_time"


def model_defaults(model) -> dict:
    """The run defaults of ``model`` (a name or a folder): the toy model's, SDXL's, SD3's or Stable Diffusion's."""
    if is_toy(model):
        return dict(TOY_DEFAULTS)
    config = Path(str(model)).expanduser() / "unet" / "config.json"
    if str(model) == "sdxl" or (config.is_file() and is_sdxl_unet(json.loads(config.read_text()))):
        return dict(SDXL_DEFAULTS)
    if str(model) in SD3_MODELS or is_sd3_folder(model):
        return dict(SD3_DEFAULTS)
    return dict(SD_DEFAULTS)


def fill_model_defaults(obj, names, **renamed) -> None:
    """Fields of the dataclass ``obj`` left None take its model's run defaults (:func:`model_defaults` of
    ``obj.model``): the one place requests and stage configs resolve them. ``renamed``: field -> the table's key
    (a sample's ``sample_steps`` is the table's ``gen_steps``)."""
    defaults = model_defaults(obj.model)
    for name, key in [*((n, n) for n in names), *renamed.items()]:
        if getattr(obj, name) is None:
            setattr(obj, name, defaults[key])
