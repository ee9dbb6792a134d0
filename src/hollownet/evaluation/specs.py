"""The ``hollownet bench --methods`` language: which training run each table row is.

``--methods`` is a comma-separated list of specs::

    SPEC   := NAME [ "@" FRACTION ] ( ":" KEY "=" VALUE )*
    NAME   := hollow | lora | full
    KEY    := r | alpha | targets | lr | steps | weights | stream | opt | blocks | samples | infer

* ``hollow``                the default cut (``--hollow`` default: the valid skip-symmetric cut nearest 39 % of
  U-Net parameters, the paper's fraction; on SD 1.x/2.x the paper's own cut)
* ``hollow@0.56``           the skip-symmetric cut nearest to 56 % of U-Net parameters
* ``hollow:blocks=down_blocks.3+mid_block+up_blocks.0``  a cut by name ("+" between names)
* ``lora``, ``lora:r=1``    plain LoRA on the whole U-Net (rank from ``--rank`` unless ``r=``)
* ``full``, ``full:lr=5e-6``  full fine-tuning of every U-Net weight
* ``hollow:weights=nf4``    the frozen weights in stage 2 stored int8 / nf4 (or fp32 / bf16 / fp16),
  overriding ``--precision`` for training only (generation runs the original model at ``--precision``)
* ``hollow:stream=1``       streamed frozen weights (``hollownet train --stream-weights``)
* ``hollow:opt=in-backward``  AdamW applied inside backward (``--optimizer adamw-in-backward``)
* ``lora:targets=attn+conv``  the layers that get LoRA (``--lora-targets``: groups or layer names, "+" between)
* ``hollow:samples=100``    stage 1 stores 100 samples, reused over ``steps x batch`` (less stage-1 time)
* ``hollow:infer=merged``   generate with the LoRA fused into one path (default: the paper's two-path)
* options combine: ``hollow@0.56:r=8:lr=2e-4:steps=800``, ``hollow:weights=int8:opt=in-backward``

``r`` (rank), ``alpha`` (LoRA alpha), ``lr`` and ``steps`` override the run-wide ``--rank``,
``--lora-alpha``, ``--lr`` and ``--steps`` for that method; ``@FRACTION`` and ``blocks=`` are for
``hollow`` only, ``r``/``alpha``/``weights``/``stream``/``opt`` not for ``full``. The canonical form
of a spec (options in the order above) names the method in the table and, with ":" written as "_",
its folder. ``--seeds`` is parsed here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hollownet.errors import HollownetError
from hollownet.settings import PRECISIONS

METHOD_NAMES = ("hollow", "lora", "full")
OPTION_KEYS = ("r", "alpha", "targets", "lr", "steps", "weights", "stream", "opt", "blocks", "samples", "infer")
INFER_MODES = ("two-path", "merged")
OPTIMIZER_ALIASES = {"adamw": "adamw", "in-backward": "adamw-in-backward", "adamw-in-backward": "adamw-in-backward"}
_TRUE, _FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off")
# the options whose value is a word from a list: (the words, how an error names them)
_WORDS = {"weights": (PRECISIONS, f"one of {'|'.join(PRECISIONS)}"), "stream": (_TRUE + _FALSE, "1 or 0"),
          "opt": (tuple(OPTIMIZER_ALIASES), "adamw or in-backward"), "infer": (INFER_MODES, "two-path or merged")}


@dataclass(frozen=True)
class MethodSpec:
    """One parsed ``--methods`` entry; unset options fall back to the run-wide settings."""

    name: str
    fraction: float | None = None
    rank: int | None = None
    alpha: float | None = None
    targets: tuple[str, ...] | None = None  # train --lora-targets (groups or layer names)
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
        options = (("r", self.rank), ("alpha", self.alpha), ("targets", "+".join(self.targets) if self.targets else None),
                   ("lr", self.lr), ("steps", self.steps),
                   ("weights", self.weights), ("stream", 1 if self.stream else None),
                   ("opt", {"adamw-in-backward": "in-backward"}.get(self.optimizer, self.optimizer)),
                   ("blocks", "+".join(self.blocks) if self.blocks else None), ("samples", self.samples),
                   ("infer", self.infer))
        return text + "".join(f":{k}={v:g}" if isinstance(v, float) else f":{k}={v}" for k, v in options if v)

    @property
    def slug(self) -> str:
        """The key as a folder name (":" is not allowed in Windows file names)."""
        return self.key.replace(":", "_")

    def __str__(self) -> str:
        return self.key


def _bad(spec: str, why: str) -> HollownetError:
    return HollownetError(
        f"method spec {spec!r}: {why} (syntax: NAME[@FRACTION][:KEY=VALUE...], NAME hollow|lora|full, "
        f"KEY {'|'.join(OPTION_KEYS)}; e.g. hollow@0.56, lora:r=1, full:lr=5e-6, hollow:weights=nf4)"
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
        if key in ("r", "alpha", "targets", "weights", "stream", "opt") and name == "full":
            raise _bad(spec, f"{key}= is a LoRA option; full fine-tuning has no LoRA")
        if key in ("stream", "infer", "blocks") and name != "hollow":
            raise _bad(spec, f"{key}= is only for hollow" + (" (lora and full have one path)" if key == "infer" else ""))
        if key in _WORDS:
            (allowed, say), word = _WORDS[key], value.lower()
            if word not in allowed:
                raise _bad(spec, f"{key}={value!r} is not {say}")
            fields[target] = {"stream": word in _TRUE, "opt": OPTIMIZER_ALIASES.get(word)}.get(key, word)
            continue
        if key in ("blocks", "targets"):
            fields[key] = tuple(b.strip() for b in value.split("+") if b.strip())
            if not fields[key]:
                raise _bad(spec, f"{key}= names nothing")
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
    for k, default in (("optimizer", "adamw"), ("stream", False), ("infer", "two-path")):
        if k in fields and fields[k] == default:
            fields.pop(k)  # the default: one canonical form
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
