"""What the app's buttons do, as plain functions of plain values (the Gradio wiring is ui.py).

Every refusal is the CLI's one-line message (``jobs.one_line_error``), returned as text, never a
traceback; warnings are the CLI's ``warning: ...`` lines, collected with the same checks
(``hollownet.checks``, ``hollownet.photos``).
"""

from __future__ import annotations

import math
import shutil
import warnings
import zipfile
from pathlib import Path

from hollownet.errors import HollownetError
from hollownet.settings import Modes
from hollownet.app.jobs import DONE, Job, Jobs, generate_work, one_line_error, train_request, train_work
from hollownet.checks import check_generate_prompt, check_photo_folder, preflight_train
from hollownet.photos import IMAGE_EXTENSIONS, PhotoError, list_photos, load_photo
from hollownet.memory.budget import fit_budget
from hollownet.memory.planner import plan_memory
from hollownet.memory.sizes import format_bytes, parse_size
from hollownet.requests import PlanRequest
from hollownet.settings import model_defaults
from hollownet.toy import NAME as TOY

FEW, MANY = 3, 6  # the 3-6 photos the app asks for
FINAL = "final LoRA"  # step 4's LoRA choice besides the snapshots
# what one request may ask (a server shared by a browser must not be OOM-killed by a typo: steps = 1e9 was);
# the CLI takes any value, checked against the planner
BOUNDS = {"steps": (1, 20_000), "rank": (1, 1024), "resolution": (8, 2048), "batch": (1, 64),
          "sample_every": (0, 20_000), "save_every": (0, 20_000), "seed": (0, 2**32 - 1),
          "gen_steps": (1, 500), "num_images": (1, 16)}
LABELS = {"gen_steps": "steps", "num_images": "images"}  # the page's labels where they differ from the names


def bounded(values: dict, names: tuple[str, ...]) -> dict[str, int]:
    """The whole numbers ``names`` of ``values`` (as the page sends them: floats, None when empty), each within
    :data:`BOUNDS`; every one that is not, refused in one line."""
    out, bad = {}, []
    for name in names:
        v, (lo, hi), label = values.get(name), BOUNDS[name], LABELS.get(name, name)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v == int(v) and lo <= v <= hi
        if ok:
            out[name] = int(v)
        else:
            bad.append(f"{label} {'(empty)' if v is None else v} (a whole number from {lo} to {hi:,})")
    if bad:
        raise HollownetError(f"out of range: {'; '.join(bad)}")
    return out


class Collected:
    """``with Collected() as c``: the CLI's warnings as one-line ``warning: ...`` texts in ``c.lines``."""

    def __enter__(self):
        self._ctx = warnings.catch_warnings(record=True)
        self._caught = self._ctx.__enter__()
        warnings.simplefilter("always")
        self.lines: list[str] = []
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        for w in self._caught:
            if issubclass(w.category, (UserWarning,)) and not issubclass(w.category, (DeprecationWarning, FutureWarning)):
                line = "warning: " + " ".join(str(w.message).split())
                if line not in self.lines:
                    self.lines.append(line)
        return False


def defaults_for(model: str) -> dict:
    """The run defaults the CLI picks for this model (the toy's 64 px, r=8, ...)."""
    return model_defaults(model or TOY)


# --------------------------------------------------------------------------------- 1. photos


def stage_photos(paths: list[str], folder: Path) -> list[Path]:
    """Copy the dropped files into ``folder`` (emptied first), keeping their names.

    But for a leading ``.``, made ``_``: a hidden name (``.x.png``) is one ``photos.list_photos`` (so training)
    skips, and the check here must see the photos training will."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    out = []
    for i, p in enumerate(paths or []):
        src = Path(p)
        name = "_" + src.name[1:] if src.name.startswith(".") else src.name
        dst = folder / name
        if dst.exists():  # two uploads with one name
            dst = folder / f"{i:02d}-{name}"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def check_photos(paths: list[str], resolution: int, folder: Path) -> tuple[list[str], list[str]]:
    """Stage the photos in ``folder`` and check them as ``hollownet train`` does.

    Returns (the readable photos, the notes: ``error: ...`` for an unreadable file, ``warning: ...``
    for a tiny one or an odd count)."""
    staged = stage_photos(paths, folder)
    notes, good = [], []
    with Collected() as c:
        for p in staged:
            if p.suffix.lower() not in IMAGE_EXTENSIONS:
                notes.append(f"error: {p.name} is not a {', '.join(IMAGE_EXTENSIONS)} photo; remove it")
                continue
            try:
                load_photo(p, int(resolution))
                good.append(str(p))
            except PhotoError as e:
                notes.append(f"error: {one_line_error(e)}")
        if staged:
            try:
                check_photo_folder(folder)
            except Exception as e:  # noqa: BLE001  shown as its one line
                msg = one_line_error(e)
                if msg is None:
                    raise
                notes.append(f"error: {msg}")
    notes += c.lines
    if good and len(good) > MANY:
        notes.append(f"warning: {len(good)} photos: 3-6 varied photos of the subject are what DreamBooth-style training uses")
    return good, notes


# ---------------------------------------------------------------------------- 2. memory plan


def plan_request(s: dict, photos: int) -> PlanRequest:
    n = bounded(s, ("steps", "rank", "resolution", "batch"))
    return PlanRequest(model=s["model"] or TOY, method=s["method"], rank=n["rank"], resolution=n["resolution"],
                       batch=n["batch"], modes=Modes(precision=s["precision"]), steps=n["steps"], photos=max(1, photos))


def plan_table(s: dict, photos: int) -> str:
    """Markdown: the predicted peaks of pre-compute, training and generation, next to inference."""
    try:
        plan = plan_memory(plan_request(s, photos)).to_json()
    except Exception as e:  # noqa: BLE001
        return _error_or_raise(e)
    by_batch = plan["inference_peak_bytes_by_batch"]
    inf = plan["inference_peak_bytes"]
    rows = [("stage 1: pre-compute", plan["precompute_peak_bytes"]), ("stage 2: training", plan["train_peak_bytes"]),
            ("generation (text encoder, U-Net with guidance, VAE decoder, in turn)", plan.get("generate_peak_bytes") or by_batch.get("2")),
            ("inference (one U-Net step, batch 1)", inf)]
    lines = ["| stage | predicted peak | vs inference |", "|---|---:|---:|"]
    lines += [f"| {name} | {format_bytes(v)} | {v / inf:.2f}× |" for name, v in rows if v is not None]
    what = f"{plan['method']}" + (f", hollowed {plan['fraction']:.0%} of the U-Net" if plan.get("fraction") else "")
    lines.append(f"\n{what}; r={plan['rank']}, {plan['resolution']} px, batch {plan['batch']}, {plan['precision']} "
                 "weights. Tensor bytes, predicted before any weight loads (hollownet plan).")
    return "\n".join(lines)


def suggest(s: dict, photos: int, budget: str, top: int = 3) -> tuple[str, str | None, str | None]:
    """(markdown, best precision, best method) for the ``top`` settings that fit ``budget`` (``fit_budget``)."""
    try:
        answer = fit_budget(plan_request(s, photos), parse_size(budget, "budget"), top=top)
    except Exception as e:  # noqa: BLE001
        return _error_or_raise(e), None, None
    lines = ["| # | setting | weights | stage 1 | training | peak |", "|---|---|---|---:|---:|---:|"]
    for i, c in enumerate(answer.fits, 1):
        lines.append(f"| {i} | {c.label().strip()} | {c.precision}{' streamed' if c.stream_weights else ''}"
                     f"{', checkpointing' if c.grad_checkpointing else ''}{', in-backward AdamW' if c.in_backward else ''} | "
                     f"{format_bytes(c.precompute_peak)} | {format_bytes(c.train_peak)} | {format_bytes(c.peak)} |")
    best = answer.fits[0]
    lines.append(f"\nBest fidelity that fits: `hollownet train ... {' '.join(best.flags())}`. "
                 "'Use the best' sets its method and precision here.")
    return "\n".join(lines), best.precision, best.method


# --------------------------------------------------------------------------------- 3. train


def start_training(jobs: Jobs, photos: list[str], s: dict) -> str:
    """Copy the photos into a new run folder and start stage 1 + 2 there; a one-line answer."""
    if not photos:
        return "error: drop 3-6 photos of the subject first"
    try:
        n = bounded({**s, **{k: s.get(k) or 0 for k in ("sample_every", "save_every")}},  # empty: 0, none
                    ("steps", "rank", "resolution", "batch", "seed", "sample_every", "save_every"))
    except HollownetError as e:
        return f"error: {e}"
    folder = jobs.new_run_folder()
    settings = {**s, "model": s["model"] or TOY, "images": str(folder / "photos"), "output": str(folder / "lora"),
                **n, "lr": float(s["lr"]) if s.get("lr") is not None else None}
    if jobs.refusal():  # refused before any folder is made
        return f"error: {jobs.refusal()}"
    stage_photos(photos, folder / "photos")
    with Collected() as c:
        try:
            preflight_train(train_request(settings))  # the CLI's checks, before the job starts
        except Exception as e:  # noqa: BLE001
            shutil.rmtree(folder, ignore_errors=True)
            return _error_or_raise(e)
    return _start(jobs, "train", folder, settings, train_work, c.lines)


def resume_training(jobs: Jobs) -> str:
    """Run the newest training again in its folder: stage 1 and 2 continue from what is on disk."""
    last = jobs.latest.get("train")
    if last is None:
        return "error: no training to resume"
    if last.status == DONE:
        return "error: that training is finished; start a new one, or generate from it"
    return _start(jobs, "train", last.folder, last.settings, train_work, [], memory=last.memory)


def start_generation(jobs: Jobs, g: dict) -> str:
    try:
        b = bounded({**g, "gen_steps": g.get("steps")}, ("gen_steps", "seed", "num_images"))
    except HollownetError as e:
        return f"error: {e}"
    last = jobs.latest.get("train")
    if last is None or last.status != DONE:
        return "error: train a LoRA first (or wait for the training to finish)"
    folder = Path(last.folder)
    n = len(list((folder / "images").glob("*"))) if (folder / "images").exists() else 0
    settings = {"model": last.settings["model"], "lora": last.settings["output"], "prompt": g["prompt"],
                "output": str(folder / "images" / f"{n:03d}"), "steps": b["gen_steps"], "guidance": float(g["guidance"]),
                "seed": b["seed"], "num_images": b["num_images"], "merged": g["path"] == "merged",
                "device": last.settings.get("device", "cpu")}
    if str(g.get("lora") or FINAL) != FINAL:  # a snapshot, "step N" (train's --save-every)
        settings["step"] = int(str(g["lora"]).split()[-1])
    with Collected() as c:
        check_generate_prompt(settings["prompt"])
    return _start(jobs, "generate", folder, settings, generate_work, c.lines)


def stop(jobs: Jobs) -> str:
    return jobs.stop()


def _start(jobs: Jobs, kind: str, folder, settings: dict, work, notes: list[str], **fields) -> str:
    try:
        jobs.start(kind, folder, settings, work, warnings=notes, **fields)
    except Exception as e:  # noqa: BLE001
        return _error_or_raise(e)
    return "\n".join([f"started {'training' if kind == 'train' else 'generation'} in {folder}", *notes])


def _error_or_raise(e: BaseException) -> str:
    msg = one_line_error(e)
    if msg is None:
        raise e
    return f"error: {msg}"


# ------------------------------------------------------------------------------ what the page shows


def view(jobs: Jobs) -> dict:
    """Everything the page shows about the newest run, from the server's jobs (a reloaded page calls it too)."""
    train, gen = jobs.latest.get("train"), jobs.latest.get("generate")
    if gen is not None and train is not None and gen.folder != train.folder:
        gen = None  # a generation of an older run
    active = jobs.running() or (gen if gen and train and gen.started > train.started else train)
    v = {"status": active.one_line() if active else "no run yet", "running": bool(jobs.running()),
         "sheet": None, "snapshots": [FINAL],
         "step": train.step if train else 0, "total": train.total if train else 0,
         "losses": list(train.losses) if train else [], "memory": memory_text(train, gen),
         "photos": [], "gallery": [], "lora_files": [], "images_zip": None, "folder": train.folder if train else None,
         "can_resume": bool(train) and train.status not in (DONE, "running"),
         "trained": bool(train) and train.status == DONE, "notes": (active.warnings if active else [])}
    if train is None:
        return v
    folder = Path(train.folder)
    if (folder / "photos").is_dir():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            v["photos"] = [str(p) for p in list_photos(folder / "photos")]
    v["gallery"] = [str(p) for p in sorted((folder / "images").glob("*/*.png"))]
    sheet = folder / "lora" / "samples" / "sheet.png"  # grows a row per sample step while it trains
    v["sheet"] = (str(sheet), sheet.stat().st_mtime_ns) if sheet.is_file() else None
    v["snapshots"] = [FINAL] + [f"step {int(p.name[5:])}" for p in sorted((folder / "lora" / "snapshots").glob("step-*"))
                                if (p / "hollownet.json").is_file()]
    if train.status == DONE:
        v["lora_files"] = [f for f in (train.result or {}).get("lora_files", []) if Path(f).is_file()]
    if v["gallery"] and not jobs.running():
        v["images_zip"] = images_zip(folder)
    return v


def memory_text(train: Job | None, gen: Job | None) -> str:
    parts = []
    m = (train.memory if train else {}) | (gen.memory if gen else {})
    for key, label in (("precompute_peak_bytes", "pre-compute"), ("train_peak_bytes", "training"),
                       ("generate_peak_bytes", "generation")):
        if m.get(key):
            parts.append(f"{label} {format_bytes(m[key])}")
    text = "measured tensor peaks: " + ", ".join(parts) if parts else "measured memory: not yet"
    if m.get("process_peak_rss"):
        text += f"; app process peak RSS {format_bytes(m['process_peak_rss'])}"
    return text


def images_zip(folder: Path) -> str:
    """``FOLDER/images.zip`` of every generated image (remade when images were added)."""
    images = sorted((folder / "images").glob("*/*.png"))
    out = folder / "images.zip"
    if not out.exists() or any(p.stat().st_mtime > out.stat().st_mtime for p in images):
        tmp = out.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w") as z:
            for p in images:
                z.write(p, f"{p.parent.name}-{p.name}")
        tmp.replace(out)
    return str(out)
