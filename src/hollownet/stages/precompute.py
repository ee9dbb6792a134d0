"""Stage 1: photos -> pre-compute store.

In order, each model part loaded, used once, and dropped:
  1. text encoder(s): embed the prompts, as the model's family does (``families.py``: SDXL's two encoders
     and pooled projection, its per-photo time ids);
  2. VAE encoder (decoder never loaded): encode the photos to latents;
  3. U-Net encoder + hollow (outer up blocks never loaded), no grad: for every training sample
     (photo, noise seed, timestep) the activation the hollow hands to the first kept up unit.
For the ``lora``/``full`` baselines step 3 is skipped: they train on the whole U-Net.

That is the sample-major order. ``PrecomputeConfig(layer_major=True, memory_budget=...)`` runs the
same three steps layer-major instead (``layerwise.py``): one layer loaded at a time, every sample
pushed through it in chunks, activations spilled to disk beyond the budget. Same store, same
numbers; the peak is one layer plus one chunk instead of a whole model.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
import warnings
from dataclasses import InitVar, asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hollownet import encoders as E
from hollownet import unet_split as H
from hollownet.cut import HollowPlan, meta_unet, resolve_plan, unit_modules
from hollownet.checks import caption_words, prompt_identifier
from hollownet.families import Family, SampleConditioning, added_cond_kwargs, detect_family
from hollownet.files import remove_stale_temps, save_tensors
from hollownet.photos import load_photos, photo_sizes
from hollownet.errors import HollownetError
from hollownet.loading import (is_under, load_unet, model_fingerprint, prediction_type, read_tensors, release_memory,
                               resolve_model_dir, return_freed_memory_promptly, weight_files)
from hollownet.lowmem import layerwise as LW
from hollownet.memory.sizes import parse_size
from hollownet.memory.tracker import PartMeter
from hollownet.settings import FLOAT_PRECISIONS, METHODS, Modes, fill_model_defaults, torch_dtype
from hollownet.stages.progress import LoggedBar, ProgressLog
from hollownet.stages.store import FORMAT, Store, shard_name


MAX_SAMPLES = 10_000_000  # a store's samples: its table is ~1.5 GB of JSON there, the shards terabytes at 512 px


@dataclass(kw_only=True)
class PrecomputeConfig:
    """What stage 1 needs. Everything here except the runtime-only fields (``device``, ``batch_size``,
    ``layer_major``, ``memory_budget``) is saved with the store."""

    model: str
    images: str
    prompt: str
    output: str  # the store folder
    method: str = "hollow"  # hollow | lora | full
    hollow: float | None = None  # fraction of U-Net parameters to hollow (nearest valid cut)
    hollow_blocks: list[str] | None = None  # or the cut, by name
    resolution: int | None = None  # None: the model's default (settings.model_defaults), as TrainRequest's
    num_samples: int  # training samples (= steps x batch: every step sees fresh noise)
    seed: int = 0
    precision: str = Modes.precision  # compute dtype of frozen weights; activations are stored in it
    class_prompt: str | None = None
    class_images: str | None = None
    prior_loss_weight: float = 1.0
    shard_size: int = 64
    batch_size: int = 4  # samples per U-Net forward (runtime only)
    device: str = "cpu"  # runtime only
    # Layer-major stage 1 (runtime only: the store is the same): one layer in memory at a time.
    layer_major: bool = False
    memory_budget: int | str | None = None  # bytes or "800MiB"; beyond it activations spill to disk
    # A whole run's modes (settings.Modes; not a field, not saved): then precision, layer_major and
    # memory_budget follow from them (Modes.compute, Modes.stage1) and are not given as well.
    modes: InitVar[Modes | None] = None

    def __post_init__(self, modes: Modes | None = None):
        fill_model_defaults(self, ("resolution",))
        if modes is not None:
            if (self.precision, self.layer_major, self.memory_budget) != (Modes.precision, False, None):
                raise HollownetError("give stage 1 either modes or precision / layer_major / memory_budget, not both")
            self.precision = modes.on(self.device).compute  # stage 1 runs the original, float weights
            self.layer_major, self.memory_budget = modes.stage1
        if self.method not in METHODS:
            raise HollownetError(f"--method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.precision not in FLOAT_PRECISIONS:
            raise HollownetError(f"--precision {self.precision!r} is not one of {', '.join(FLOAT_PRECISIONS)}")
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 8:
            raise HollownetError(f"--resolution {self.resolution} must be a positive multiple of 8, e.g. 512")
        if self.resolution % 8:
            raise HollownetError(f"--resolution {self.resolution} must be a multiple of 8 (the VAE's downscale factor)")
        if self.num_samples < 1:
            raise HollownetError("the number of training samples must be at least 1 (--steps x --batch)")
        if self.num_samples > MAX_SAMPLES:  # the sample table lives in memory and manifest.json (~150 bytes a sample)
            raise HollownetError(f"{self.num_samples:,} pre-computed samples (--steps x --batch) is more than the {MAX_SAMPLES:,} "
                                 "a store holds: lower --steps or --batch, or pass --num-samples N to reuse N samples")
        if bool(self.class_prompt) != bool(self.class_images):
            raise HollownetError("prior preservation needs both --class-prompt and --class-images")
        if self.memory_budget is not None:
            parse_size(self.memory_budget, "memory budget")  # validate early
            if not self.layer_major:
                raise HollownetError("a memory budget applies to layer-major pre-compute only (set layer_major)")


@dataclass
class PrecomputeResult:
    store: Path
    plan: HollowPlan | None
    seconds: float
    memory: dict | None = None  # measured peak (see memory.tracker.PartMeter.summary)
    resumed_shards: int = 0
    layer_major: dict | None = None  # per part: chunk sizes, spilled arrays (layer-major runs)


def budget_bytes(cfg: PrecomputeConfig) -> int | None:
    """Layer-major stage 1's memory budget in bytes (None: no budget)."""
    return None if cfg.memory_budget is None else parse_size(cfg.memory_budget, "memory budget")


def _skeleton(model_dir: Path):
    """The model's U-Net on the meta device (structure, no weights)."""
    from diffusers import UNet2DConditionModel

    return meta_unet(UNet2DConditionModel.load_config(model_dir / "unet"))


def hollow_plan_for(model_dir: Path, cfg) -> HollowPlan:
    return resolve_plan(_skeleton(model_dir), fraction=cfg.hollow, blocks=cfg.hollow_blocks)


def sample_table(n_instance: int, n_class: int, cfg: PrecomputeConfig, num_train_timesteps: int,
                 photo_prompts: list[int] | None = None) -> list[dict]:
    """The fixed, seeded list of training samples; sample i gets noise seeded by (seed, i).

    With prior preservation, samples alternate instance / class (so a batch of 2k holds k of each).
    ``photo_prompts[j]``: the prompt index of instance photo j (per-photo captions; default 0).
    """
    g = torch.Generator().manual_seed(cfg.seed)
    table = []
    perm_i, perm_c = [], []
    for i in range(cfg.num_samples):
        if not perm_i:
            perm_i = torch.randperm(n_instance, generator=g).tolist()
        j = perm_i.pop()
        entry = dict(latent=j, prompt=photo_prompts[j] if photo_prompts else 0, weight=1.0)
        if n_class and i % 2 == 1:
            if not perm_c:
                perm_c = torch.randperm(n_class, generator=g).tolist()
            entry = dict(latent=n_instance + perm_c.pop(), prompt=1, weight=cfg.prior_loss_weight)
        entry["timestep"] = int(torch.randint(0, num_train_timesteps, (1,), generator=g))
        entry["noise_seed"] = cfg.seed * 1_000_003 + i
        table.append(entry)
    return table


VALIDATION = "validation"  # the held-out samples' pseudo-shard (stage 2's validation loss)
VALIDATION_FILE = "validation.safetensors"
VALIDATION_SAMPLES = 8
VALIDATION_SEED_BASE = 1 << 40  # training noise seeds are seed * 1_000_003 + i: far below it


def validation_count(num_samples: int, shard_size: int) -> int:
    """Held-out samples: no more than the first shard holds, so stage 1's measured (and planned) peak is unchanged."""
    return min(VALIDATION_SAMPLES, num_samples, shard_size)


def validation_table(n_instance: int, cfg: PrecomputeConfig, num_train_timesteps: int,
                     photo_prompts: list[int] | None = None) -> list[dict]:
    """The fixed held-out samples: the instance photos in turn, timesteps spread evenly over the schedule, noise
    seeds from a range training never draws from. A function of the store's identity: the same after any resume."""
    n = validation_count(cfg.num_samples, cfg.shard_size)
    rows = []
    for k in range(n):
        j = k % n_instance
        rows.append(dict(latent=j, prompt=photo_prompts[j] if photo_prompts else 0, weight=1.0,
                         timestep=int((k + 0.5) * num_train_timesteps / n),
                         noise_seed=VALIDATION_SEED_BASE + cfg.seed * 1_000_003 + k))
    return rows


def sample_noise(seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def photo_captions(folder: str | Path, names: list[str], prompt: str) -> list[str]:
    """kohya's convention: ``NAME.txt`` beside a photo is that photo's caption, else the instance prompt.

    A caption must keep the identifier the instance prompt teaches (its first rare word): a photo
    captioned without it would train the base model's plain words instead, silently.
    """
    identifier = prompt_identifier(prompt)
    out = []
    for name in names:
        txt = Path(folder).expanduser() / (Path(name).stem + ".txt")
        if not txt.is_file():
            out.append(prompt)
            continue
        caption = " ".join(txt.read_text(encoding="utf-8", errors="replace").split())
        if not caption:
            raise HollownetError(f"caption file {txt} is empty: write the photo's prompt in it or delete it")
        if identifier and identifier not in caption_words(caption):
            raise HollownetError(f"caption {txt.name} ({caption!r}) lacks the identifier {identifier!r} of --prompt; "
                                 "add it (e.g. 'a photo of sks dog on a sofa')")
        out.append(caption)
    return out


def _photo_digest(names: list[str], pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.numpy().tobytes() + "|".join(names).encode()).hexdigest()[:16]


def embed_prompts(model_dir: Path, prompts: list[str], dtype, device, meter: PartMeter,
                  family: Family | None = None) -> dict[str, torch.Tensor]:
    """The prompt tensors (``"embeds"``, and SDXL's pooled ``"text_embeds"``), exactly as the family's
    pipeline's ``encode_prompt`` computes them; the encoders are freed after."""
    tensors = (family or detect_family(model_dir)).encode_prompts(model_dir, prompts, dtype, device, meter)
    release_memory()
    return tensors


def encode_photos(model_dir: Path, pixels: torch.Tensor, seed: int, dtype, device, batch_size: int, meter: PartMeter) -> torch.Tensor:
    """Scaled VAE latents, one posterior sample per photo (seeded). The decoder is never loaded."""
    from diffusers import AutoencoderKL

    config = AutoencoderKL.load_config(model_dir / "vae")
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    files = weight_files(model_dir, "vae")
    keys = [k for k in vae.state_dict() if not is_under(k, ["decoder", "post_quant_conv"])]
    vae.load_state_dict(read_tensors(files, keys, dtype=dtype, device=device), strict=False, assign=True)
    latents = E.encode_latents(vae.eval(), pixels, seed, dtype, device, batch_size, meter)
    del vae
    release_memory()
    return latents


def run_precompute(cfg: PrecomputeConfig, track_memory: bool = True) -> PrecomputeResult:
    """Stage 1, resumable: finished shards in an existing compatible store are kept.

    ``track_memory``: measure each part's exact peak tensor memory (the first U-Net shard only).
    """
    from diffusers import DDPMScheduler

    t0 = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model)
    family = detect_family(model_dir)
    dtype = torch_dtype(cfg.precision)
    plan = hollow_plan_for(model_dir, cfg) if cfg.method == "hollow" else None
    pixels, names = load_photos(cfg.images, cfg.resolution)
    class_pixels, class_names = (load_photos(cfg.class_images, cfg.resolution) if cfg.class_images else (pixels[:0], []))
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler")
    captions = photo_captions(cfg.images, names, cfg.prompt)
    # prompt 0 is the instance prompt, then the class prompt, then any per-photo captions
    prompts = [cfg.prompt] + ([cfg.class_prompt] if cfg.class_prompt else [])
    prompts += [c for c in dict.fromkeys(captions) if c not in prompts]
    photo_prompts = [prompts.index(c) for c in captions]
    identity = dict(
        format=FORMAT,
        model=str(cfg.model),
        model_fingerprint=model_fingerprint(model_dir),
        method=cfg.method,
        hollow_blocks=plan.hollow_blocks if plan else None,
        resolution=cfg.resolution,
        dtype=cfg.precision,
        seed=cfg.seed,
        num_samples=cfg.num_samples,
        photos=_photo_digest(names + class_names, torch.cat([pixels, class_pixels])),
        prompts=prompts,
        prediction_type=prediction_type(model_dir),
    )
    meter = PartMeter(track_memory, cfg.device)
    store = Store(cfg.output)
    budget = budget_bytes(cfg)
    if cfg.layer_major:
        return_freed_memory_promptly()  # layer after layer is loaded and freed
    if store.exists():
        store.check_identity(identity)
        remove_stale_temps(store.root)  # a process killed mid-write (kill -9) leaves its temp file
        for name, why in store.damaged().items():  # a truncated or flipped file: computed again, not read
            warnings.warn(f"{store.root / name} is damaged ({why}); computing it again")
            store.forget(name)
    else:
        table = sample_table(len(names), len(class_names), cfg, scheduler.config.num_train_timesteps, photo_prompts)
        store.write_manifest({**identity, "family": family.name, "photo_files": names, "class_photo_files": class_names,
                              "shard_size": cfg.shard_size, "num_shards": math.ceil(cfg.num_samples / cfg.shard_size),
                              "plan": plan.to_dict() if plan else None, "samples": table, "done_shards": []})
    manifest = store.manifest()
    table, size = manifest["samples"], manifest["shard_size"]
    done = store.done_shards()
    todo = {i: table[i * size : (i + 1) * size] for i in range(manifest["num_shards"]) if i not in done}
    if not (store.root / VALIDATION_FILE).exists():  # also for a store made before validation existed
        todo[VALIDATION] = validation_table(len(names), cfg, scheduler.config.num_train_timesteps, photo_prompts)
    info: dict = {"memory_budget": budget, "resumed_shards": len(done)}  # layer-major runs report it
    scratch = store.root / LW.SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)  # an interrupted layer-major run's activations: never reused
    run = _Stage1(cfg, model_dir, family, store, dtype, budget, meter, scratch, info)
    try:
        sizes = photo_sizes(cfg.images) + (photo_sizes(cfg.class_images) if cfg.class_images else [])
        cond, latents = _prompts_and_latents(run, prompts, torch.cat([pixels, class_pixels]), sizes)
        total = len(table) + validation_count(cfg.num_samples, size)
        with tqdm(total=total, initial=total - sum(map(len, todo.values())), desc="pre-compute",
                  unit="sample", disable=None) as tq:
            bar = LoggedBar(tq, ProgressLog("pre-compute", total, total - sum(map(len, todo.values())), unit="sample"))
            if cfg.layer_major and plan is not None and todo:
                _unet_layer_major(run, todo, plan, latents, cond, scheduler, bar)
            else:  # and layer-major with no U-Net to run (a baseline, or no shard left): nothing to measure
                _unet_sample_major(run, todo, plan, latents, cond, scheduler, bar,
                                   PartMeter(False) if cfg.layer_major else meter)
        store.finish()  # the progress lines folded into manifest.json: one rewrite a run
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return PrecomputeResult(store=store.root, plan=plan, seconds=time.perf_counter() - t0, memory=meter.summary(),
                            resumed_shards=len(done), layer_major=info if cfg.layer_major else None)


def _stats(stats) -> list[dict]:
    return [asdict(s) for s in stats]


@dataclass
class _Stage1:
    """What the parts of one stage-1 run share."""

    cfg: PrecomputeConfig
    model_dir: Path
    family: Family
    store: Store
    dtype: torch.dtype
    budget: int | None  # bytes, layer-major only
    meter: PartMeter
    scratch: Path  # layer-major activations, deleted after the run
    info: dict  # what a layer-major run reports: its budget, resumed shards, per-part layer stats


def _prompts_and_latents(run: _Stage1, prompts, pixels, sizes):
    """The prompt tensors (with the photos' time ids: a :class:`SampleConditioning`) and the photos' latents,
    computed (sample- or layer-major) unless stored."""
    cfg, model_dir, family, store, dtype, meter = run.cfg, run.model_dir, run.family, run.store, run.dtype, run.meter
    budget, scratch, info = run.budget, run.scratch, run.info
    if not (store.root / "prompts.safetensors").exists():
        if cfg.layer_major:
            tensors, stats = family.encode_prompts_layer_major(model_dir, prompts, dtype, cfg.device, meter, budget=budget,
                                                               batch_size=cfg.batch_size, scratch=scratch / "text")
            info.update({part: _stats(s) for part, s in stats.items()})
        else:
            tensors = embed_prompts(model_dir, prompts, dtype, cfg.device, meter, family)
        save_tensors(store.root / "prompts.safetensors", tensors)
        store.record("prompts.safetensors")
    if not (store.root / "latents.safetensors").exists():
        if cfg.layer_major:
            latents, stats = LW.encode_photos(model_dir, pixels, cfg.seed, family.vae_dtype(dtype), cfg.device,
                                              cfg.batch_size, meter,
                                              budget=budget, scratch=scratch / "vae")
            info["VAE encoder"] = _stats(stats)
        else:
            latents = encode_photos(model_dir, pixels, cfg.seed, family.vae_dtype(dtype), cfg.device, cfg.batch_size, meter)
        time_ids = family.photo_time_ids(sizes, cfg.resolution)
        save_tensors(store.root / "latents.safetensors", {"latents": latents, **({"time_ids": time_ids} if time_ids is not None else {})})
        store.record("latents.safetensors")
    photos = store.tensors("latents.safetensors")
    return SampleConditioning(family, store.tensors("prompts.safetensors"), photos.get("time_ids")), photos["latents"]


def _unet_sample_major(run: _Stage1, todo, plan, latents, cond: SampleConditioning, scheduler, bar, meter) -> None:
    """The unfinished shards one by one, the U-Net's encoder + hollow loaded whole (none for a baseline),
    measured into ``meter``."""
    cfg, model_dir, store, dtype = run.cfg, run.model_dir, run.store, run.dtype
    unet = None
    if plan is not None and todo:
        skip = kept_up_modules(_skeleton(model_dir), plan)
        unet, _ = load_unet(model_dir, skip=skip, dtype=dtype, device=cfg.device)
    for shard, rows in todo.items():
        with meter.measure("U-Net encoder + hollow", *([unet] if unet is not None else [])):
            tensors = make_shard(rows, latents, cond.embeds, scheduler, unet, plan, dtype, cfg, bar, cond)
        save_part(store, shard, tensors)
    del unet
    release_memory()


def _unet_layer_major(run: _Stage1, todo, plan, latents, cond: SampleConditioning, scheduler, bar) -> None:
    """The unfinished shards' samples through the U-Net's encoder + hollow one layer at a time
    (``layerwise.py``) into scratch arrays, then the shards written (each atomically, marked done one
    by one). An interruption before that leaves no shard written; the rerun recomputes those samples."""
    cfg, model_dir, store, dtype, budget, meter = run.cfg, run.model_dir, run.store, run.dtype, run.budget, run.meter
    scratch, info = run.scratch, run.info
    spans, rows_all = [], []  # shard -> its rows' span in the arrays
    for shard, rows in todo.items():
        spans.append((shard, rows, len(rows_all), len(rows_all) + len(rows)))
        rows_all += rows
    arrays = LW.Arrays(len(rows_all), scratch / "unet", budget)
    layer_bar = tqdm(desc="pre-compute (layer-major U-Net)", unit="layer", disable=None, leave=False)
    try:
        for shard, rows, a, b in spans:  # the U-Net's inputs, exactly as make_shard draws them
            t = make_shard(rows, latents, cond.embeds, scheduler, None, plan, dtype, cfg)
            arrays.write("noisy", a, b, t["noisy"])
            arrays.write("timestep", a, b, t["timestep"])
            del t
        prompt_index = torch.tensor([r["prompt"] for r in rows_all], dtype=torch.long)
        unet = _skeleton(model_dir).requires_grad_(False).eval()
        weights = LW.FileWeights(unet, weight_files(model_dir), dtype, cfg.device)
        out, stats = LW.run_unet_hollow(unet, plan, arrays, weights, cond.embeds, prompt_index,
                                        LW.RunOptions(cfg.device, meter, budget, cfg.batch_size, layer_bar), dtype=dtype,
                                        constants=(latents,), cond=cond.unet_cond(rows_all))
        info["U-Net encoder + hollow"] = _stats(stats)
        info["spilled_bytes"] = sum(arrays.spilled.values())
        for shard, rows, a, b in spans:  # each shard written atomically, then marked done
            tensors = make_shard(rows, latents, cond.embeds, scheduler, None, plan, dtype, cfg, bar, cond)
            tensors["hollow_out"] = arrays.read(out, a, b).clone()
            save_part(store, shard, tensors)
    finally:
        arrays.close()
        layer_bar.close()


def save_part(store: Store, shard, tensors: dict[str, torch.Tensor]) -> None:
    """A finished shard, written atomically and marked done; or the held-out samples' file."""
    if shard == VALIDATION:
        save_tensors(store.root / VALIDATION_FILE, tensors)
        store.record(VALIDATION_FILE)  # size + SHA-256, checked on resume as the shards are
        return
    save_tensors(store.root / shard_name(shard), tensors)
    store.mark_done(shard)


def kept_up_modules(unet, plan: HollowPlan) -> list[str]:
    """Stage 1 never runs the kept up units or the output head: don't load them."""
    names = [n for u in plan.kept_up for n in unit_modules(unet, u)]
    return names + ["conv_norm_out", "conv_out"]


def noisy_and_target(latent: torch.Tensor, rows: list[dict], scheduler) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward diffusion of each latent with its seeded noise, and the ε or v the U-Net must predict."""
    noise = torch.stack([sample_noise(r["noise_seed"], latent.shape[1:]) for r in rows])
    t = torch.tensor([r["timestep"] for r in rows], dtype=torch.long)
    noisy = scheduler.add_noise(latent, noise, t)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latent, noise, t)
    else:
        raise HollownetError(f"scheduler prediction_type {kind!r} is not supported (epsilon or v_prediction)")
    return noisy, target, t


def make_shard(rows, latents, embeds, scheduler, unet, plan, dtype, cfg, bar=None,
               cond: SampleConditioning | None = None) -> dict[str, torch.Tensor]:
    """One shard's tensors: the samples' noisy latents, targets, timesteps, prompts, weights, the family's
    per-sample inputs (``cond``: SDXL's pooled text embeds and time ids) and (with a U-Net) the hollow's
    output, ``cfg.batch_size`` samples per forward; ``bar``: counts the samples."""
    latent = latents[[r["latent"] for r in rows]]
    noisy, target, t = noisy_and_target(latent, rows, scheduler)
    prompt_index = torch.tensor([r["prompt"] for r in rows], dtype=torch.long)
    out = dict(noisy=noisy, target=target, timestep=t, prompt_index=prompt_index,
               weight=torch.tensor([r["weight"] for r in rows], dtype=torch.float32))
    extra = cond.sample_inputs(rows) if cond is not None else {}
    out.update(extra)
    if unet is None:
        if bar is not None:
            bar.update(len(rows))
        return out
    hollow_out = []
    with torch.no_grad():
        for s in range(0, len(rows), cfg.batch_size):
            sl = slice(s, s + cfg.batch_size)
            h = H.hollow_output(unet, plan, noisy[sl].to(cfg.device, dtype), t[sl].to(cfg.device),
                                embeds[prompt_index[sl]].to(cfg.device, dtype),
                                added_cond_kwargs=added_cond_kwargs({k: v[sl] for k, v in extra.items()}, cfg.device, dtype))
            hollow_out.append(h.cpu())
            if bar is not None:
                bar.update(h.shape[0])
    out["hollow_out"] = torch.cat(hollow_out)
    return out


def config_dict(cfg: PrecomputeConfig) -> dict:
    return {k: v for k, v in asdict(cfg).items() if k not in ("device", "batch_size", "layer_major", "memory_budget")}
