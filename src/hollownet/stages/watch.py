"""Watching stage 2 while it runs (issue 27): plain progress lines, LoRA snapshots, validation loss and
sample images, each at its own interval; kept apart from the training loop (``train.run_train`` calls
:meth:`Watch.after_step` once per step and :meth:`Watch.finish` at the end).

- snapshots: ``OUT/snapshots/step-XXXX/``, written by the final LoRA's own writer (``export``);
- validation: the store's held-out samples (``precompute.validation_table``: same photos, noise and
  timesteps training never draws), no grad, eval mode, in chunks no larger than a training batch;
- samples: the training state is checkpointed and dropped, the images drawn by ``generate.render`` (two-path,
  exactly as ``hollownet generate``), then the state is rebuilt from the checkpoint: the sample step's
  peak is generation's, and training continues bit for bit as without it.

Work already on disk (a snapshot, a sample row) is never redone after a resume.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hollownet.errors import HollownetError
from hollownet.memory.tracker import PartMeter
from hollownet.settings import Modes
from hollownet.sheets import contact_sheet
from hollownet.stages.export import SNAPSHOTS, lora_state_dict, snapshot_dir, step_name
from hollownet.stages.generate import LoraWeights, generate, memory_record
from hollownet.stages.precompute import VALIDATION_FILE
from hollownet.files import save_image, save_json
from hollownet.toy import NAME as TOY
from hollownet.toy import world as W

SAMPLES = "samples"
SHEET = "sheet.png"
VALIDATION_JSON = "validation.json"


def due(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def default_sample_prompts(model: str, prompt: str) -> list[str]:
    """The instance prompt where the photos never put it: the toy's unseen backgrounds, else SD's beach."""

    if str(model) == TOY:
        return [f"{prompt} on a {bg} background" for bg in W.UNSEEN_BACKGROUNDS]
    return [f"{prompt} on the beach"]


@dataclass
class SampleSettings:
    """How the sample rows are drawn: as ``hollownet generate`` would with these flags (its default scheduler:
    ``train.sample_source``)."""

    prompts: list[str]
    seed: int
    steps: int  # denoising steps
    guidance: float


def lora_weights_of(unet, rank: int, alpha: float):
    """The LoRA on ``unet`` as generation reads it from a file (``generate.LoraWeights``), copied out of the model."""
    from diffusers.utils import convert_unet_state_dict_to_peft


    state = convert_unet_state_dict_to_peft({k: v.detach().float().cpu().clone() for k, v in lora_state_dict(unet).items()})
    targets = sorted({k.rsplit(".lora_A", 1)[0] for k in state if ".lora_A" in k})
    return LoraWeights(targets, rank, float(alpha), state)


@dataclass
class Watch:
    """Stage 2's watchers for one run; ``export(folder)`` writes the LoRA as the final one is written."""

    out: Path
    total: int
    start: int
    log: object  # progress.ProgressLog
    save_every: int = 0
    validate_every: int = 0
    sample_every: int = 0
    samples: SampleSettings | None = None
    rank: int = 0  # the LoRA's, for the sample rows' generation
    alpha: float = 0.0
    validation: int = 0  # how many held-out samples the store has (0: none); read only while validating
    history: list[list] = field(default_factory=list)  # [step, validation loss]
    sample_memory: dict | None = None  # the largest sample step's measured peak (generate's record)

    def __post_init__(self):
        path = self.out / VALIDATION_JSON
        if path.is_file() and self.start:  # a resume: the curve up to the checkpoint is kept, the rest recomputed
            self.history = [h for h in json.loads(path.read_text())["history"] if h[0] <= self.start]

    def after_step(self, step: int, loss: float, trainee, export, validate, source) -> None:
        """Everything due after ``step``: ``validate()`` gives the held-out loss now, ``export(folder, step)`` writes
        a snapshot, ``source(weights)`` sets generation up; ``trainee`` is freed while a sample row is drawn."""
        t0 = time.monotonic()
        extra = ""
        if self.validation and (due(step, self.validate_every) or step == self.total):
            extra = f"validation loss {self.record_validation(step, validate()):.4f}"
        if due(step, self.save_every):
            self.snapshot(step, export)
        if self.samples is not None and due(step, self.sample_every) and step < self.total and not self.drawn(step):
            weights = lora_weights_of(trainee.net.unet, self.rank, self.alpha)
            trainee.while_freed(lambda: self.draw(step, lambda: source(weights)))
        self.log.t0 += time.monotonic() - t0  # s/step and ETA are the training steps' own
        self.log.update(step, loss, extra)

    def drawn(self, step: int) -> bool:
        return (self.out / SAMPLES / step_name(step) / "manifest.json").is_file()

    def final_weights(self, trainee):
        """The LoRA for the last sample row, copied before the training state is dropped (None: no row due)."""
        if self.samples is None or self.drawn(self.total):
            return None
        return lora_weights_of(trainee.net.unet, self.rank, self.alpha)

    def finish(self, weights, source) -> None:
        if weights is not None:
            self.draw(self.total, lambda: source(weights))

    def record_validation(self, step: int, value: float) -> float:
        self.history = [h for h in self.history if h[0] != step] + [[step, round(value, 6)]]
        save_json(self.out / VALIDATION_JSON, {"history": self.history})
        return value

    def snapshot(self, step: int, export) -> None:
        folder = self.out / SNAPSHOTS / step_name(step)
        if not (folder / "hollownet.json").is_file():  # written last by export: a finished snapshot
            export(folder, step)

    def draw(self, step: int, source) -> None:
        """One sample row: every prompt at the fixed seed, two-path, by ``hollownet generate``'s own ``generate``;
        one prompt per call, so each call's peak is exactly what ``plan`` reports for generation (one image)."""
        from PIL import Image


        folder = self.out / SAMPLES / step_name(step)
        if self.drawn(step):  # drawn before an interruption: the same images
            return
        parts, plan, resolution = source()
        entries = [{"file": f"{i:02d}.png", "prompt": p, "seed": self.samples.seed} for i, p in enumerate(self.samples.prompts)]
        for e in entries:
            meter = PartMeter(True, parts.device)
            save = lambda _, pixels, e=e: save_image(folder / e["file"], Image.fromarray(pixels.cpu().numpy()))  # noqa: E731
            generate(parts, plan, [(e["prompt"], e["seed"])], steps=self.samples.steps, resolution=resolution,
                     guidance=self.samples.guidance, meter=meter, on_image=save)
            memory = memory_record(meter)
            if self.sample_memory is None or memory["peak_bytes"] > self.sample_memory["peak_bytes"]:
                self.sample_memory = memory
        save_json(folder / "manifest.json", {"images": entries})  # written last: the row is finished
        self.sheet()

    def sheet(self) -> Path:
        """The contact sheet of every row drawn so far: rows = steps, columns = prompts."""
        from PIL import Image


        rows = {}
        for folder in sorted((self.out / SAMPLES).glob("step-*")):
            if (folder / "manifest.json").is_file():
                entries = json.loads((folder / "manifest.json").read_text())["images"]
                rows[f"step {int(folder.name[5:])}"] = [Image.open(folder / e["file"]) for e in entries]
        path = self.out / SAMPLES / SHEET
        contact_sheet(rows, path, caption="columns: " + " | ".join(self.samples.prompts))
        return path

    def record(self) -> dict:
        """What ``train.json`` keeps of it."""
        rec: dict = {"snapshots": sorted(str(p) for p in (self.out / SNAPSHOTS).glob("step-*"))}
        if self.history:
            best = min(self.history, key=lambda h: h[1])
            rec["validation"] = {"every": self.validate_every, "samples": self.validation, "history": self.history, "best_step": best[0], "best_loss": best[1]}
        if self.samples is not None:
            rec["samples"] = {"every": self.sample_every, "prompts": self.samples.prompts, "seed": self.samples.seed,
                              "steps": sorted(int(p.name[5:]) for p in (self.out / SAMPLES).glob("step-*")),
                              "sheet": str(self.out / SAMPLES / SHEET), "memory": self.sample_memory}
        return rec


def validation_loss(net, batch: dict, embeds, cfg, chunk: int, predict, loss_fn) -> float:
    """Mean loss over the held-out samples: eval mode, no grad, ``chunk`` samples per forward (a training batch)."""
    unet = net.unet
    n = batch["target"].shape[0]
    total = 0.0
    unet.eval()
    try:
        with torch.no_grad():
            for s in range(0, n, chunk):
                part = {k: v[s : s + chunk] for k, v in batch.items()}
                pred = predict(unet, net.plan, part, embeds, net.dtype, cfg.device, False, net.streamer)
                total += loss_fn(pred, part, cfg.device).item() * part["target"].shape[0]
                del pred
    finally:
        unet.train()
    return total / n


def held_out_count(store) -> int:
    """How many held-out samples the store has (0, with a warning, for a store made before they existed)."""
    from safetensors import safe_open


    if not (store.root / VALIDATION_FILE).is_file():
        warnings.warn(f"the store in '{store.root}' has no held-out samples (made by an older hollownet): "
                      "no validation loss; run with a new --output for one")
        return 0
    with safe_open(store.root / VALIDATION_FILE, "pt") as f:
        return int(f.get_slice("target").get_shape()[0])


def load_validation(store, keys) -> dict:
    """The held-out samples, read when validating and dropped after: never resident during a training step."""

    tensors = store.tensors(VALIDATION_FILE)
    return {k: tensors[k] for k in keys}


def generation_modes(modes: Modes) -> Modes:
    """Generation's modes for a run trained in ``modes``: its precision and streaming (no training-only modes)."""
    return Modes(precision=modes.precision, compute_dtype=modes.compute_dtype, stream_weights=modes.stream_weights)
