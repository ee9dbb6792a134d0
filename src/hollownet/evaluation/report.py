"""The ``hollownet bench`` report: cell results aggregated into the paper's table, as markdown, JSON and PNGs.

The table: Method | base params | LoRA params | peak memory | vs inference | DINO | CLIP-I | CLIP-T
(the toy model's own columns in place of the last three, ``toy.bench``). A method's score is the
mean over all its finished cells (subjects × seeds) and ± is the sample standard deviation over those
cells; ``summary.json`` also has, per metric, the mean and std over seeds of the subject-averaged
score (``over_seeds``) and per-subject means over seeds.

"vs inference" is the mean measured training peak divided by the inference peak: the tensor-memory
peak of one no-grad denoising step of the full U-Net at batch 1 (the paper's inference figure; the
batch-2 classifier-free-guidance figure is kept beside it as ``peak_bytes_cfg``), same precision and
resolution as training, text encoder and VAE not resident (``bench.inference_reference``). Training
peaks are exact live tensor bytes on the device, weights included.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from hollownet.evaluation.metrics import METRICS
from hollownet.memory.sizes import format_bytes
from hollownet.toy.bench import TOY_METRICS

METRIC_LABELS = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "toy_subject": "toy subject",
                 "identity": "identity", "identity_score": "identity score", "presence": "colours present", "background": "background", "drift": "drift"}


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
    return "—" if not st or st.get("mean") is None else format_bytes(st["mean"])


def _md(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def format_summary(summary: dict) -> str:
    """The paper-style markdown table, a memory/time table, per-subject scores and failed cells."""
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
              ("- identity: share of images in which the subject is recognisably drawn (shape, both colours, their "
               "layout: toy.identity); identity score: its best-aligned colour-mask IoU with the photos, mean; "
               "toy subject: cosine of the toy evaluator's features, generated vs subject photos (sees colour more "
               "than shape); colours present: share of images showing both subject colours; background: share following the prompt's background; "
               "drift: share of ordinary-prompt images showing the subject's colours (lower is better). All are the toy "
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


def _pyplot():
    import matplotlib  # here: only a run that draws pays for it, and the backend is chosen only then

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def plot_summary(summary: dict, path: str | Path) -> None:
    """Bars per method: DINO, CLIP-I, CLIP-T (± std) and training peak memory vs the inference peak."""
    plt = _pyplot()
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
    plt = _pyplot()
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
