"""The whole personalization run (what ``hollownet train`` does) and the offline demo.

photos -> stage 1 (precompute.py) -> store -> stage 2 (train.py) -> LoRA (export.py) -> infer.py
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .plan import DEFAULT_LORA_TARGETS
from .precompute import PrecomputeConfig, run_precompute
from .settings import compute_precision, stage1_layout
from .store import atomic_write, save_json
from .train import TrainConfig, run_train


@dataclass
class TrainRequest:
    """Everything ``hollownet train`` takes; mirrors its flags one to one."""

    model: str
    images: str
    prompt: str
    output: str
    method: str = "hollow"
    hollow: float | None = None
    hollow_blocks: list[str] | None = None
    rank: int = 32
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    resolution: int = 512
    steps: int = 400
    batch: int = 1
    lr: float = 1e-4
    seed: int = 0
    precision: str = "fp32"
    grad_checkpointing: bool = False
    num_samples: int | None = None
    class_prompt: str | None = None
    class_images: str | None = None
    prior_loss_weight: float = 1.0
    checkpoint_every: int = 100
    resume: bool = True  # stage 2 continues from its newest matching checkpoint; False: start stage 2 over
    layer_major: bool | None = None  # None: on for int8/nf4 or streamed weights (settings.stage1_layout)
    memory_budget: str | int | None = None
    compute_dtype: str | None = None
    stream_weights: bool = False
    optimizer: str = "adamw"
    device: str = "cpu"
    track_memory: bool = True
    store: str | None = None  # default OUTPUT/store
    extra: dict = field(default_factory=dict)


def personalize(req: TrainRequest) -> dict:
    """Stage 1 + stage 2 + export; writes OUTPUT/train.json and OUTPUT/loss.png and returns the record."""
    from .checks import preflight_train
    from .memory import MemoryTracker  # noqa: F401  (imported early: a missing module fails before work starts)

    preflight_train(req)  # paths, prompt, photo count: before any model loads
    out = Path(req.output)
    made = not out.exists()
    try:
        return _personalize(req, out)
    except BaseException:
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves no empty folder behind
        raise


def _personalize(req: TrainRequest, out: Path) -> dict:
    store = req.store or str(out / "store")
    t0 = time.perf_counter()
    train_cfg = TrainConfig(
        model=req.model, store=store, output=str(out), method=req.method, rank=req.rank, lora_alpha=req.lora_alpha,
        lora_targets=list(req.lora_targets or DEFAULT_LORA_TARGETS), lr=req.lr, steps=req.steps, batch=req.batch,
        seed=req.seed, precision=req.precision, compute_dtype=req.compute_dtype, grad_checkpointing=req.grad_checkpointing,
        stream_weights=req.stream_weights, optimizer=req.optimizer, checkpoint_every=req.checkpoint_every,
        resume=req.resume, device=req.device, track_memory_steps=2 if req.track_memory else 0,
    )  # made first: bad stage-2 settings fail before stage 1 spends any time
    layer_major, budget = stage1_layout(req.layer_major, req.memory_budget, precision=req.precision,
                                        stream_weights=req.stream_weights)
    pre = run_precompute(PrecomputeConfig(
        model=req.model, images=req.images, prompt=req.prompt, output=store, method=req.method, hollow=req.hollow,
        hollow_blocks=req.hollow_blocks, resolution=req.resolution,
        num_samples=req.num_samples or req.steps * req.batch, seed=req.seed,
        precision=compute_precision(req.precision, req.compute_dtype),  # stage 1 runs the original, float weights
        class_prompt=req.class_prompt, class_images=req.class_images, prior_loss_weight=req.prior_loss_weight,
        layer_major=layer_major, memory_budget=budget, device=req.device,
    ), track_memory=req.track_memory)
    res = run_train(train_cfg)
    record = {
        "command": "train",
        "settings": asdict(req),
        "plan": res.plan.to_dict() if res.plan else None,
        "timings": {"precompute_s": round(pre.seconds, 3), "train_s": round(res.seconds, 3),
                    "total_s": round(time.perf_counter() - t0, 3),
                    "train_s_per_step": round(res.train_seconds / max(1, len(res.losses) - res.start_step), 4),
                    "resumed_from_step": res.start_step},
        "memory": {"precompute": pre.memory, "train": res.memory},
        "loss": loss_summary(res.losses),
        "outputs": {"lora": str(out / "pytorch_lora_weights.safetensors"), "store": store},
    }
    record["summary"] = summarize(record)
    save_json(out / "train.json", record)
    plot_loss(res.losses, out / "loss.png", title=f"{req.method} — {req.prompt}")
    return record


def loss_summary(losses: list[float]) -> dict:
    """Per-step loss is noisy (random timesteps): compare means of the first and last tenth."""
    k = max(1, len(losses) // 10)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"window": k, "first_mean": mean(losses[:k]), "last_mean": mean(losses[-k:]),
            "history": [round(x, 6) for x in losses]}


def summarize(record: dict) -> str:
    from .memory import format_bytes

    mem = record["memory"]
    lines = []
    if record["plan"]:
        p = record["plan"]
        lines.append(f"hollowed {', '.join(p['hollow_blocks'])} ({p['fraction']:.0%} of U-Net params); "
                     f"trained {p['lora_params'] / 1e6:.2f}M LoRA params")
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
    lines.append(f"LoRA: {record['outputs']['lora']}")
    return "\n".join(lines)


def plot_loss(losses: list[float], path: Path, title: str = "") -> None:
    """Raw loss and its running mean: what a person looks at to see whether training worked."""
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
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(title[:80], fontsize=9)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))  # the one write path (store.write_bytes)
    plt.close(fig)


def run_demo(output: str | Path, steps: int = 30) -> dict:
    """Tiny random model + bundled photos, the whole pipeline, offline, in about a minute on a CPU."""
    from .data import demo_photos_dir
    from .infer import GenerateConfig, run_generate
    from .tiny import build_tiny_model

    out = Path(output)
    model = out / "tiny-model"
    if not (model / "model_index.json").exists():
        print(f"building a tiny random-weight SD model in {model} (offline) ...")
        build_tiny_model(model)
    print(f"personalizing on the bundled photos in {demo_photos_dir()} ...")
    record = personalize(TrainRequest(model=str(model), images=str(demo_photos_dir()), prompt="a photo of sks dog",
                                      output=str(out / "lora"), resolution=64, steps=steps, rank=4, lr=1e-3,
                                      checkpoint_every=0))
    print(record["summary"])
    gen = run_generate(GenerateConfig(model=str(model), lora=str(out / "lora"), prompt="a photo of sks dog on the beach",
                                      output=str(out / "images"), steps=10, num_images=2))
    print(f"generated {len(gen['images'])} images in {out / 'images'} ({gen['mode']} inference)")
    print("note: the demo model has random weights, so its images are noise; point --model at a real "
          "Stable Diffusion folder for real pictures. Memory figures are for the tiny model.")
    return {"train": record, "generate": gen}
