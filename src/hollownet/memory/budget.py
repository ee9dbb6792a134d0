"""``hollownet plan --budget``: which settings fit a memory budget, best expected fidelity first."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

from hollownet.cut import all_plans, lora_size, lora_target_modules, meta_unet
from hollownet.errors import HollownetError
from hollownet.memory.configs import ModelConfigs, load_model_configs
from hollownet.memory.predict import predict_generate, predict_train
from hollownet.memory.sizes import GiB
from hollownet.memory.stage1 import PARTS, predict_precompute, settle_stage1
from hollownet.requests import PlanRequest
from hollownet.settings import PRECISIONS, QUANTIZED_PRECISIONS, Modes

#: Bytes per weight at least, per frozen-weight precision (quantization scales not counted: a lower bound).
_MIN_BYTES_PER_WEIGHT = {"fp32": 4, "bf16": 2, "fp16": 2, "int8": 1, "nf4": 0.5}
IB = "adamw-in-backward"


@dataclass
class Candidate:
    method: str
    depth: int | None
    fraction: float
    hollow_blocks: list[str] | None
    precision: str
    grad_checkpointing: bool
    lower_bound: int  # weights + trained params' grads and AdamW state: the step's peak is at least this
    stream_weights: bool = False
    in_backward: bool = False  # optimizer adamw-in-backward
    precompute_peak: int | None = None
    train_peak: int | None = None
    generate_precision: str | None = None  # the best-fidelity generation precision that fits (hollownet generate --precision)
    generate_peak: int | None = None

    @property
    def peak(self) -> int | None:
        """The whole experience: stage 1, stage 2 and (where predicted) generation."""
        if self.train_peak is None:
            return None
        return max(self.train_peak, self.precompute_peak or 0, self.generate_peak or 0)

    @property
    def fidelity_key(self):
        """Expected fidelity cost, least first: nf4 weights last of all (their output error is an order of
        magnitude above the others', see benchmarks/README.md), then less hollowing, then fp32 < bf16 < int8
        weights, then global before per-tensor gradient clipping (adamw-in-backward); checkpointing and
        streaming cost only time."""
        return (self.precision == "nf4", self.fraction, PRECISIONS.index(self.precision), self.in_backward,
                self.grad_checkpointing, self.stream_weights)

    def label(self) -> str:
        if self.method == "lora":
            return "LoRA (no hollow)"
        blocks = self.hollow_blocks or []
        short = ",".join(b.replace(".downsamplers", ".ds").replace(".upsamplers", ".us").replace(".resnets.", ".r")
                         .replace(".attentions.", ".a").replace("down_blocks.", "d").replace("up_blocks.", "u")
                         .replace("mid_block", "mid") for b in blocks)
        return f"hollow {self.fraction:5.1%} [{short}]"

    def flags(self) -> list[str]:
        """``hollownet train`` flags for this setting."""
        out = ["--method lora"] if self.method == "lora" else [f"--hollow-blocks {','.join(self.hollow_blocks)}"]
        out.append(f"--precision {self.precision}")
        out += ["--stream-weights"] if self.stream_weights else (["--grad-checkpointing"] if self.grad_checkpointing else [])
        out += [f"--optimizer {IB}"] if self.in_backward else []
        return out

    def generate_flags(self) -> list[str]:
        """``hollownet generate`` flags for this setting."""
        return [f"--precision {self.generate_precision}"] if self.generate_precision else []

    def to_dict(self) -> dict:
        d = asdict(self)
        d["peak_bytes"] = self.peak
        return d


#: (precision, checkpointing, streamed, in-backward) settings tried per cut: float weights as they
#: are, quantized ones with checkpointing (without it activations dominate), streamed (hollow only).
MODES = ([(p, ck, False, False) for p in ("fp32", "bf16") for ck in (False, True)]
         + [(p, True, False, ib) for p in ("int8", "nf4") for ib in (False, True)]
         + [(p, True, True, ib) for p in ("fp32", "bf16") for ib in (False, True)])


def candidates(mc: ModelConfigs, req: PlanRequest, modes=MODES) -> list[Candidate]:
    """Plain LoRA and every valid hollow cut, in each of ``modes``, best expected fidelity first."""
    skeleton = meta_unet(mc.unet)
    mods = dict(skeleton.named_modules())
    total = sum(p.numel() for p in skeleton.parameters())
    out = []
    cuts = [("lora", None, 0.0, None, [])] + [
        ("hollow", p.depth, p.fraction, p.hollow_blocks, p.hollow_prefixes(skeleton)) for p in all_plans(skeleton)
    ]
    for method, depth, fraction, blocks, skip in cuts:
        kept = total - sum(p.numel() for n in skip for p in mods[n].parameters())
        lora = sum(lora_size(mods[n], req.rank) for n in lora_target_modules(skeleton, skip, tuple(req.lora_targets)))
        for precision, ckpt, stream, ib in modes:
            if stream and method != "hollow":
                continue
            weights = 0 if stream else int(kept * _MIN_BYTES_PER_WEIGHT[precision])
            # fp32 LoRA: weight and 2 AdamW moments, plus its gradients unless they are applied inside backward
            out.append(Candidate(method, depth, fraction, blocks, precision, ckpt, stream_weights=stream, in_backward=ib,
                                 lower_bound=weights + lora * (12 if ib else 16)))
    return sorted(out, key=lambda c: c.fidelity_key)


@dataclass
class BudgetAnswer:
    budget: int
    fits: list[Candidate]
    evaluated: list[Candidate]
    smallest: Candidate | None
    seconds: float
    request: PlanRequest
    model: str
    top: int = 5

    def to_json(self) -> dict:
        return {"model": self.model, "budget_bytes": self.budget, "rank": self.request.rank,
                "resolution": self.request.resolution, "batch": self.request.batch, "optimizer": self.request.modes.optimizer,
                "fits": [c.to_dict() for c in self.fits],
                "smallest": self.smallest.to_dict() if self.smallest else None,
                "ranking": "nf4 frozen weights last; then less hollowing first, then fp32 < bf16 < int8 frozen weights, then AdamW "
                           "before adamw-in-backward (per-tensor clipping), then without checkpointing, then without streaming "
                           "(they cost time only)",
                "seconds": round(self.seconds, 2)}

    def format(self) -> str:
        req = self.request
        head = (f"{self.model}: settings whose peak (max of pre-compute, training and generation) fits in {self.budget / GiB:.2f} GiB "
                f"({self.budget:,} bytes); LoRA r={req.rank}, {req.resolution} px, batch {req.batch}, {req.modes.optimizer}")
        lines = [head, "ranked by expected fidelity cost: nf4 weights last (10x the output error of int8); then less hollowing, "
                       "then fp32 < bf16 < int8 weights, then global gradient clipping (AdamW) before per-tensor (in-backward); "
                       "checkpointing and streaming cost only time", ""]
        lines.append(f"  {'#':>2}  {'setting':<44} {'weights':<11} {'ckpt':<5} {'AdamW':<9} {'stage 1':>9} {'training':>9} "
                     f"{'generation':>16} {'peak':>9}")
        gen = lambda c: (f"{c.generate_precision} {c.generate_peak / GiB:5.2f} G" if c.generate_precision else "-")  # noqa: E731
        for i, c in enumerate(self.fits, 1):
            weights = c.precision + (" stream" if c.stream_weights else "")
            lines.append(f"  {i:>2}  {c.label():<44} {weights:<11} {'yes' if c.grad_checkpointing else 'no':<5} "
                         f"{'in-bwd' if c.in_backward else 'after':<9} "
                         f"{c.precompute_peak / GiB:7.2f} G {c.train_peak / GiB:7.2f} G {gen(c):>16} {c.peak / GiB:7.2f} G")
        best = self.fits[0]
        more = f"the {self.top} best shown (--top 0: all); " if self.top and len(self.fits) >= self.top else ""
        lines += ["", f"best fidelity that fits: hollownet train ... {' '.join(best.flags())} --rank {req.rank}"]
        if best.generate_precision:
            lines.append(f"                    then: hollownet generate ... {' '.join(best.generate_flags())}")
        lines += [f"(G = GiB; {more}{len(self.evaluated)} settings predicted, others ruled out by their weights alone; {self.seconds:.0f} s)"]
        return "\n".join(lines)


#: Generation precisions tried by ``--budget``, best fidelity first (generate does not stream weights yet).
GENERATE_PRECISIONS = ("fp32", "bf16", "int8", "nf4")


def fit_budget(req: PlanRequest, budget: int, *, top: int = 5, progress=None, model: ModelConfigs | None = None) -> BudgetAnswer:
    """Which (cut, precision, checkpointing, streaming, optimizer) settings fit ``budget``, best expected fidelity first.

    Generation is part of the experience: a setting fits only if ``hollownet generate`` fits too, in the
    best-fidelity precision of :data:`GENERATE_PRECISIONS` that does (its ``generate_precision``); a model
    whose text encoder or VAE config is not known is planned without it (a note says so).

    Candidates are tried in fidelity order; the first ``top`` that fit are returned (``top=0``: all).
    A candidate whose weights, gradients and AdamW state alone exceed the budget is ruled out without
    a prediction; otherwise its training step is predicted exactly, then (if that fits) its stage 1
    (once per cut and precision). If nothing fits, raises :class:`BudgetError` naming the smallest
    achievable peak (branch and bound on the same lower bound, so it is exact too).
    """
    model = model or load_model_configs(req.model)
    if model.family.backbone == "transformer":
        raise HollownetError("--budget is not supported for SD3 / SD3.5 yet: plan one setting at a time (--method, "
                             "--hollow, --precision, --grad-checkpointing)")
    t0 = time.perf_counter()
    mc = model or load_model_configs(req.model)
    cands = candidates(mc, req)
    if not mc.knows_generation:
        mc.notes.append("generation: the text encoder or VAE config is not known; the budget covers training only")
    search = _Search(mc, req, progress)
    fits: list[Candidate] = []
    for c in cands:
        if search.fits(c, budget):
            fits.append(c)
            if top and len(fits) >= top:
                break
    if not fits:
        best, best_peak = search.smallest(cands)
        raise BudgetError(
            f"nothing fits in {budget / GiB:.2f} GiB ({budget:,} bytes) at LoRA r={req.rank}, {req.resolution} px, batch {req.batch}: "
            f"the smallest peak is {best_peak / GiB:.2f} GiB ({best.label().strip()}: {' '.join(best.flags()[1:])}); "
            "raise --budget or lower --resolution, --batch or --rank",
            smallest=best,
        )
    return BudgetAnswer(budget=budget, fits=fits, evaluated=search.evaluated, smallest=None, top=top,
                        seconds=time.perf_counter() - t0, request=req, model=mc.name)


class _Search:
    """``fit_budget``'s predictions for the candidates of one request, each made once: stage 1 per part group,
    dtype and layout (the layout decided per cut and compute dtype), training per candidate, generation per cut
    and precision. ``evaluated``: the candidates whose training step was predicted, in order."""

    def __init__(self, mc: ModelConfigs, req: PlanRequest, progress=None):
        self.mc, self.req, self.progress = mc, req, progress
        self.plain_optimizer = "adamw" if req.modes.in_backward else req.modes.optimizer
        self.with_generation = mc.knows_generation
        self.unet_params = sum(p.numel() for p in meta_unet(mc.unet).parameters())
        self.evaluated: list[Candidate] = []
        self._stage1: dict = {}
        self._layouts: dict = {}  # (method, cut, compute dtype) -> stage 1's settled (layer_major, memory_budget)
        self._generation: dict = {}

    def fits(self, c: Candidate, budget: int) -> bool:
        """Every stage of ``c`` fits ``budget``, the cheapest checks first (generation's precision set on ``c``)."""
        if c.lower_bound > budget or self.front(c) > budget or self.train(c) > budget or self.pre(c) > budget:
            return False
        return self.generation(c, budget) is not None

    def smallest(self, cands: list[Candidate]) -> tuple[Candidate, int]:
        """The candidate of the smallest whole-run peak, and that peak (branch and bound on the lower bound)."""
        best, best_peak = None, None
        bound = lambda c: max(c.lower_bound, self.front(c))  # noqa: E731  (stage 1's first parts are cut-independent)
        for c in sorted(cands, key=lambda c: (bound(c), c.lower_bound)):
            if best_peak is not None and bound(c) >= best_peak:
                break
            peak = max(self.train(c), self.pre(c), self.generation(c, None))
            if best_peak is None or peak < best_peak:
                best, best_peak = c, peak
        return best, best_peak

    def stage1_part(self, r: PlanRequest, parts: tuple[str, ...]) -> int:
        """One of stage 1's part groups for ``r`` (text encoder + VAE: the same for every cut; the U-Net part
        per cut), cached per dtype and layout: the layout decision and the candidates' peaks share it."""
        pcfg = r.precompute_config()
        key = (parts, pcfg.precision, pcfg.layer_major, pcfg.memory_budget) + ((r.method, r.depth) if parts == PARTS[2:] else ())
        if key not in self._stage1:
            self._stage1[key] = predict_precompute(self.mc, r, parts=parts)["peak_bytes"]
        return self._stage1[key]

    def stage1_peak(self, r: PlanRequest) -> int:
        return max(self.stage1_part(r, PARTS[:2]), self.stage1_part(r, PARTS[2:]))

    def request(self, c: Candidate) -> PlanRequest:
        """The request of candidate ``c``, stage 1's layout decided (``settle_stage1``, as ``hollownet train``)."""
        req = self.req
        modes = replace(req.modes, precision=c.precision, grad_checkpointing=c.grad_checkpointing,
                        stream_weights=c.stream_weights, optimizer=IB if c.in_backward else self.plain_optimizer,
                        compute_dtype=req.modes.compute_dtype if c.precision in QUANTIZED_PRECISIONS else None)
        r = replace(req, method=c.method, depth=c.depth, hollow=None, hollow_blocks=None, modes=modes)
        if modes.stage1_unsettled:  # decided once per what sample-major stage 1 depends on
            key = (c.method, c.depth, modes.compute)
            if key not in self._layouts:
                self._layouts[key] = settle_stage1(self.mc, r, peak=self.stage1_peak)[0].modes.stage1
            r = replace(r, modes=replace(modes, layer_major=self._layouts[key][0], memory_budget=self._layouts[key][1]))
        return r

    def train(self, c: Candidate) -> int:
        if c.train_peak is None:
            c.train_peak = predict_train(self.mc, self.request(c))[0].peak_bytes
            self.evaluated.append(c)
            if self.progress:
                self.progress(c)
        return c.train_peak

    def front(self, c: Candidate) -> int:
        """Stage 1's text encoder and VAE parts: the same for every cut (cached per dtype and layout)."""
        return self.stage1_part(self.request(c), PARTS[:2])

    def pre(self, c: Candidate) -> int:
        c.precompute_peak = self.stage1_peak(self.request(c))
        return c.precompute_peak

    def generation_peak(self, c: Candidate, precision: str) -> int:
        key = (c.method, c.depth, precision)
        if key not in self._generation:
            compute = self.req.modes.compute_dtype if precision in QUANTIZED_PRECISIONS else None
            modes = Modes(precision=precision, compute_dtype=compute).on(self.req.device)
            self._generation[key] = predict_generate(self.mc, replace(self.request(c), modes=modes), modes)["peak_bytes"]
        return self._generation[key]

    def generation(self, c: Candidate, limit: int | None) -> int | None:
        """The best-fidelity generation precision whose peak fits ``limit`` (None: the smallest), set on ``c``."""
        if not self.with_generation:
            return 0
        for precision in GENERATE_PRECISIONS if limit is not None else GENERATE_PRECISIONS[-1:]:
            if limit is not None and self.unet_params * _MIN_BYTES_PER_WEIGHT[precision] > limit:
                continue  # its U-Net weights alone are over
            peak = self.generation_peak(c, precision)
            if limit is None or peak <= limit:
                c.generate_precision, c.generate_peak = precision, peak
                return peak
        return None


class BudgetError(HollownetError):
    def __init__(self, message: str, smallest: Candidate | None = None):
        super().__init__(message)
        self.smallest = smallest
