"""Stage 0 for a diffusion transformer: which cut applies, and the ladder of prefix cuts.

The cut rule reads the architecture. A network whose late layers read early ones through long skips (a
U-Net's down/up blocks; HunyuanDiT's ``skip_linear`` blocks) can hollow its **centre**: the skips carry
the trained outer layers around it (``cut.py``). A plain DiT (SD3's MMDiT, PixArt, Sana, Flux) has no
long skips, so LoRA before a hollowed middle would get no gradient: its frozen part is a **prefix** (the
embedders and blocks ``0..k-1``, ``dit_split.py``). Of the DiTs, only SD3 / SD3.5 is split so far; the
others are named and refused in one line.

A prefix cut ``k`` runs from 0 (the embedders alone) to ``N-1`` (one block left to train); ``k = N``
splits exactly but leaves no LoRA target, so it is no training cut. There is no default ``k`` yet: the
toy-DiT fraction curve (issue 26, part 2) is to choose it; until then a cut is named by ``k`` or by the
frozen fraction of the transformer's parameters (the ``k`` nearest it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from hollownet.cut import lora_size, lora_target_modules
from hollownet.dit_split import check_supported, num_blocks, prefix_modules
from hollownet.errors import HollownetError
from hollownet.loading import is_under
from hollownet.settings import SD3_LORA_TARGETS, SD3_MODELS  # their home: the CLI reads them without torch

CONFIG_DIR = Path(__file__).parent / "configs"
#: SD3 / SD3.5 transformers from their published configs (sources in each file's ``_note``).
BUNDLED_TRANSFORMERS = {name: f"{name}_transformer.json" for name in SD3_MODELS}
#: diffusers' ``train_dreambooth_lora_sd3.py`` default: both streams' attention projections of every joint
#: block (``attn``; SD3.5 Medium's image-only ``attn2`` is not among them, as there).
SD3_LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")


def dead_targets(model: nn.Module) -> set[str]:
    """Modules whose LoRA could never change the output: a ``context_pre_only`` block (SD3's last) drops its
    text stream, so its text queries (``attn.add_q_proj``) reach nothing; diffusers' script trains them anyway."""
    return {f"transformer_blocks.{i}.attn.add_q_proj" for i, b in enumerate(model.transformer_blocks) if b.context_pre_only}


def suffix_lora_targets(model: nn.Module, k: int, targets: tuple[str, ...] = SD3_LORA_TARGETS) -> list[str]:
    """Full names of the live modules ``targets`` match (peft's suffix rule) in blocks ``k..``."""
    dead = dead_targets(model)
    return [n for n in lora_target_modules(model, prefix_modules(model, k), targets) if n not in dead]


def cut_kind(model: nn.Module) -> str:
    """``"centre"`` where long skips carry the outer layers around a hollow, ``"prefix"`` for a plain DiT."""
    if hasattr(model, "down_blocks") and hasattr(model, "up_blocks"):
        return "centre"
    if any(getattr(m, "skip_linear", None) is not None for m in model.modules()):
        return "centre"  # HunyuanDiT: its second half's blocks read the first half's outputs
    if hasattr(model, "transformer_blocks"):
        return "prefix"
    raise HollownetError(f"{type(model).__name__} is neither a U-Net nor a diffusion transformer with transformer_blocks; "
                         "hollownet cannot cut it")


def check_prefix_cut(model: nn.Module) -> None:
    """The prefix cut, or one line saying why not (a centre-cut DiT, a DiT not split yet)."""
    kind = cut_kind(model)
    if kind == "centre" and not hasattr(model, "down_blocks"):
        raise HollownetError(f"{type(model).__name__} has long skips, so its cut is a centre cut, which hollownet does not "
                             "implement for transformers yet; use an SD3 / SD3.5 model")
    if kind == "centre":
        raise HollownetError("this is a U-Net: its cut is the centre cut (hollownet.cut), not a prefix")
    check_supported(model)


@dataclass
class PrefixPlan:
    """A prefix cut ``k`` and its accounting (shapes only: the transformer may live on the meta device)."""

    k: int
    num_blocks: int
    total_params: int
    prefix_params: int
    lora_targets: list[str]  # full names of the suffix's modules that get LoRA
    lora_targets_total: int  # live modules the targets match in the whole transformer (k = 0)
    lora_params: int = 0

    @property
    def fraction(self) -> float:
        """Share of the transformer's parameters in the frozen prefix (never loaded for training)."""
        return self.prefix_params / self.total_params

    @property
    def frozen_blocks(self) -> str:
        return f"embedders + blocks 0..{self.k - 1}" if self.k else "embedders only"

    def to_dict(self) -> dict:
        return dict(kind="prefix", k=self.k, num_blocks=self.num_blocks, total_params=self.total_params,
                    prefix_params=self.prefix_params, kept_params=self.total_params - self.prefix_params,
                    fraction=round(self.fraction, 4), lora_params=self.lora_params,
                    lora_targets_kept=len(self.lora_targets), lora_targets_total=self.lora_targets_total)

    def format(self) -> str:
        m = lambda n: f"{n / 1e6:8.1f}M"  # noqa: E731
        return "\n".join([
            f"prefix plan (k={self.k} of {self.num_blocks} blocks, {self.fraction:.1%} of transformer parameters frozen)",
            f"  frozen prefix: {self.frozen_blocks} (stage 1 only; never loaded for training)",
            f"  transformer    {m(self.total_params)}",
            f"  prefix         {m(self.prefix_params)}",
            f"  kept (frozen)  {m(self.total_params - self.prefix_params)}",
            f"  LoRA (trained) {m(self.lora_params)}  on {len(self.lora_targets)} of {self.lora_targets_total} target layers",
        ])


def _params_under(model: nn.Module, prefixes: list[str]) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if is_under(n, prefixes))


def prefix_fractions(model: nn.Module) -> list[float]:
    """The frozen share of the transformer's parameters for every training cut ``k`` in ``0..N-1``."""
    check_prefix_cut(model)
    total = sum(p.numel() for p in model.parameters())
    sizes = {n: sum(p.numel() for p in m.parameters()) for n, m in model.named_children()}
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.transformer_blocks]
    embed = sum(sizes[n] for n in prefix_modules(model, 0))
    return [(embed + sum(blocks[:k])) / total for k in range(num_blocks(model))]


def make_prefix_plan(model: nn.Module, k: int, *, rank: int = 0, lora_targets: tuple[str, ...] = SD3_LORA_TARGETS) -> PrefixPlan:
    check_prefix_cut(model)
    n = num_blocks(model)
    if k == n:
        raise HollownetError(f"prefix k={n} freezes every block and leaves nothing to train; pick k in 0..{n - 1}")
    if not 0 <= k < n:
        raise HollownetError(f"prefix k={k} is outside 0..{n - 1} for this transformer ({n} blocks); pick k in that range")
    kept = suffix_lora_targets(model, k, lora_targets)
    plan = PrefixPlan(k=k, num_blocks=n, total_params=sum(p.numel() for p in model.parameters()),
                      prefix_params=_params_under(model, prefix_modules(model, k)), lora_targets=kept,
                      lora_targets_total=len(suffix_lora_targets(model, 0, lora_targets)))
    if rank:
        mods = dict(model.named_modules())
        plan.lora_params = sum(lora_size(mods[name], rank) for name in kept)
    return plan


def k_for_fraction(model: nn.Module, fraction: float) -> int:
    """The training cut whose frozen fraction is nearest ``fraction`` (the smaller ``k`` on a tie)."""
    if not 0 <= fraction < 1:
        raise HollownetError(f"prefix fraction {fraction:g} is outside [0, 1); give the share of parameters to freeze, e.g. 0.4")
    fr = prefix_fractions(model)
    return min(range(len(fr)), key=lambda k: (abs(fr[k] - fraction), k))


def resolve_prefix_plan(model: nn.Module, *, k: int | None = None, fraction: float | None = None, **kw) -> PrefixPlan:
    """One entry point for the two ways to name a prefix cut."""
    if (k is None) == (fraction is None):
        raise HollownetError("give the prefix cut as exactly one of k (blocks to freeze) and a fraction of parameters; "
                             "a DiT has no default cut yet")
    return make_prefix_plan(model, k_for_fraction(model, fraction) if k is None else k, **kw)


@lru_cache(maxsize=8)
def _bundled(name: str) -> str:
    return (CONFIG_DIR / BUNDLED_TRANSFORMERS[name]).read_text()


def load_transformer_config(model: str | Path) -> dict:
    """A transformer config from a bundled name (sd3m, sd35m, sd35l) or a diffusers pipeline folder."""
    if str(model) in BUNDLED_TRANSFORMERS:
        cfg = json.loads(_bundled(str(model)))
    else:
        path = Path(model) / "transformer" / "config.json"
        if not path.exists():
            raise HollownetError(f"'{model}' is neither a bundled transformer ({', '.join(BUNDLED_TRANSFORMERS)}) nor a "
                                 "diffusers folder with transformer/config.json; give one of those")
        cfg = json.loads(path.read_text())
    return {k: v for k, v in cfg.items() if not k.startswith("_note")}


def meta_transformer(config: dict) -> nn.Module:
    """The transformer's structure on the meta device: names and shapes, no memory, no weights."""
    # diffusers is heavy to import: only here and in the loaders
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel.from_config(config)


#: SD3's text length: 77 CLIP tokens + 256 T5 tokens (the pipeline's max_sequence_length default).
SD3_TEXT_TOKENS = 77 + 256


def stored_values(model: nn.Module, k: int, latent_hw: tuple[int, int], text_tokens: int = SD3_TEXT_TOKENS) -> int:
    """Values stage 1 stores per sample at cut ``k`` (:class:`dit_split.Prefix`): the image tokens, the text
    tokens (none at ``k = N``: the last block drops them) and ``temb``. The same for every ``k < N``."""
    cfg, width = model.config, model.inner_dim
    patches = (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)
    text = text_tokens * cfg.caption_projection_dim if k < num_blocks(model) else 0
    return patches * width + text + width


def fraction_table(model: str | Path | nn.Module, ks: list[int] | None = None, rank: int = 0) -> str:
    """Parameters and the frozen share at several prefix cuts (default: about every quarter of the blocks)."""
    net = model if isinstance(model, nn.Module) else meta_transformer(load_transformer_config(model))
    n = num_blocks(net)
    ks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1}) if ks is None else ks
    total = sum(p.numel() for p in net.parameters())
    hw = (net.config.sample_size, net.config.sample_size)
    per_sample = stored_values(net, 0, hw) * 2 / 2**20
    rows = [f"{type(net).__name__}: {n} blocks, {total / 1e6:.1f}M parameters; stage 1 stores {per_sample:.1f} MiB a sample "
            f"in bf16 at its {hw[0]}x{hw[1]} latent with {SD3_TEXT_TOKENS} text tokens, whatever k",
            "   k  frozen       prefix       kept  LoRA targets kept" + ("  LoRA params" if rank else "")]
    for k in ks:
        p = make_prefix_plan(net, k, rank=rank)
        rows.append(f"{k:4d}  {p.fraction:6.1%}  {p.prefix_params / 1e6:9.1f}M  {(total - p.prefix_params) / 1e6:9.1f}M  "
                    f"{len(p.lora_targets):4d} / {p.lora_targets_total}" + (f"  {p.lora_params / 1e6:9.2f}M" if rank else ""))
    return "\n".join(rows)
