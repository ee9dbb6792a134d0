"""Stage 2: fine-tune on the store, then export (stage 4).

``hollow``: only the kept (outer) U-Net weights are read; the hollow stays on the meta device and
its output comes from the store. ``lora`` / ``full``: the paper's baselines, on the whole U-Net,
from the same store (its noisy latents, targets and prompt embeddings).

The network is built by ``builder.build_unet`` (the planner builds it the same way on fake tensors);
how it holds its weights -- a float precision, int8/nf4 quantized, streamed -- and which optimizer
runs are ``cfg.modes`` (``settings.Modes``: every rule between them is there).
"""

from __future__ import annotations

import math
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from tqdm.auto import tqdm

from hollownet import unet_split as H
from hollownet.builder import Network, build_unet
from hollownet.cut import HollowPlan
from hollownet.errors import HollownetError
from hollownet.families import FAMILIES, added_cond_kwargs, detect_family
from hollownet.files import remove_stale_temps, save_json, save_torch, tensor_digest
from hollownet.loading import model_fingerprint, release_memory, resolve_model_dir, return_freed_memory_promptly
from hollownet.lowmem.stream import SafetensorsSource
from hollownet.memory.tracker import MemoryTracker
from hollownet.optimizers import make_optimizer
from hollownet.settings import DEFAULT_LORA_FORMAT, DEFAULT_SCHEDULER, LORA_FORMATS, Modes, fill_model_defaults
from hollownet.stages.export import save_lora
from hollownet.stages.generate import Parts, prepare
from hollownet.stages import watch as W
from hollownet.stages.progress import ProgressLog
from hollownet.stages.store import Store
from hollownet.stages.watch import Watch, validation_loss


@dataclass
class TrainConfig:
    """Stage 2 settings; all but ``device`` are saved with the result."""

    model: str
    store: str
    output: str
    method: str = "hollow"
    # None: the model's default (settings.model_defaults), resolved on construction as TrainRequest's
    rank: int | None = None
    lora_alpha: float | None = None  # default: = rank (scale 1)
    lora_targets: list[str] | None = None
    lr: float | None = None
    steps: int | None = None
    batch: int | None = None
    seed: int = 0
    modes: Modes = field(default_factory=Modes)  # precision, compute dtype, streaming, checkpointing, optimizer
    max_grad_norm: float = 1.0  # global norm; with adamw-in-backward: per parameter tensor (see optimizers.InBackwardAdamW)
    checkpoint_every: int = 100
    resume: bool = True  # continue from the newest valid checkpoint with the same settings; False: start over
    track_memory_steps: int = 2  # exact live-bytes tracking of the first steps (the peak repeats after)
    device: str = "cpu"
    lora_format: str = DEFAULT_LORA_FORMAT  # LoRA file layout(s) written: diffusers | kohya | both (formats.py)
    # watching the run (stages/watch.py); none of them changes what is trained
    log_every: int = 0  # a plain line every N steps where tqdm draws no bar (stderr not a terminal; 0: ~20 a run; and every 30 s)
    save_every: int = 0  # LoRA snapshots in OUTPUT/snapshots/step-XXXX (0: none)
    validate_every: int | None = None  # held-out loss every N steps (None: with the samples, else a tenth; 0: never)
    sample_every: int = 0  # sample images in OUTPUT/samples (0: none)
    sample_prompts: list[str] | None = None  # None: the instance prompt in an unseen context (watch.default_sample_prompts)
    sample_seed: int = 0
    sample_steps: int | None = None  # None: the model's generation default (as generate)
    sample_guidance: float | None = None

    def __post_init__(self):
        fill_model_defaults(self, ("rank", "lora_targets", "lr", "steps", "batch"), sample_steps="gen_steps",
                            sample_guidance="guidance")
        self.lora_targets = list(self.lora_targets)
        self.modes = self.modes.on(self.device)
        self.modes.check_method(self.method)
        for flag in ("log_every", "save_every", "validate_every", "sample_every"):
            if (getattr(self, flag) or 0) < 0:
                raise HollownetError(f"--{flag.replace('_', '-')} must be 0 (off) or a number of steps")
        if self.sample_every and self.method == "full":
            raise HollownetError("--sample-every draws with a LoRA: use --method hollow or lora, or drop --sample-every")
        if self.rank < 1 and self.method != "full":
            raise HollownetError(f"--rank must be at least 1 (got {self.rank})")
        if self.steps < 1 or self.batch < 1 or self.sample_steps < 1:
            raise HollownetError("--steps, --batch and --sample-steps must be at least 1")
        if self.lora_format not in LORA_FORMATS:
            raise HollownetError(f"--format {self.lora_format!r} is not one of {', '.join(LORA_FORMATS)}")

    def network(self, unet_config: dict, source, hollow_blocks: list[str] | None) -> Network:
        """The network these settings train, frozen weights from ``source`` (``builder.build_unet``)."""
        return build_unet(unet_config, source, hollow_blocks, method=self.method, modes=self.modes, rank=self.rank,
                          lora_alpha=self.lora_alpha, lora_targets=self.lora_targets, device=self.device)


@dataclass
class TrainResult:
    output: Path
    losses: list[float]
    seconds: float
    plan: HollowPlan | None
    memory: dict | None = None
    start_step: int = 0  # > 0: resumed from a checkpoint at this step
    train_seconds: float = 0.0  # the steps this run made (not loading, not the resumed ones)
    watch: dict = field(default_factory=dict)  # snapshots, validation loss, samples (watch.Watch.record)


def build_model(model_dir: Path, manifest: dict, cfg: TrainConfig) -> Network:
    """The network that is trained, from the model's checkpoint file; unpacks as ``unet, plan, params``."""
    return cfg.network(UNet2DConditionModel.load_config(model_dir / "unet"), SafetensorsSource(model_dir),
                       manifest.get("hollow_blocks"))


def predict(unet, plan: HollowPlan | None, batch: dict, embeds: torch.Tensor, dtype, device, grad_checkpointing=False,
            unit_weights=None):
    """The trained network's output for a batch of store samples (``unit_weights``: streamed weights); the
    family's per-sample inputs in the batch (SDXL's ``text_embeds``, ``time_ids``) go in as ``added_cond_kwargs``."""
    noisy = batch["noisy"].to(device, dtype)
    t = batch["timestep"].to(device)
    text = embeds[batch["prompt_index"]].to(device, dtype)
    added = added_cond_kwargs(batch, device, dtype)
    if plan is None:
        return unet(noisy, t, text, added_cond_kwargs=added).sample
    return H.hollowed_forward(unet, plan, noisy, t, text, batch["hollow_out"].to(device, dtype), grad_checkpointing,
                              unit_weights, added_cond_kwargs=added)


def loss_fn(pred: torch.Tensor, batch: dict, device) -> torch.Tensor:
    """MSE to ε or v (whichever the store's targets are), weighted per sample (prior preservation)."""
    # Written out rather than F.mse_loss: same math, and CPU's mse kernel pads its output storage,
    # which would make real and fake-tensor memory counts differ by a few KiB.
    per_sample = (pred.float() - batch["target"].to(device).float()).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * batch["weight"].to(device)).mean()


def batch_indices(step: int, batch: int, num_samples: int) -> list[int]:
    """Step i trains on samples [i*b, (i+1)*b), wrapping around the store."""
    return [(step * batch + j) % num_samples for j in range(batch)]


class TrainingStopped(HollownetError):
    """``on_step`` asked to stop: a checkpoint of this step was saved, so a resumed run continues from it."""


def run_train(cfg: TrainConfig, on_step=None) -> TrainResult:
    """Stage 2 + export. The first ``cfg.track_memory_steps`` steps are measured exactly (hollownet.memory.tracker).

    ``on_step(step, losses, memory)`` (e.g. the app's progress bar) runs after each step; a true return stops here."""
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
    family = FAMILIES[manifest["family"]] if "family" in manifest else detect_family(model_dir)
    torch.manual_seed(cfg.seed)
    if cfg.modes.low_memory:
        return_freed_memory_promptly()  # before the layer-by-layer quantizing / reading starts
    out = Path(cfg.output)
    t = Trainee(make=lambda: _network_and_optimizer(model_dir, manifest, cfg), ckpt_dir=out / "checkpoints",
                settings=checkpoint_settings(cfg, manifest), steps=cfg.steps, keep=bool(cfg.checkpoint_every))
    t.net, t.optimizer = t.make()
    plan = t.net.plan
    embeds = store.tensors("prompts.safetensors")["embeds"]
    start, losses = _start(cfg, t)
    keys = ("noisy", "target", "timestep", "prompt_index", "weight") + family.sample_keys + (("hollow_out",) if plan else ())
    watch = make_watch(cfg, out, store, manifest, start, keys)
    info = result_info(cfg, manifest, plan, t.net.params) | {"family": family.name}
    export = lambda folder, step=None: _export(t.net.unet, folder, info | ({"step": step} if step else {}), cfg, family)  # noqa: E731
    validate = lambda: validation_loss(t.net, W.load_validation(store, keys), embeds, cfg, cfg.batch, predict, loss_fn)  # noqa: E731
    per_step = cfg.batch * (2 if manifest.get("class_photo_files") else 1)  # prior preservation doubles it
    t.net.unet.train()
    memory = None
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc=f"train ({cfg.method})", unit="step", disable=None)
    t_loop = time.perf_counter()
    for step in bar:
        batch = store.samples(batch_indices(step, per_step, manifest["num_samples"]), keys=keys)
        loss, memory = tracked_step(t, batch, embeds, cfg, step - start < cfg.track_memory_steps, memory)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if not math.isfinite(loss):
            raise HollownetError(nan_loss_advice(loss, step, start, batch, store.root, t.ckpt_dir))
        stop = on_step is not None and bool(on_step(step + 1, losses, memory)) and step + 1 < cfg.steps
        if stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps):
            save_checkpoint(t.ckpt_dir, step + 1, t.net.unet, t.net.params, t.optimizer, losses, t.settings)
        if stop:
            raise TrainingStopped(f"stopped at step {step + 1} of {cfg.steps}; the checkpoint is kept: resume to continue")
        t.step, t.losses = step + 1, losses
        watch.after_step(step + 1, loss, t, export, validate, sample_source(cfg, model_dir, info))
    bar.close()
    train_seconds = time.perf_counter() - t_loop
    export(out)
    weights = watch.final_weights(t)
    t.net = t.optimizer = export = validate = None
    release_memory()
    watch.finish(weights, sample_source(cfg, model_dir, info))
    return TrainResult(output=out, losses=losses, seconds=time.perf_counter() - t0, plan=plan, memory=memory,
                       start_step=start, train_seconds=train_seconds, watch=watch.record())


def _network_and_optimizer(model_dir: Path, manifest: dict, cfg: TrainConfig):
    net = build_model(model_dir, manifest, cfg)
    return net, make_optimizer(net.params, cfg.modes.optimizer, cfg.lr, cfg.max_grad_norm)


def _start(cfg: TrainConfig, t: Trainee) -> tuple[int, list[float]]:
    """Resume from the newest matching checkpoint, or (``--no-resume``) delete every old one: (step, losses)."""
    remove_stale_temps(t.ckpt_dir, ".step-*.pt*.tmp")  # a process killed mid-write (kill -9) leaves its temp file
    if cfg.resume:
        return load_checkpoint(t.ckpt_dir, t.net.unet, t.net.params, t.optimizer, settings=t.settings, steps=cfg.steps)
    for old in t.ckpt_dir.glob("step-*.pt"):  # starting over: an old run's checkpoints must never be resumed
        old.unlink()
    return 0, []


def tracked_step(t: Trainee, batch, embeds, cfg: TrainConfig, track: bool, memory: dict | None):
    """One step; ``track``: measured exactly, the largest report so far kept. Returns (loss, memory)."""
    tracker = MemoryTracker(device=cfg.device).add_resident(t.net.unet, t.optimizer) if track else None
    loss = train_step(t.net, batch, embeds, t.optimizer, cfg, tracker)
    if tracker is not None and (memory is None or tracker.report.peak_bytes >= memory["peak_bytes"]):
        memory = tracker.report.to_dict()
    return loss, memory


def _export(unet, folder: Path, info: dict, cfg: TrainConfig, family) -> None:
    """The result's files in ``folder``: the LoRA (``--format``), or the fine-tuned ``unet/`` (``--method full``)."""
    if cfg.method == "full":
        unet.save_pretrained(Path(folder) / "unet")
        if "step" in info:  # a snapshot: its last file marks it finished
            save_json(Path(folder) / "hollownet.json", info)
    else:
        save_lora(unet, folder, info, lora_format=cfg.lora_format, family=family)


@dataclass
class Trainee:
    """What stage 2 holds: its network and optimizer. :meth:`while_freed` runs work with both dropped: saved to a
    checkpoint first and rebuilt from it after, so the run goes on exactly as without the break."""

    make: Callable  # () -> (network, optimizer), as at the start
    ckpt_dir: Path
    settings: dict
    steps: int
    keep: bool  # keep the checkpoint made for the break (False: --checkpoint-every 0)
    net: Network | None = None
    optimizer: object = None
    step: int = 0
    losses: list[float] = field(default_factory=list)

    def while_freed(self, work: Callable[[], None]) -> None:
        path = self.ckpt_dir / f"step-{self.step:06d}.pt"
        made = not path.is_file()
        if made:
            save_checkpoint(self.ckpt_dir, self.step, self.net.unet, self.net.params, self.optimizer, self.losses, self.settings)
        self.net = self.optimizer = None
        release_memory()
        work()  # if it fails (or a second Ctrl-C stops it), the checkpoint stays: a rerun resumes from it
        self.net, self.optimizer = self.make()
        load_checkpoint(self.ckpt_dir, self.net.unet, self.net.params, self.optimizer, settings=self.settings,
                        steps=self.steps, quiet=True)
        self.net.unet.train()
        if made and not self.keep:
            path.unlink(missing_ok=True)


def make_watch(cfg: TrainConfig, out: Path, store: Store, manifest: dict, start: int, keys) -> Watch:
    """The run's watchers (stages/watch.py) from its settings; ``--no-resume`` forgets an old run's samples and snapshots."""
    if not cfg.resume:
        for old in (W.SNAPSHOTS, W.SAMPLES):
            shutil.rmtree(out / old, ignore_errors=True)
        (out / W.VALIDATION_JSON).unlink(missing_ok=True)
    samples = None
    if cfg.sample_every:
        prompts = cfg.sample_prompts or W.default_sample_prompts(cfg.model, manifest["prompts"][0])
        samples = W.SampleSettings(prompts=list(prompts), seed=cfg.sample_seed, steps=cfg.sample_steps,
                                   guidance=cfg.sample_guidance)
    validate_every = cfg.validate_every
    if validate_every is None:
        validate_every = cfg.sample_every or max(1, cfg.steps // 10)
    log = ProgressLog(f"train ({cfg.method})", cfg.steps, start, every=cfg.log_every)
    return Watch(out=out, total=cfg.steps, start=start, log=log, save_every=cfg.save_every, validate_every=validate_every,
                 sample_every=cfg.sample_every, samples=samples, rank=cfg.rank, alpha=float(cfg.lora_alpha or cfg.rank),
                 validation=W.held_out_count(store) if validate_every else 0)


def sample_source(cfg: TrainConfig, model_dir: Path, info: dict) -> Callable:
    """``source(weights)`` -> (parts, plan, resolution): generation's own set-up (``generate.prepare``) for a LoRA in memory."""
    def source(weights):
        parts = Parts.real(model_dir, weights, W.generation_modes(cfg.modes), cfg.device, DEFAULT_SCHEDULER)
        plan, resolution = prepare(parts, info, lora=True, merged=False, resolution=None)
        return parts, plan, resolution

    return source


def train_step(net: Network, batch, embeds, optimizer, cfg: TrainConfig, tracker=None) -> float:
    """forward, backward, clip, AdamW: phases marked for the memory tracker when one is given."""
    phase = tracker.phase if tracker is not None else (lambda name: nullcontext())
    with tracker if tracker is not None else nullcontext():
        with phase("forward"):
            # one expression: the prediction must not outlive the loss (a name would keep it through backward)
            loss = loss_fn(predict(net.unet, net.plan, batch, embeds, net.dtype, cfg.device, net.checkpointing,
                                   net.streamer), batch, cfg.device)
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            if cfg.max_grad_norm and not cfg.modes.in_backward:  # in-backward clips per parameter, inside backward
                torch.nn.utils.clip_grad_norm_(net.params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return loss.item()


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
        "training": {**{k: v for k, v in asdict(cfg).items() if k not in ("device", "model", "store", "output", "modes")},
                     **cfg.modes.stage2()},
    }


RESUME_WINDOW = 5  # a non-finite loss within this many steps of a resume points at the checkpoint first
CHECKPOINT_SETTINGS = ("method", "rank", "lora_alpha", "lora_targets", "lr", "batch", "seed", "max_grad_norm")
CHECKPOINT_MODES = ("precision", "compute_dtype", "stream_weights", "optimizer")


def checkpoint_settings(cfg: TrainConfig, manifest: dict) -> dict:
    """What a checkpoint must share with a run to be resumed by it (``steps`` may grow)."""
    settings = {k: getattr(cfg, k) for k in CHECKPOINT_SETTINGS} | {k: getattr(cfg.modes, k) for k in CHECKPOINT_MODES}
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
    state["sha256"] = tensor_digest([state["params"], state["optimizer"]])  # torch.load checks no checksum itself
    save_torch(ckpt_dir / f"step-{step:06d}.pt", state)
    for old in sorted(ckpt_dir.glob("step-*.pt"))[:-2]:
        old.unlink()


def checkpoint_damage(state: dict) -> str | None:
    """Why a loaded checkpoint must not be resumed (flipped bytes, non-finite values), or None."""
    if "sha256" in state and tensor_digest([state["params"], state["optimizer"]]) != state["sha256"]:
        return "is damaged (its checksum differs from the one written)"
    if not all(bool(torch.isfinite(p).all()) for p in state["params"]):
        return "holds non-finite values (NaN or inf)"
    return None


def nan_loss_advice(loss: float, step: int, start: int, batch: dict, store: Path, ckpt_dir: Path) -> str:
    """The likely cause of a non-finite loss first: damaged stored samples, then a damaged checkpoint
    (right after a resume), and only then the learning rate or precision."""
    what = f"loss became {loss} at step {step}"
    if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in batch.values()):
        return (f"{what}: the pre-compute store in '{store}' holds non-finite values, so it is damaged; "
                "delete that folder and rerun to compute it again")
    if start and step - start < RESUME_WINDOW:
        return (f"{what}, {step - start + 1} step(s) after resuming from step {start}: the checkpoint in '{ckpt_dir}' "
                f"or the store in '{store}' is likely damaged; rerun with --no-resume (or delete the store) "
                "and, only if it happens again, lower --lr or use --precision fp32")
    return f"{what}; lower --lr or use --precision fp32"


def load_checkpoint(ckpt_dir: Path, unet, params, optimizer, settings: dict | None = None,
                    steps: int | None = None, quiet: bool = False) -> tuple[int, list[float]]:
    """Restore the newest checkpoint that loads; (0, []) when there is none.

    Checkpoints are written atomically, so a half-written one is never named ``step-*.pt``; one
    that still fails to load (a damaged disk) is skipped with a warning for the one before it.
    One made with other ``settings`` (or other tensor shapes) is refused in one line.
    """
    for path in sorted(ckpt_dir.glob("step-*.pt"), reverse=True):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state["step"], state["params"], state["optimizer"], state["losses"]  # noqa: B018
            why = checkpoint_damage(state)
        except Exception as e:  # noqa: BLE001  a damaged file: try the one before it
            why = f"cannot be read ({type(e).__name__})"
        if why:
            warnings.warn(f"checkpoint {path} {why}; trying an older one")
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
        if not quiet:  # quiet: the run's own break (watch.py's samples), not a resume
            print(f"resuming from step {state['step']} ({path}); --no-resume starts over", file=sys.stderr)
        return state["step"], list(state["losses"])
    return 0, []
