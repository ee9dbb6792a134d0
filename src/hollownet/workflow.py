"""The whole personalization run (what ``hollownet train`` does) and the offline demo.

photos -> stage 1 (precompute.py) -> store -> stage 2 (train.py) -> LoRA (export.py) -> generate.py
"""

from __future__ import annotations

import json
import time
from dataclasses import fields, replace
from pathlib import Path

from hollownet.checks import preflight_train
from hollownet.devices import default_device
from hollownet.errors import HollownetError
from hollownet.families import folder_family
from hollownet.loading import resolve_model_dir
from hollownet.lock import output_lock
from hollownet.memory.configs import load_model_configs
from hollownet.memory.machine import check_train
from hollownet.memory.sizes import format_bytes
from hollownet.memory.stage1 import settle_stage1
from hollownet.photos import demo_photos_dir, list_photos
from hollownet.requests import PlanRequest, TrainRequest
from hollownet.settings import Modes
from hollownet.sheets import contact_sheet
from hollownet.stages.dit import check_settings as check_dit_settings, run_dit_precompute, run_dit_train
from hollownet.stages.formats import DIFFUSERS_FILE, KOHYA_FILE
from hollownet.stages.generate import GenerateConfig, run_generate
from hollownet.stages.precompute import PrecomputeConfig, run_precompute
from hollownet.files import atomic_write, read_json, save_json
from hollownet.stages.train import TrainConfig, run_train
from hollownet.toy import NAME as TOY
from hollownet.toy import world as W
from hollownet.toy.evaluator import load_evaluator, score_images
from hollownet.toy.identity import IdentityReference, identity_rate


def shared_fields(cls, source, **given):
    """``cls(...)`` with every field it shares by name with the dataclass ``source``, and ``given``."""
    names = {f.name for f in fields(cls)} & {f.name for f in fields(source)}
    return cls(**{n: getattr(source, n) for n in names - set(given)}, **given)


def settled_modes(req: TrainRequest) -> Modes:
    """The run's modes with stage 1's layout decided as ``hollownet plan`` decides it with the same flags
    (``stage1.settle_stage1``: a low-memory run's stage 1 is layer-major only where sample-major would need more)."""
    if not req.modes.stage1_unsettled:
        return req.modes
    model_dir = resolve_model_dir(req.model)
    plan_req = PlanRequest.from_train(req, model=str(model_dir), photos=len(list_photos(req.images)),
                                      class_photos=len(list_photos(req.class_images)) if req.class_images else 0)
    return settle_stage1(load_model_configs(model_dir), plan_req)[0].modes


def personalize(req: TrainRequest, on_step=None) -> dict:
    """Stage 1 + stage 2 + export; writes OUTPUT/train.json and OUTPUT/loss.png and returns the record.

    ``on_step``: called after each training step (``stages.train.run_train``); a true return stops there."""
    preflight_train(req)  # paths, prompt, photo count: before any model loads
    if req.device is None:
        req = replace(req, device=default_device())
    out = Path(req.output)
    made = not out.exists()
    try:
        with output_lock(out):  # one run per output folder: a second is refused, naming the first
            return _personalize(req, out, on_step)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves no empty folder behind
        raise


def stage_functions(req: TrainRequest):
    """``(stage 1, stage 2)`` for the request's model, by its family's backbone: a U-Net's centre cut
    (``precompute.py``, ``train.py``) or a transformer's prefix cut (``stages/dit.py``, its settings checked here,
    before anything runs)."""
    if folder_family(resolve_model_dir(req.model)).backbone == "transformer":
        check_dit_settings(req)
        return run_dit_precompute, run_dit_train
    return run_precompute, run_train


# settings that do not change the LoRA: a finished run asked again with other values of these is still done
RUNTIME_SETTINGS = ("output", "device", "resume", "track_memory", "log_every", "ignore_memory_check")
# settings a finished run can be continued with (more --steps; watching it: stage 2's resume decides)
CONTINUABLE_SETTINGS = ("steps", "num_samples", "checkpoint_every", "lora_format", "save_every", "validate_every",
                        "sample_every", "sample_prompts", "sample_seed", "sample_steps", "sample_guidance")


def finished_run(req: TrainRequest, out: Path) -> dict | None:
    """The record of the finished run in ``out`` if ``req`` asks for exactly that run again (then nothing is
    loaded: it is done); None if ``out`` holds no finished run, ``--no-resume`` asks to train over it, or ``req``
    continues it (:data:`CONTINUABLE_SETTINGS`). A finished run with other settings is refused in one line naming
    them (before any model loads; stage 2 would refuse its checkpoints later)."""
    record_path = out / "train.json"
    if not req.resume or not record_path.is_file():
        return None
    record = read_json(record_path, "delete it (or pass --no-resume) to train again")
    if not all(Path(f).is_file() for f in (record.get("outputs") or {}).get("lora_files") or [None]):
        return None  # its LoRA was deleted: trained again
    normal = lambda d: {k: v for k, v in json.loads(json.dumps(d, default=str)).items()  # noqa: E731
                        if k not in RUNTIME_SETTINGS}
    had, want = normal(record.get("settings") or {}), normal(req.settings())
    changed = [k for k in sorted(had.keys() | want.keys()) if had.get(k) != want.get(k)]
    if changed and all(k in CONTINUABLE_SETTINGS for k in changed):
        return None  # e.g. more --steps: stage 2 resumes from the run's checkpoint
    changed = [k for k in changed if k not in CONTINUABLE_SETTINGS]
    if changed:
        said = "; ".join(f"--{k.replace('_', '-')} {had.get(k)} there, {want.get(k)} now" for k in changed[:3])
        raise HollownetError(f"'{out}' holds a finished run with other settings ({said}{'; ...' if len(changed) > 3 else ''}): "
                             "pick a new --output, or pass --no-resume to train over it")
    lora = record["outputs"].get("lora") or record["outputs"]["lora_files"][0]
    return {**record, "already_done": True,
            "summary": f"already done: {lora} (a finished run with these settings; --no-resume trains it again)"}


def _personalize(req: TrainRequest, out: Path, on_step=None) -> dict:
    done = finished_run(req, out)
    if done is not None:
        return done
    store = req.store or str(out / "store")
    t0 = time.perf_counter()
    stage1, stage2 = stage_functions(req)
    if stage1 is run_precompute:  # a U-Net's cut: the planner's prediction against the device's memory, before loading
        check_train(req, resolve_model_dir(req.model), photos=len(list_photos(req.images)),
                    class_photos=len(list_photos(req.class_images)) if req.class_images else 0)
    # made first: bad stage-2 settings fail before stage 1 spends any time
    train_cfg = shared_fields(TrainConfig, req, store=store, output=str(out), track_memory_steps=2 if req.track_memory else 0)
    pre = stage1(shared_fields(PrecomputeConfig, req, output=store, modes=settled_modes(req),
                               num_samples=req.num_samples or req.steps * req.batch), track_memory=req.track_memory)
    res = stage2(train_cfg, on_step=on_step)
    record = {
        "command": "train",
        "settings": req.settings(),
        "plan": res.plan.to_dict() if res.plan else None,
        "timings": {"precompute_s": round(pre.seconds, 3), "train_s": round(res.seconds, 3),
                    "total_s": round(time.perf_counter() - t0, 3),
                    "train_s_per_step": round(res.train_seconds / max(1, len(res.losses) - res.start_step), 4),
                    "resumed_from_step": res.start_step},
        "memory": {"precompute": pre.memory, "train": res.memory},
        "loss": loss_summary(res.losses),
        **res.watch,  # snapshots, validation, samples
        "outputs": {"lora": str(out / lora_files(req.lora_format)[0]),
                    "lora_files": [str(out / f) for f in lora_files(req.lora_format) if (out / f).is_file()],
                    "store": store},
    }
    record["summary"] = summarize(record)
    save_json(out / "train.json", record)
    plot_loss(res.losses, out / "loss.png", title=f"{req.method} — {req.prompt}",
              validation=(record.get("validation") or {}).get("history"))
    return record


def lora_files(lora_format: str) -> list[str]:
    return {"diffusers": [DIFFUSERS_FILE], "kohya": [KOHYA_FILE]}.get(lora_format, [DIFFUSERS_FILE, KOHYA_FILE])


def loss_summary(losses: list[float]) -> dict:
    """Per-step loss is noisy (random timesteps): compare means of the first and last tenth."""
    k = max(1, len(losses) // 10)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"window": k, "first_mean": mean(losses[:k]), "last_mean": mean(losses[-k:]),
            "history": [round(x, 6) for x in losses]}


def summarize(record: dict) -> str:
    mem = record["memory"]
    lines = []
    if record["plan"] and record["plan"].get("kind") == "prefix":  # a transformer's prefix cut (stages/dit.py)
        p = record["plan"]
        lines.append(f"froze the prefix k={p['k']} of {p['num_blocks']} blocks ({p['fraction']:.0%} of transformer params); "
                     f"trained {p['lora_params'] / 1e6:.2f}M LoRA params on {p['lora_targets_kept']} layers")
    elif record["plan"]:
        p = record["plan"]
        lines.append(f"hollowed {', '.join(p['hollow_blocks'])} ({p['fraction']:.0%} of U-Net params); "
                     f"trained {p['lora_params'] / 1e6:.2f}M LoRA params")
        if p.get("why"):  # records made before the default was chosen by fraction lack it
            lines.append(f"cut: {p['why']}; it removes {p['lora_targets_removed_share']:.1%} of the layers LoRA targets")
    t = record["timings"]
    lines.append(f"pre-compute {t['precompute_s']:.1f} s, training {t['train_s']:.1f} s ({t['train_s_per_step']:.3f} s/step)")
    for stage in ("precompute", "train"):
        m = mem.get(stage)
        if m:
            cuda = f", CUDA max allocated {format_bytes(m['cuda_max_allocated'])}" if m.get("cuda_max_allocated") else ""
            lines.append(f"peak memory, {stage}: {format_bytes(m['peak_bytes'])} ({m.get('peak_phase')}){cuda}")
    loss = record["loss"]
    if loss["history"]:
        lines.append(f"loss (mean of {loss['window']} steps) {loss['first_mean']:.4f} at the start -> {loss['last_mean']:.4f} at the end")
    val = record.get("validation")
    if val:
        lines.append(f"validation loss lowest at step {val['best_step']} ({val['best_loss']:.4f}; "
                     f"{val['history'][-1][1]:.4f} at the end)" + (", snapshot there" if any(
                         s.endswith(f"step-{val['best_step']:04d}") for s in record.get("snapshots", [])) else ""))
    if record.get("samples"):
        lines.append(f"samples: {record['samples']['sheet']}")
    files = record["outputs"].get("lora_files") or [record["outputs"]["lora"]]
    lines.append(f"LoRA: {', '.join(files)}")
    return "\n".join(lines)


def plot_loss(losses: list[float], path: Path, title: str = "", validation: list | None = None) -> None:
    """Raw loss and its running mean, and the held-out loss (``[step, loss]``) beside them: what a person looks
    at to see whether training worked, and where it stopped getting better."""
    if not losses:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(3, len(losses) // 10) if len(losses) >= 6 else 1
    smooth = [sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(losses, alpha=0.35, label="loss")
    if k > 1:
        ax.plot(smooth, label=f"running mean of {k}")
    if validation:  # step s's loss is plotted at index s - 1, as the training loss of step s
        ax.plot([s - 1 for s, _ in validation], [v for _, v in validation], "o-", ms=3, label="validation (held out)")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(title[:80], fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))  # the one write path (files.write_bytes)
    plt.close(fig)


DEMO_IMAGES_PER_PROMPT = 4  # x 3 unseen backgrounds on the toy model: 12 images scored


def run_demo(output: str | Path, model: str = "toy", steps: int | None = None) -> dict:
    """Personalize a novel subject, generate it where its photos never were, show before / after.

    ``model="toy"`` (default): the bundled toy model and one of its novel subjects (rendered photos),
    offline, a few minutes on a CPU; scored by the toy evaluator against the base model. Any other
    ``model`` (a Stable Diffusion folder or hub id): the bundled dog photos at 512 px.
    Writes ``OUTPUT/sheet.png`` (photos | base model | personalized), the LoRA and the images.
    """
    from PIL import Image

    out = Path(output)
    if model == TOY:
        photos_dir, subject = out / "photos", "plus"
        photos_dir.mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(W.subject_photos(subject, 5)):
            img.save(photos_dir / f"{i:02d}.png")
        prompt, prompts = W.INSTANCE_PROMPT, W.evaluation_prompts()
        print(f"toy subject '{subject}' ({W.SUBJECTS[subject].description}), photos on "
              f"{' and '.join(W.PHOTO_BACKGROUNDS)} backgrounds: {photos_dir}")
    else:
        photos_dir, prompt = demo_photos_dir(), "a photo of sks dog"
        prompts = ["a photo of sks dog on the beach", "a photo of sks dog in the snow"]
    print(f"personalizing with Hollowed Net: {prompt!r} ...")
    record = personalize(TrainRequest(model=model, images=str(photos_dir), prompt=prompt, output=str(out / "lora"),
                                      steps=steps, checkpoint_every=0))  # the rest: the model's defaults
    print(record["summary"])
    rows: dict[str, list] = {"photos": [Image.open(p).convert("RGB") for p in sorted(photos_dir.iterdir())
                                        if p.suffix.lower() in (".png", ".jpg", ".jpeg")]}
    gens = {}
    for label, lora in (("base model", None), ("personalized", str(out / "lora"))):
        rows[label] = []
        for j, p in enumerate(prompts):
            folder = out / "images" / ("base" if lora is None else "personalized") / f"p{j}"
            gens[label] = run_generate(GenerateConfig(model=model, lora=lora, prompt=p, output=str(folder),
                                                      num_images=DEMO_IMAGES_PER_PROMPT, seed=j * 100))
            rows[label] += [Image.open(folder / f) for f in gens[label]["images"]]
    contact_sheet(rows, out / "sheet.png", caption=f"prompts: {'; '.join(prompts)}")
    result = {"train": record, "generate": gens["personalized"], "sheet": str(out / "sheet.png")}
    peak = (gens["personalized"].get("memory") or {}).get("peak_bytes")
    print(f"generation ({gens['personalized']['mode']}) peak memory {format_bytes(peak)}; sheet: {out / 'sheet.png'}")
    if model == TOY:
        ev = load_evaluator()
        bgs = [bg for bg in W.UNSEEN_BACKGROUNDS for _ in range(DEMO_IMAGES_PER_PROMPT)]
        identity = IdentityReference(rows["photos"])
        scores = {k: score_images(ev, rows[k], rows["photos"], backgrounds=bgs) for k in ("base model", "personalized")}
        for k, v in scores.items():
            v["identity_scores"] = identity.scores(rows[k])
            v["identity"] = identity_rate(v["identity_scores"])
            print(f"toy scores, {k:12s}: subject drawn (identity) in {v['identity']:.0%} of the images, background "
                  f"followed {v['background_followed']:.0%}, subject colours present {v['presence']:.0%}")
        result["toy_scores"] = scores
        print("(the toy model's figures, measured by the toy evaluator: not Stable Diffusion's)")
    save_json(out / "demo.json", json.loads(json.dumps(result, default=str)))
    return result
