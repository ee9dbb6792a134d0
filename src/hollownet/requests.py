"""The requests of ``hollownet train`` and ``hollownet plan``: plain data, no torch (the CLI reads
their fields for its flags and defaults, and ``--help`` must stay fast).

``TrainRequest`` is a whole personalization run (``workflow.personalize``); ``PlanRequest`` the
same settings for a memory prediction (``memory.planner``). Their modes -- precision, compute
dtype, streaming, checkpointing, optimizer, stage 1's layout -- are one ``settings.Modes``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from hollownet.errors import HollownetError
from hollownet.settings import DEFAULT_LORA_FORMAT, Modes, expand_lora_targets, fill_model_defaults


@dataclass
class TrainRequest:
    """Everything ``hollownet train`` takes; mirrors its flags one to one (the modes' flags: ``modes``)."""

    model: str
    images: str
    prompt: str
    output: str
    method: str = "hollow"
    hollow: float | None = None
    hollow_blocks: list[str] | None = None
    # None: the model's default (settings.model_defaults), resolved on construction
    rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None  # layer names or groups (settings.LORA_TARGET_GROUPS)
    resolution: int | None = None
    steps: int | None = None
    batch: int | None = None
    lr: float | None = None
    seed: int = 0
    modes: Modes = field(default_factory=Modes)  # precision, compute dtype, streaming, checkpointing, optimizer, stage 1 layout
    num_samples: int | None = None  # default steps x batch: fresh noise every step
    class_prompt: str | None = None
    class_images: str | None = None
    prior_loss_weight: float = 1.0
    checkpoint_every: int = 100
    resume: bool = True  # stage 2 continues from its newest matching checkpoint; False: start stage 2 over
    device: str | None = None  # None: the best this machine has (devices.default_device: cuda, mps, cpu)
    track_memory: bool = True
    ignore_memory_check: bool = False  # run even where the planner predicts more memory than the device has
    store: str | None = None  # default OUTPUT/store
    lora_format: str = DEFAULT_LORA_FORMAT  # diffusers | kohya | both: which LoRA file(s) to write (formats.py)
    # watching the run (stages/watch.py): progress lines, snapshots, validation loss, sample images
    log_every: int = 0
    save_every: int = 0
    validate_every: int | None = None  # None: with the samples, else a tenth of the steps; 0: never
    sample_every: int = 0
    sample_prompts: list[str] | None = None
    sample_seed: int = 0
    sample_steps: int | None = None  # denoising steps of a sample (default: the model's, as generate)
    sample_guidance: float | None = None

    def __post_init__(self):
        fill_model_defaults(self, ("rank", "lora_targets", "resolution", "steps", "batch", "lr"))
        self.lora_targets = expand_lora_targets(self.lora_targets)
        self.modes = self.modes.on(self.device)  # int8/nf4's compute dtype as chosen for the device, recorded

    def settings(self) -> dict:
        """The request as ``train.json`` records it: one flat dict, the modes' keys among the others."""
        return {**{k: v for k, v in asdict(self).items() if k != "modes"}, **asdict(self.modes)}


@dataclass
class PlanRequest:
    """What ``hollownet plan`` takes; the names and defaults of ``hollownet train``'s flags."""

    model: str = "sd21"
    method: str = "hollow"  # hollow | lora | full
    hollow: float | None = None  # fraction of U-Net parameters (nearest valid cut)
    hollow_blocks: list[str] | None = None  # or the cut by name
    depth: int | None = None  # or the cut by depth (sweeps)
    # None: the model's default (settings.model_defaults), resolved on construction
    rank: int | None = None
    lora_alpha: float | None = None
    lora_targets: tuple[str, ...] | None = None
    resolution: int | None = None
    batch: int | None = None
    modes: Modes = field(default_factory=Modes)  # as train's; the optimizer may also be adamw-foreach (CUDA's default)
    # stage 1 (defaults: PrecomputeConfig's and a typical personalization run)
    photos: int = 4  # instance photos
    class_photos: int = 0  # prior preservation: class photos (then 2 prompts, and a step trains 2 x batch samples)
    steps: int | None = None  # num_samples = steps x batch, as hollownet train
    precompute_batch: int = 4  # PrecomputeConfig.batch_size: samples per U-Net (and VAE) forward in stage 1
    shard_size: int = 64
    inference_batches: tuple[int, ...] = (1, 2)  # 2 = classifier-free guidance
    # generation (hollownet generate's settings; the modes above apply to it too)
    gen_steps: int | None = None  # denoising steps (the peak repeats after the third: see planner)
    guidance: float | None = None  # > 1: classifier-free guidance, the U-Net's batch is 2
    num_images: int = 1
    merged: bool = False  # the LoRA fused into the weights, one U-Net pass (float precisions only)
    device: str | None = None  # the device the plan is for (int8/nf4's compute dtype); None: train's default here

    def __post_init__(self):
        fill_model_defaults(self, ("rank", "lora_targets", "resolution", "batch", "steps", "gen_steps", "guidance"))
        self.lora_targets = tuple(expand_lora_targets(self.lora_targets))
        self.modes = self.modes.on(self.device)
        if self.resolution < 8 or self.resolution % 8:
            raise HollownetError(f"--resolution {self.resolution} must be a positive multiple of 8 (the VAE's downscale factor)")
        if self.photos < 1:
            raise HollownetError(f"--photos must be at least 1 (got {self.photos})")
        if self.gen_steps < 1 or self.num_images < 1:
            raise HollownetError("--gen-steps and --num-images must be at least 1")

    @classmethod
    def from_train(cls, req: TrainRequest, *, photos: int, class_photos: int = 0, **given) -> PlanRequest:
        """The plan of the run ``req`` asks for: every setting the two share, from ``req``."""
        names = {f.name for f in fields(cls)} & {f.name for f in fields(req)}
        return cls(**{n: getattr(req, n) for n in names - set(given)}, photos=photos, class_photos=class_photos, **given)

    @property
    def prompts(self) -> int:
        return 2 if self.class_photos else 1

    @property
    def per_step(self) -> int:
        """Samples per training step: with prior preservation, ``batch`` of each kind (as run_train)."""
        return self.batch * self.prompts

    @property
    def num_samples(self) -> int:
        return self.steps * self.batch

    def train_config(self):
        """Stage 2 as ``hollownet train`` runs it for these settings (its own checks and defaults)."""
        from hollownet.stages.train import TrainConfig  # lazily: the CLI imports this module for --help (no torch)

        return TrainConfig(model=self.model, store="", output="", method=self.method, rank=self.rank,
                           lora_alpha=self.lora_alpha, lora_targets=list(self.lora_targets), batch=self.batch,
                           modes=self.modes, device="cpu")

    def precompute_config(self):
        """Stage 1 as ``hollownet train`` runs it for these settings (``workflow.personalize``)."""
        from hollownet.stages.precompute import PrecomputeConfig  # lazily: the CLI imports this module for --help

        prior = dict(class_prompt="class", class_images="class") if self.class_photos else {}
        return PrecomputeConfig(model=self.model, images="", prompt="", output="", method=self.method,
                                hollow=self.hollow, hollow_blocks=self.hollow_blocks, resolution=self.resolution,
                                num_samples=self.num_samples, shard_size=self.shard_size, batch_size=self.precompute_batch,
                                modes=self.modes, device="cpu", **prior)
