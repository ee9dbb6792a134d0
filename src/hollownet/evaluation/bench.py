"""The benchmark runner (``hollownet bench``): the paper's comparison table on a benchmark dataset.

For every cell — subject × method × seed — it trains (:func:`hollownet.workflow.personalize`),
generates ``images_per_prompt`` images for each of the subject's evaluation prompts, scores them
(DINO, CLIP-I against the subject's real photos, CLIP-T against the prompt), and records the
measured peak memory of pre-compute and training. The cells are then aggregated into the
paper's table (Method | base params | LoRA params | peak memory | vs inference | DINO | CLIP-I |
CLIP-T) as markdown, JSON and a PNG.

Method specs
------------
``--methods`` is a comma-separated list of specs::

    SPEC   := NAME [ "@" FRACTION ] ( ":" KEY "=" VALUE )*
    NAME   := hollow | lora | full
    KEY    := r | alpha | lr | steps | weights | stream | opt | blocks | samples | infer

* ``hollow``                the paper's cut (``--hollow`` default: up_blocks.0 and its skip partners)
* ``hollow@0.56``           the skip-symmetric cut nearest to 56 % of U-Net parameters
* ``hollow:blocks=down_blocks.3+mid_block+up_blocks.0``  a cut by name ("+" between names)
* ``lora``, ``lora:r=1``    plain LoRA on the whole U-Net (rank from ``--rank`` unless ``r=``)
* ``full``, ``full:lr=5e-6``  full fine-tuning of every U-Net weight
* ``hollow:weights=nf4``    the frozen weights in stage 2 stored int8 / nf4 (or fp32 / bf16 / fp16),
  overriding ``--precision`` for training only (generation runs the original model at ``--precision``)
* ``hollow:stream=1``       streamed frozen weights (``hollownet train --stream-weights``)
* ``hollow:opt=in-backward``  AdamW applied inside backward (``--optimizer adamw-in-backward``)
* ``hollow:samples=100``    stage 1 stores 100 samples, reused over ``steps x batch`` (less stage-1 time)
* ``hollow:infer=merged``   generate with the LoRA fused into one path (default: the paper's two-path)
* options combine: ``hollow@0.56:r=8:lr=2e-4:steps=800``, ``hollow:weights=int8:opt=in-backward``

``r`` (rank), ``alpha`` (LoRA alpha), ``lr`` and ``steps`` override the run-wide ``--rank``,
``--lora-alpha``, ``--lr`` and ``--steps`` for that method; ``@FRACTION`` and ``blocks=`` are for
``hollow`` only, ``r``/``alpha``/``weights``/``stream``/``opt`` not for ``full``. The canonical form of a spec (options in the order
above) names the method in the table and, with ":" written as "_", its folder.

Outputs (all under ``--output``)
--------------------------------
``cells/<subject>/<method>/seed-<s>/result.json``  one finished (or failed) cell, written atomically;
    a rerun skips finished cells and retries failed ones. Beside it ``train/`` (the personalize
    output; its pre-compute store is deleted after the cell unless ``keep="all"``) and ``images/``
    (PNGs + manifest.json); ``keep="results"`` deletes both and keeps only result.json.
``inference_memory.json``  the inference reference for "vs inference" (see below).
``summary.md`` / ``summary.json`` / ``summary.png``  the aggregated table.

Aggregation: a method's score is the mean over all its finished cells (subjects × seeds) and ± is
the sample standard deviation over those cells; ``summary.json`` also has, per metric, the mean and
std over seeds of the subject-averaged score (``over_seeds``) and per-subject means over seeds.

"vs inference" is the mean measured training peak divided by the inference peak: the tensor-memory
peak of one no-grad denoising step of the full U-Net at batch 1 (the paper's inference figure; the
batch-2 classifier-free-guidance figure is kept beside it as ``peak_bytes_cfg``), same precision and
resolution as training, text encoder and VAE not resident. It is predicted by
:func:`hollownet.memory.planner.predict_inference` (fake tensors, no weights loaded) where that module is
installed, else measured once with :class:`hollownet.memory.tracker.MemoryTracker` on the real model; the
two agree to the byte on the tiny test model. Cached in ``inference_memory.json``; its ``source``
says which was used. Training peaks are exact live tensor bytes on the device, weights included.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from hollownet.errors import HollownetError
from hollownet.stages.store import save_json
from hollownet.toy import is_toy

METHOD_NAMES = ("hollow", "lora", "full")
OPTION_KEYS = ("r", "alpha", "lr", "steps", "weights", "stream", "opt", "blocks", "samples", "infer")
INFER_MODES = ("two-path", "merged")
WEIGHTS = ("fp32", "bf16", "fp16", "int8", "nf4")
OPTIMIZER_ALIASES = {"adamw": "adamw", "in-backward": "adamw-in-backward", "adamw-in-backward": "adamw-in-backward"}
_TRUE, _FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off")
METRICS = ("dino", "clip_i", "clip_t")
TOY_METRICS = ("toy_subject", "presence", "background", "drift")  # hollownet.toy.bench: the toy's, not SD's
METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "toy_subject": "toy subject",
                 "presence": "presence", "background": "background", "drift": "drift"}
KEEP_CHOICES = ("weights", "all", "results")
CELL_FORMAT = "hollownet-bench-cell/1"
SUMMARY_FORMAT = "hollownet-bench/1"

__all__ = [
    "BenchConfig",
    "MethodSpec",
    "aggregate",
    "format_summary",
    "measure_inference_peak",
    "parse_method",
    "parse_methods",
    "parse_seeds",
    "plot_summary",
    "run_bench",
]


# --------------------------------------------------------------------------
# Method specs.
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """One parsed ``--methods`` entry; unset options fall back to the run-wide settings."""

    name: str
    fraction: float | None = None
    rank: int | None = None
    alpha: float | None = None
    lr: float | None = None
    steps: int | None = None
    weights: str | None = None  # stage-2 frozen-weight precision (train --precision) for this method
    stream: bool = False  # train --stream-weights
    optimizer: str | None = None  # train --optimizer
    blocks: tuple[str, ...] | None = None
    samples: int | None = None  # stage-1 samples (train --num-samples): fewer than steps x batch reuses them
    infer: str | None = None  # hollow: "merged" generates with the LoRA fused (default: two-path)

    @property
    def key(self) -> str:
        """Canonical spec text, e.g. ``hollow@0.56:r=8``."""
        text = self.name + (f"@{self.fraction:g}" if self.fraction is not None else "")
        for k, v in (("r", self.rank), ("alpha", self.alpha), ("lr", self.lr), ("steps", self.steps)):
            if v is not None:
                text += f":{k}={v:g}" if isinstance(v, float) else f":{k}={v}"
        if self.weights:
            text += f":weights={self.weights}"
        if self.stream:
            text += ":stream=1"
        if self.optimizer:
            text += ":opt=" + ("in-backward" if self.optimizer == "adamw-in-backward" else self.optimizer)
        if self.blocks:
            text += ":blocks=" + "+".join(self.blocks)
        if self.samples:
            text += f":samples={self.samples}"
        if self.infer:
            text += f":infer={self.infer}"
        return text

    @property
    def slug(self) -> str:
        """The key as a folder name (":" is not allowed in Windows file names)."""
        return self.key.replace(":", "_")

    def __str__(self) -> str:
        return self.key


def _bad(spec: str, why: str) -> HollownetError:
    return HollownetError(
        f"method spec {spec!r}: {why} (syntax: NAME[@FRACTION][:KEY=VALUE...], NAME hollow|lora|full, "
        f"KEY r|alpha|lr|steps|weights|stream|opt|blocks|samples|infer; e.g. hollow@0.56, lora:r=1, full:lr=5e-6, hollow:weights=nf4)"
    )


def parse_method(text: str) -> MethodSpec:
    """One spec (see the module docstring); raises :class:`HollownetError` with one line if it doesn't parse."""
    spec = text.strip()
    if not spec:
        raise _bad(text, "empty spec")
    head, *options = spec.split(":")
    name, at, fraction_text = head.partition("@")
    name = name.strip().lower()
    if name not in METHOD_NAMES:
        raise _bad(spec, f"unknown method {name!r}")
    fields: dict = {}
    if at:
        if name != "hollow":
            raise _bad(spec, "@FRACTION is only for hollow")
        try:
            fraction = float(fraction_text)
        except ValueError:
            raise _bad(spec, f"fraction {fraction_text!r} is not a number") from None
        if not 0.0 < fraction < 1.0 or not math.isfinite(fraction):
            raise _bad(spec, f"fraction {fraction_text!r} must be between 0 and 1")
        fields["fraction"] = fraction
    for option in options:
        key, eq, value = option.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key or not value:
            raise _bad(spec, f"option {option!r} is not KEY=VALUE")
        if key not in OPTION_KEYS:
            raise _bad(spec, f"unknown option {key!r}")
        target = {"r": "rank", "opt": "optimizer"}.get(key, key)
        if target in fields:
            raise _bad(spec, f"option {key!r} given twice")
        if key in ("r", "alpha", "weights", "stream", "opt") and name == "full":
            raise _bad(spec, f"{key}= is a LoRA option; full fine-tuning has no LoRA")
        if key == "weights":
            if value.lower() not in WEIGHTS:
                raise _bad(spec, f"weights={value!r} is not one of {'|'.join(WEIGHTS)}")
            fields["weights"] = value.lower()
            continue
        if key == "stream":
            if name != "hollow":
                raise _bad(spec, "stream= is only for hollow")
            if value.lower() not in _TRUE + _FALSE:
                raise _bad(spec, f"stream={value!r} is not 1 or 0")
            fields["stream"] = value.lower() in _TRUE
            continue
        if key == "opt":
            if value.lower() not in OPTIMIZER_ALIASES:
                raise _bad(spec, f"opt={value!r} is not adamw or in-backward")
            fields["optimizer"] = OPTIMIZER_ALIASES[value.lower()]
            continue
        if key == "infer":
            if name != "hollow":
                raise _bad(spec, "infer= is only for hollow (lora and full have one path)")
            if value.lower() not in INFER_MODES:
                raise _bad(spec, f"infer={value!r} is not two-path or merged")
            fields["infer"] = value.lower()
            continue
        if key == "blocks":
            if name != "hollow":
                raise _bad(spec, "blocks= is only for hollow")
            blocks = tuple(b.strip() for b in value.split("+") if b.strip())
            if not blocks:
                raise _bad(spec, "blocks= names no block")
            fields["blocks"] = blocks
            continue
        try:
            number = int(value) if key in ("r", "steps", "samples") else float(value)
        except ValueError:
            kind = "an integer" if key in ("r", "steps", "samples") else "a number"
            raise _bad(spec, f"{key}={value!r} is not {kind}") from None
        if not (number > 0 and math.isfinite(number)):
            raise _bad(spec, f"{key}={value!r} must be positive")
        fields[target] = number
    if "fraction" in fields and "blocks" in fields:
        raise _bad(spec, "give @FRACTION or blocks=, not both")
    if fields.get("stream") and fields.get("weights") in ("int8", "nf4"):
        raise _bad(spec, "stream=1 reads float weights; not with weights=int8|nf4")
    if fields.get("optimizer") == "adamw":
        fields.pop("optimizer")  # the default: one canonical form
    if fields.get("stream") is False:
        fields.pop("stream")
    if fields.get("infer") == "two-path":
        fields.pop("infer")  # the default
    return MethodSpec(name=name, **fields)


def parse_methods(methods: str | list[str] | tuple[str, ...]) -> list[MethodSpec]:
    """A comma-separated string (or list) of specs; duplicates (same canonical form) are refused."""
    items = methods.split(",") if isinstance(methods, str) else [m for part in methods for m in str(part).split(",")]
    specs = [parse_method(m) for m in items if m.strip()]
    if not specs:
        raise HollownetError("--methods names no method; e.g. --methods hollow,lora")
    seen: set[str] = set()
    for s in specs:
        if s.key in seen:
            raise HollownetError(f"--methods lists {s.key!r} twice")
        seen.add(s.key)
    return specs


def parse_seeds(seeds: str | int | list[int] | tuple[int, ...]) -> list[int]:
    """``"0,1,2"``, ``"0-4"`` (inclusive range), a mix of both, or a list of ints."""
    if isinstance(seeds, int):
        return [seeds]
    if not isinstance(seeds, str):
        out = [int(s) for s in seeds]
    else:
        out = []
        for part in (p.strip() for p in seeds.split(",")):
            if not part:
                continue
            lo, dash, hi = part.partition("-")
            try:
                out += list(range(int(lo), int(hi) + 1)) if dash and lo else [int(part)]
            except ValueError:
                raise HollownetError(f"--seeds {seeds!r}: {part!r} is not a seed or a range like 0-4") from None
    if not out:
        raise HollownetError("--seeds names no seed; e.g. --seeds 0,1,2")
    if len(set(out)) != len(out):
        raise HollownetError(f"--seeds {seeds!r} lists a seed twice")
    return out


# --------------------------------------------------------------------------
# Configuration.
# --------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Everything ``hollownet bench`` takes; mirrors its flags."""

    model: str
    dataset: str
    output: str
    methods: str | list[str] = "hollow,lora"
    seeds: str | list[int] = "0"
    subjects: list[str] | None = None  # default: every subject with photos
    steps: int = 400
    lr: float = 1e-4
    rank: int = 32
    lora_alpha: float | None = None
    resolution: int = 512
    batch: int = 1
    precision: str = "fp32"
    grad_checkpointing: bool = False
    images_per_prompt: int = 4
    prompts: int | None = None  # the first N evaluation prompts of each subject (default all)
    gen_steps: int = 30
    guidance: float = 7.5
    scheduler: str = "dpm"
    identifier: str = "sks"
    dino_model: object = "facebook/dino-vits16"  # id / folder, or a built evaluate.DinoExtractor
    clip_model: object = "openai/clip-vit-base-patch32"  # id / folder, or a built evaluate.ClipExtractor
    keep: str = "weights"  # weights | all | results
    summarize_only: bool = False
    device: str = "cpu"
    lora_format: str = "both"  # LoRA file(s) each cell writes: diffusers | kohya | both (as train --format)

    def __post_init__(self):
        if self.keep not in KEEP_CHOICES:
            raise HollownetError(f"--keep {self.keep!r} is not one of {', '.join(KEEP_CHOICES)}")
        for name in ("steps", "rank", "batch", "images_per_prompt", "gen_steps", "resolution"):
            if getattr(self, name) < 1:
                raise HollownetError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.prompts is not None and self.prompts < 1:
            raise HollownetError(f"--prompts must be at least 1 (got {self.prompts})")


def _model_label(m) -> str:
    return m if isinstance(m, str) else getattr(m, "model_id", type(m).__name__)


@dataclass
class _Cell:
    subject: object  # data.BenchmarkSubject
    spec: MethodSpec
    seed: int
    folder: Path
    config: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.subject.name} × {self.spec.key} × seed {self.seed}"

    @property
    def result_path(self) -> Path:
        return self.folder / "result.json"


def _cell_config(cfg: BenchConfig, spec: MethodSpec, subject, seed: int, prompts: list[str], fingerprint: str,
                 scorer: str = "dino-clip") -> dict:
    """The settings a cell's result depends on; a rerun refuses a finished cell made with others."""
    return {
        "model_fingerprint": fingerprint,
        "subject": subject.name,
        "photos": sorted(p.name for p in subject.photo_paths),
        "instance_prompt": subject.instance_prompt,
        "method": spec.name,
        "hollow": spec.fraction,
        "hollow_blocks": list(spec.blocks) if spec.blocks else None,
        "rank": (spec.rank or cfg.rank) if spec.name != "full" else None,
        "lora_alpha": (spec.alpha or cfg.lora_alpha) if spec.name != "full" else None,
        "lr": spec.lr or cfg.lr,
        "steps": spec.steps or cfg.steps,
        "batch": cfg.batch,
        "resolution": cfg.resolution,
        "precision": cfg.precision,
        "grad_checkpointing": cfg.grad_checkpointing,
        # the low-memory options only when set, so cells finished before they existed stay valid
        **({"train_precision": spec.weights} if spec.weights else {}),
        **({"stream_weights": True} if spec.stream else {}),
        **({"optimizer": spec.optimizer} if spec.optimizer else {}),
        **({"num_samples": spec.samples} if spec.samples else {}),
        **({"infer": spec.infer} if spec.infer else {}),
        "seed": seed,
        "prompts": prompts,
        "images_per_prompt": cfg.images_per_prompt,
        "gen_steps": cfg.gen_steps,
        "guidance": cfg.guidance,
        "scheduler": cfg.scheduler,
        **({"scorer": "toy"} if scorer == "toy" else {"dino_model": _model_label(cfg.dino_model),
                                                       "clip_model": _model_label(cfg.clip_model)}),
    }


def _select_subjects(dataset, names: list[str] | None) -> list:
    from hollownet.data import DatasetError

    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names:
        return list(dataset)
    out = []
    for name in names:
        if name in dataset:
            out.append(dataset[name])
        elif name in getattr(dataset, "missing", ()) or name in getattr(dataset, "classes", {}):
            raise DatasetError(
                f"subject {name!r} has no photos in {dataset.root}: put its photos in {dataset.root / name} "
                f"or leave it out of --subjects"
            )
        else:
            raise DatasetError(f"no subject {name!r} in {dataset.root}; subjects: {', '.join(dataset.names)}")
    return out


# --------------------------------------------------------------------------
# The run.
# --------------------------------------------------------------------------


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    """Run (or resume) every cell, then write and return the summary (``summary.json``'s content)."""
    from hollownet.data import DatasetWarning, load_benchmark_dataset
    from hollownet.loading import model_fingerprint, resolve_model_dir

    log = log or (lambda msg: print(msg, flush=True))
    specs = parse_methods(cfg.methods)
    seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.output)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        if cfg.dataset == "toy":  # the bundled novel subjects, rendered into the output folder
            from hollownet.toy.bench import toy_dataset

            dataset = toy_dataset(out / "toy-subjects", identifier=cfg.identifier)
        else:
            dataset = load_benchmark_dataset(cfg.dataset, identifier=cfg.identifier)
    for w in caught:  # e.g. subjects without photos: one line each, not a Python warning with a source line
        if issubclass(w.category, DatasetWarning):
            log(f"note: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    subjects = _select_subjects(dataset, cfg.subjects)
    model_dir = resolve_model_dir(cfg.model)
    fingerprint = model_fingerprint(model_dir)
    # the toy model is scored by the toy evaluator (no DINO / CLIP weights exist for its world)
    scorer = "toy" if is_toy(model_dir) else "dino-clip"
    out.mkdir(parents=True, exist_ok=True)

    cells: list[_Cell] = []
    for subject in subjects:
        prompts = list(subject.prompts[: cfg.prompts] if cfg.prompts else subject.prompts)
        for spec in specs:
            for seed in seeds:
                folder = out / "cells" / subject.name / spec.slug / f"seed-{seed}"
                cells.append(_Cell(subject, spec, seed, folder,
                                   _cell_config(cfg, spec, subject, seed, prompts, fingerprint, scorer)))
    todo = _check_existing(cells, out)
    log(f"bench: {len(subjects)} subject(s) × {len(specs)} method(s) × {len(seeds)} seed(s) = {len(cells)} cells, "
        f"{len(cells) - len(todo)} already finished, {len(todo)} to run")

    inference = _inference_reference(cfg, model_dir, fingerprint, out, measure=not cfg.summarize_only, log=log)
    if todo and not cfg.summarize_only:
        dino, clip = _extractors(cfg) if scorer != "toy" else (None, None)
        unet_params = _unet_params(model_dir)
        for i, cell in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {cell.label}")
            result = _run_cell(cell, cfg, dataset.identifier, dino, clip, unet_params, log)
            save_json(cell.result_path, result)
            if result["status"] == "ok":
                s = result["scores"]
                log(f"    done in {result['timings']['cell_s']:.1f} s: "
                    + ", ".join(f"{METRIC_LABELS[k]} {s[k]:.4f}" for k in metrics_of([result])))
            else:
                log(f"    FAILED: {result['error']}")

    results = [_load_result(c) for c in cells]
    summary = aggregate([r for r in results if r is not None], inference_peak=inference.get("peak_bytes"),
                        methods=[s.key for s in specs])
    summary.update({
        "format": SUMMARY_FORMAT,
        "dataset": str(dataset.root),
        "layout": dataset.layout,
        "model": str(cfg.model),
        "model_fingerprint": fingerprint,
        "subjects": [s.name for s in subjects],
        "seeds": seeds,
        "inference": inference,
        "settings": {k: (_model_label(v) if k in ("dino_model", "clip_model") else v)
                     for k, v in asdict(cfg).items() if k not in ("output", "summarize_only", "device")},
        "pending": [{"subject": c.subject.name, "method": c.spec.key, "seed": c.seed}
                    for c, r in zip(cells, results) if r is None],
    })
    summary["settings"]["methods"] = [s.key for s in specs]
    summary["settings"]["seeds"] = seeds
    save_json(out / "summary.json", summary)
    (out / "summary.md").write_text(format_summary(summary), encoding="utf-8")
    if any(m["n_ok"] for m in summary["methods"]):
        plot_summary(summary, out / "summary.png")
        plot_tradeoffs(summary, out / "tradeoffs.png")
    return summary


def _check_existing(cells: list[_Cell], out: Path) -> list[_Cell]:
    """Cells still to run; a finished cell made with other settings stops the run before any work."""
    todo = []
    for cell in cells:
        result = _load_result(cell)
        if result is None or result.get("status") != "ok":
            todo.append(cell)
            continue
        old = result.get("config", {})
        diff = [k for k in cell.config if old.get(k) != cell.config[k]]
        if diff:
            k = diff[0]
            raise HollownetError(
                f"{cell.folder} was made with {k} {_short(old.get(k))}, not {_short(cell.config[k])}; "
                f"use a new --output folder, or delete {out / 'cells'} to start over"
            )
    return todo


def _short(v) -> str:
    s = json.dumps(v)
    return s if len(s) <= 50 else s[:47] + "..."


def _load_result(cell: _Cell) -> dict | None:
    try:
        return json.loads(cell.result_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _extractors(cfg: BenchConfig):
    """Built once per run, before any training, so a bad --dino-model fails in seconds."""
    from hollownet.evaluation.metrics import ClipExtractor, DinoExtractor

    try:
        dino = cfg.dino_model if isinstance(cfg.dino_model, DinoExtractor) else DinoExtractor(cfg.dino_model, cfg.device)
        clip = cfg.clip_model if isinstance(cfg.clip_model, ClipExtractor) else ClipExtractor(cfg.clip_model, cfg.device)
    except ValueError as e:
        raise HollownetError(str(e)) from None
    return dino, clip


def _unet_params(model_dir: Path) -> int:
    from diffusers import UNet2DConditionModel

    from hollownet.cut import meta_unet

    return sum(p.numel() for p in meta_unet(UNet2DConditionModel.load_config(model_dir / "unet")).parameters())


def _run_cell(cell: _Cell, cfg: BenchConfig, identifier: str, dino, clip, unet_params: int, log) -> dict:
    """One cell, start to finish; any exception becomes a failed result (the run goes on)."""
    from hollownet.evaluation.metrics import evaluate_folder
    from hollownet.workflow import TrainRequest, personalize

    t0 = time.perf_counter()
    c = cell.config
    train_dir, images_dir = cell.folder / "train", cell.folder / "images"
    base = {"format": CELL_FORMAT, "subject": cell.subject.name, "class_noun": cell.subject.class_noun,
            "method": cell.spec.key, "seed": cell.seed, "config": c}
    try:
        # A retried cell starts clean: a half-written store or LoRA from a crash is not trusted.
        shutil.rmtree(train_dir, ignore_errors=True)
        shutil.rmtree(images_dir, ignore_errors=True)
        record = personalize(TrainRequest(
            model=cfg.model, images=str(cell.subject.folder), prompt=cell.subject.instance_prompt,
            output=str(train_dir), method=c["method"], hollow=c["hollow"], hollow_blocks=c["hollow_blocks"],
            rank=c["rank"] or cfg.rank, lora_alpha=c["lora_alpha"], resolution=cfg.resolution, steps=c["steps"],
            batch=cfg.batch, lr=c["lr"], seed=cell.seed, precision=c.get("train_precision", cfg.precision),
            grad_checkpointing=cfg.grad_checkpointing, stream_weights=c.get("stream_weights", False),
            optimizer=c.get("optimizer", "adamw"), checkpoint_every=0, device=cfg.device, track_memory=True,
            num_samples=c.get("num_samples"), lora_format=cfg.lora_format,
        ))
        info_path = train_dir / "hollownet.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        t1 = time.perf_counter()
        gen = dict(images_per_prompt=cfg.images_per_prompt, steps=cfg.gen_steps, guidance=cfg.guidance,
                   scheduler=cfg.scheduler, resolution=cfg.resolution, precision=cfg.precision, device=cfg.device,
                   seed=cell.seed, merged=c.get("infer") == "merged")
        generate_images(cfg.model, train_dir, c["method"], c["prompts"], images_dir, **gen)
        if c.get("scorer") == "toy":  # ordinary prompts too: does the subject leak into them (drift)?
            from hollownet.toy.bench import DRIFT_PROMPTS

            generate_images(cfg.model, train_dir, c["method"], list(DRIFT_PROMPTS), cell.folder / "drift", **gen)
        t2 = time.perf_counter()
        if c.get("scorer") == "toy":
            from hollownet.toy.bench import score_cell

            scores = score_cell(images_dir, cell.folder / "drift", cell.subject.folder)
        else:
            scores = evaluate_folder(images_dir, cell.subject.folder, identifier=identifier, dino_model=dino,
                                     clip_model=clip, device=cfg.device)
        t3 = time.perf_counter()
    except Exception as e:  # noqa: BLE001 - a failed cell is recorded, not fatal
        lines = str(e).strip().splitlines()
        return {**base, "status": "failed", "error": f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": "),
                "traceback": "".join(traceback.format_exception(e)[-6:]), "finished": _now(),
                "timings": {"cell_s": round(time.perf_counter() - t0, 3)}}
    plan = record.get("plan")
    mem = record.get("memory") or {}
    train_mem, pre_mem = mem.get("train") or {}, mem.get("precompute") or {}
    result = {
        **base,
        "status": "ok",
        "error": None,
        "params": {
            "unet": unet_params,
            "base": plan["kept_params"] if plan else unet_params,
            "lora": info.get("trainable_params") if c["method"] != "full" else None,
            "trainable": info.get("trainable_params") if c["method"] != "full" else unet_params,
        },
        "plan": plan,
        "memory": {
            "train_peak_bytes": train_mem.get("peak_bytes"),
            "train_peak_phase": train_mem.get("peak_phase"),
            "train_cuda_max_allocated": train_mem.get("cuda_max_allocated"),
            "precompute_peak_bytes": pre_mem.get("peak_bytes"),
            "precompute_peak_phase": pre_mem.get("peak_phase"),
        },
        "timings": {**record.get("timings", {}), "generate_s": round(t2 - t1, 3), "evaluate_s": round(t3 - t2, 3),
                    "cell_s": round(time.perf_counter() - t0, 3)},
        "loss": {k: v for k, v in (record.get("loss") or {}).items() if k != "history"},
        "scores": {k: scores[k] for k in (*metrics_of([{"scores": scores}]), "n_generated", "n_reference", "n_prompts",
                                          "per_prompt")},
        "finished": _now(),
    }
    _cleanup(cell.folder, cfg.keep)
    return result


def _cleanup(folder: Path, keep: str) -> None:
    if keep == "all":
        return
    if keep == "results":
        for name in ("train", "images", "drift"):
            shutil.rmtree(folder / name, ignore_errors=True)
        return
    shutil.rmtree(folder / "train" / "store", ignore_errors=True)
    shutil.rmtree(folder / "train" / "checkpoints", ignore_errors=True)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def generate_images(model: str, train_dir: str | Path, method: str, prompts: list[str], output: str | Path, *,
                    images_per_prompt: int, steps: int, guidance: float = 7.5, scheduler: str = "dpm",
                    resolution: int | None = None, precision: str = "fp32", device: str = "cpu", seed: int = 0,
                    merged: bool = False) -> dict:
    """``images_per_prompt`` images per prompt into ``output`` with one ``manifest.json``; the pipeline loads once.

    hollow: the paper's two-path inference (as ``hollownet generate``); lora: the LoRA on the U-Net;
    full: the fine-tuned U-Net in ``train_dir/unet``; ``merged``: hollow's LoRA fused, one path. Image ``i`` of prompt ``p`` uses the noise seed
    ``seed * 1_000_003 + p * 1_009 + i``, so all methods of a cell see the same starting noise.
    """
    import torch

    from hollownet.stages.generate import denoise, load_pipeline
    from hollownet.cut import plan_for_blocks
    from hollownet.settings import torch_dtype

    train_dir, out = Path(train_dir), Path(output)
    pipe, info = load_pipeline(model, None if method == "full" else str(train_dir), precision, device, scheduler)
    if method == "full":
        from diffusers import UNet2DConditionModel

        if not (train_dir / "unet").is_dir():
            raise HollownetError(f"no fine-tuned unet/ in '{train_dir}'")
        pipe.unet = UNet2DConditionModel.from_pretrained(train_dir / "unet", torch_dtype=torch_dtype(precision)).to(device)
    plan = plan_for_blocks(pipe.unet, info["hollow_blocks"]) if info.get("method") == "hollow" and not merged else None
    if merged and method != "full":
        pipe.fuse_lora()
    resolution = resolution or info.get("resolution") or pipe.unet.config.sample_size * pipe.vae_scale_factor
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for p, prompt in enumerate(prompts):
        for i in range(images_per_prompt):
            image_seed = seed * 1_000_003 + p * 1_009 + i
            image = denoise(pipe, plan, prompt, steps=steps, resolution=resolution, guidance=guidance,
                            negative_prompt=None, generator=torch.Generator().manual_seed(image_seed), device=device)
            name = f"p{p:02d}-{i:02d}.png"
            image.save(out / name)
            entries.append({"file": name, "prompt": prompt, "seed": image_seed})
    save_json(out / "manifest.json", {"images": entries})
    del pipe
    return {"images": entries, "mode": "two-path" if plan is not None else ("merged" if merged else method)}


# --------------------------------------------------------------------------
# Inference reference.
# --------------------------------------------------------------------------


def measure_inference_peak(model: str | Path, *, resolution: int, precision: str = "fp32", device: str = "cpu",
                           batch: int = 1) -> dict:
    """Exact tensor-memory peak of one no-grad forward of the full U-Net (weights included).

    ``batch=1`` is the paper's inference figure, ``batch=2`` one denoising step with classifier-free
    guidance. The text-encoder output it reads is a [batch, tokens, cross_attention_dim] tensor of
    the model's token length.
    """
    import torch

    from hollownet.memory.tracker import MemoryTracker
    from hollownet.loading import load_unet, release_memory, resolve_model_dir, vae_scale_factor
    from hollownet.settings import torch_dtype

    model_dir = resolve_model_dir(model)
    dtype = torch_dtype(precision)
    unet, _ = load_unet(model_dir, dtype=dtype, device=device)
    te_config = json.loads((model_dir / "text_encoder" / "config.json").read_text())
    tokens = te_config.get("max_position_embeddings", 77)
    side = resolution // vae_scale_factor(json.loads((model_dir / "vae" / "config.json").read_text()))
    tracker = MemoryTracker(device=device).add_resident(unet)
    with torch.no_grad(), tracker:
        sample = torch.randn(batch, unet.config.in_channels, side, side, device=device, dtype=dtype)
        text = torch.randn(batch, tokens, unet.config.cross_attention_dim, device=device, dtype=dtype)
        t = torch.full((batch,), 500, device=device, dtype=torch.long)
        with tracker.phase("forward"):
            unet(sample, t, text)
    del unet
    release_memory()
    report = tracker.report
    return {
        "peak_bytes": report.peak_bytes,
        "weights_bytes": report.breakdown.get("weights"),
        "cuda_max_allocated": report.cuda_max_allocated,
        "source": (f"measured with hollownet.memory.tracker.MemoryTracker: one no-grad forward of the full U-Net, "
                   f"text encoder and VAE not resident (batch {batch}, {resolution} px, {precision}, {device})"),
        "batch": batch,
        "resolution": resolution,
        "precision": precision,
        "device": str(device),
    }


def predict_inference_peak(model: str | Path, *, resolution: int, precision: str = "fp32", batch: int = 1) -> dict:
    """The same figure from ``hollownet.memory.planner`` (fake tensors: no weights loaded, seconds for SD)."""
    from hollownet.memory import planner as memplan
    from hollownet.loading import resolve_model_dir

    model_dir = resolve_model_dir(model)
    mc = memplan.load_model_configs(model_dir)
    req = memplan.PlanRequest(model=str(model_dir), resolution=resolution, precision=precision)
    report = memplan.predict_inference(mc, req, batch=batch)
    return {
        "peak_bytes": report.peak_bytes,
        "weights_bytes": report.breakdown.get("weights"),
        "source": (f"predicted by hollownet.memory.planner.predict_inference: {getattr(memplan, 'INFERENCE_DEFINITION', 'U-Net step')}"
                   f" (batch {batch}, {resolution} px, {precision})"),
        "batch": batch,
        "resolution": resolution,
        "precision": precision,
    }


def _inference_reference(cfg: BenchConfig, model_dir: Path, fingerprint: str, out: Path, *, measure: bool, log) -> dict:
    """The inference peak for "vs inference": batch 1, the paper's figure (batch 2, CFG, kept beside it).

    ``hollownet.memory.planner``'s prediction where that module is installed (it agrees to the byte with a
    measurement), else measured once with the MemoryTracker; cached in OUTPUT/inference_memory.json.
    """
    path = out / "inference_memory.json"
    want = {"model_fingerprint": fingerprint, "resolution": cfg.resolution, "precision": cfg.precision}
    try:
        cached = json.loads(path.read_text())
        if all(cached.get(k) == v for k, v in want.items()):
            return cached
    except (OSError, json.JSONDecodeError):
        pass
    if not measure:
        return {"peak_bytes": None, "source": "not known yet (run without --summarize-only once)"}
    kw = dict(resolution=cfg.resolution, precision=cfg.precision)
    result = None
    try:
        import importlib.util

        if importlib.util.find_spec("hollownet.memory.planner") is not None:
            result = predict_inference_peak(model_dir, **kw)
            result["peak_bytes_cfg"] = predict_inference_peak(model_dir, batch=2, **kw)["peak_bytes"]
    except Exception as e:  # noqa: BLE001 - the planner is optional here; measuring is the fallback
        log(f"note: hollownet.memory.planner could not predict the inference peak ({type(e).__name__}: {e}); measuring it")
        result = None
    if result is None:
        log("measuring the inference peak (one U-Net forward) ...")
        result = measure_inference_peak(model_dir, device=cfg.device, **kw)
        result["peak_bytes_cfg"] = measure_inference_peak(model_dir, device=cfg.device, batch=2, **kw)["peak_bytes"]
    result = {**result, **want}
    save_json(path, result)
    return result


# --------------------------------------------------------------------------
# Aggregation and reports.
# --------------------------------------------------------------------------


def _stats(values) -> dict:
    """mean, sample standard deviation (None below two values) and count, ignoring None."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None, "n": len(vals)}


def aggregate(results: list[dict], inference_peak: int | None = None, methods: list[str] | None = None) -> dict:
    """Cell results -> one row per method (pure: no files, no models).

    Per method: scores and memory as mean ± sample std over all finished cells (subjects × seeds);
    ``over_seeds``: per metric, mean ± std over seeds of the per-seed mean over subjects;
    ``per_subject``: per metric, mean ± std over seeds; params from the method's cells (the same in
    every cell of a method); ``vs_inference``: mean training peak / ``inference_peak``.
    Failed cells count in ``n_failed`` and are listed in ``failed``; they add nothing to the means.
    """
    metrics = metrics_of(results)
    order = list(methods or [])
    for r in results:
        if r["method"] not in order:
            order.append(r["method"])
    rows = []
    for m in order:
        cells = [r for r in results if r["method"] == m]
        ok = [r for r in cells if r.get("status") == "ok"]
        seeds = sorted({r["seed"] for r in ok})
        subjects = list(dict.fromkeys(r["subject"] for r in ok))
        row = {
            "method": m,
            "n_cells": len(cells),
            "n_ok": len(ok),
            "n_failed": len(cells) - len(ok),
            "subjects": subjects,
            "seeds": seeds,
            "params": _params(ok),
            "plan": next((r.get("plan") for r in ok if r.get("plan")), None),
            "scores": {k: _stats(r["scores"][k] for r in ok) for k in metrics},
            "over_seeds": {k: _stats(_stats(r["scores"][k] for r in ok if r["seed"] == s)["mean"] for s in seeds)
                           for k in metrics},
            "per_subject": {s: {k: _stats(r["scores"][k] for r in ok if r["subject"] == s) for k in metrics}
                            for s in subjects},
            "memory": {k: _stats(r.get("memory", {}).get(k) for r in ok)
                       for k in ("train_peak_bytes", "precompute_peak_bytes")},
            "timings": {k: _stats(r.get("timings", {}).get(k) for r in ok)
                        for k in ("precompute_s", "train_s", "train_s_per_step", "generate_s", "evaluate_s", "cell_s")},
        }
        train_peak = row["memory"]["train_peak_bytes"]["mean"]
        row["vs_inference"] = train_peak / inference_peak if inference_peak and train_peak is not None else None
        pre_peak = row["memory"]["precompute_peak_bytes"]["mean"]
        row["precompute_vs_inference"] = pre_peak / inference_peak if inference_peak and pre_peak is not None else None
        rows.append(row)
    failed = [{"subject": r["subject"], "method": r["method"], "seed": r["seed"], "error": r.get("error")}
              for r in results if r.get("status") != "ok"]
    return {
        "metrics": list(metrics),
        "methods": rows,
        "failed": failed,
        "n_cells": len(results),
        "n_ok": sum(r["n_ok"] for r in rows),
        "n_failed": len(failed),
        "inference_peak_bytes": inference_peak,
    }


def metrics_of(results: list[dict]) -> tuple[str, ...]:
    """The score columns: the toy's where the cells were scored by the toy evaluator, else DINO / CLIP."""
    toy = any("toy_subject" in (r.get("scores") or {}) for r in results)
    return TOY_METRICS if toy else METRICS


def _params(ok: list[dict]) -> dict:
    if not ok:
        return {"unet": None, "base": None, "lora": None, "trainable": None}
    first = ok[0].get("params", {})
    return {k: first.get(k) for k in ("unet", "base", "lora", "trainable")}


def _fmt_count(n) -> str:
    if n is None:
        return "—"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def _fmt_score(st: dict) -> str:
    if not st or st.get("mean") is None:
        return "—"
    return f"{st['mean']:.4f}" + (f" ± {st['std']:.4f}" if st.get("std") is not None else "")


def _fmt_bytes(st: dict) -> str:
    from hollownet.memory.tracker import format_bytes

    return "—" if not st or st.get("mean") is None else format_bytes(st["mean"])


def _md(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def format_summary(summary: dict) -> str:
    """The paper-style markdown table, a memory/time table, per-subject scores and failed cells."""
    from hollownet.memory.tracker import format_bytes

    metrics = summary.get("metrics") or METRICS
    lines = ["| Method | base params | LoRA params | peak memory | vs inference | "
             + " | ".join(METRIC_LABELS[k] for k in metrics) + " |", "|---|---:|---:|---:|---:|" + "---:|" * len(metrics)]
    for row in summary["methods"]:
        p = row["params"]
        vs = f"{row['vs_inference']:.2f}×" if row.get("vs_inference") is not None else "—"
        lines.append(f"| {_md(row['method'])} | {_fmt_count(p['base'])} | {_fmt_count(p['lora'])} | "
                     f"{_fmt_bytes(row['memory']['train_peak_bytes'])} | {vs} | "
                     + " | ".join(_fmt_score(row["scores"][k]) for k in metrics) + " |")
    inf = summary.get("inference") or {}
    n_ok, n_all = summary.get("n_ok", 0), summary.get("n_cells", 0)
    lines += ["", f"- {n_ok} of {n_all} cells finished"
              + (f", {summary['n_failed']} failed" if summary.get("n_failed") else "")
              + (f", {len(summary['pending'])} not run yet" if summary.get("pending") else "") + ".",
              ("- toy subject: cosine of the toy evaluator's features, generated vs subject photos (DINO-like); "
               "presence: share of images showing the subject; background: share following the prompt's background; "
               "drift: share of ordinary-prompt images showing the subject (lower is better). All are the toy "
               "model's figures, not Stable Diffusion's; mean ± sample std over finished cells (subjects × seeds)."
               if tuple(metrics) == TOY_METRICS else
               "- DINO, CLIP-I, CLIP-T: raw cosine, mean ± sample std over finished cells (subjects × seeds)."),
              "- base params: U-Net parameters loaded for training (the kept outer layers for hollow); "
              "LoRA params: trained LoRA parameters (full fine-tuning trains every U-Net parameter).",
              "- peak memory: measured training peak (exact live tensor bytes on the device, weights included).",
              f"- vs inference: training peak / inference peak ({format_bytes(inf.get('peak_bytes'))}; "
              f"{inf.get('source', 'n/a')})."]
    lines += ["", "| Method | hollowed | pre-compute peak | pre-compute vs inference | train s/step | "
              "generate s | cells |", "|---|---:|---:|---:|---:|---:|---:|"]
    for row in summary["methods"]:
        plan = row.get("plan")
        hollowed = f"{plan['fraction']:.0%}" if plan else "—"
        pvs = f"{row['precompute_vs_inference']:.2f}×" if row.get("precompute_vs_inference") is not None else "—"
        sps, gen = row["timings"]["train_s_per_step"]["mean"], row["timings"]["generate_s"]["mean"]
        lines.append(f"| {_md(row['method'])} | {hollowed} | {_fmt_bytes(row['memory']['precompute_peak_bytes'])} | "
                     f"{pvs} | {'—' if sps is None else f'{sps:.3f}'} | {'—' if gen is None else f'{gen:.1f}'} | "
                     f"{row['n_ok']}/{row['n_cells']} |")
    subjects = list(dict.fromkeys(s for row in summary["methods"] for s in row["per_subject"]))
    if subjects:
        lines += ["", f"Per subject ({' / '.join(METRIC_LABELS[k] for k in metrics)}, mean over seeds):", "",
                  "| subject | " + " | ".join(_md(r["method"]) for r in summary["methods"]) + " |",
                  "|---|" + "---:|" * len(summary["methods"])]
        for s in subjects:
            vals = []
            for row in summary["methods"]:
                st = row["per_subject"].get(s)
                vals.append("—" if st is None else " / ".join(f"{st[k]['mean']:.3f}" for k in metrics))
            lines.append(f"| {_md(s)} | " + " | ".join(vals) + " |")
    if summary.get("failed"):
        lines += ["", "Failed cells (rerun the same command to retry them):", ""]
        lines += [f"- {f['subject']} × {f['method']} × seed {f['seed']}: {_md(f.get('error') or '?')}"
                  for f in summary["failed"]]
    return "\n".join(lines) + "\n"


def plot_summary(summary: dict, path: str | Path) -> None:
    """Bars per method: DINO, CLIP-I, CLIP-T (± std) and training peak memory vs the inference peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["methods"] if r["n_ok"]]
    names = [r["method"] for r in rows]
    x = range(len(rows))
    metrics = summary.get("metrics") or METRICS
    fig, axes = plt.subplots(1, len(metrics) + 1, figsize=((len(metrics) + 1) * (1.5 + 0.6 * max(2, len(rows))), 4), dpi=100)
    for ax, k in zip(axes, metrics):
        means = [r["scores"][k]["mean"] for r in rows]
        errs = [r["scores"][k]["std"] or 0.0 for r in rows]
        ax.bar(x, means, yerr=errs, capsize=4, color="tab:blue")
        ax.set_title(METRIC_LABELS[k])
        ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax = axes[len(metrics)]
    mib = [(r["memory"]["train_peak_bytes"]["mean"] or 0) / 2**20 for r in rows]
    ax.bar(x, mib, color="tab:orange", label="training peak")
    inf = summary.get("inference_peak_bytes")
    if inf:
        ax.axhline(inf / 2**20, color="k", linestyle="--", label="inference peak")
    ax.set_title("peak memory (MiB)")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tradeoffs(summary: dict, path: str | Path) -> None:
    """Fidelity against the hollowed fraction (hollow rows; LoRA FT at 0) and against training peak memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = (summary.get("metrics") or METRICS)[0]
    rows = [r for r in summary["methods"] if r["n_ok"] and r["scores"][metric]["mean"] is not None]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)

    def plain_cut(m: str) -> bool:  # LoRA FT and hollow rows that differ only in their cut (and rank)
        name = m.split(":")[0].split("@")[0]
        return name in ("hollow", "lora") and all(o.split("=")[0] in ("r", "blocks") for o in m.split(":")[1:])

    def label(r: dict) -> str:  # a cut by name is long: its hollowed share says it
        return f"cut {r['plan']['fraction']:.0%}" if r.get("plan") and "blocks=" in r["method"] else r["method"]

    cuts = sorted(((r["plan"]["fraction"] if r.get("plan") else 0.0), r["method"], r) for r in rows
                  if plain_cut(r["method"]))
    if cuts:
        xs, ys = [c[0] for c in cuts], [c[2]["scores"][metric]["mean"] for c in cuts]
        es = [c[2]["scores"][metric]["std"] or 0.0 for c in cuts]
        a.errorbar(xs, ys, yerr=es, marker="o", capsize=3, linestyle="none")
        for x, y, c in zip(xs, ys, cuts):
            a.annotate(label(c[2]), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    a.set_xlabel("hollowed share of U-Net parameters (0: LoRA FT)")
    a.set_ylabel(METRIC_LABELS[metric])
    a.set_title("fidelity vs hollowed fraction", fontsize=10)
    for r in rows:
        mem = r["memory"]["train_peak_bytes"]["mean"]
        if mem is not None:
            b.scatter(mem / 2**20, r["scores"][metric]["mean"], color="tab:blue")
            b.annotate(label(r), (mem / 2**20, r["scores"][metric]["mean"]), fontsize=7, xytext=(3, 3),
                       textcoords="offset points")
    inf = summary.get("inference_peak_bytes")
    if inf:
        b.axvline(inf / 2**20, color="k", linestyle="--", label="inference peak")
        b.legend(fontsize=7)
    b.set_xlabel("training peak memory (MiB)")
    b.set_ylabel(METRIC_LABELS[metric])
    b.set_title("fidelity vs memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: hollownet bench --help")
