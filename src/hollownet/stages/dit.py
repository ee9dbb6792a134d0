"""Stage 1 and stage 2 for a diffusion transformer (SD3 / SD3.5): the prefix cut, end to end.

The U-Net's stages (``precompute.py``, ``train.py``) hollow a centre; a plain DiT has no long skips, so its
frozen part is a prefix (``dit_cut.py``, ``dit_split.py``). ``hollownet train`` takes this module's two stages
for a folder whose family's backbone is a transformer (``families.SD3``; ``workflow.stage_functions``):

1. :func:`run_dit_precompute`: the text encoders (``SD3.encode_prompts``: what the pipeline's ``encode_prompt``
   gives), the VAE encoder, then the transformer's prefix (``dit_lora.load_part(..., "prefix")``: embedders
   and blocks ``0..k-1``, the rest never read) once per sample: its :class:`dit_split.Prefix` (image tokens,
   text tokens, ``temb``) is stored with the sample's noisy latent, ``sigma`` and flow target (``flow.py``);
2. :func:`run_dit_train`: the suffix alone (blocks ``k..``, output layers; the prefix never read) with LoRA
   (``dit_lora.add_suffix_lora``), trained on the stored prefixes with the flow loss; the LoRA written in
   diffusers' SD3 layout (``transformer.…``), which ``StableDiffusion3Pipeline.load_lora_weights`` reads.

The store and checkpoints are the U-Net stages' (``store.Store``, ``train.save_checkpoint``): resumable the
same way. What the U-Net stages offer and this slice does not yet is refused in one line before any model
loads (:func:`check_settings`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hollownet import dit_split as D
from hollownet import flow
from hollownet.cut import PAPER_FRACTION
from hollownet.dit_cut import PrefixPlan, k_for_fraction, load_transformer_config, make_prefix_plan, meta_transformer
from hollownet.dit_lora import add_suffix_lora, load_part, save_sd3_lora
from hollownet.errors import HollownetError
from hollownet.families import folder_family
from hollownet.files import remove_stale_temps, save_json, save_tensors
from hollownet.loading import model_fingerprint, release_memory, resolve_model_dir, vae_scale_factor
from hollownet.memory.tracker import MemoryTracker, PartMeter
from hollownet.optimizers import make_optimizer
from hollownet.photos import load_photos
from hollownet.settings import torch_dtype
from hollownet.stages.export import INFO_FILE
from hollownet.stages.precompute import (PrecomputeConfig, PrecomputeResult, _photo_digest, encode_photos,
                                         photo_captions, sample_noise, save_part)
from hollownet.stages.store import FORMAT, Store
from hollownet.stages.train import (TrainConfig, TrainingStopped, TrainResult, batch_indices, checkpoint_settings,
                                    load_checkpoint, nan_loss_advice, save_checkpoint)

#: The paper's hollowed share of the U-Net, used as the DiT's provisional default: the prefix ``k`` whose frozen
#: share of the transformer's parameters is nearest it. Provisional: the toy-DiT curve (issue 26, part 2) is to
#: choose the default; pass ``--hollow FRACTION`` or ``--hollow-blocks`` to choose the cut yourself.
PROVISIONAL_FRACTION = PAPER_FRACTION
OBJECTIVE = "flow_matching"  # the store's ``prediction_type``: stage 2 refuses a store of another objective
PREFIX_KEYS = ("hidden_states", "encoder_hidden_states", "temb")
SAMPLE_KEYS = ("noisy", "target", "sigma", "timestep", "prompt_index", "weight", "loss_weight")


# ---------------------------------------------------------------------------------- what is refused


def check_settings(cfg) -> None:
    """Refuse, in one line, a setting the DiT stages do not run yet (``cfg``: a ``TrainRequest``, a
    ``PrecomputeConfig`` or a ``TrainConfig``: the fields each has are checked)."""
    get = lambda name, default=None: getattr(cfg, name, default)  # noqa: E731
    if get("method", "hollow") != "hollow":
        raise HollownetError(f"--method {get('method')} is not supported for SD3 yet: use --method hollow (--hollow 0 "
                             "freezes only the embedders: the same attention LoRA on every block)")
    if get("class_prompt") or get("class_images"):
        raise HollownetError("prior preservation (--class-prompt / --class-images) is not supported for SD3 yet: drop them")
    modes = get("modes")
    precision = modes.precision if modes is not None else get("precision", "fp32")
    if precision != "fp32":
        raise HollownetError(f"--precision {precision} is not supported for SD3 yet: use --precision fp32")
    if modes is not None:
        if modes.stream_weights:
            raise HollownetError("--stream-weights is not supported for SD3 yet: drop it")
        if modes.optimizer != "adamw":
            raise HollownetError(f"--optimizer {modes.optimizer} is not supported for SD3 yet: use --optimizer adamw")
    layer_major = modes.layer_major if modes is not None else get("layer_major")
    budget = modes.memory_budget if modes is not None else get("memory_budget")
    if layer_major or budget is not None:
        raise HollownetError("layer-major pre-compute (--layer-major / --memory-budget) is not supported for SD3 yet: drop it")
    for flag in ("save_every", "sample_every", "validate_every"):
        if get(flag):
            raise HollownetError(f"--{flag.replace('_', '-')} is not supported for SD3 yet: drop it")
    if get("lora_format", "diffusers") == "kohya":
        raise HollownetError("--format kohya is not written for SD3 (ComfyUI reads the diffusers file's "
                             "transformer.… keys): use --format diffusers")


def prefix_k(transformer, hollow: float | None, hollow_blocks: list[str] | None) -> int:
    """The prefix cut: ``--hollow FRACTION`` (the ``k`` whose frozen share is nearest), ``--hollow-blocks`` naming
    ``transformer_blocks.0`` .. ``transformer_blocks.{k-1}`` (none: ``k = 0``), else :data:`PROVISIONAL_FRACTION`."""
    if hollow_blocks is not None:
        names = [b for b in hollow_blocks if b]
        k = len(names)
        if names != [f"transformer_blocks.{i}" for i in range(k)]:
            raise HollownetError(f"--hollow-blocks {','.join(names)} is not a prefix of an SD3 transformer: name "
                                 "transformer_blocks.0,transformer_blocks.1,... in order (the first k blocks), or use --hollow FRACTION")
        if k >= D.num_blocks(transformer):
            raise HollownetError(f"--hollow-blocks freezes all {k} blocks, leaving nothing to train; name fewer")
        return k
    return k_for_fraction(transformer, PROVISIONAL_FRACTION if hollow is None else hollow)


def check_latent_size(model_dir: Path, resolution: int) -> None:
    """A resolution whose latent the transformer's position table cannot cover (diffusers would raise mid-run)."""
    config = load_transformer_config(model_dir)
    pixels_per_patch = vae_scale_factor(json.loads((model_dir / "vae" / "config.json").read_text())) * config["patch_size"]
    most = config.get("pos_embed_max_size")
    if most is not None and resolution // pixels_per_patch > most:
        biggest = most * pixels_per_patch
        raise HollownetError(f"--resolution {resolution} is beyond this transformer's position table "
                             f"({most} patches a side): use --resolution {biggest} or less")


# ------------------------------------------------------------------------------------------- stage 1


def sample_table(n_photos: int, cfg: PrecomputeConfig, scheduler, photo_prompts: list[int]) -> list[dict]:
    """The fixed, seeded training samples: photos in shuffled turns (as the U-Net's table), each with a
    timestep drawn as diffusers' SD3 script draws it (``flow.draw_index``) and its noise seed."""
    g = torch.Generator().manual_seed(cfg.seed)
    table, perm = [], []
    n_train = scheduler.config.num_train_timesteps
    for i in range(cfg.num_samples):
        if not perm:
            perm = torch.randperm(n_photos, generator=g).tolist()
        j = perm.pop()
        index = flow.draw_index(g, n_train)
        t, sigma = flow.schedule_point(scheduler, index)
        table.append(dict(latent=j, prompt=photo_prompts[j], weight=1.0, index=index, timestep=t, sigma=sigma,
                          noise_seed=cfg.seed * 1_000_003 + i))
    return table


def make_shard(rows: list[dict], latents, prompts: dict[str, torch.Tensor], net, k: int, dtype, cfg, bar=None) -> dict:
    """One shard: the samples' noisy latents, flow targets (``x0``: the script's preconditioned target),
    ``sigma``, timesteps, prompts, weights, and the prefix's output (:data:`PREFIX_KEYS`), ``cfg.batch_size``
    samples per forward."""
    x0 = latents[[r["latent"] for r in rows]]
    noise = torch.stack([sample_noise(r["noise_seed"], x0.shape[1:]) for r in rows])
    sigma = torch.tensor([r["sigma"] for r in rows], dtype=torch.float32)
    noisy = flow.noisy_latents(x0, noise, sigma)
    prompt_index = torch.tensor([r["prompt"] for r in rows], dtype=torch.long)
    out = dict(noisy=noisy, target=x0, sigma=sigma, timestep=torch.tensor([r["timestep"] for r in rows], dtype=torch.float32),
               prompt_index=prompt_index, weight=torch.tensor([r["weight"] for r in rows], dtype=torch.float32),
               loss_weight=flow.loss_weighting(sigma))
    parts: dict[str, list] = {key: [] for key in PREFIX_KEYS}
    with torch.no_grad():
        for s in range(0, len(rows), cfg.batch_size):
            sl, idx = slice(s, s + cfg.batch_size), prompt_index[s : s + cfg.batch_size]
            prefix = D.run_prefix(net, k, noisy[sl].to(cfg.device, dtype), prompts["embeds"][idx].to(cfg.device, dtype),
                                  prompts["pooled_projections"][idx].to(cfg.device, dtype), out["timestep"][sl].to(cfg.device))
            for key, value in prefix.tensors().items():
                parts[key].append(value.cpu())
            if bar is not None:
                bar.update(len(idx))
    out.update({key: torch.cat(v) for key, v in parts.items() if v})
    return out


def run_dit_precompute(cfg: PrecomputeConfig, track_memory: bool = True) -> PrecomputeResult:
    """Stage 1 for an SD3 folder, resumable as the U-Net's: finished shards of a compatible store are kept."""
    # diffusers is heavy to import: only the stages that run a model need its scheduler
    from diffusers import FlowMatchEulerDiscreteScheduler

    check_settings(cfg)
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model)
    family = folder_family(model_dir)
    dtype = torch_dtype(cfg.precision)
    skeleton = meta_transformer(load_transformer_config(model_dir))
    k = prefix_k(skeleton, cfg.hollow, cfg.hollow_blocks)
    plan = make_prefix_plan(skeleton, k)
    check_latent_size(model_dir, cfg.resolution)
    pixels, names = load_photos(cfg.images, cfg.resolution)
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir / "scheduler")
    captions = photo_captions(cfg.images, names, cfg.prompt)
    prompts = [cfg.prompt] + [c for c in dict.fromkeys(captions) if c != cfg.prompt]
    photo_prompts = [prompts.index(c) for c in captions]
    identity = dict(format=FORMAT, model=str(cfg.model), model_fingerprint=model_fingerprint(model_dir), method=cfg.method,
                    hollow_blocks=D.prefix_modules(skeleton, k), resolution=cfg.resolution, dtype=cfg.precision,
                    seed=cfg.seed, num_samples=cfg.num_samples, photos=_photo_digest(names, pixels), prompts=prompts,
                    prediction_type=OBJECTIVE)
    meter = PartMeter(track_memory, cfg.device)
    store = Store(cfg.output)
    if store.exists():
        store.check_identity(identity)
        remove_stale_temps(store.root)
        for name, why in store.damaged().items():
            warnings.warn(f"{store.root / name} is damaged ({why}); computing it again")
            store.forget(name)
    else:
        store.write_manifest({**identity, "family": family.name, "prefix_k": k, "photo_files": names,
                              "class_photo_files": [], "shard_size": cfg.shard_size,
                              "num_shards": math.ceil(cfg.num_samples / cfg.shard_size), "plan": plan.to_dict(),
                              "samples": sample_table(len(names), cfg, scheduler, photo_prompts), "done_shards": []})
    manifest = store.manifest()
    table, size, done = manifest["samples"], manifest["shard_size"], store.done_shards()
    todo = {i: table[i * size : (i + 1) * size] for i in range(manifest["num_shards"]) if i not in done}
    if not (store.root / "prompts.safetensors").exists():
        save_tensors(store.root / "prompts.safetensors", family.encode_prompts(model_dir, prompts, dtype, cfg.device, meter))
        store.record("prompts.safetensors")
        release_memory()
    if not (store.root / "latents.safetensors").exists():
        latents = encode_photos(model_dir, pixels, cfg.seed, family.vae_dtype(dtype), cfg.device, cfg.batch_size, meter)
        save_tensors(store.root / "latents.safetensors", {"latents": latents})
        store.record("latents.safetensors")
    latents, cond = store.tensors("latents.safetensors")["latents"], store.tensors("prompts.safetensors")
    if todo:
        net, _ = load_part(model_dir, k, "prefix", dtype=dtype, device=cfg.device)
        with tqdm(total=len(table), initial=len(table) - sum(map(len, todo.values())), desc="pre-compute (prefix)",
                  unit="sample", disable=None) as bar:
            for shard, rows in todo.items():
                with meter.measure("transformer prefix", net):
                    tensors = make_shard(rows, latents, cond, net, k, dtype, cfg, bar)
                save_part(store, shard, tensors)
        del net
        release_memory()
    store.finish()  # the progress lines folded into manifest.json
    return PrecomputeResult(store=store.root, plan=plan, seconds=time.perf_counter() - t0, memory=meter.summary(),
                            resumed_shards=len(done))


# ------------------------------------------------------------------------------------------- stage 2


def stored_prefix(batch: dict, k: int, device, dtype) -> D.Prefix:
    """A store batch's :class:`dit_split.Prefix` (what blocks ``k..`` read)."""
    text = batch.get("encoder_hidden_states")
    return D.Prefix(k, batch["hidden_states"].to(device, dtype), text.to(device, dtype) if text is not None else None,
                    batch["temb"].to(device, dtype), tuple(batch["noisy"].shape[-2:]))


def predict(net, k: int | None, batch: dict, device, dtype=torch.float32) -> torch.Tensor:
    """The trained transformer's output (a velocity) for a batch of store samples: the suffix on the stored prefix.
    ``k=None`` is LoRA FT (LoRA on every block): the whole transformer on the samples' noisy latents and prompt
    tensors, as diffusers' SD3 script runs it; ``hollownet plan`` predicts it, ``train`` refuses it for SD3 yet."""
    if k is None:
        return net(hidden_states=batch["noisy"].to(device, dtype), encoder_hidden_states=batch["embeds"].to(device, dtype),
                   pooled_projections=batch["pooled_projections"].to(device, dtype),
                   timestep=batch["timestep"].to(device)).sample
    return D.run_suffix(net, stored_prefix(batch, k, device, dtype))


def batch_loss(net, k: int | None, batch: dict, device, dtype=torch.float32) -> torch.Tensor:
    """The flow-matching loss of a batch (``flow.flow_loss``: diffusers' SD3 script's, per-sample weights included)."""
    pred = predict(net, k, batch, device, dtype)
    return flow.flow_loss(pred, batch["noisy"].to(device), batch["sigma"].to(device), batch["target"].to(device),
                          batch["loss_weight"].to(device), batch["weight"].to(device))


def build_suffix(model_dir: Path, k: int, cfg: TrainConfig):
    """The suffix (blocks ``k..``, output layers; the prefix never read) with its LoRA: ``(net, trainable params)``."""
    net, _ = load_part(model_dir, k, "suffix", dtype=torch.float32, device=cfg.device)
    if cfg.modes.checkpointing:
        net.enable_gradient_checkpointing()
    add_suffix_lora(net, k, cfg.rank, alpha=cfg.lora_alpha, targets=tuple(cfg.lora_targets))
    return net, [p for p in net.parameters() if p.requires_grad]


def lora_info(cfg: TrainConfig, manifest: dict, plan: PrefixPlan) -> dict:
    """``hollownet.json`` beside the LoRA: what it was trained on, and how."""
    return {"format": "hollownet-lora/1", "family": manifest["family"], "base_model": manifest["model"],
            "model_fingerprint": manifest["model_fingerprint"], "method": cfg.method, "prefix_k": plan.k,
            "hollow_blocks": manifest["hollow_blocks"], "plan": plan.to_dict(), "rank": cfg.rank,
            "lora_alpha": cfg.lora_alpha or cfg.rank, "lora_targets": list(cfg.lora_targets),
            "trainable_params": plan.lora_params, "resolution": manifest["resolution"], "prompt": manifest["prompts"][0],
            "prediction_type": manifest["prediction_type"],
            "training": {"lr": cfg.lr, "steps": cfg.steps, "batch": cfg.batch, "seed": cfg.seed,
                         "max_grad_norm": cfg.max_grad_norm, **cfg.modes.stage2()}}


def run_dit_train(cfg: TrainConfig, on_step=None) -> TrainResult:
    """Stage 2 + export for an SD3 store; ``on_step(step, losses, memory)`` as ``train.run_train``'s (a true
    return saves a checkpoint and stops)."""
    check_settings(cfg)
    t0 = time.perf_counter()
    model_dir = resolve_model_dir(cfg.model)
    folder_family(model_dir)
    store = Store(cfg.store)
    manifest = store.manifest()
    if not store.is_complete():
        raise HollownetError(f"the store in '{store.root}' is incomplete; run pre-compute again to finish it")
    if manifest.get("prediction_type") != OBJECTIVE or "prefix_k" not in manifest:
        raise HollownetError(f"the store in '{store.root}' was not made for an SD3 transformer; use a new --output")
    if manifest["model_fingerprint"] != model_fingerprint(model_dir):
        raise HollownetError(f"the store in '{store.root}' was made from another model; use a new --output folder")
    k = manifest["prefix_k"]
    plan = make_prefix_plan(meta_transformer(load_transformer_config(model_dir)), k, rank=cfg.rank,
                            lora_targets=tuple(cfg.lora_targets))
    torch.manual_seed(cfg.seed)
    net, params = build_suffix(model_dir, k, cfg)
    optimizer = make_optimizer(params, cfg.modes.optimizer, cfg.lr, cfg.max_grad_norm)
    out = Path(cfg.output)
    ckpt_dir, settings = out / "checkpoints", checkpoint_settings(cfg, manifest)
    if cfg.resume:
        start, losses = load_checkpoint(ckpt_dir, net, params, optimizer, settings=settings, steps=cfg.steps)
    else:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        start, losses = 0, []
    keys = SAMPLE_KEYS + PREFIX_KEYS
    memory = None
    net.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="train (hollow, SD3)", unit="step", disable=None)
    t_loop = time.perf_counter()
    for step in bar:
        batch = store.samples(batch_indices(step, cfg.batch, manifest["num_samples"]), keys=keys)
        tracker = MemoryTracker(device=cfg.device).add_resident(net, optimizer) if step - start < cfg.track_memory_steps else None
        loss = train_step(net, k, batch, params, optimizer, cfg, tracker)
        if tracker is not None and (memory is None or tracker.report.peak_bytes >= memory["peak_bytes"]):
            memory = tracker.report.to_dict()
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if not math.isfinite(loss):
            raise HollownetError(nan_loss_advice(loss, step, start, batch, store.root, ckpt_dir))
        stop = on_step is not None and bool(on_step(step + 1, losses, memory)) and step + 1 < cfg.steps
        if stop or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps):
            save_checkpoint(ckpt_dir, step + 1, net, params, optimizer, losses, settings)
        if stop:
            raise TrainingStopped(f"stopped at step {step + 1} of {cfg.steps}; the checkpoint is kept: resume to continue")
    bar.close()
    train_seconds = time.perf_counter() - t_loop
    if cfg.lora_format == "both":
        warnings.warn("SD3: only the diffusers LoRA file is written (ComfyUI reads its transformer.… keys); "
                      "no kohya file")
    save_sd3_lora(net, out)
    save_json(out / INFO_FILE, lora_info(cfg, manifest, plan))
    return TrainResult(output=out, losses=losses, seconds=time.perf_counter() - t0, plan=plan, memory=memory,
                       start_step=start, train_seconds=train_seconds)


def train_step(net, k: int, batch: dict, params, optimizer, cfg: TrainConfig, tracker=None) -> float:
    """forward, backward, clip, AdamW (phases marked for the memory tracker when one is given)."""
    phase = tracker.phase if tracker is not None else (lambda name: nullcontext())
    with tracker if tracker is not None else nullcontext():
        with phase("forward"):
            loss = batch_loss(net, k, batch, cfg.device, torch_dtype(cfg.modes.compute))  # fp32: all train runs yet
        with phase("backward"):
            loss.backward()
        with phase("optimizer"):
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return loss.item()
