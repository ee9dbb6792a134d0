"""Low-memory stage-2 modes: peak memory, output error and step time against plain LoRA FT.

Modes (``TrainConfig`` settings): plain LoRA FT on the whole U-Net (the baseline), the hollowed
network in fp32 / bf16, with int8 or nf4 frozen weights (``quant.py``, bf16 compute), with streamed
frozen weights (``stream.py``), each with per-unit gradient checkpointing, and with torch's AdamW
or ``adamw-in-backward`` (per-parameter AdamW step inside backward, gradients freed at once).

(a) **Stage-2 peak** on the real SD 2.1 architecture (bundled config), 512 px, batch 1, LoRA r=128
    on to_q/to_k/to_v/to_out.0, the paper's cut, measured with ``MemoryTracker`` under
    ``FakeTensorMode``: the trainer's own construction (``builder.build_unet`` from a
    ``FakeSource``: shapes only; quantization runs on fake tensors) and its own ``train_step``, the
    measured step being a run's second (AdamW's state resident): the run's peak (``memory.predict.predict_step``).
    Beside it, stage 1's predicted peak, layer-major (``layerwise.predict_peak``, another module's
    planner) at the given budgets, for the whole-run figure (max of the two stages).
(b) **Relative output error** of the hollowed network (kept layers, stored hollow output) against
    fp32 on the same inputs, per precision, on real random-weight models: the tiny test model and,
    if present, an SD 2.1-architecture model with random weights (``--model-dir``, see
    ``layerwise_stage1.py``, which builds one). Random weights are not trained weights: the error of a
    trained model is not measured here.
(c) **Step time**, real weights on this CPU, every mode in the same process, as a ratio to plain LoRA
    FT (same model, same batch): ``--time-resolution`` px (default 64 on the SD 2.1 random model: on a
    2-core CPU a step is weight-bandwidth-bound there, as a GPU step at 512 px is not), 1 warm-up step,
    then the median of ``--time-steps`` steps; the baseline is timed again last to show drift. bf16
    compute is emulated on CPUs without AVX512-BF16 (slow); the fp32-compute int8/nf4 rows separate
    the cost of dequantizing from that.

    python benchmarks/modes.py                       # (a), (b), (c); writes benchmarks/results/modes.json
    python benchmarks/modes.py --skip-time --skip-error   # (a) only, about a minute
    python benchmarks/modes.py --measure-real "hollow streamed fp32 + in-backward" --output results/real_stream.json
    python benchmarks/modes.py --skip-fake --skip-error --random-weights sd21 --profile \
        --modes "hollow fp32 + ckpt;hollow int8 (bf16 compute, dequantize) + ckpt;hollow int8 (bf16 compute) + ckpt;hollow int8 (fp32 compute) + ckpt"
        # (c) without a weights folder (random SD 2.1 weights made in memory), with seconds per op family
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hollownet import unet_split as H  # noqa: E402
from hollownet.memory.predict import make_train_batch, predict_step, train_batch_shapes  # noqa: E402
from hollownet.cut import load_unet_config, make_plan, meta_unet  # noqa: E402
from hollownet.loading import return_freed_memory_promptly  # noqa: E402
from hollownet.lowmem import quant  # noqa: E402
from hollownet.lowmem.quant import frozen_weight_bytes, relative_error  # noqa: E402
from hollownet.lowmem.stream import RandomSource  # noqa: E402
from hollownet.optimizers import make_optimizer  # noqa: E402
from hollownet.settings import Modes  # noqa: E402
from hollownet.stages.train import TrainConfig, build_model, train_step  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
GiB = 1024**3
IB = "adamw-in-backward"

# label -> TrainConfig settings (Modes' among them). The first is the baseline of the time ratios.
MODES: dict[str, dict] = {
    "LoRA FT (whole U-Net, fp32)": dict(method="lora"),
    "hollow fp32": dict(),
    "hollow fp32 + ckpt": dict(grad_checkpointing=True),
    "hollow bf16 + ckpt": dict(precision="bf16", grad_checkpointing=True),
    "hollow int8 + ckpt": dict(precision="int8", grad_checkpointing=True),
    "hollow int8 + ckpt + in-backward": dict(precision="int8", grad_checkpointing=True, optimizer=IB),
    "hollow int8 (fp32 compute) + ckpt + in-backward": dict(precision="int8", compute_dtype="fp32", grad_checkpointing=True, optimizer=IB),
    # int8 in bf16 through torch's int8 kernel on a CPU (quant.int8_kernel) and, as before it, dequantized per call
    "hollow int8 (bf16 compute) + ckpt": dict(precision="int8", compute_dtype="bf16", grad_checkpointing=True),
    "hollow int8 (bf16 compute, dequantize) + ckpt": dict(precision="int8", compute_dtype="bf16", grad_checkpointing=True,
                                                          int8_kernel=False),
    "hollow int8 (fp32 compute) + ckpt": dict(precision="int8", compute_dtype="fp32", grad_checkpointing=True),
    "hollow nf4 + ckpt": dict(precision="nf4", grad_checkpointing=True),
    "hollow nf4 + ckpt + in-backward": dict(precision="nf4", grad_checkpointing=True, optimizer=IB),
    "hollow nf4 (fp32 compute) + ckpt + in-backward": dict(precision="nf4", compute_dtype="fp32", grad_checkpointing=True, optimizer=IB),
    "hollow streamed fp32 (ckpt)": dict(stream_weights=True),
    "hollow streamed fp32 + in-backward": dict(stream_weights=True, optimizer=IB),
    "hollow streamed bf16 + in-backward": dict(precision="bf16", stream_weights=True, optimizer=IB),
}
TARGETS = {"hollow int8 + ckpt + in-backward": 1.0 * GiB, "hollow nf4 + ckpt + in-backward": 0.75 * GiB,
           "hollow streamed fp32 + in-backward": 0.75 * GiB, "hollow streamed bf16 + in-backward": 0.75 * GiB,
           "hollow int8 + ckpt": 1.0 * GiB, "hollow nf4 + ckpt": 0.75 * GiB, "hollow streamed fp32 (ckpt)": 0.75 * GiB}


def _config(settings: dict, rank: int, **kw) -> TrainConfig:
    modes, rest = Modes.split({k: v for k, v in settings.items() if k != "int8_kernel"})
    return TrainConfig(**{"model": "-", "store": "-", "output": "-", "rank": rank, **rest, **kw}, modes=modes)


def _optimizer(net, cfg: TrainConfig):
    return make_optimizer(net.params, cfg.modes.optimizer, cfg.lr, cfg.max_grad_norm)


def synthetic_batch(unet_config: dict, plan, resolution: int, batch: int, dtype, text_len: int, text_dim: int):
    shapes = train_batch_shapes(unet_config, plan, resolution, batch, text_len, text_dim)
    return make_train_batch(shapes, dtype, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------ (a) fake peaks


def fake_stage2_peak(unet_config: dict, settings: dict, *, rank: int, resolution: int, text_dim: int | None = None) -> dict:
    """The measured (second) training step's peak under FakeTensorMode (``memory.predict.predict_step``)."""
    t0 = time.perf_counter()
    r, info = predict_step(unet_config, _config(settings, rank), resolution=resolution, text_dim=text_dim)
    return dict(peak_bytes=r.peak_bytes, peak_gib=round(r.peak_bytes / GiB, 4), peak_phase=r.peak_phase,
                breakdown=r.breakdown, phase_peaks=r.phase_peaks, **info, seconds=round(time.perf_counter() - t0, 1))


def stage1_peaks(model: str, resolution: int, budgets: list[str], samples: int, photos: int) -> dict:
    """Layer-major stage 1's predicted peak in fp32 per budget (``memplan.predict_precompute_layer_major``)."""
    from hollownet.memory.configs import load_model_configs
    from hollownet.memory.stage1 import predict_precompute_layer_major
    from hollownet.requests import PlanRequest

    mc = load_model_configs(model)
    out = {}
    for budget in budgets:
        req = PlanRequest(model=model, resolution=resolution, steps=samples, photos=photos, layer_major=True,
                          memory_budget=budget)
        t0 = time.perf_counter()
        s = predict_precompute_layer_major(mc, req)
        out[budget] = dict(peak_bytes=s["peak_bytes"], peak_gib=round(s["peak_bytes"] / GiB, 4), peak_layer=s["peak_phase"],
                           unet_spilled_bytes=s["spilled_bytes"], seconds=round(time.perf_counter() - t0, 1))
    return out


# -------------------------------------------------------------------------- (b) output error


def output_errors(model_dir: Path, resolution: int, batch: int = 2, seed: int = 0,
                  precisions=("fp32", "fp16", "bf16", "int8", "nf4", "int8/fp32", "nf4/fp32")) -> dict:
    """Relative error ||out - out_fp32|| / ||out_fp32|| of the hollowed network, same inputs.

    ``int8/fp32``: int8 weights with fp32 compute (isolates the quantization error from bf16's).
    """
    from diffusers import UNet2DConditionModel

    from hollownet.loading import load_unet

    config = UNet2DConditionModel.load_config(model_dir / "unet")
    plan = make_plan(meta_unet(config))
    text_dim = config["cross_attention_dim"]
    g = torch.Generator().manual_seed(seed)
    h = resolution // 8
    x = torch.randn(batch, config["in_channels"], h, h, generator=g)
    t = torch.tensor([100 + 700 * i // max(1, batch - 1) for i in range(batch)])
    text = torch.randn(batch, 77, text_dim, generator=g)
    full, _ = load_unet(model_dir)
    with torch.no_grad():
        hollow_out = H.hollow_output(full, plan, x, t, text)
    del full
    manifest = {"hollow_blocks": plan.hollow_blocks}
    out, ref = {}, None
    for p in precisions:
        prec, _, cd = p.partition("/")
        cfg = _config(dict(precision=prec, compute_dtype=cd or None), 4, model=str(model_dir))
        torch.manual_seed(0)
        unet, plan_, _ = net = build_model(model_dir, manifest, cfg)
        dt = net.dtype
        with torch.no_grad():
            y = H.hollowed_forward(unet, plan_, x.to(dt), t, text.to(dt), hollow_out.to(dt)).float()
        if ref is None:
            ref = y
        out[p] = dict(relative_error=relative_error(y, ref), frozen_bytes=frozen_weight_bytes(unet), compute_dtype=str(dt))
        del unet
    return out


# ----------------------------------------------------------------------------- (c) step time


def _network(model_dir: Path | str, config: dict, manifest: dict, cfg: TrainConfig):
    """The trained network from the folder's weights, or (a bundled config's name) from random ones."""
    if Path(model_dir).is_dir():
        return build_model(Path(model_dir), manifest, cfg)
    return cfg.network(config, RandomSource.for_module(meta_unet(config)), manifest["hollow_blocks"] if cfg.method == "hollow" else None)


def _unet_config(model_dir: Path | str) -> dict:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.load_config(Path(model_dir) / "unet") if Path(model_dir).is_dir() else load_unet_config(str(model_dir))


def step_times(model_dir: Path | str, modes: dict, *, rank: int, resolution: int, steps: int, batch: int = 1, _ratios=True,
               profile: bool = False) -> dict:
    """Seconds per step of each mode (``model_dir``: a weights folder, or a bundled config for random weights);
    ``profile``: and the timed steps' CPU time per op family (torch.profiler, :func:`op_families`)."""
    config = _unet_config(model_dir)
    plan0 = make_plan(meta_unet(config))
    manifest = {"hollow_blocks": plan0.hollow_blocks}
    text_dim = config["cross_attention_dim"]
    out = {}
    for label, settings in modes.items():
        cfg = _config(settings, rank, model=str(model_dir), lr=1e-5)
        torch.manual_seed(0)
        t0 = time.perf_counter()
        net = _network(model_dir, config, manifest, cfg)
        unet, plan, params = net
        build_s = time.perf_counter() - t0
        optimizer = _optimizer(net, cfg)
        b, embeds = synthetic_batch(config, plan, resolution, batch, net.dtype, 77, text_dim)
        unet.train()
        times, kernel, quant._HAS_INT8_KERNEL = [], quant._HAS_INT8_KERNEL, settings.get("int8_kernel", quant._HAS_INT8_KERNEL)
        try:
            for i in range(steps + 1):  # the first is a warm-up (AdamW state, allocator)
                t0 = time.perf_counter()
                train_step(net, b, embeds, optimizer, cfg)
                if i:
                    times.append(time.perf_counter() - t0)
            if profile:  # one more step, profiled (not among the timed ones: the profiler adds its overhead)
                cpu0 = time.process_time()  # this process's CPU seconds: less sensitive to a loaded machine than wall time
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                    train_step(net, b, embeds, optimizer, cfg)
                cpu = time.process_time() - cpu0
        finally:
            quant._HAS_INT8_KERNEL = kernel
        out[label] = dict(seconds=[round(s, 3) for s in times], build_seconds=round(build_s, 1),
                          median_seconds=round(statistics.median(times), 3) if times else None)
        if profile:
            out[label].update(profiled_step_cpu_seconds=round(cpu, 2), **op_families(prof))
            print(f"  {label:<40} profiled step {cpu:.2f} CPU s: {out[label]['op_families_seconds']}", flush=True)
        if times:
            print(f"  {label:<40} {out[label]['median_seconds']:8.2f} s/step", flush=True)
        del net, unet, optimizer, params
    if not _ratios or steps == 0:
        return out
    # The baseline once more at the end: how much the machine's speed drifted during the run.
    first = next(iter(modes))
    again = step_times(model_dir, {first + " (again, last)": modes[first]}, rank=rank, resolution=resolution,
                       steps=steps, batch=batch, _ratios=False) if len(modes) > 1 else {}
    out.update(again)
    base = out[first]["median_seconds"]
    for v in out.values():
        v["ratio_to_lora_ft"] = round(v["median_seconds"] / base, 3)
    return out


FAMILIES = (("int8 kernel", ("_weight_int8pack_mm",)), ("matmul", ("mm", "addmm", "bmm", "matmul", "linear", "baddbmm")),
            ("convolution", ("conv", "_conv", "mkldnn_conv", "slow_conv", "_slow_conv", "thnn_conv")),
            ("attention", ("scaled_dot_product", "_scaled_dot_product", "_softmax", "softmax")),
            ("dequantize / casts / copies", ("to", "_to_copy", "copy_", "mul_", "index_select", "clone", "contiguous")),
            ("norms", ("group_norm", "native_group_norm", "layer_norm", "native_layer_norm")),
            ("elementwise", ("add", "add_", "mul", "silu", "gelu", "div", "sub", "addcmul_", "addcdiv_", "lerp_", "sqrt")))


def op_families(prof) -> dict:
    """Self CPU seconds of a profiled step per op family (aten op names; prefixes for the convolution
    variants), and the ten costliest ops by name."""
    out: dict[str, float] = {}
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    for e in ops:
        name = e.key.split("::")[-1]
        fam = next((f for f, names in FAMILIES if any(name == n or (f == "convolution" and name.startswith(n))
                                                      or name.startswith(n + "_backward") for n in names)), "other")
        out[fam] = out.get(fam, 0.0) + e.self_cpu_time_total / 1e6
    return dict(op_families_seconds={k: round(v, 2) for k, v in sorted(out.items(), key=lambda kv: -kv[1])},
                top_ops_seconds={e.key: round(e.self_cpu_time_total / 1e6, 2) for e in ops[:10]})


# ------------------------------------------------------------------- (d) real measurement


class RssSampler:
    """Peak anonymous and file-backed resident memory of this process (Linux ``/proc/self/status``),
    sampled every 10 ms in a thread. Anonymous pages are what the process owns (tensors, the Python
    and torch runtime, allocator slack); file-backed ones are mapped files, which the kernel may drop."""

    def __init__(self, every: float = 0.01):
        import threading

        self.every, self.peak = every, {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key in self.peak:
                self.peak[key] = max(self.peak[key], int(value.split()[0]) * 1024)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def measure_real(model_dir: Path, label: str, *, rank: int, resolution: int) -> dict:
    """Two real training steps on real (random) weights, the second measured with ``MemoryTracker``,
    against ``memory.predict.predict_step`` for the same settings; plus this process's peak RSS.

    Run one mode per process (``--measure-real LABEL``): RSS is the process's high-water mark.
    """
    import resource

    from diffusers import UNet2DConditionModel

    from hollownet.memory.tracker import MemoryTracker

    settings = MODES[label]
    config = UNet2DConditionModel.load_config(model_dir / "unet")
    cfg = _config(settings, rank, model=str(model_dir), lr=1e-5)
    predicted, _ = predict_step(config, cfg, resolution=resolution, text_dim=config["cross_attention_dim"])
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if cfg.modes.low_memory:
        return_freed_memory_promptly()  # as run_train does
    sampler = RssSampler().__enter__()
    torch.manual_seed(0)
    net = build_model(model_dir, {"hollow_blocks": make_plan(meta_unet(config)).hollow_blocks}, cfg)
    unet, plan, params = net
    optimizer = _optimizer(net, cfg)
    b, embeds = synthetic_batch(config, plan, resolution, 1, net.dtype, 77, config["cross_attention_dim"])
    unet.train()
    times = []
    t0 = time.perf_counter()
    train_step(net, b, embeds, optimizer, cfg)
    times.append(time.perf_counter() - t0)
    tracker = MemoryTracker("cpu").add_resident(unet, optimizer)
    t0 = time.perf_counter()
    train_step(net, b, embeds, optimizer, cfg, tracker)
    times.append(time.perf_counter() - t0)
    sampler.__exit__()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = dict(mode=label, resolution=resolution, rank=rank, measured_peak_bytes=tracker.report.peak_bytes,
               predicted_peak_bytes=predicted.peak_bytes, equal=tracker.report.peak_bytes == predicted.peak_bytes,
               peak_rss_bytes=rss, rss_before_model_bytes=rss_before, peak_rss_anon_bytes=sampler.peak["RssAnon"],
               peak_rss_file_bytes=sampler.peak["RssFile"], step_seconds=[round(t, 2) for t in times])
    print(f"  {label}: measured {tracker.report.peak_bytes / GiB:.4f} GiB, predicted {predicted.peak_bytes / GiB:.4f} GiB "
          f"({'equal' if out['equal'] else 'DIFFERENT'}); process peak RSS {rss / GiB:.2f} GiB "
          f"({rss_before / GiB:.2f} GiB before the model was built; peak anonymous {sampler.peak['RssAnon'] / GiB:.2f}, "
          f"file-backed {sampler.peak['RssFile'] / GiB:.2f}); steps {out['step_seconds']} s", flush=True)
    return out


# ------------------------------------------------------------------------------------ main


def time_section(args, modes: dict, model_dir: Path, tiny_dir: Path) -> dict:
    """(c): on --random-weights' config, else --model-dir's weights, else the tiny model's."""
    tdir = model_dir if (model_dir / "model_index.json").exists() else tiny_dir
    if tdir == tiny_dir and not args.random_weights and not (tiny_dir / "model_index.json").exists():
        from hollownet.tiny import build_tiny_model  # here: only without a model, as (b) does

        build_tiny_model(tiny_dir)
    res = args.time_resolution if tdir == model_dir or args.random_weights else 64
    tdir = args.random_weights or tdir
    name = f"{tdir} random weights" if args.random_weights else tdir.name
    print(f"(c) step time on {name}, {res} px, r={args.time_rank}, median of {args.time_steps} steps")
    out = dict(model=name, resolution=res, rank=args.time_rank,
               modes=step_times(tdir, modes, rank=args.time_rank, resolution=res, steps=args.time_steps, profile=args.profile))
    for k, v in out["modes"].items():
        if "ratio_to_lora_ft" in v:  # not with --time-steps 0 (profiled steps only)
            print(f"  {k:<40} x{v['ratio_to_lora_ft']:.2f} (to the first mode)")
    return out



def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sd21", help="bundled config for (a)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--stage1-budgets", default="0.7GiB,0.95GiB", help="layer-major stage-1 budgets for the whole-run figure")
    ap.add_argument("--stage1-samples", type=int, default=400)
    ap.add_argument("--model-dir", default=str(RESULTS / "_model_sd21_random"),
                    help="a diffusers folder with (random) SD 2.1-architecture weights for (b) and (c)")
    ap.add_argument("--time-resolution", type=int, default=64)
    ap.add_argument("--time-steps", type=int, default=2)
    ap.add_argument("--time-rank", type=int, default=128)
    ap.add_argument("--error-resolution", type=int, default=64)
    ap.add_argument("--random-weights", metavar="CONFIG", help="(c) on a bundled config (sd21) with random weights made in "
                    "memory (lowmem.stream.RandomSource) instead of --model-dir's folder")
    ap.add_argument("--profile", action="store_true", help="(c) with CPU seconds per op family (torch.profiler)")
    ap.add_argument("--skip-fake", action="store_true")
    ap.add_argument("--skip-stage1", action="store_true")
    ap.add_argument("--skip-error", action="store_true")
    ap.add_argument("--skip-time", action="store_true")
    ap.add_argument("--measure-real", metavar="LABEL",
                    help="(d) only: two real steps of this mode at --resolution on --model-dir's weights, the tracker's "
                         "measurement against the fake prediction, and peak RSS (one mode per process)")
    ap.add_argument("--modes", default="", help="';'-separated subset of mode labels (default: all; labels hold commas)")
    ap.add_argument("--output", default=str(RESULTS / "modes.json"))
    args = ap.parse_args(argv)
    wanted = [m.strip() for m in args.modes.split(";") if m.strip()]
    unknown = [m for m in wanted if m not in MODES]
    if unknown:
        ap.error(f"unknown mode {unknown[0]!r}; one of: " + "; ".join(MODES))
    modes = {k: v for k, v in MODES.items() if not wanted or k in wanted}
    if args.measure_real:
        if args.measure_real not in MODES:
            ap.error(f"unknown mode {args.measure_real!r}; one of: " + "; ".join(MODES))
        print(f"(d) real measurement on {Path(args.model_dir).name}, {args.resolution} px, r={args.rank}")
        result = measure_real(Path(args.model_dir), args.measure_real, rank=args.rank, resolution=args.resolution)
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
        return result
    result: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "command": "modes.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not args.skip_fake:
        config = load_unet_config(args.model)
        print(f"(a) stage-2 peak, {args.model}, {args.resolution} px, batch 1, LoRA r={args.rank}, paper cut, fake tensors")
        peaks = {}
        for label, settings in modes.items():
            peaks[label] = fake_stage2_peak(config, settings, rank=args.rank, resolution=args.resolution,
                                            text_dim=config["cross_attention_dim"])
            p = peaks[label]
            print(f"  {label:<40} {p['peak_gib']:6.3f} GiB  (peak in {p['peak_phase']}; frozen resident "
                  f"{p['resident_frozen_bytes'] / GiB:.3f} GiB; {p['seconds']} s)", flush=True)
        result["stage2_peak"] = dict(setting=dict(model=args.model, resolution=args.resolution, batch=1, rank=args.rank,
                                                  lora_targets="to_q,to_k,to_v,to_out.0", cut="paper (default)"),
                                     modes=peaks)
        if not args.skip_stage1:
            budgets = [b for b in args.stage1_budgets.split(",") if b]
            s1 = stage1_peaks(args.model, args.resolution, budgets, args.stage1_samples, photos=4)
            result["stage1_layer_major"] = s1
            for b, v in s1.items():
                print(f"  stage 1 layer-major, budget {b}: " + (f"{v['peak_gib']:.3f} GiB" if "peak_gib" in v else str(v)))
            whole = {}
            for label, target in TARGETS.items():
                if label not in peaks:
                    continue
                s1_ok = [v["peak_bytes"] for v in s1.values() if isinstance(v, dict) and "peak_bytes" in v and v["peak_bytes"] <= target]
                s1_peak = max(s1_ok) if s1_ok else min((v["peak_bytes"] for v in s1.values() if isinstance(v, dict) and "peak_bytes" in v), default=None)
                run = max(peaks[label]["peak_bytes"], s1_peak or 0)
                whole[label] = dict(target_gib=target / GiB, stage2_gib=peaks[label]["peak_gib"],
                                    stage1_gib=round(s1_peak / GiB, 4) if s1_peak else None, whole_run_gib=round(run / GiB, 4),
                                    met=run <= target and s1_peak is not None)
            result["targets"] = whole
    model_dir = Path(args.model_dir)
    tiny_dir = RESULTS / "_model_tiny"
    if not args.skip_error:
        from hollownet.tiny import build_tiny_model

        if not (tiny_dir / "model_index.json").exists():
            build_tiny_model(tiny_dir)
        print("(b) relative output error of the hollowed network vs fp32, same inputs")
        errs = {"tiny (64 px)": output_errors(tiny_dir, 64)}
        if (model_dir / "model_index.json").exists():
            errs[f"sd21 random weights ({args.error_resolution} px)"] = output_errors(model_dir, args.error_resolution)
        for m, e in errs.items():
            print(f"  {m}: " + ", ".join(f"{p} {v['relative_error']:.2e}" for p, v in e.items()))
        result["output_error"] = errs
    if not args.skip_time:
        result["step_time"] = time_section(args, modes, model_dir, tiny_dir)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
