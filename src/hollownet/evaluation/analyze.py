"""Layer significance (``hollownet analyze``): how much a plain LoRA changes each U-Net block.

The Hollowed Net paper's evidence for which blocks to hollow: fine-tune the whole U-Net with LoRA
on a subject and look at the size of the weight update per block. Blocks whose weights barely move
(the low-resolution middle of the U-Net) can be left out of personalization.

For every LoRA layer, ΔW = scale · B · A (``lora.up`` · ``lora.down``; a conv LoRA's factors are
flattened to matrices first), with scale = alpha / rank (alpha / √rank for rsLoRA). alpha and rank
come from ``hollownet.json`` beside the weights, else from the adapter config that diffusers stores
in the safetensors metadata (``lora_alpha``, ``r``, ``alpha_pattern``, ``rank_pattern``, ``use_rslora``),
else from per-layer ``.alpha`` tensors (kohya style), else alpha = rank (scale 1, said in a note).

Per group of layers (a block, a unit, or a single layer) the ΔW entries of all its LoRA layers are
pooled: ``mean_abs`` = Σ|ΔW| / numel and ``rms`` = ‖ΔW‖_F / √numel = √(Σ ΔW² / numel). With several
LoRA folders (e.g. one per subject) each group's numbers are the mean ± sample std over the LoRAs
that have the group. Groups are listed in U-Net order: conv_in / time embedding, down_blocks.0 …,
mid_block, up_blocks.0 …, conv_out; within a block resnets.i, attentions.i, then the resampler.

Levels: ``block`` (down_blocks.1, mid_block, ...), ``unit`` (down_blocks.1.attentions.0,
down_blocks.1.resnets.1, down_blocks.1.downsamplers, ...) and ``layer`` (every LoRA'd module).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from hollownet import workflow
from hollownet.errors import HollownetError
from hollownet.evaluation.bench import train_request
from hollownet.settings import Modes, fill_model_defaults
from hollownet.stages.export import INFO_FILE, LORA_FILE
from hollownet.files import save_json

LEVELS = ("block", "unit", "layer")
FORMAT = "hollownet-significance/1"
_PREFIXES = ("unet.", "base_model.model.")
_PAIRS = ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight"),
          (".lora_down.weight", ".lora_up.weight"))

__all__ = [
    "AnalyzeConfig",
    "LoraFile",
    "format_table",
    "group_name",
    "layer_stats",
    "load_lora",
    "order_key",
    "plot_significance",
    "run_analyze",
    "significance",
]


# --------------------------------------------------------------------------
# Reading a LoRA.
# --------------------------------------------------------------------------


@dataclass
class LoraFile:
    """The U-Net LoRA layers of one file: module name -> (A [r, ...], B [out, r, ...], scale)."""

    path: Path
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    info: dict = field(default_factory=dict)
    scale_source: str = ""
    notes: list[str] = field(default_factory=list)


def _weights_path(path: str | Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file():
        return p
    if not p.exists():
        raise HollownetError(f"LoRA folder '{p}' does not exist; pass the --output folder of 'hollownet train --method lora'")
    if (p / LORA_FILE).is_file():
        return p / LORA_FILE
    hint = " (a --method full run has no LoRA to analyze)" if (p / "unet").is_dir() else ""
    raise HollownetError(
        f"no {LORA_FILE} in '{p}'{hint}; pass the --output folder of 'hollownet train --method lora' or a .safetensors file"
    )


def _pattern_value(name: str, pattern: dict, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _factors(tensors: dict[str, torch.Tensor]) -> tuple[dict, dict, dict[str, float], int]:
    """A LoRA file's tensors by U-Net module: (down factors, up factors, per-layer alphas, how many
    text-encoder tensors were skipped), whatever the key layout (diffusers, peft, kohya)."""
    downs: dict[str, torch.Tensor] = {}
    ups: dict[str, torch.Tensor] = {}
    alphas: dict[str, float] = {}
    skipped = 0
    for key, tensor in tensors.items():
        name = key
        if name.startswith(("text_encoder", "te_", "lora_te")):
            skipped += 1
            continue
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
        name = re.sub(r"\.default(_\d+)?(?=\.weight$)", "", name)  # peft adapter names in raw state dicts
        for down_suffix, up_suffix in _PAIRS:
            if name.endswith(down_suffix):
                downs[name[: -len(down_suffix)]] = tensor
                break
            if name.endswith(up_suffix):
                ups[name[: -len(up_suffix)]] = tensor
                break
        else:
            if name.endswith(".alpha") and tensor.numel() == 1:
                alphas[name[: -len(".alpha")]] = float(tensor)
    return downs, ups, alphas, skipped


def load_lora(path: str | Path) -> LoraFile:
    """Read a LoRA folder (``hollownet train`` output) or a ``.safetensors`` file; U-Net layers only."""
    weights = _weights_path(path)
    folder = weights.parent
    try:
        with safe_open(str(weights), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file
        raise HollownetError(f"cannot read '{weights}' as safetensors ({type(e).__name__}); is it a LoRA file?") from None
    info_path = folder / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() and weights.name == LORA_FILE else {}

    downs, ups, alphas, skipped = _factors(tensors)
    if not downs:
        raise HollownetError(
            f"'{weights}' holds no U-Net LoRA layers (expected diffusers keys like "
            f"unet.<module>.lora.down.weight / .lora.up.weight or peft lora_A / lora_B)"
        )
    unpaired = sorted(set(downs) ^ set(ups))
    if unpaired:
        raise HollownetError(f"'{weights}': LoRA layer {unpaired[0]} has only one of its two factors; the file is incomplete")

    adapter = {}
    if "lora_adapter_metadata" in metadata:
        try:
            raw = json.loads(metadata["lora_adapter_metadata"])
            adapter = {k.split(".", 1)[1] if k.startswith("unet.") else k: v for k, v in raw.items()}
        except (json.JSONDecodeError, AttributeError):
            adapter = {}

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    notes: list[str] = []
    if info.get("lora_alpha") is not None and info.get("rank"):
        source = f"{INFO_FILE} (alpha {info['lora_alpha']:g}, rank {info['rank']})"
    elif adapter.get("lora_alpha") is not None and adapter.get("r"):
        source = f"safetensors metadata (alpha {adapter['lora_alpha']:g}, rank {adapter['r']})"
    elif alphas:
        source = "per-layer .alpha tensors"
    else:
        source = "none found: alpha = rank assumed (scale 1)"
        notes.append(f"{weights}: no alpha in {INFO_FILE}, metadata or .alpha tensors; assuming alpha = rank (scale 1)")
    for name in sorted(downs):
        a, b = downs[name], ups[name]
        rank = a.shape[0]
        if info.get("lora_alpha") is not None and info.get("rank"):
            alpha, r, rslora = float(info["lora_alpha"]), int(info["rank"]), False
        elif adapter.get("lora_alpha") is not None and adapter.get("r"):
            alpha = float(_pattern_value(name, adapter.get("alpha_pattern"), adapter["lora_alpha"]))
            r = int(_pattern_value(name, adapter.get("rank_pattern"), adapter["r"]))
            rslora = bool(adapter.get("use_rslora"))
        else:
            alpha, r, rslora = alphas.get(name, float(rank)), rank, False
        if r != rank:  # the tensors are the truth for the rank
            r = rank
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        layers[name] = (a, b, scale)
    if skipped:
        notes.append(f"{weights}: {skipped} text-encoder LoRA tensors ignored (U-Net only)")
    method = info.get("method")
    if method == "hollow":
        notes.append(
            f"{weights} was trained with --method hollow: its hollowed blocks ({', '.join(info.get('hollow_blocks') or [])}) "
            "have no LoRA and are absent here; analyze a --method lora run to see every block"
        )
    return LoraFile(path=weights, layers=layers, info=info, scale_source=source, notes=notes)


def delta_weight(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """ΔW = scale · B · A in float64, as a [out, in·kh·kw] matrix (linear and conv LoRA alike)."""
    return scale * (b.double().flatten(1) @ a.double().flatten(1))


def layer_stats(lora: LoraFile) -> dict[str, dict]:
    """Per LoRA layer: Σ|ΔW|, Σ ΔW², numel."""
    out = {}
    for name, (a, b, scale) in lora.layers.items():
        dw = delta_weight(a, b, scale)
        out[name] = {"abs_sum": float(dw.abs().sum()), "sq_sum": float(dw.pow(2).sum()), "numel": dw.numel()}
    return out


# --------------------------------------------------------------------------
# Grouping and order.
# --------------------------------------------------------------------------


def group_name(module: str, level: str = "block") -> str:
    """The block / unit / layer a LoRA'd module belongs to."""
    if level not in LEVELS:
        raise HollownetError(f"--level {level!r} is not one of {', '.join(LEVELS)}")
    if level == "layer":
        return module
    parts = module.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
        block = parts[:2]
        rest = parts[2:]
    elif parts[0] == "mid_block":
        block, rest = parts[:1], parts[1:]
    else:
        return parts[0]
    if level == "block":
        return ".".join(block)
    if rest and rest[0] in ("resnets", "attentions") and len(rest) > 1:
        return ".".join(block + rest[:2])
    if rest:
        return ".".join(block + rest[:1])
    return ".".join(block)


_PRE = ("conv_in", "time_proj", "time_embedding", "class_embedding", "add_time_proj", "add_embedding",
        "encoder_hid_proj")


def _natural(parts: list[str]) -> tuple:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)


def order_key(name: str) -> tuple:
    """U-Net execution order for block, unit and layer names."""
    parts = name.split(".")
    head = parts[0]
    if head == "down_blocks":
        section, index, rest = 1, int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0, parts[2:]
    elif head == "mid_block":
        section, index, rest = 2, 0, parts[1:]
    elif head == "up_blocks":
        section, index, rest = 3, int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0, parts[2:]
    elif head in _PRE:
        return (0, _PRE.index(head), (), _natural(parts[1:]))
    else:
        return (4, 0, (), _natural(parts))
    if not rest:
        unit = (-1, 0)
    elif rest[0] in ("resnets", "attentions") and len(rest) > 1 and rest[1].isdigit():
        unit = (int(rest[1]), 0 if rest[0] == "resnets" else 1)
        rest = rest[2:]
    elif rest[0] in ("downsamplers", "upsamplers"):
        unit = (10**6, 0)
        rest = rest[1:]
    else:
        unit = (10**6 + 1, 0)
    return (section, index, unit, _natural(rest))


# --------------------------------------------------------------------------
# Significance.
# --------------------------------------------------------------------------


def _stats(values: list[float]) -> dict:
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def significance(loras: list[LoraFile], level: str = "block") -> dict:
    """Per group, pooled mean |ΔW| and ‖ΔW‖_F/√numel of each LoRA, then mean ± std over the LoRAs."""
    if not loras:
        raise HollownetError("no LoRA to analyze; pass LoRA folders or --train")
    per_lora: list[dict[str, dict]] = []
    for lora in loras:
        groups: dict[str, dict] = {}
        for name, st in layer_stats(lora).items():
            g = groups.setdefault(group_name(name, level), {"abs_sum": 0.0, "sq_sum": 0.0, "numel": 0, "layers": 0})
            g["abs_sum"] += st["abs_sum"]
            g["sq_sum"] += st["sq_sum"]
            g["numel"] += st["numel"]
            g["layers"] += 1
        per_lora.append({k: {"mean_abs": g["abs_sum"] / g["numel"], "rms": math.sqrt(g["sq_sum"] / g["numel"]),
                             "numel": g["numel"], "layers": g["layers"]} for k, g in groups.items()})
    names = sorted({k for d in per_lora for k in d}, key=order_key)
    rows = []
    for name in names:
        have = [d[name] for d in per_lora if name in d]
        rows.append({
            "name": name,
            "layers": have[0]["layers"],
            "numel": have[0]["numel"],
            "mean_abs": _stats([h["mean_abs"] for h in have]),
            "rms": _stats([h["rms"] for h in have]),
            "per_lora": [d[name]["mean_abs"] if name in d else None for d in per_lora],
        })
    top = max((r["mean_abs"]["mean"] for r in rows), default=0.0) or 1.0
    for r in rows:
        r["relative"] = r["mean_abs"]["mean"] / top
    return {
        "format": FORMAT,
        "level": level,
        "loras": [{"path": str(x.path), "method": x.info.get("method"), "rank": x.info.get("rank"),
                   "lora_alpha": x.info.get("lora_alpha"), "scale_source": x.scale_source, "layers": len(x.layers)}
                  for x in loras],
        "groups": rows,
        "notes": [n for x in loras for n in x.notes],
        "definition": "dW = scale * B @ A per LoRA layer; per group pooled over its layers: mean_abs = sum|dW| / numel, "
                      "rms = ||dW||_F / sqrt(numel); mean ± sample std over LoRAs",
    }


def _fmt(st: dict, total: int = 1) -> str:
    if st["mean"] is None:
        return "—"
    text = f"{st['mean']:.3e}" + (f" ± {st['std']:.1e}" if st["std"] is not None else "")
    return text + (f" (n={st['n']})" if st["n"] < total else "")


def format_table(result: dict, bar_width: int = 20) -> str:
    """Markdown table in U-Net order, with a text bar of mean |ΔW| relative to the largest group."""
    n = len(result["loras"])
    head = "block" if result["level"] == "block" else result["level"]
    lines = [f"| {head} | LoRA layers | ΔW entries | mean abs ΔW | ‖ΔW‖_F/√numel | relative |",
             "|---|---:|---:|---:|---:|:---|"]
    for r in result["groups"]:
        bar = "█" * max(0, round(r["relative"] * bar_width))
        lines.append(f"| {r['name']} | {r['layers']} | {r['numel']:,} | {_fmt(r['mean_abs'], n)} | {_fmt(r['rms'], n)} | "
                     f"{bar} {r['relative']:.2f} |")
    lines.append("")
    lines.append(f"{n} LoRA file{'s' if n != 1 else ''}" + (" (mean ± std over them)" if n > 1 else "")
                 + f"; ΔW = scale·B·A, scale from {result['loras'][0]['scale_source']}"
                 + ("" if n == 1 else " (first file)") + ".")
    lines += [f"note: {x}" for x in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_significance(result: dict, path: str | Path) -> None:
    """Bar chart of mean |ΔW| and ‖ΔW‖_F/√numel per group (± std over LoRAs), in U-Net order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["groups"]
    colors = {"down_blocks": "tab:blue", "mid_block": "tab:red", "up_blocks": "tab:green"}
    color = [colors.get(r["name"].split(".")[0], "tab:gray") for r in rows]
    x = list(range(len(rows)))
    width = max(6.0, 0.35 * len(rows) + 2)
    fig, axes = plt.subplots(2, 1, figsize=(width, 6.5), dpi=100, sharex=True)
    for ax, key, label in ((axes[0], "mean_abs", "mean |ΔW|"), (axes[1], "rms", "‖ΔW‖_F / √numel")):
        ax.bar(x, [r[key]["mean"] for r in rows], yerr=[r[key]["std"] or 0.0 for r in rows], color=color, capsize=3)
        ax.set_ylabel(label)
    axes[0].set_title(f"LoRA update size per {result['level']} ({len(result['loras'])} LoRA file(s))", fontsize=10)
    axes[1].set_xticks(x, [r["name"] for r in rows], rotation=60, ha="right", fontsize=7 if len(rows) > 12 else 9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------
# The command.
# --------------------------------------------------------------------------


@dataclass
class AnalyzeConfig:
    """What ``hollownet analyze`` takes: LoRA folders, or --train settings for one plain-LoRA run."""

    output: str
    loras: list[str] = field(default_factory=list)
    level: str = "block"
    train: bool = False
    model: str | None = None
    images: str | None = None
    prompt: str | None = None
    steps: int | None = None  # None: the model's default (settings.model_defaults)
    rank: int | None = None
    lr: float | None = None
    resolution: int | None = None
    seed: int = 0
    precision: str = Modes.precision
    device: str | None = None  # None: the best this machine has

    def __post_init__(self):
        if self.model:
            fill_model_defaults(self, ("steps", "rank", "lr", "resolution"))
        if self.level not in LEVELS:
            raise HollownetError(f"--level {self.level!r} is not one of {', '.join(LEVELS)}")
        if self.train:
            missing = [f"--{k}" for k in ("model", "images", "prompt") if not getattr(self, k)]
            if missing:
                raise HollownetError(f"--train needs {', '.join(missing)} (the base model, the subject's photos, the prompt)")
        elif not self.loras:
            raise HollownetError("nothing to analyze: pass one or more LoRA folders, or --train with --model, --images, --prompt")


def run_analyze(cfg: AnalyzeConfig) -> dict:
    """Optionally train a plain LoRA, then write OUTPUT/significance.{json,png,md} and return the result."""
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in cfg.loras]
    for p in paths:  # bad folders fail before a long training run
        _weights_path(p)
    if cfg.train:
        lora_dir = out / "lora"
        workflow.personalize(train_request(cfg, images=cfg.images, prompt=cfg.prompt, output=str(lora_dir),
                                           method="lora", seed=cfg.seed, track_memory=False))
        shutil.rmtree(lora_dir / "store", ignore_errors=True)
        paths.append(str(lora_dir))
    result = significance([load_lora(p) for p in paths], cfg.level)
    save_json(out / "significance.json", result)
    (out / "significance.md").write_text(format_table(result), encoding="utf-8")
    plot_significance(result, out / "significance.png")
    return result
