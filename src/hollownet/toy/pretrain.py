"""Pretrain the bundled toy text-to-image model from scratch on a CPU (the committed weights' recipe).

    python -m hollownet.toy.pretrain --output src/hollownet/toy/model      # ~45 min on 2 cores

Four parts, in order, each seeded:
  1. tokenizer: CLIP BPE whose merges make every world word (and ``sks``...) one token;
  2. VAE (``AutoencoderKL``, 4x16x16 latents for 64 px) on broad images (70%: any colour, polygons,
     stripes, gradients, noise) and world renders (30%), with a deterministic encoder (posterior
     logvar fixed at -30 after training, so stage 1's posterior *sample* is the mean the U-Net saw);
  3. text encoder (``CLIPTextModel``, 2 layers, width 64) and U-Net (SD's block layout) jointly on
     captioned world renders: v-prediction, cosine schedule, 15% empty captions (for guidance);
  4. the toy evaluator (``hollownet.toy.evaluator``) on world renders only; a continued run
     (``--unet-from``) keeps the continued model's evaluator, so its scores stay comparable.
Writes a ``StableDiffusionPipeline`` folder in fp16 safetensors plus ``evaluator.safetensors`` and
``pretrain.json`` (command, seeds, time taken, loss log).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from hollownet.tiny import byte_vocab
from hollownet.toy.evaluator import save_evaluator, train_evaluator
from hollownet.toy import world as W

MAX_TOKENS = 16  # captions are at most 9 tokens with start/end

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32, sample_size=64,
    block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    mid_block_add_attention=False,  # 2.5x faster steps on a CPU; 64 px needs no global attention
)
UNET_CONFIG = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=16,
    # a global text path (attention-pooled text added to the time embedding): the stock pipeline drives it
    addition_embed_type="text", addition_embed_type_num_heads=4,
)
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                        timestep_spacing="trailing", clip_sample=False)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- 1. tokenizer


def bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one lower-case word: end-of-word marker on the last symbol, lowest rank first."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), math.inf), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == math.inf:
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def save_toy_tokenizer(folder: Path):
    """A CLIPTokenizer over the byte symbols plus the world's words, each word one token."""
    from transformers import CLIPTokenizer


    vocab, _ = byte_vocab()
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in W.vocabulary():
        while len(pieces := bpe_pieces(word, ranks)) > 1:  # join the pieces left to right, lowest rank
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer.from_pretrained(folder, model_max_length=MAX_TOKENS)
    for word in W.vocabulary():
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, ids)  # the reason this tokenizer exists
    tok.save_pretrained(folder)
    return tok


# ----------------------------------------------------------------------------- 2. VAE


def broad_batch(rng: random.Random, n: int) -> torch.Tensor:
    images = [W.random_image(rng) if rng.random() < 0.7 else W.render(W.random_scene(rng)) for _ in range(n)]
    return torch.from_numpy(W.to_array(images))


def train_vae(minutes: float, seed: int, history: list, init: Path | None = None):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = AutoencoderKL.from_pretrained(init, torch_dtype=torch.float32) if init else AutoencoderKL(**VAE_CONFIG)
    log(f"VAE: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params, {minutes} min")
    pool = broad_batch(rng, 12000)  # drawn once (rendering is slower than a step), flipped and rotated per batch
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < minutes * 60:
        lr = 1e-3 * min(1, (step + 1) / 100) * (0.1 if time.perf_counter() - t0 > minutes * 60 * 0.85 else 1)
        for g in opt.param_groups:
            g["lr"] = lr
        # 32 px crops: the VAE is convolutional (no attention), so crops teach it the same at 1/4 the cost
        i, j = random.Random(step).randrange(33), random.Random(-step).randrange(33)
        x = pool[torch.randint(len(pool), (32,))][..., i:i + 32, j:j + 32]
        x = x.flip(-1) if step % 2 else x
        x = x.transpose(-1, -2).contiguous() if step % 3 == 0 else x.contiguous()
        z = vae.encode(x).latent_dist.mean
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            history.append({"part": "vae", "step": step, "s": round(time.perf_counter() - t0, 1), "loss": round(loss.item(), 5)})
            log(f"VAE step {step} loss {loss.item():.4f}")
        step += 1
    # a deterministic encoder: the posterior's logvar is -30 for every input (std 3e-7)
    with torch.no_grad():
        half = vae.config.latent_channels
        vae.quant_conv.weight[half:] = 0
        vae.quant_conv.bias[half:] = -30.0
    return vae.eval().requires_grad_(False), step


def psnr(vae, images: torch.Tensor) -> float:
    with torch.no_grad():
        rec = vae.decode(vae.encode(images).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss((rec + 1) / 2, (images + 1) / 2).item()
    return 10 * math.log10(1 / mse)


# ----------------------------------------------------------------------------- 3. text encoder + U-Net


def world_dataset(rng: random.Random, n: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [W.random_scene(rng) for _ in range(n)]
    captions = [s.caption(short=rng.random() < W.SHORT_CAPTION_RATE) for s in scenes]
    return torch.from_numpy(W.to_array([W.render(s) for s in scenes])), captions


def train_unet(vae, tok, minutes: float, seed: int, history: list, samples: int = 16000, batch: int = 32,
               init: Path | None = None):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    rng = random.Random(seed + 1)
    images, captions = world_dataset(rng, samples)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    scaling = 1.0 / latents.std().item()
    latents = latents * scaling
    log(f"{samples} world latents, std before scaling {1 / scaling:.3f} (scaling_factor {scaling:.4f})")
    ids = tok(captions, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids
    empty = tok([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]

    if init:  # continue an earlier run (same VAE: pass --vae-from INIT/vae --vae-minutes 0)
        text_encoder = CLIPTextModel.from_pretrained(init / "text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(init / "unet", torch_dtype=torch.float32)
    else:
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                                    eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                                    **TEXT_CONFIG))
        unet = UNet2DConditionModel(**UNET_CONFIG)
    sched = DDPMScheduler(**SCHEDULER_CONFIG)
    log(f"U-Net {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M, text encoder "
        f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.2f}M params, {minutes} min")
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    acp = sched.alphas_cumprod
    t0, step, budget = time.perf_counter(), 0, minutes * 60
    while (elapsed := time.perf_counter() - t0) < budget:
        frac = elapsed / budget  # warm-up, then cosine decay to 10% over the time budget
        lr = 1e-3 * min(1, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(latents), (batch,))
        x0, tid = latents[idx], ids[idx].clone()
        tid[torch.rand(batch) < 0.15] = empty
        noise = torch.randn_like(x0)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch,))
        a = acp[t].sqrt().view(-1, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(-1, 1, 1, 1)
        noisy, target = a * x0 + s * noise, a * noise - s * x0  # v-prediction
        pred = unet(noisy, t, text_encoder(tid)[0]).sample
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 50 == 0:
            history.append({"part": "unet", "step": step, "s": round(elapsed, 1), "loss": round(loss.item(), 5)})
            log(f"U-Net step {step} loss {loss.item():.4f} lr {lr:.2e}")
        step += 1
    return unet.eval().requires_grad_(False), text_encoder.eval().requires_grad_(False), sched, scaling, step


# ----------------------------------------------------------------------------- 4. evaluator


def evaluator_source(evaluator_from: Path | None, unet_from: Path | None) -> Path | None:
    """The evaluator to keep instead of training one: ``--evaluator-from``, else the continued model's.

    The evaluator is the ruler, trained on world renders only and independent of the U-Net: a new one
    (its steps depend on the CPU's load) would move every published score for no change in the model."""
    if evaluator_from:
        return evaluator_from
    kept = unet_from / "evaluator.safetensors" if unet_from else None
    return kept if kept and kept.is_file() else None


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", required=True, help="folder to write the pipeline to")
    p.add_argument("--vae-minutes", type=float, default=14.0)
    p.add_argument("--vae-from", type=Path, help="start the VAE from this vae/ folder (e.g. an earlier run's)")
    p.add_argument("--unet-minutes", type=float, default=35.0)
    p.add_argument("--unet-from", type=Path, help="continue the U-Net and text encoder of this pipeline folder")
    p.add_argument("--evaluator-minutes", type=float, default=2.0)
    p.add_argument("--evaluator-from", type=Path,
                   help="keep this evaluator.safetensors (default when continuing: --unet-from's) instead of training one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers import StableDiffusionPipeline


    out = Path(args.output)
    t_start = time.perf_counter()
    history: list[dict] = []
    tok = save_toy_tokenizer(out / "tokenizer")
    vae, vae_steps = train_vae(args.vae_minutes, args.seed, history, args.vae_from)
    vae.save_pretrained(out / "vae")  # kept at fp32 until the end: a later run can start from it (--vae-from)
    rng = random.Random(12345)  # held-out sets
    world_psnr = psnr(vae, torch.from_numpy(W.to_array([W.render(W.random_scene(rng)) for _ in range(128)])))
    subject_psnr = {n: round(psnr(vae, torch.from_numpy(W.to_array(W.subject_photos(n, 8, seed=99)))), 2) for n in W.SUBJECTS}
    log(f"VAE held-out PSNR: world {world_psnr:.2f} dB, novel subjects {subject_psnr}")
    unet, text_encoder, sched, scaling, unet_steps = train_unet(vae, tok, args.unet_minutes, args.seed, history,
                                                              init=args.unet_from)
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    kept = evaluator_source(args.evaluator_from, args.unet_from)
    if kept:
        shutil.copyfile(kept, out / "evaluator.safetensors")
        eval_log = {"kept_from": str(kept)}
    else:
        evaluator, eval_log = train_evaluator(args.evaluator_minutes, args.seed)
        save_evaluator(evaluator, out / "evaluator.safetensors")
    record = {
        "command": "python -m hollownet.toy.pretrain " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed, "threads": args.threads, "minutes": round((time.perf_counter() - t_start) / 60, 1),
        "vae": {"steps": vae_steps, "from": str(args.vae_from) if args.vae_from else None, "psnr_world_db": round(world_psnr, 2), "psnr_subjects_db": subject_psnr},
        "unet": {"steps": unet_steps, "from": str(args.unet_from) if args.unet_from else None, "batch": 32, "scaling_factor": scaling},
        "evaluator": eval_log, "torch": torch.__version__, "loss_log": history,
    }
    source = args.unet_from or (args.vae_from.parent if args.vae_from else None)
    earlier = source / "pretrain.json" if source else None
    if earlier and earlier.is_file():  # a continued run keeps the record of the run it continued
        record["continued_from"] = json.loads(earlier.read_text())
    (out / "pretrain.json").write_text(json.dumps(record, indent=1))
    log(f"done in {record['minutes']} min: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
