"""Stage 2: fine-tune on the store, then export (stage 4).

``hollow``: only the kept (outer) U-Net weights are read; the hollow stays on the meta device and
its output comes from the store. ``lora`` / ``full``: the paper's baselines, on the whole U-Net,
from the same store (its noisy latents, targets and prompt embeddings).

Low-memory modes: ``precision="int8"|"nf4"`` stores the frozen Linear/Conv2d weights quantized
(``quant.py``, QLoRA-style; compute in ``compute_dtype``, bf16 by default); ``stream_weights`` reads
each kept unit's frozen weights from the checkpoint file only while it runs (``stream.py``);
``optimizer="adamw-in-backward"`` applies AdamW per parameter as its gradient arrives (``quant.py``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hollownet import unet_split as H
from hollownet.errors import HollownetError
from hollownet.stages.export import save_lora
from hollownet.loading import load_unet, model_fingerprint, release_memory, resolve_model_dir, return_freed_memory_promptly
from hollownet.cut import DEFAULT_LORA_TARGETS, HollowPlan, lora_target_modules, meta_unet, plan_for_blocks
from hollownet.settings import FLOAT_PRECISIONS, compute_precision, is_low_memory, torch_dtype
from hollownet.stages.store import Store, save_torch


@dataclass
class TrainConfig:
    """Stage 2 settings; all but ``device`` are saved with the result."""

    model: str
    store: str
    output: str
    method: str = "hollow"
    rank: int = 32
    lora_alpha: float | None = None  # default: = rank (scale 1)
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    lr: float = 1e-4
    steps: int = 400
    batch: int = 1
    seed: int = 0
    precision: str = "fp32"  # frozen weights: fp32|bf16|fp16, or int8|nf4 (quantized); LoRA, its grads and AdamW state stay fp32
    grad_checkpointing: bool = False
    max_grad_norm: float = 1.0  # global norm; with adamw-in-backward: per parameter tensor (see quant.InBackwardAdamW)
    compute_dtype: str | None = None  # activations / dequantized weights: None = precision's dtype, bf16 for int8|nf4
    stream_weights: bool = False  # kept units' frozen weights read per unit from the mapped checkpoint (turns checkpointing on)
    optimizer: str = "adamw"  # adamw | adamw-in-backward
    checkpoint_every: int = 100
    resume: bool = True  # continue from the newest valid checkpoint with the same settings; False: start over
    track_memory_steps: int = 2  # exact live-bytes tracking of the first steps (the peak repeats after)
    device: str = "cpu"
    lora_format: str = "both"  # LoRA file layout(s) written: diffusers | kohya | both (formats.py)

    def __post_init__(self):
        from hollownet.lowmem.quant import OPTIMIZERS, SCHEMES

        if self.precision not in FLOAT_PRECISIONS and self.precision not in SCHEMES:
            raise HollownetError(f"--precision {self.precision!r} is not one of {', '.join((*FLOAT_PRECISIONS, *SCHEMES))}")
        if self.compute_dtype is not None and (self.compute_dtype not in FLOAT_PRECISIONS or self.precision not in SCHEMES):
            raise HollownetError(f"a compute dtype (one of {', '.join(FLOAT_PRECISIONS)}) goes with --precision int8|nf4 only")
        if self.method == "full" and self.precision != "fp32":
            raise HollownetError("--method full trains every weight and needs --precision fp32")
        if self.optimizer not in OPTIMIZERS:
            raise HollownetError(f"--optimizer {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.method == "full" and (self.stream_weights or self.optimizer != "adamw"):
            raise HollownetError("--method full supports neither --stream-weights nor another optimizer than adamw")
        if self.stream_weights:
            if self.method != "hollow":
                raise HollownetError("--stream-weights needs --method hollow (it streams the kept units one by one)")
            if self.precision in SCHEMES:
                raise HollownetError("--stream-weights reads weights in a float precision: use --precision fp32, bf16 or fp16 with it")
            self.grad_checkpointing = True  # a unit's weights must not stay in the autograd graph
        if self.rank < 1 and self.method != "full":
            raise HollownetError(f"--rank must be at least 1 (got {self.rank})")
        if self.steps < 1 or self.batch < 1:
            raise HollownetError("--steps and --batch must be at least 1")
        from hollownet.stages.formats import LORA_FORMATS

        if self.lora_format not in LORA_FORMATS:
            raise HollownetError(f"--format {self.lora_format!r} is not one of {', '.join(LORA_FORMATS)}")


@dataclass
class TrainResult:
    output: Path
    losses: list[float]
    seconds: float
    plan: HollowPlan | None
    memory: dict | None = None
    start_step: int = 0  # > 0: resumed from a checkpoint at this step
    train_seconds: float = 0.0  # the steps this run made (not loading, not the resumed ones)


def compute_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype of activations and of the (dequantized) frozen weights."""
    return torch_dtype(compute_precision(cfg.precision, cfg.compute_dtype))


def build_model(model_dir: Path, manifest: dict, cfg: TrainConfig):
    """The network that is trained, with LoRA added; returns (unet, plan, trainable params)."""
    from diffusers import UNet2DConditionModel

    if cfg.precision not in FLOAT_PRECISIONS or cfg.stream_weights:
        from hollownet.lowmem.stream import SafetensorsSource, build_lowmem_model

        return build_lowmem_model(UNet2DConditionModel.load_config(model_dir / "unet"), SafetensorsSource(model_dir),
                                  manifest.get("hollow_blocks"), cfg)
    skeleton = meta_unet(UNet2DConditionModel.load_config(model_dir / "unet"))
    plan = None
    skip: list[str] = []
    if cfg.method == "hollow":
        plan = plan_for_blocks(skeleton, manifest["hollow_blocks"], rank=cfg.rank, lora_targets=tuple(cfg.lora_targets))
        skip = plan.hollow_prefixes(skeleton)
    dtype = torch_dtype(cfg.precision)
    unet, _ = load_unet(model_dir, skip=skip, dtype=dtype, device=cfg.device)
    if cfg.method == "full":
        unet.requires_grad_(True)
        return unet, plan, [p for p in unet.parameters()]
    return unet, plan, add_lora_outside(unet, skip, cfg)


def add_lora_outside(unet, skip: list[str], cfg: TrainConfig) -> list[torch.nn.Parameter]:
    """``add_lora`` on every ``cfg.lora_targets`` layer outside the ``skip`` prefixes (the hollow)."""
    targets = lora_target_modules(unet, skip, tuple(cfg.lora_targets))
    if not targets:
        raise HollownetError(f"no layer outside the hollow matches --lora-targets {','.join(cfg.lora_targets)}")
    return add_lora(unet, targets, cfg.rank, cfg.lora_alpha)


def add_lora(unet, targets: list[str], rank: int, alpha: float | None = None) -> list[torch.nn.Parameter]:
    """peft LoRA on exactly ``targets`` (full module names); returns the trainable LoRA parameters.

    B starts at zero, so the network starts as the base model. LoRA trains in fp32 whatever the
    frozen weights' precision.
    """
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights="gaussian"))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def predict(unet, plan: HollowPlan | None, batch: dict, embeds: torch.Tensor, dtype, device, grad_checkpointing=False):
    """The trained network's output for a batch of store samples."""
    noisy = batch["noisy"].to(device, dtype)
    t = batch["timestep"].to(device)
    text = embeds[batch["prompt_index"]].to(device, dtype)
    if plan is None:
        return unet(noisy, t, text).sample
    return H.hollowed_forward(unet, plan, noisy, t, text, batch["hollow_out"].to(device, dtype), grad_checkpointing)


def loss_fn(pred: torch.Tensor, batch: dict, device) -> torch.Tensor:
    """MSE to ε or v (whichever the store's targets are), weighted per sample (prior preservation)."""
    # Written out rather than F.mse_loss: same math, and CPU's mse kernel pads its output storage,
    # which would make real and fake-tensor memory counts differ by a few KiB.
    per_sample = (pred.float() - batch["target"].to(device).float()).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * batch["weight"].to(device)).mean()


def batch_indices(step: int, batch: int, num_samples: int) -> list[int]:
    """Step i trains on samples [i*b, (i+1)*b), wrapping around the store."""
    return [(step * batch + j) % num_samples for j in range(batch)]


def run_train(cfg: TrainConfig) -> TrainResult:
    """Stage 2 + export. The first ``cfg.track_memory_steps`` steps are measured exactly (hollownet.memory.tracker)."""
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model)
    store = Store(cfg.store)
    manifest = store.manifest()
    if not store.is_complete():
        raise HollownetError(f"the store in '{store.root}' is incomplete; run pre-compute again to finish it")
    if manifest["method"] != cfg.method:
        raise HollownetError(f"the store was made for --method {manifest['method']}, not {cfg.method}; use a new --output")
    if manifest["model_fingerprint"] != model_fingerprint(model_dir):
        raise HollownetError(f"the store in '{store.root}' was made from another model; use a new --output folder")
    torch.manual_seed(cfg.seed)
    dtype = compute_dtype(cfg)
    if is_low_memory(cfg.precision, cfg.stream_weights):
        return_freed_memory_promptly()  # before the layer-by-layer quantizing / reading starts
    unet, plan, params = build_model(model_dir, manifest, cfg)
    embeds = store.tensors("prompts.safetensors")["embeds"]
    optimizer = make_optimizer(params, cfg)
    out = Path(cfg.output)
    ckpt_dir = out / "checkpoints"
    start, losses = 0, []
    settings = checkpoint_settings(cfg, manifest)
    for stale in ckpt_dir.glob(".step-*.pt.tmp"):  # a process killed mid-write (kill -9) leaves its temp file
        stale.unlink()
    if cfg.resume:
        start, losses = load_checkpoint(ckpt_dir, unet, params, optimizer, settings=settings, steps=cfg.steps)
    else:
        for old in ckpt_dir.glob("step-*.pt"):  # starting over: an old run's checkpoints must never be resumed
            old.unlink()
    per_step = cfg.batch * (2 if manifest.get("class_photo_files") else 1)  # prior preservation doubles it
    if plan is None and cfg.grad_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    memory = None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train ({cfg.method})", unit="step", disable=None)
    t_loop = time.perf_counter()
    for step in bar:
        batch = store.samples(batch_indices(step, per_step, manifest["num_samples"]),
                              keys=("noisy", "target", "timestep", "prompt_index", "weight") + (("hollow_out",) if plan else ()))
        tracker = None
        if step - start < cfg.track_memory_steps:
            from hollownet.memory.tracker import MemoryTracker

            tracker = MemoryTracker(device=cfg.device).add_resident(unet, optimizer)
        loss = train_step(unet, plan, batch, embeds, params, optimizer, cfg, dtype, tracker)
        if tracker is not None and (memory is None or tracker.report.peak_bytes >= memory["peak_bytes"]):
            memory = tracker.report.to_dict()
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if math.isnan(loss):
            raise HollownetError(f"loss became NaN at step {step}; lower --lr or use --precision fp32")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt_dir, step + 1, unet, params, optimizer, losses, settings)
    bar.close()
    train_seconds = time.perf_counter() - t_loop
    info = result_info(cfg, manifest, plan, params)
    if cfg.method == "full":
        unet.save_pretrained(out / "unet")
    else:
        save_lora(unet, out, info, lora_format=cfg.lora_format)
    del unet, optimizer
    release_memory()
    return TrainResult(output=out, losses=losses, seconds=time.perf_counter() - t0, plan=plan, memory=memory,
                       start_step=start, train_seconds=train_seconds)


def train_step(unet, plan, batch, embeds, params, optimizer, cfg: TrainConfig, dtype, tracker=None) -> float:
    """forward, backward, clip, AdamW: phases marked for the memory tracker when one is given."""
    from contextlib import nullcontext

    phase = tracker.phase if tracker is not None else (lambda name: nullcontext())
    with tracker if tracker is not None else nullcontext():
        with phase("forward"):
            loss = loss_fn(predict(unet, plan, batch, embeds, dtype, cfg.device, cfg.grad_checkpointing), batch, cfg.device)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            if cfg.max_grad_norm and cfg.optimizer == "adamw":  # in-backward clips per parameter, inside backward
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return loss.item()


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``torch.optim.AdamW(params, lr)``, or its in-backward form (``quant.InBackwardAdamW``)."""
    from hollownet.lowmem.quant import make_optimizer as make

    return make(params, cfg.optimizer, cfg.lr, cfg.max_grad_norm)


def result_info(cfg: TrainConfig, manifest: dict, plan: HollowPlan | None, params) -> dict:
    return {
        "format": "hollownet-lora/1",
        "base_model": manifest["model"],
        "model_fingerprint": manifest["model_fingerprint"],
        "method": cfg.method,
        "hollow_blocks": plan.hollow_blocks if plan else None,
        "plan": plan.to_dict() if plan else None,
        "rank": cfg.rank,
        "lora_alpha": cfg.lora_alpha or cfg.rank,
        "lora_targets": cfg.lora_targets,
        "trainable_params": sum(p.numel() for p in params),
        "resolution": manifest["resolution"],
        "prompt": manifest["prompts"][0],
        "prediction_type": manifest["prediction_type"],
        "training": {k: v for k, v in asdict(cfg).items() if k not in ("device", "model", "store", "output")},
    }


CHECKPOINT_SETTINGS = ("method", "rank", "lora_alpha", "lora_targets", "lr", "batch", "seed", "precision",
                       "compute_dtype", "stream_weights", "optimizer", "max_grad_norm")


def checkpoint_settings(cfg: TrainConfig, manifest: dict) -> dict:
    """What a checkpoint must share with a run to be resumed by it (``steps`` may grow)."""
    settings = {k: getattr(cfg, k) for k in CHECKPOINT_SETTINGS}
    settings["lora_alpha"] = cfg.lora_alpha or cfg.rank
    settings["lora_targets"] = list(cfg.lora_targets)
    settings["store"] = {k: manifest.get(k) for k in ("model_fingerprint", "hollow_blocks", "resolution", "dtype",
                                                      "seed", "num_samples", "photos", "prompts")}
    return settings


def save_checkpoint(ckpt_dir: Path, step: int, unet, params, optimizer, losses, settings: dict | None = None) -> None:
    """Trainable tensors + AdamW state + loss history + settings, atomically; the two newest are kept."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "params": [p.detach().cpu() for p in params], "optimizer": optimizer.state_dict(),
             "losses": losses, "settings": settings}
    save_torch(ckpt_dir / f"step-{step:06d}.pt", state)
    for old in sorted(ckpt_dir.glob("step-*.pt"))[:-2]:
        old.unlink()


def load_checkpoint(ckpt_dir: Path, unet, params, optimizer, settings: dict | None = None,
                    steps: int | None = None) -> tuple[int, list[float]]:
    """Restore the newest checkpoint that loads; (0, []) when there is none.

    Checkpoints are written atomically, so a half-written one is never named ``step-*.pt``; one
    that still fails to load (a damaged disk) is skipped with a warning for the one before it.
    One made with other ``settings`` (or other tensor shapes) is refused in one line.
    """
    import sys
    import warnings

    for path in sorted(ckpt_dir.glob("step-*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state["step"], state["params"], state["optimizer"], state["losses"]  # noqa: B018
        except Exception as e:  # noqa: BLE001  a damaged file: try the one before it
            warnings.warn(f"checkpoint {path} cannot be read ({type(e).__name__}); trying an older one")
            continue
        refuse = f"checkpoint {path} was made with other settings"
        fix = "rerun with the settings it was made with, or add --no-resume to start over (or use a new --output)"
        saved = state.get("settings")
        if saved is not None and settings is not None:
            for key in settings:
                if saved.get(key) != settings[key]:
                    what = "pre-compute store" if key == "store" else f"--{key.replace('_', '-')}"
                    have = "" if key == "store" else f" ({saved.get(key)} vs {settings[key]})"
                    raise HollownetError(f"{refuse}: a different {what}{have}; {fix}")
        if len(state["params"]) != len(params) or any(a.shape != b.shape for a, b in zip(state["params"], params)):
            raise HollownetError(f"{refuse} (rank, targets, cut); {fix}")
        if steps is not None and state["step"] > steps:
            raise HollownetError(f"checkpoint {path} is at step {state['step']}, beyond --steps {steps}; "
                                 "raise --steps, or add --no-resume to start over")
        with torch.no_grad():
            for p, saved_p in zip(params, state["params"]):
                p.copy_(saved_p)
        optimizer.load_state_dict(state["optimizer"])
        print(f"resuming from step {state['step']} ({path}); --no-resume starts over", file=sys.stderr)
        return state["step"], list(state["losses"])
    return 0, []
