"""The benchmark runner (``hollownet bench``): the paper's comparison table on a benchmark dataset.

For every cell — subject × method × seed — it trains (:func:`hollownet.workflow.personalize`),
generates ``images_per_prompt`` images for each of the subject's evaluation prompts (through
``stages.generate``, as ``hollownet generate`` does), scores them with the model's scorer (DINO,
CLIP-I against the subject's real photos, CLIP-T against the prompt: ``metrics.DinoClipScorer``;
the toy model's own columns: ``toy.bench.ToyScorer``), and records the measured peak memory of
pre-compute and training. The method specs are ``specs.py``, the table ``report.py``.

Outputs (all under ``--output``)
--------------------------------
``cells/<subject>/<method>/seed-<s>/result.json``  one finished (or failed) cell, written atomically;
    a rerun skips finished cells and retries failed ones. Beside it ``train/`` (the personalize
    output; its pre-compute store is deleted after the cell unless ``keep="all"``) and ``images/``
    (PNGs + manifest.json); ``keep="results"`` deletes both and keeps only result.json.
``inference_memory.json``  the inference reference for "vs inference": predicted by
    :func:`hollownet.memory.predict.predict_inference` (fake tensors, no weights loaded), else measured
    once with :class:`hollownet.memory.tracker.MemoryTracker` on the real model; the two agree to the
    byte on the tiny test model. Its ``source`` says which was used.
``summary.md`` / ``summary.json`` / ``summary.png`` / ``tradeoffs.png``  the aggregated table.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch
from diffusers import UNet2DConditionModel

from hollownet import workflow
from hollownet.cut import meta_unet
from hollownet.devices import default_device
from hollownet.errors import HollownetError
from hollownet.evaluation.datasets import DatasetError, DatasetWarning, load_dataset
from hollownet.evaluation.metrics import DinoClipScorer, model_label
from hollownet.evaluation.report import METRIC_LABELS, aggregate, format_summary, plot_summary, plot_tradeoffs
from hollownet.evaluation.specs import MethodSpec, parse_methods, parse_seeds
from hollownet.families import added_cond_shapes
from hollownet.executor import Executor, Job, job_memory
from hollownet.loading import load_unet, model_fingerprint, release_memory, resolve_model_dir, vae_scale_factor
from hollownet.memory.configs import load_model_configs
from hollownet.memory.predict import INFERENCE_DEFINITION, predict_inference
from hollownet.memory.tracker import MemoryTracker
from hollownet.requests import PlanRequest
from hollownet.settings import (DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, DEFAULT_IDENTIFIER, DEFAULT_LORA_FORMAT,
                                DEFAULT_SCHEDULER, Modes, expand_lora_targets, fill_model_defaults, model_defaults,
                                torch_dtype)
from hollownet.stages.generate import load_pipeline, prepare, render
from hollownet.files import save_json
from hollownet.toy import is_toy
from hollownet.toy.bench import ToyScorer

KEEP_CHOICES = ("weights", "all", "results")
CELL_FORMAT = "hollownet-bench-cell/1"
SUMMARY_FORMAT = "hollownet-bench/1"

__all__ = ["BenchConfig", "generate_images", "measure_inference_peak", "run_bench", "train_request"]


@dataclass
class BenchConfig:
    """Everything ``hollownet bench`` takes; mirrors its flags."""

    model: str
    dataset: str
    output: str
    methods: str | list[str] = "hollow,lora"
    seeds: str | list[int] = "0"
    subjects: list[str] | None = None  # default: every subject with photos
    # None: the model's default (settings.model_defaults), resolved on construction
    steps: int | None = None
    lr: float | None = None
    rank: int | None = None
    lora_alpha: float | None = None
    resolution: int | None = None
    batch: int | None = None
    precision: str = Modes.precision
    grad_checkpointing: bool = False
    images_per_prompt: int = 4
    prompts: int | None = None  # the first N evaluation prompts of each subject (default all)
    gen_steps: int | None = None
    guidance: float | None = None
    scheduler: str = DEFAULT_SCHEDULER
    identifier: str = DEFAULT_IDENTIFIER
    dino_model: object = DEFAULT_DINO_MODEL  # id / folder, or a built metrics.DinoExtractor
    clip_model: object = DEFAULT_CLIP_MODEL  # id / folder, or a built metrics.ClipExtractor
    keep: str = "weights"  # weights | all | results
    summarize_only: bool = False
    device: str | None = None  # None: the best this machine has (devices.default_device)
    lora_format: str = DEFAULT_LORA_FORMAT  # LoRA file(s) each cell writes: diffusers | kohya | both (as train --format)

    def __post_init__(self):
        fill_model_defaults(self, ("steps", "lr", "rank", "resolution", "batch", "gen_steps", "guidance"))
        self.device = self.device or default_device()
        if self.keep not in KEEP_CHOICES:
            raise HollownetError(f"--keep {self.keep!r} is not one of {', '.join(KEEP_CHOICES)}")
        for name in ("steps", "rank", "batch", "images_per_prompt", "gen_steps", "resolution"):
            if getattr(self, name) < 1:
                raise HollownetError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})")
        if self.prompts is not None and self.prompts < 1:
            raise HollownetError(f"--prompts must be at least 1 (got {self.prompts})")


def train_request(cfg, **run) -> workflow.TrainRequest:
    """The one place evaluation turns its settings into a training run: the run-wide settings of ``cfg`` (a
    BenchConfig or an AnalyzeConfig), then ``run``'s for this run. No checkpoints: a failed cell starts over."""
    common = dict(model=cfg.model, resolution=cfg.resolution, steps=cfg.steps, lr=cfg.lr, rank=cfg.rank,
                  precision=cfg.precision, device=cfg.device, checkpoint_every=0)
    modes, rest = Modes.split({**common, **run})
    return workflow.TrainRequest(**rest, modes=modes)


@dataclass
class _Cell:
    subject: object  # datasets.BenchmarkSubject
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
                 scorer) -> dict:
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
        "lora_targets": (expand_lora_targets(spec.targets or model_defaults(cfg.model)["lora_targets"])
                         if spec.name != "full" else None),
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
        **scorer.config,
    }


def _select_subjects(dataset, names: list[str] | None) -> list:
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


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None, executor: Executor | None = None) -> dict:
    """Run (or resume) every cell, then write and return the summary (``summary.json``'s content).

    ``executor`` (:mod:`hollownet.executor`): the cells as jobs, each in its own process, N at once or on
    Ray; by default (or one local worker) they run here, one after another."""
    log = log or (lambda msg: print(msg, flush=True))
    specs = parse_methods(cfg.methods)
    seeds = parse_seeds(cfg.seeds)
    out = Path(cfg.output)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DatasetWarning)
        dataset = load_dataset(cfg.dataset, out, identifier=cfg.identifier)
    for w in caught:  # e.g. subjects without photos: one line each, not a Python warning with a source line
        if issubclass(w.category, DatasetWarning):
            log(f"note: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    subjects = _select_subjects(dataset, cfg.subjects)
    model_dir = resolve_model_dir(cfg.model)
    fingerprint = model_fingerprint(model_dir)
    # chosen once: the toy model is scored by the toy evaluator (no DINO / CLIP weights exist for its world)
    scorer = ToyScorer() if is_toy(model_dir) else DinoClipScorer(cfg.dino_model, cfg.clip_model, dataset.identifier,
                                                                  cfg.device)
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

    inference = inference_reference(cfg, model_dir, fingerprint, out, measure=not cfg.summarize_only, log=log)
    if todo and not cfg.summarize_only and executor and not executor.in_process:  # cells as jobs (issue 16)
        _run_cells_as_jobs(todo, cfg, scorer, _unet_params(model_dir), executor, log)
    elif todo and not cfg.summarize_only:
        scorer.load()
        unet_params = _unet_params(model_dir)
        for i, cell in enumerate(todo, 1):
            log(f"[{i}/{len(todo)}] {cell.label}")
            result = _run_cell(cell, cfg, scorer, unet_params)
            save_json(cell.result_path, result)
            _log_cell(result, scorer.metrics, log)

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
        "settings": {k: (model_label(v) if k in ("dino_model", "clip_model") else v)
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


def _log_cell(result: dict, metrics, log) -> None:
    if result["status"] == "ok":
        s = result["scores"]
        log(f"    done in {result['timings']['cell_s']:.1f} s: " + ", ".join(f"{METRIC_LABELS[k]} {s[k]:.4f}" for k in metrics))
    else:
        log(f"    FAILED: {result['error']}")


def run_cell_job(cell: _Cell, cfg: BenchConfig, scorer, unet_params: int) -> dict:
    """One cell as an executor job, in its own process: its scorer loads there, result.json is written there."""
    scorer.load()
    result = _run_cell(cell, cfg, scorer, unet_params)
    save_json(cell.result_path, result)
    return result


def _run_cells_as_jobs(todo: list[_Cell], cfg: BenchConfig, scorer, unet_params: int, executor: Executor,
                       log) -> None:
    """The cells through ``executor``, each reserving the planner's prediction for its method; a cell whose
    worker died on every try is recorded as failed (a rerun retries it); the other cells are untouched."""
    memory: dict = {}
    for cell in todo:
        c = cell.config
        key = (cell.spec.key, len(c["photos"]))
        if key not in memory and executor.kind == "ray":  # only Ray reserves; one prediction per method, not per cell
            memory[key] = job_memory(PlanRequest.from_train(_cell_request(cfg, cell), photos=len(c["photos"])))
    jobs = [Job(cell.label, run_cell_job, (cell, cfg, scorer, unet_params),
                memory=memory.get((cell.spec.key, len(cell.config["photos"])))) for cell in todo]
    log(f"running {len(jobs)} cell(s) with the {executor.kind} executor"
        + (f", {executor.workers} at once" if executor.workers else ""))
    for cell, outcome in zip(todo, executor.run(jobs, log)):
        result = outcome.value
        if not outcome.ok:
            result = {"format": CELL_FORMAT, "subject": cell.subject.name, "class_noun": cell.subject.class_noun,
                      "method": cell.spec.key, "seed": cell.seed, "config": cell.config, "status": "failed",
                      "error": f"worker: {outcome.error}", "finished": _now()}
            save_json(cell.result_path, result)
        log(f"{cell.label}:")
        _log_cell(result, scorer.metrics, log)


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


def _unet_params(model_dir: Path) -> int:
    return sum(p.numel() for p in meta_unet(UNet2DConditionModel.load_config(model_dir / "unet")).parameters())


def _cell_request(cfg: BenchConfig, cell: _Cell) -> workflow.TrainRequest:
    c = cell.config
    return train_request(
        cfg, images=str(cell.subject.folder), prompt=cell.subject.instance_prompt, output=str(cell.folder / "train"),
        method=c["method"], hollow=c["hollow"], hollow_blocks=c["hollow_blocks"], rank=c["rank"] or cfg.rank,
        lora_alpha=c["lora_alpha"], steps=c["steps"], batch=cfg.batch, lr=c["lr"], seed=cell.seed,
        precision=c.get("train_precision", cfg.precision), grad_checkpointing=cfg.grad_checkpointing,
        stream_weights=c.get("stream_weights", False), optimizer=c.get("optimizer", "adamw"),
        num_samples=c.get("num_samples"), lora_format=cfg.lora_format, track_memory=True,
        lora_targets=c["lora_targets"])


def _run_cell(cell: _Cell, cfg: BenchConfig, scorer, unet_params: int) -> dict:
    """One cell, start to finish; any exception becomes a failed result (the run goes on)."""
    t0 = time.perf_counter()
    c = cell.config
    train_dir = cell.folder / "train"
    base = {"format": CELL_FORMAT, "subject": cell.subject.name, "class_noun": cell.subject.class_noun,
            "method": cell.spec.key, "seed": cell.seed, "config": c}
    try:
        for name in ("train", "images", *scorer.extra_prompts):  # a retried cell starts clean: a half-written
            shutil.rmtree(cell.folder / name, ignore_errors=True)  # store or LoRA from a crash is not trusted
        record = workflow.personalize(_cell_request(cfg, cell))
        info_path = train_dir / "hollownet.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        t1 = time.perf_counter()
        gen = dict(images_per_prompt=cfg.images_per_prompt, steps=cfg.gen_steps, guidance=cfg.guidance,
                   scheduler=cfg.scheduler, resolution=cfg.resolution, precision=cfg.precision, device=cfg.device,
                   seed=cell.seed, merged=c.get("infer") == "merged")
        for name, prompts in {"images": c["prompts"], **scorer.extra_prompts}.items():
            generate_images(cfg.model, train_dir, c["method"], list(prompts), cell.folder / name, **gen)
        t2 = time.perf_counter()
        scores = scorer.score(cell.folder, cell.subject)
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
        "scores": {k: scores[k] for k in (*scorer.metrics, "n_generated", "n_reference", "n_prompts", "per_prompt")},
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


def generate_images(model: str, train_dir: str | Path, method: str, prompts: list[str], output: str | Path, *,  # wide: one keyword per generate flag
                    images_per_prompt: int, steps: int, guidance: float | None = None, scheduler: str = DEFAULT_SCHEDULER,
                    resolution: int | None = None, precision: str = Modes.precision, device: str = "cpu", seed: int = 0,
                    merged: bool = False) -> dict:
    """``images_per_prompt`` images per prompt into ``output`` with one ``manifest.json``; the pipeline loads once.

    hollow: the paper's two-path inference (as ``hollownet generate``); lora: the LoRA on the U-Net;
    full: the fine-tuned U-Net in ``train_dir/unet``; ``merged``: hollow's LoRA fused, one path. Image ``i`` of
    prompt ``p`` uses the noise seed ``seed * 1_000_003 + p * 1_009 + i``, so all methods of a cell see the same
    starting noise. ``guidance`` None: the model's default.
    """
    guidance = model_defaults(model)["guidance"] if guidance is None else guidance
    train_dir, full = Path(train_dir), method == "full"
    pipe, info = load_pipeline(model, None if full else str(train_dir), precision, device, scheduler,
                               unet=train_dir / "unet" if full else None)
    plan, resolution = prepare(pipe, info, lora=not full, merged=merged, resolution=resolution)
    jobs = [(prompt, seed * 1_000_003 + p * 1_009 + i, f"p{p:02d}-{i:02d}.png")
            for p, prompt in enumerate(prompts) for i in range(images_per_prompt)]
    entries, _ = render(pipe, plan, jobs, Path(output), steps=steps, resolution=resolution, guidance=guidance)
    return {"images": entries, "mode": "two-path" if plan is not None else ("merged" if merged else method)}


# --------------------------------------------------------------------------
# Inference reference.
# --------------------------------------------------------------------------


def measure_inference_peak(model: str | Path, *, resolution: int, precision: str = Modes.precision, device: str = "cpu",
                           batch: int = 1) -> dict:
    """Exact tensor-memory peak of one no-grad forward of the full U-Net (weights included).

    ``batch=1`` is the paper's inference figure, ``batch=2`` one denoising step with classifier-free
    guidance. The text-encoder output it reads is a [batch, tokens, cross_attention_dim] tensor of
    the model's token length.
    """
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
        added = {k: torch.randn(batch, *shape, device=device, dtype=dtype)  # SDXL: pooled text, time ids
                 for k, shape in (added_cond_shapes(unet.config) or {}).items()} or None
        with tracker.phase("forward"):
            unet(sample, t, text, added_cond_kwargs=added)
    del unet
    release_memory()
    report = tracker.report
    return {
        "peak_bytes": report.peak_bytes,
        "weights_bytes": report.breakdown.get("weights"),
        "cuda_max_allocated": report.cuda_max_allocated,
        "source": (f"measured with hollownet.memory.tracker.MemoryTracker: one no-grad forward of the full U-Net, "
                   f"text encoder and VAE not resident (batch {batch}, {resolution} px, {precision}, {device})"),
        "batch": batch, "resolution": resolution, "precision": precision, "device": str(device),
    }


def predict_inference_peak(model: str | Path, *, resolution: int, precision: str = Modes.precision, batch: int = 1) -> dict:
    """The same figure from ``hollownet.memory.planner`` (fake tensors: no weights loaded, seconds for SD)."""
    model_dir = resolve_model_dir(model)
    mc = load_model_configs(model_dir)
    req = PlanRequest(model=str(model_dir), resolution=resolution, modes=Modes(precision=precision))
    report = predict_inference(mc, req, batch=batch)
    return {
        "peak_bytes": report.peak_bytes,
        "weights_bytes": report.breakdown.get("weights"),
        "source": (f"predicted by hollownet.memory.planner (memory.predict.predict_inference): {INFERENCE_DEFINITION}"
                   f" (batch {batch}, {resolution} px, {precision})"),
        "batch": batch, "resolution": resolution, "precision": precision,
    }


def inference_reference(cfg: BenchConfig, model_dir: Path, fingerprint: str, out: Path, *, measure: bool, log) -> dict:
    """The inference peak for "vs inference": batch 1, the paper's figure (batch 2, CFG, kept beside it).

    ``hollownet.memory.planner``'s prediction (it agrees to the byte with a measurement), else (a model the
    planner cannot read) measured once with the MemoryTracker; cached in OUTPUT/inference_memory.json.
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
    try:
        result = predict_inference_peak(model_dir, **kw)
        result["peak_bytes_cfg"] = predict_inference_peak(model_dir, batch=2, **kw)["peak_bytes"]
    except Exception as e:  # noqa: BLE001 - measuring is the fallback
        log(f"note: hollownet.memory.planner could not predict the inference peak ({type(e).__name__}: {e}); measuring it")
        result = measure_inference_peak(model_dir, device=cfg.device, **kw)
        result["peak_bytes_cfg"] = measure_inference_peak(model_dir, device=cfg.device, batch=2, **kw)["peak_bytes"]
    result = {**result, **want}
    save_json(path, result)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: hollownet bench --help")
