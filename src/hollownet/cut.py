"""Stage 0: plan the hollow — which central, skip-symmetric part of the U-Net to cut out.

A UNet2DConditionModel is a ladder of *units*. On the way down each unit produces one skip
connection: a (resnet, attention) pair of a down block, or its downsampler. On the way up each
(resnet, attention) pair of an up block consumes one skip, last produced first; upsamplers consume
none. A cut of depth ``d`` hollows the last ``d`` down units, the mid block, and the first up units
up to and including the one that consumes the d-th skip (plus that up block's upsampler when the cut
ends at the block's end). Every skip made inside the hollow is consumed inside it, so the kept outer
layers need from the hollow exactly one tensor: the activation it hands to the first kept up unit.

The default cut means the same on every U-Net: the valid cut whose hollowed share of the U-Net's
parameters is nearest the paper's (:data:`PAPER_FRACTION`, 39%). On SD 1.x/2.x that is the paper's
cut itself (``down_blocks.2.downsamplers``, ``down_blocks.3``, ``mid_block``, ``up_blocks.0``:
depth 3, 39.1% / 38.9%); on SDXL's 3-level U-Net, whose central blocks hold far more of the
parameters, it is depth 1 (46.5%), where the old rule ("``up_blocks.0`` and its skip partners")
hollowed 92.7% and removed 86% of the layers LoRA targets (43% now).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from hollownet.errors import HollownetError
from hollownet.loading import resolve_model_dir
from hollownet.settings import DEFAULT_LORA_TARGETS  # noqa: F401  (re-exported: the cut is where LoRA targets are used)

SUPPORTED_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
SUPPORTED_UP = ("CrossAttnUpBlock2D", "UpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")
CONFIG_DIR = Path(__file__).parent / "configs"
#: The paper's cut on SD 2.x hollows 39% of the U-Net's parameters (Cho et al. 2024, Table 1).
PAPER_FRACTION = 0.39
BUNDLED_UNETS = {"sd15": "sd15_unet.json", "sd21": "sd21_unet.json", "sdxl": "sdxl_unet.json"}


@dataclass(frozen=True)
class Unit:
    """One rung of the ladder: a (resnet, attention) pair (``index`` set) or a resampler (``None``)."""

    side: str  # "down" | "up"
    block: int
    index: int | None

    def module_names(self, has_attention: bool) -> list[str]:
        prefix = f"{self.side}_blocks.{self.block}"
        if self.index is None:
            return [f"{prefix}.{'downsamplers' if self.side == 'down' else 'upsamplers'}"]
        names = [f"{prefix}.resnets.{self.index}"]
        if has_attention:
            names.append(f"{prefix}.attentions.{self.index}")
        return names


def ladder(unet: nn.Module) -> tuple[list[Unit], list[Unit]]:
    """Down units in execution order, up units in execution order."""
    down, up = [], []
    for i, block in enumerate(unet.down_blocks):
        _check_block(f"down_blocks.{i}", block, SUPPORTED_DOWN)
        down += [Unit("down", i, j) for j in range(len(block.resnets))]
        if block.downsamplers is not None:
            down.append(Unit("down", i, None))
    for i, block in enumerate(unet.up_blocks):
        _check_block(f"up_blocks.{i}", block, SUPPORTED_UP)
        up += [Unit("up", i, j) for j in range(len(block.resnets))]
        if block.upsamplers is not None:
            up.append(Unit("up", i, None))
    _check_block("mid_block", unet.mid_block, SUPPORTED_MID)
    check_supported(unet)
    return down, up


def check_supported(unet: nn.Module) -> None:
    """Refuse, in one line, what the split forward (``unet_split``) does not follow (it would be
    silently wrong): checked with the blocks, so before any stage runs."""
    cfg = unet.config
    if cfg.encoder_hid_dim_type == "ip_image_proj":
        raise HollownetError("U-Nets with an IP-Adapter image projection (encoder_hid_dim_type='ip_image_proj') are not "
                             "supported; unload the IP-Adapter (unet.unload_ip_adapter()) first")
    if cfg.attention_type in ("gated", "gated-text-image"):
        raise HollownetError(f"U-Nets with GLIGEN attention (attention_type={cfg.attention_type!r}) are not supported")
    if any(getattr(b, "s1", None) for b in unet.up_blocks):
        raise HollownetError("FreeU is enabled on this U-Net, which the split forward does not apply; call "
                             "unet.disable_freeu() first")


def _check_block(name: str, block: nn.Module | None, supported: tuple[str, ...]) -> None:
    kind = type(block).__name__
    if kind not in supported:
        raise HollownetError(
            f"{name} is a {kind}, which hollownet cannot cut; supported blocks: {', '.join(supported)}"
        )


def has_attention(unet: nn.Module, unit: Unit) -> bool:
    block = (unet.down_blocks if unit.side == "down" else unet.up_blocks)[unit.block]
    return getattr(block, "attentions", None) is not None and unit.index is not None


def unit_modules(unet: nn.Module, unit: Unit) -> list[str]:
    return unit.module_names(has_attention(unet, unit))


def max_depth(unet: nn.Module) -> int:
    down, _ = ladder(unet)
    return len(down)


def default_depth(unet: nn.Module) -> int:
    """The depth of the default cut (see :func:`nearest_paper_depth`)."""
    return nearest_paper_depth(depth_fractions(unet))


def nearest_paper_depth(fractions: list[float]) -> int:
    """The depth whose hollowed fraction is nearest the paper's (the shallower one on a tie)."""
    return min(range(len(fractions)), key=lambda d: (abs(fractions[d] - PAPER_FRACTION), d))


def split_ladder(down: list[Unit], up: list[Unit], depth: int) -> tuple[list[Unit], list[Unit], list[Unit], list[Unit]]:
    """kept down, hollow down, hollow up, kept up for the cut of ``depth``."""
    consumed, cut_at = 0, 0
    while consumed < depth:  # walk up until the hollow has consumed its own `depth` skips
        if up[cut_at].index is not None:
            consumed += 1
        cut_at += 1
    # A cut ending at an up block's last pair takes that block's upsampler too (block boundary).
    if depth and cut_at < len(up) and up[cut_at].index is None and up[cut_at].block == up[cut_at - 1].block:
        cut_at += 1
    return down[: len(down) - depth], down[len(down) - depth :], up[:cut_at], up[cut_at:]


def depth_fractions(unet: nn.Module) -> list[float]:
    """The hollowed share of the U-Net's parameters for every depth 0..max_depth."""
    down, up = ladder(unet)
    total = sum(p.numel() for p in unet.parameters())
    out = []
    for depth in range(len(down) + 1):
        _, hollow_down, hollow_up, _ = split_ladder(down, up, depth)
        prefixes = ["mid_block"] + [n for u in hollow_down + hollow_up for n in unit_modules(unet, u)]
        out.append(_param_count(unet, prefixes) / total)
    return out


@dataclass
class HollowPlan:
    """A cut and its accounting. ``depth`` is the number of skips produced inside the hollow."""

    depth: int
    kept_down: list[Unit]
    hollow_down: list[Unit]
    hollow_up: list[Unit]
    kept_up: list[Unit]
    hollow_blocks: list[str]  # canonical names, e.g. ["down_blocks.3", "mid_block", "up_blocks.0"]
    total_params: int
    hollow_params: int
    lora_params: int = 0
    lora_targets: list[str] = field(default_factory=list)  # full module names that get LoRA
    fractions: list[float] = field(default_factory=list)  # every depth's hollowed fraction (the default's why)
    lora_targets_total: int = 0  # modules the LoRA targets match in the whole U-Net
    lora_targets_kept: int = 0  # ... outside the hollow

    @property
    def kept_params(self) -> int:
        return self.total_params - self.hollow_params

    @property
    def fraction(self) -> float:
        return self.hollow_params / self.total_params

    @property
    def is_default(self) -> bool:
        return self.depth == nearest_paper_depth(self.fractions)

    @property
    def lora_targets_removed_share(self) -> float:
        """Share of the modules LoRA targets (e.g. the attention projections) that the cut removes."""
        return 1 - self.lora_targets_kept / self.lora_targets_total if self.lora_targets_total else 0.0

    @property
    def why(self) -> str:
        """How this cut relates to the default, in one line."""
        fr, d = self.fractions, nearest_paper_depth(self.fractions)
        if self.depth == d:
            near = " and ".join(f"{fr[i]:.1%}" for i in (d - 1, d + 1) if 0 <= i < len(fr))
            return (f"default: the valid skip-symmetric cut nearest the paper's {PAPER_FRACTION:.0%} of U-Net parameters "
                    f"({self.fraction:.1%}; the cuts next to it hollow {near})")
        return f"as asked (the default cut, nearest the paper's {PAPER_FRACTION:.0%}, hollows {fr[d]:.1%})"

    def hollow_prefixes(self, unet: nn.Module) -> list[str]:
        """Module names whose weights live only in the hollow."""
        names = ["mid_block"]
        for u in self.hollow_down + self.hollow_up:
            names += unit_modules(unet, u)
        return names

    def to_dict(self) -> dict:
        return {
            "depth": self.depth,
            "hollow_blocks": self.hollow_blocks,
            "total_params": self.total_params,
            "hollow_params": self.hollow_params,
            "kept_params": self.kept_params,
            "fraction": round(self.fraction, 4),
            "lora_params": self.lora_params,
            "why": self.why,
            "lora_targets_removed_share": round(self.lora_targets_removed_share, 4),
        }

    def format(self) -> str:
        m = lambda n: f"{n / 1e6:8.1f}M"  # noqa: E731
        lines = [
            f"hollow plan (depth {self.depth}, {self.fraction:.1%} of U-Net parameters hollowed)",
            f"  hollowed: {', '.join(self.hollow_blocks)}",
            f"  chosen:   {self.why}",
            f"  U-Net params   {m(self.total_params)}",
            f"  hollowed       {m(self.hollow_params)}  (never loaded for training)",
            f"  kept (frozen)  {m(self.kept_params)}",
            f"  LoRA (trained) {m(self.lora_params)}  on {len(self.lora_targets)} layers",
            f"  LoRA targets   {self.lora_targets_removed_share:.1%} removed by the cut "
            f"({self.lora_targets_total - self.lora_targets_kept} of {self.lora_targets_total} target layers)",
        ]
        return "\n".join(lines)


def _param_count(unet: nn.Module, prefixes: list[str]) -> int:
    mods = dict(unet.named_modules())
    return sum(p.numel() for name in prefixes for p in mods[name].parameters())


def canonical_names(unet: nn.Module, down: list[Unit], up: list[Unit]) -> list[str]:
    """Collapse whole blocks to their block name, keep partial ones at sub-block granularity."""
    out = []
    for side, units, blocks in (("down", down, unet.down_blocks), ("up", up, unet.up_blocks)):
        names_side = []
        for b in sorted({u.block for u in units}):
            in_block = [u for u in units if u.block == b]
            whole = len(in_block) == len(blocks[b].resnets) + (
                (blocks[b].downsamplers if side == "down" else blocks[b].upsamplers) is not None
            )
            if whole:
                names_side.append(f"{side}_blocks.{b}")
            else:
                for u in in_block:
                    names_side += unit_modules(unet, u)
        if side == "down":
            out += names_side + ["mid_block"]
        else:
            out += names_side
    return out


def make_plan(
    unet: nn.Module,
    depth: int | None = None,
    *,
    rank: int = 0,
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
    fractions: list[float] | None = None,
) -> HollowPlan:
    """The cut of the given depth (default: nearest the paper's fraction) with parameter and LoRA
    accounting. ``unet`` may live on the meta device: only structure and shapes are read.
    ``fractions``: ``depth_fractions(unet)``, when the caller has them already."""
    down, up = ladder(unet)
    fractions = depth_fractions(unet) if fractions is None else fractions
    depth = nearest_paper_depth(fractions) if depth is None else depth
    if not 0 <= depth <= len(down):
        raise HollownetError(f"hollow depth {depth} is outside 0..{len(down)} for this U-Net")
    kept_down, hollow_down, hollow_up, kept_up = split_ladder(down, up, depth)
    plan = HollowPlan(
        depth=depth,
        kept_down=kept_down,
        hollow_down=hollow_down,
        hollow_up=hollow_up,
        kept_up=kept_up,
        hollow_blocks=canonical_names(unet, hollow_down, hollow_up),
        total_params=sum(p.numel() for p in unet.parameters()),
        hollow_params=0,
        fractions=fractions,
    )
    hollow = plan.hollow_prefixes(unet)
    plan.hollow_params = _param_count(unet, hollow)
    kept_targets = lora_target_modules(unet, hollow, lora_targets)
    plan.lora_targets_total = len(lora_target_modules(unet, [], lora_targets))
    plan.lora_targets_kept = len(kept_targets)
    if rank:
        plan.lora_targets = kept_targets
        mods = dict(unet.named_modules())
        plan.lora_params = sum(lora_size(mods[n], rank) for n in plan.lora_targets)
    return plan


def lora_target_modules(unet: nn.Module, excluded_prefixes: list[str], targets: tuple[str, ...]) -> list[str]:
    """Full names of modules that match ``targets`` (peft-style suffix match) outside the hollow."""
    out = []
    for name, mod in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if any(name == p or name.startswith(p + ".") for p in excluded_prefixes):
            continue
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            out.append(name)
    return out


def lora_size(mod: nn.Module, rank: int) -> int:
    if isinstance(mod, nn.Linear):
        return rank * (mod.in_features + mod.out_features)
    k = mod.kernel_size[0] * mod.kernel_size[1]
    return rank * (mod.in_channels * k + mod.out_channels)


def all_plans(unet: nn.Module) -> list[HollowPlan]:
    fractions = depth_fractions(unet)
    return [make_plan(unet, d, fractions=fractions) for d in range(len(fractions))]


def plan_for_fraction(unet: nn.Module, fraction: float, **kw) -> HollowPlan:
    """The valid cut whose hollowed-parameter fraction is nearest to ``fraction``."""
    plans = all_plans(unet)
    lo, hi = plans[0].fraction, plans[-1].fraction
    if not (0 < fraction < 1) or not (lo - 0.05 <= fraction <= hi + 0.05):
        raise HollownetError(
            f"hollow fraction {fraction:g} is outside what this U-Net allows ({lo:.2f}-{hi:.2f}); "
            f"pick --hollow in that range or name the cut with --hollow-blocks"
        )
    best = min(plans, key=lambda p: abs(p.fraction - fraction))
    if not (lo <= fraction <= hi):
        import warnings

        warnings.warn(f"--hollow {fraction:g} is beyond this U-Net's range ({lo:.2f}-{hi:.2f}); "
                      f"using the nearest cut, {best.fraction:.2f}")
    return make_plan(unet, best.depth, fractions=best.fractions, **kw)


def plan_for_blocks(unet: nn.Module, blocks: list[str], **kw) -> HollowPlan:
    """The valid cut named by ``blocks`` (any mix of block and sub-block names)."""
    wanted = _expand(unet, blocks)
    for p in all_plans(unet):
        if _expand(unet, p.hollow_blocks) == wanted:
            return make_plan(unet, p.depth, fractions=p.fractions, **kw)
    valid = "; ".join(",".join(p.hollow_blocks) for p in all_plans(unet)[:6])
    raise HollownetError(
        f"--hollow-blocks {','.join(blocks)} is not a skip-symmetric central cut; valid cuts include: {valid} ..."
    )


def _expand(unet: nn.Module, names: list[str]) -> set[str]:
    """Names -> the set of leaf unit module names they cover (so 'down_blocks.3' == its parts)."""
    down, up = ladder(unet)
    leaves = {n for u in down + up for n in unit_modules(unet, u)} | {"mid_block"}
    out = set()
    for name in names:
        name = name.strip()
        covered = {leaf for leaf in leaves if leaf == name or leaf.startswith(name + ".")}
        if not covered:
            raise HollownetError(f"--hollow-blocks: '{name}' names no block of this U-Net (e.g. down_blocks.3, mid_block, up_blocks.0)")
        out |= covered
    return out


def resolve_plan(
    unet: nn.Module,
    *,
    fraction: float | None = None,
    blocks: list[str] | None = None,
    depth: int | None = None,
    rank: int = 0,
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS,
) -> HollowPlan:
    """One entry point for the three ways a user names a cut."""
    kw = dict(rank=rank, lora_targets=lora_targets)
    if sum(x is not None for x in (fraction, blocks, depth)) > 1:
        raise HollownetError("give only one of --hollow and --hollow-blocks")
    if fraction is not None:
        return plan_for_fraction(unet, fraction, **kw)
    if blocks:
        return plan_for_blocks(unet, blocks, **kw)
    return make_plan(unet, depth, **kw)


@lru_cache(maxsize=8)
def _bundled_config(name: str) -> str:
    return (CONFIG_DIR / BUNDLED_UNETS[name]).read_text()


def load_unet_config(model: str | Path) -> dict:
    """A U-Net config from a bundled name (sd15, sd21, sdxl) or a diffusers model folder."""
    if str(model) in BUNDLED_UNETS:
        cfg = json.loads(_bundled_config(str(model)))
    else:
        path = resolve_model_dir(model) / "unet" / "config.json"
        cfg = json.loads(path.read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_note")}


def meta_unet(config: dict) -> nn.Module:
    """The U-Net's structure on the meta device: shapes and names, no memory, no weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)
