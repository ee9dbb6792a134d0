"""The ``hollownet`` command: parses arguments and calls the Python API, nothing more.

The flags of ``train`` and ``plan`` are the fields of ``workflow.TrainRequest`` /
``memory.planner.PlanRequest`` and ``settings.Modes``, under the same names (``--lora-alpha`` is
``lora_alpha``): their defaults are read from the dataclasses (:func:`_default`), and the requests
are made from the parsed flags by name (:func:`_request`); tests/test_cli.py checks both ways.
Each command imports what it runs inside its function, marked ``# lazy``: ``hollownet --help``
must not load torch (seconds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import warnings

from hollownet.app import add_app_parser, cmd_app
from hollownet.errors import HollownetError
from hollownet.memory.sizes import SIZE_HELP
from hollownet.paths import preflight_paths
from hollownet.requests import PlanRequest, TrainRequest
from hollownet.settings import (ALL_OPTIMIZERS, COMPUTE_DTYPE_HELP, FLOAT_PRECISIONS, LOW_MEMORY_STAGE1_BUDGET, METHODS,
                                OPTIMIZERS, PRECISIONS, SD_DEFAULTS, TOY_DEFAULTS, LORA_TARGET_GROUPS, Modes,
                                DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, DEFAULT_IDENTIFIER, DEFAULT_LORA_FORMAT,
                                DEFAULT_SCHEDULER, LORA_FORMATS, SCHEDULERS)
from hollownet.toy import is_toy
from hollownet.trainmany import add_executor_flags, add_train_many_parser, cmd_train_many, executor_from_args



def _default(cls, name: str):
    """The default of field ``name`` of the dataclass ``cls`` (the one place it is written)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _by_model(key: str) -> str:
    """Help text for a default that depends on the base model (settings.model_defaults)."""
    say = lambda v: ",".join(v) if isinstance(v, tuple) else v  # noqa: E731
    return f"default {say(SD_DEFAULTS[key])}; {say(TOY_DEFAULTS[key])} with --model toy"


LORA_TARGETS_HELP = ("layers that get LoRA: groups " + ", ".join(f"{g} ({','.join(v)})" for g, v in LORA_TARGET_GROUPS.items() if g != "all")
                     + ", all; or layer-name suffixes; comma-separated (" + _by_model("lora_targets").replace("%", "%%") + ")")


def _request(cls, args, **given):
    """``cls`` made from the parsed flags of the same names (a flag left unset: the field's default),
    its ``modes`` from the modes' flags, and ``given`` (every run command: tests/test_cli.py checks the
    flags are the fields)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in given}
    if "modes" in fields:
        given["modes"] = Modes(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Modes) if hasattr(args, f.name)})
    required = {n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    values = {n: getattr(args, n) for n in fields if getattr(args, n, None) is not None or n in required}
    return cls(**values, **given)

EPILOG_TRAIN = """\
examples:
  hollownet train --model ./sd21 --images ./my_dog --prompt "a photo of sks dog" --output runs/dog
  hollownet train ... --hollow 0.5                   # hollow ~50% of the U-Net (nearest valid cut)
  hollownet train ... --precision bf16 --grad-checkpointing   # half the memory, full-precision LoRA
  hollownet train ... --precision nf4 --grad-checkpointing --optimizer adamw-in-backward   # least memory (QLoRA-style)
  hollownet train ... --stream-weights --optimizer adamw-in-backward   # unquantized weights, ~one block resident
  hollownet train ... --method lora                  # the plain-LoRA baseline, for comparison
  hollownet train ... --no-resume                    # start stage 2 over instead of continuing it

Stage 1 (pre-compute) writes OUTPUT/store and stage 2 OUTPUT/checkpoints; rerun with the same
settings, both resume by themselves (after a crash, Ctrl-C or a full disk).
With --precision int8|nf4 stage 1 runs the original weights in the compute dtype (by default bf16
where the device has it natively, else fp32; train.json records which).
'hollownet plan' with the same flags predicts the peak memory of both stages before you start.
Stage 2 writes OUTPUT/pytorch_lora_weights.safetensors (loadable with diffusers'
load_lora_weights), OUTPUT/pytorch_lora_weights_kohya.safetensors (ComfyUI, Forge, AUTOMATIC1111;
see --format), OUTPUT/hollownet.json and OUTPUT/train.json (settings, timings, peak memory).
"""

EPILOG_GENERATE = """\
examples:
  hollownet generate --model ./sd21 --lora runs/dog --prompt "a sks dog on the beach" --output out/beach
  hollownet generate ... --merged          # one U-Net pass per step, LoRA fused (cheaper, approximate)

Default is the paper's two-path inference: per denoising step the original U-Net (LoRA off) runs up
to the hollow's output and the LoRA layers run from it, exactly the function that was trained.
"""


def _add_model_and_cut(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", required=True, help=model_help)
    p.add_argument("--method", choices=METHODS, default="hollow",
                   help="hollow: Hollowed Net (default); lora / full: the paper's baselines")
    cut = p.add_mutually_exclusive_group()
    cut.add_argument("--hollow", type=float, metavar="FRACTION",
                     help="fraction of U-Net parameters to hollow; the nearest skip-symmetric cut is used "
                          "(default: the cut nearest the paper's 0.39: its own cut on SD 1.x/2.x, 0.47 on SDXL)")
    cut.add_argument("--hollow-blocks", type=lambda s: [b for b in s.split(",") if b], metavar="B1,B2,...",
                     help="the cut by name, e.g. down_blocks.3,mid_block,up_blocks.0")
    p.add_argument("--rank", type=int, help=f"LoRA rank ({_by_model('rank')})")
    p.add_argument("--resolution", type=int, help=f"training resolution in pixels ({_by_model('resolution')})")
    p.add_argument("--batch", type=int, help=f"samples per step ({_by_model('batch')})")
    p.add_argument("--precision", choices=PRECISIONS, default=_default(Modes, "precision"),
                   help="storage of the frozen weights: fp32, bf16, fp16, or int8 / nf4 quantized (QLoRA-style, "
                        "computed in --compute-dtype; --method hollow or lora). LoRA always trains in fp32 (default fp32)")
    p.add_argument("--compute-dtype", choices=FLOAT_PRECISIONS,
                   help="with --precision int8|nf4: dtype the weights are dequantized to and activations use "
                        f"(default: {COMPUTE_DTYPE_HELP}; recorded in train.json)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward: less memory, ~30%% slower")
    p.add_argument("--stream-weights", action="store_true",
                   help="--method hollow: keep the kept layers' frozen weights in the checkpoint file on disk and read "
                        "each block only while it runs (about one block resident; turns on --grad-checkpointing; slower)")
    p.add_argument("--layer-major", action=argparse.BooleanOptionalAction, default=None,
                   help="pre-compute one layer at a time over all samples (stage 1 peak: one layer + a chunk of "
                        "activations). Default: on with --precision int8|nf4 or --stream-weights where the "
                        f"sample-major stage 1 would exceed {LOW_MEMORY_STAGE1_BUDGET} (the planner predicts it), off otherwise")
    p.add_argument("--memory-budget", metavar="SIZE",
                   help=f"layer-major pre-compute: {SIZE_HELP}, e.g. 700MiB; activations beyond it spill to disk "
                        f"(default {LOW_MEMORY_STAGE1_BUDGET} when layer-major is on by default, none otherwise)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hollownet",
        description="Personalize Stable Diffusion on your own photos with Hollowed Net: a LoRA trained "
                    "on-device in about the memory inference needs, with the photos never leaving the machine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Start with 'hollownet demo' (offline, the bundled toy model, a few minutes on a CPU). 'hollownet COMMAND --help' for details.",
    )
    parser.add_argument("--version", action="version", version=f"hollownet {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("train", help="personalize: pre-compute, fine-tune, export a LoRA",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_TRAIN)
    _add_model_and_cut(t, "base model: a diffusers folder or a hub id (SD 1.x / 2.x, eps or v prediction; SDXL folders)")
    t.add_argument("--images", required=True, help="folder of 3-6 photos of your subject (JPEG/PNG/WebP)")
    t.add_argument("--prompt", required=True, help='instance prompt with a rare identifier, e.g. "a photo of sks dog"')
    t.add_argument("--output", required=True, help="output folder (LoRA, records, store, checkpoints)")
    t.add_argument("--steps", type=int, help=f"training steps ({_by_model('steps')})")
    t.add_argument("--lr", type=float, help=f"AdamW learning rate ({_by_model('lr')})")
    t.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: = rank)")
    t.add_argument("--lora-targets", type=lambda s: s.split(","), default=None, help=LORA_TARGETS_HELP)
    t.add_argument("--seed", type=int, default=_default(TrainRequest, "seed"),
                   help="seed of the noise, timesteps and LoRA init (default %(default)s)")
    t.add_argument("--num-samples", type=int, help="pre-computed samples (default steps x batch: fresh noise every step)")
    t.add_argument("--class-prompt", help='prior preservation: class prompt, e.g. "a photo of dog"')
    t.add_argument("--class-images", help="prior preservation: folder of class images")
    t.add_argument("--prior-loss-weight", type=float, default=_default(TrainRequest, "prior_loss_weight"),
                   help="prior preservation: weight of the class images' loss (default %(default)s)")
    t.add_argument("--checkpoint-every", type=int, default=_default(TrainRequest, "checkpoint_every"),
                   help="steps between resumable checkpoints (default %(default)s)")
    resume = t.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_true", default=True,
                        help="continue from the newest checkpoint in OUTPUT/checkpoints (the default; kept for scripts)")
    resume.add_argument("--no-resume", "--overwrite", dest="resume", action="store_false",
                        help="start stage 2 over, deleting OUTPUT/checkpoints (the store is still reused)")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default=_default(Modes, "optimizer"),
                   help="adamw (default), or adamw-in-backward: the same AdamW applied to each LoRA tensor as soon as "
                        "its gradient exists, which is then freed (no full set of gradients; clipping per tensor)")
    t.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, xpu (default: cuda, then mps, then cpu)")
    _add_memory_check(t)
    _add_format(t)
    _add_watch(t)

    g = sub.add_parser("generate", help="generate images with a trained LoRA",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_GENERATE)
    g.add_argument("--model", required=True, help="the base model the LoRA was trained on")
    g.add_argument("--lora", help="output folder of 'hollownet train' (omit for the base model)")
    g.add_argument("--step", type=int, help="with --lora: its snapshot at this step (train --save-every) instead of the final LoRA")
    g.add_argument("--prompt", required=True, help='what to draw, with the identifier, e.g. "a sks dog on the beach"')
    g.add_argument("--output", required=True, help="folder for PNGs, manifest.json and generate.json")
    g.add_argument("--steps", type=int, help=f"denoising steps ({_by_model('gen_steps')})")
    g.add_argument("--resolution", type=int, help="image size (default: the training resolution)")
    g.add_argument("--guidance", type=float, help=f"classifier-free guidance scale ({_by_model('guidance')})")
    g.add_argument("--negative-prompt", help="what to steer away from, e.g. \"blurry, low quality\"")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    g.add_argument("--num-images", type=int, default=4, help="how many images (default 4)")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER, help="DPM-Solver++ (default), DDIM, or the model's own")
    g.add_argument("--merged", action="store_true", help="single path with the LoRA fused into the weights")
    g.add_argument("--precision", choices=PRECISIONS, default=_default(Modes, "precision"),
                   help="weights of the U-Net, text encoder and VAE decoder, as train's: fp32, bf16, fp16, or int8 / nf4 "
                        "quantized (computed in --compute-dtype; the LoRA stays unmerged in fp32; not with --merged). Default fp32")
    g.add_argument("--compute-dtype", choices=FLOAT_PRECISIONS,
                   help="with --precision int8|nf4: dtype the weights are dequantized to and activations use "
                        f"(default: {COMPUTE_DTYPE_HELP}; recorded in generate.json)")
    g.add_argument("--stream-weights", action="store_true",
                   help="as train's: the U-Net's blocks read from disk only while they run (all but the mid block; "
                        "text encoder and VAE decoder resident in --precision; slower; not with --merged)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, xpu (default: cuda, then mps, then cpu)")
    g.add_argument("--force", action="store_true",
                   help="load a LoRA whose hollownet.json names another base model (deliberate cross-model use)")
    _add_memory_check(g)

    epilog_plan = (
        "examples:\n"
        "  hollownet plan --model sd21 --rank 128                      # the paper's cut, fp32: stage peaks + breakdown\n"
        "  hollownet plan --model sd21 --precision bf16 --grad-checkpointing --json\n"
        "  hollownet plan --model ./my-sd15 --method lora --rank 4     # a diffusers folder: its configs only\n"
        "  hollownet plan --model sd21 --rank 128 --precision nf4 --grad-checkpointing --optimizer adamw-in-backward\n"
        "  hollownet plan --model sd21 --rank 128 --stream-weights --optimizer adamw-in-backward\n"
        "  hollownet plan --model sd21 --budget 2GB                    # which settings fit, best fidelity first\n"
        "  hollownet plan --model sd35m --rank 16 --hollow 0.6          # SD3.5 Medium: the prefix cut nearest 60%\n"
        "  hollownet plan --model sd35l --method lora --precision bf16 --grad-checkpointing   # LoRA FT (a prediction)\n\n"
        "Runs the trainer's own code on fake tensors (shapes only) and counts live tensor bytes exactly as\n"
        "'hollownet train' measures them. Inference = one U-Net denoising step without gradients (batch 1,\n"
        "and 2 for classifier-free guidance); text encoder and VAE not resident. Generation = 'hollownet generate'\n"
        "itself (text encoder, U-Net denoising with the CFG batch, VAE decoder, each in turn) in the same modes;\n"
        "the whole run is the largest of the three. A GPU adds its CUDA context, kernel workspaces and allocator\n"
        "caching on top.\n"
    )
    pl = sub.add_parser("plan", help="predict the memory of pre-compute, training, inference and generation (no weights, seconds)",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog_plan)
    _add_model_and_cut(pl, "sd15, sd21, sdxl, sd3m, sd35m, sd35l (bundled configs) or a diffusers folder (its configs only; "
                           "an SD3 folder: --hollow / --hollow-blocks name its prefix cut)")
    pl.add_argument("--lora-targets", type=lambda s: s.split(","), default=None, help=LORA_TARGETS_HELP)
    pl.add_argument("--optimizer", choices=ALL_OPTIMIZERS, default=_default(Modes, "optimizer"),
                    help="AdamW single-tensor (the trainer's; default), adamw-in-backward (as train's), or "
                         "adamw-foreach (torch's multi-tensor AdamW, its default on CUDA: larger step temporaries)")
    pl.add_argument("--steps", type=int, default=_default(PlanRequest, "steps"),
                    help="training steps: stage 1 stores steps x batch samples (default %(default)s)")
    pl.add_argument("--photos", type=int, default=_default(PlanRequest, "photos"), help="photos stage 1 encodes (default %(default)s)")
    pl.add_argument("--gen-steps", type=int, help=f"generation: denoising steps ({_by_model('gen_steps')})")
    pl.add_argument("--guidance", type=float, help=f"generation: guidance scale, > 1 = CFG batch 2 ({_by_model('guidance')})")
    pl.add_argument("--num-images", type=int, default=_default(PlanRequest, "num_images"),
                    help="generation: images in one run (default %(default)s)")
    pl.add_argument("--merged", action="store_true", help="generation: the LoRA fused, one U-Net pass (default two-path)")
    pl.add_argument("--device", default=None, help="the device the plan is for: with int8|nf4 it picks the compute dtype "
                                                   "(default: train's default device here)")
    pl.add_argument("--budget", metavar="SIZE",
                    help=f"which settings (cut, precision, checkpointing) fit in SIZE, {SIZE_HELP}; "
                         "ignores --method, --hollow, --precision, --grad-checkpointing, --stream-weights, --optimizer "
                         "(it tries them all, quantized and streamed weights included)")
    pl.add_argument("--top", type=int, default=5, help="with --budget: how many fitting settings to list, best first (0: all)")
    pl.add_argument("--json", action="store_true", help="print one JSON object (figures in bytes) instead of the table")

    e = sub.add_parser("eval", help="DINO, CLIP-I, CLIP-T of generated images against the real photos")
    e.add_argument("--generated", required=True, help="output folder of 'hollownet generate' (has manifest.json)")
    e.add_argument("--reference", required=True, help="folder of the subject's real photos")
    e.add_argument("--prompt", help="use this prompt for every image instead of the manifest's")
    e.add_argument("--identifier", default=DEFAULT_IDENTIFIER, help="subject token removed from prompts for CLIP-T (default %(default)s)")
    e.add_argument("--dino-model", default=DEFAULT_DINO_MODEL, help="DINO ViT (folder or hub id; default %(default)s)")
    e.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP model (folder or hub id; default %(default)s)")
    e.add_argument("--model", help="toy: score a run of the bundled toy model with the toy's own metrics (identity, "
                                   "background followed, ...) instead of DINO / CLIP, offline")
    e.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    e.add_argument("--device", default=None)

    d = sub.add_parser("demo", help="personalize a novel subject on the bundled toy model, offline; before/after sheet")
    d.add_argument("--output", default="hollownet-demo", help="folder for everything the demo writes (default ./hollownet-demo)")
    d.add_argument("--model", default="toy", help="toy (default: the bundled toy model) or a Stable Diffusion folder "
                                                  "(then the bundled dog photos at 512 px)")
    d.add_argument("--steps", type=int, help=f"training steps ({_by_model('steps')})")

    b = sub.add_parser("bench", help="benchmark methods on a DreamBooth / CustomConcept101 dataset, or the toy (the paper's table)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
examples:
  hollownet bench --model ./sd21 --dataset ../shared/data/dreambooth --output bench/db --methods hollow,lora,full:lr=5e-6
  hollownet bench ... --methods hollow,hollow@0.56,lora,lora:r=1 --seeds 0-2 --subjects dog,cat --prompts 5
  hollownet bench --model toy --dataset toy --output bench/toy --methods hollow:r=12,lora:r=12,full:lr=1e-4
                       # the bundled toy model and novel subjects, scored by the toy evaluator (toy figures)

method specs: NAME[@FRACTION][:KEY=VALUE...], NAME hollow|lora|full,
              KEY r|alpha|targets|lr|steps|weights|stream|opt|blocks|samples|infer
  hollow               the paper's cut          hollow@0.56     the valid cut nearest 56% of U-Net params
  hollow:blocks=down_blocks.3+mid_block+up_blocks.0             a cut by name
  lora, lora:r=1       plain LoRA (rank --rank unless r=)         full:lr=5e-6    full fine-tuning
  hollow:weights=nf4:opt=in-backward   train with nf4 frozen weights, AdamW inside backward
  hollow:stream=1      streamed frozen weights (train --stream-weights); generation always uses --precision
  lora:targets=attn+conv  LoRA on attention and resnet convs (groups attn|proj|ff|conv|all, or layer names)
  hollow:samples=100   stage 1 stores 100 samples, reused    hollow:infer=merged  generate with the LoRA fused
Each finished cell (subject x method x seed) is kept in OUTPUT/cells/.../result.json; rerunning the
same command skips finished cells and retries failed ones. Results: OUTPUT/summary.{md,json,png}.
""")
    b.add_argument("--model", required=True, help="base model: a diffusers folder or a hub id")
    b.add_argument("--dataset", required=True, help="benchmark folder: DreamBooth (prompts_and_classes.txt) or CustomConcept101 (dataset.json); toy: the bundled toy subjects (with --model toy)")
    b.add_argument("--output", required=True, help="folder for cells, summary.md/json/png")
    b.add_argument("--methods", default="hollow,lora", help="comma-separated method specs (default hollow,lora; see below)")
    b.add_argument("--seeds", default="0", help="e.g. 0,1,2 or 0-4 (default 0)")
    b.add_argument("--subjects", type=lambda s: [x for x in s.split(",") if x], help="comma-separated subject names (default all)")
    b.add_argument("--steps", type=int, help=f"training steps ({_by_model('steps')})")
    b.add_argument("--lr", type=float, help=f"learning rate ({_by_model('lr')})")
    b.add_argument("--rank", type=int, help=f"LoRA rank ({_by_model('rank')})")
    b.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: = rank)")
    b.add_argument("--resolution", type=int, help=f"training and generation resolution ({_by_model('resolution')})")
    b.add_argument("--batch", type=int, help=f"samples per step ({_by_model('batch')})")
    b.add_argument("--precision", choices=FLOAT_PRECISIONS, default=_default(Modes, "precision"))
    b.add_argument("--grad-checkpointing", action="store_true")
    b.add_argument("--images-per-prompt", type=int, default=4, help="generated images per evaluation prompt (default 4)")
    b.add_argument("--prompts", type=int, help="use the first N evaluation prompts of each subject (default all)")
    b.add_argument("--gen-steps", type=int, help=f"denoising steps per image ({_by_model('gen_steps')})")
    b.add_argument("--guidance", type=float, help=f"classifier-free guidance ({_by_model('guidance')})")
    b.add_argument("--scheduler", choices=SCHEDULERS, default=DEFAULT_SCHEDULER)
    b.add_argument("--identifier", default=DEFAULT_IDENTIFIER, help="subject token in the prompts (default %(default)s)")
    b.add_argument("--dino-model", default=DEFAULT_DINO_MODEL, help="DINO ViT (folder or hub id; default %(default)s)")
    b.add_argument("--clip-model", default=DEFAULT_CLIP_MODEL, help="CLIP model (folder or hub id; default %(default)s)")
    b.add_argument("--keep", choices=("weights", "all", "results"), default="weights",
                   help="after a cell: weights = delete the pre-compute store (default), all = keep everything, "
                        "results = keep only result.json")
    b.add_argument("--summarize-only", action="store_true", help="run nothing; rebuild the summary from finished cells")
    b.add_argument("--device", default=None)
    _add_format(b)
    add_executor_flags(b)  # issue 16: cells as jobs, here or on Ray
    add_train_many_parser(sub)

    c = sub.add_parser("convert", help="rewrite a LoRA file in the kohya (ComfyUI, Forge, A1111) or diffusers layout",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
examples:
  hollownet convert runs/dog runs/dog/pytorch_lora_weights_kohya.safetensors        # diffusers -> kohya
  hollownet convert my_lora_kohya.safetensors out/ --to diffusers                    # kohya -> diffusers

IN is a .safetensors LoRA or a LoRA folder (hollownet, diffusers or kohya layout, U-Net layers only).
OUT is a file, or a folder (then pytorch_lora_weights[_kohya].safetensors in it). Every module's alpha is
kept, and the written file is read back and compared: the printed max |dW| is 0 for a lossless conversion.
""")
    c.add_argument("input", metavar="IN", help="LoRA file or folder")
    c.add_argument("output", metavar="OUT", help="output file or folder")
    c.add_argument("--to", choices=("kohya", "diffusers"), help="target layout (default: the other one)")

    a = sub.add_parser("analyze", help="layer significance: size of a plain LoRA's update per U-Net block",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""\
examples:
  hollownet analyze runs/dog_lora runs/cat_lora --output sig        # LoRAs of 'hollownet train --method lora'
  hollownet analyze runs/dog_lora --level unit --output sig          # per resnets.i / attentions.i
  hollownet analyze --train --model ./sd21 --images ./my_dog --prompt "a photo of sks dog" --output sig

Per block: mean |dW| and ||dW||_F/sqrt(numel) of dW = (alpha/rank) B A, in U-Net order, averaged
over the LoRA folders given. Writes OUTPUT/significance.{md,json,png}.
""")
    a.add_argument("loras", nargs="*", metavar="LORA", help="LoRA folders (or .safetensors files), e.g. one per subject")
    a.add_argument("--output", required=True, help="folder for significance.md/json/png (and the --train LoRA)")
    a.add_argument("--level", choices=("block", "unit", "layer"), default="block", help="granularity (default block)")
    a.add_argument("--train", action="store_true", help="first train a plain LoRA (--method lora) with the flags below")
    a.add_argument("--model", help="--train: base model")
    a.add_argument("--images", help="--train: folder of the subject's photos")
    a.add_argument("--prompt", help='--train: instance prompt, e.g. "a photo of sks dog"')
    a.add_argument("--steps", type=int, help=f"--train: training steps ({_by_model('steps')})")
    a.add_argument("--rank", type=int, help=f"--train: LoRA rank ({_by_model('rank')})")
    a.add_argument("--lr", type=float, help=f"--train: learning rate ({_by_model('lr')})")
    a.add_argument("--resolution", type=int, help=f"--train: resolution ({_by_model('resolution')})")
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--precision", choices=FLOAT_PRECISIONS, default=_default(Modes, "precision"))
    a.add_argument("--device", default=None)
    for p in (t, g, e, d, b, a):
        p.add_argument("--verbose", action="store_true", help="show the libraries' logs, progress bars and warnings")
    add_app_parser(sub)
    return parser


def _add_watch(t: argparse.ArgumentParser) -> None:
    """train's flags for watching a run (stages/watch.py)."""
    w = t.add_argument_group("watching the run")
    w.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="a LoRA snapshot every N steps in OUTPUT/snapshots/step-XXXX (generate --step XXXX uses one)")
    w.add_argument("--validate-every", type=int, metavar="N", help="loss on held-out samples every N steps (default: "
                   "with --sample-every, else a tenth of the steps; 0: never); the lowest is named at the end")
    w.add_argument("--sample-every", type=int, default=0, metavar="N",
                   help="images every N steps and at the end in OUTPUT/samples, one row per step in samples/sheet.png")
    w.add_argument("--sample-prompt", dest="sample_prompts", action="append", metavar="P",
                   help="a sample prompt (repeatable; default: the instance prompt in a context the photos do not show)")
    w.add_argument("--sample-seed", type=int, default=0, metavar="S", help="the samples' noise seed, the same every row (default 0)")
    w.add_argument("--sample-steps", type=int, metavar="N", help=f"the samples' denoising steps ({_by_model('gen_steps')})")
    w.add_argument("--sample-guidance", type=float, metavar="G", help=f"the samples' guidance scale ({_by_model('guidance')})")
    w.add_argument("--log-every", type=int, default=0, metavar="N", help="where no progress bar is drawn (stderr not a "
                   "terminal: nohup, CI): a line on stderr every N steps (default: about 20 a run) and at least every 30 s")


def _add_memory_check(p: argparse.ArgumentParser) -> None:
    # not --force: generate's --force already means "a LoRA of another base model", a different risk
    p.add_argument("--ignore-memory-check", action="store_true",
                   help="run even where the planner predicts more memory than the device has available (a request "
                        "that large is otherwise refused before anything loads, naming the settings that fit)")


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", dest="lora_format", choices=LORA_FORMATS, default=DEFAULT_LORA_FORMAT,
                   help="LoRA file(s) to write: diffusers = pytorch_lora_weights.safetensors (diffusers' load_lora_weights), "
                        "kohya = pytorch_lora_weights_kohya.safetensors (ComfyUI, Forge, AUTOMATIC1111); default both")


def _version() -> str:
    from hollownet import __version__  # lazy

    return __version__


def _device(name: str | None, precision: str | None = None) -> str:
    from hollownet.devices import check_dtype, resolve_device  # lazy

    device = resolve_device(name)  # checked before anything loads
    if precision:
        check_dtype(device, precision)
    return device


def cmd_train(args) -> int:
    from hollownet.signals import exit_code  # lazy
    from hollownet.stages.train import TrainingStopped  # lazy
    from hollownet.workflow import personalize  # lazy

    stops = getattr(args, "stops", None)  # Ctrl-C / SIGTERM in stage 2: a checkpoint of the last step, then stop
    try:
        record = personalize(_request(TrainRequest, args, device=_device(args.device, args.precision)),
                             on_step=stops.on_step if stops else None)
    except TrainingStopped as e:
        if stops is None or stops.signum is None:
            raise
        print(f"hollownet train: {signal.Signals(stops.signum).name}: {e}", file=sys.stderr)
        return exit_code(stops.signum)
    print(record["summary"])
    return 0


def cmd_generate(args) -> int:
    from hollownet.memory.machine import check_generate  # lazy
    from hollownet.stages.generate import GenerateConfig, run_generate  # lazy

    record = run_generate(_request(GenerateConfig, args, device=_device(args.device, args.compute_dtype or args.precision)),
                          memory_check=check_generate)
    print(f"{len(record['images'])} images ({record['mode']}, {record['seconds_per_image']:.2f} s each) in {args.output}")
    return 0


def cmd_plan(args) -> int:
    from hollownet.memory.budget import fit_budget  # lazy
    from hollownet.memory.planner import plan_memory  # lazy
    from hollownet.memory.sizes import parse_size  # lazy

    req = _request(PlanRequest, args)
    if args.budget:
        budget = parse_size(args.budget, "--budget")
        tick = (lambda c: print(".", end="", file=sys.stderr, flush=True)) if sys.stderr.isatty() and not args.json else None
        answer = fit_budget(req, budget, top=max(0, args.top), progress=tick)
        if tick:
            print(file=sys.stderr)
        print(json.dumps(answer.to_json()) if args.json else answer.format())
        return 0
    result = plan_memory(req)
    print(json.dumps(result.to_json()) if args.json else result.format())
    return 0


def cmd_eval(args) -> int:
    if args.model is not None:
        return _eval_toy(args)
    from hollownet.evaluation.metrics import evaluate_folder, format_markdown  # lazy

    result = evaluate_folder(args.generated, args.reference, prompt=args.prompt, identifier=args.identifier,
                             dino_model=args.dino_model, clip_model=args.clip_model, device=_device(args.device))
    print(json.dumps(result) if args.json else format_markdown(result))
    return 0


def _eval_toy(args) -> int:
    from pathlib import Path

    from hollownet.toy.bench import score_folder  # lazy: loads torch

    if not is_toy(args.model):
        raise HollownetError(f"eval --model {args.model!r}: only the toy model has its own metrics; drop --model to score "
                             "with DINO / CLIP")
    if not (Path(args.generated) / "manifest.json").is_file():
        raise HollownetError(f"{args.generated} has no manifest.json: pass the output folder of 'hollownet generate'")
    r = score_folder(Path(args.generated), Path(args.reference))
    if args.json:
        print(json.dumps(r))
        return 0
    bg = "n/a (a prompt names no background)" if r["background"] is None else f"{r['background']:.0%}"
    print(f"toy model's metrics (not Stable Diffusion's), {r['n_generated']} images against {r['n_reference']} photos:\n"
          f"  identity (subject recognisably drawn)  {r['identity']:.0%}   (score {r['identity_score']:.3f})\n"
          f"  background followed                    {bg}\n"
          f"  subject colours present                {r['presence']:.0%}\n"
          f"  toy subject (feature cosine)           {r['toy_subject']:.3f}")
    return 0


def cmd_demo(args) -> int:
    from hollownet.workflow import run_demo  # lazy

    run_demo(args.output, model=args.model, steps=args.steps)
    return 0


def _quiet_libraries(verbose: bool = False) -> None:
    """Library chatter (deprecations, 'no LoRA keys for the text encoder', loading bars) is not for
    our users; ``--verbose`` shows it."""
    if verbose:
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warning: <message>`` instead of Python's file path and source line."""
    text = " ".join(str(message).split())
    print(f"warning: {text}", file=file or sys.stderr)


def cmd_bench(args) -> int:
    from pathlib import Path

    from hollownet.evaluation.bench import BenchConfig, run_bench  # lazy

    device = _device(args.device)
    run_bench(_request(BenchConfig, args, device=device), executor=executor_from_args(args, device))
    print((Path(args.output) / "summary.md").read_text(encoding="utf-8"))
    print(f"summary: {Path(args.output) / 'summary.md'}, summary.json, summary.png")
    return 0


def cmd_analyze(args) -> int:
    from pathlib import Path

    from hollownet.evaluation.analyze import AnalyzeConfig, format_table, run_analyze  # lazy

    result = run_analyze(_request(AnalyzeConfig, args, device=_device(args.device)))
    print(format_table(result))
    print(f"written: {Path(args.output) / 'significance.json'}, significance.png, significance.md")
    return 0


def cmd_convert(args) -> int:
    from hollownet.stages.formats import convert  # lazy

    r = convert(args.input, args.output, args.to)
    print(f"{r['from']} -> {r['to']}: {r['modules']} modules, {r['output']} (max |dW| after reading back: {r['max_abs_diff']:.3g})")
    return 0


COMMANDS = {"train": cmd_train, "generate": cmd_generate, "eval": cmd_eval, "demo": cmd_demo, "plan": cmd_plan, "bench": cmd_bench,
            "analyze": cmd_analyze, "convert": cmd_convert, "app": cmd_app, "train-many": cmd_train_many}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        preflight_paths(args.command, args)  # before torch is imported (seconds): a mistyped path is refused at once
    except HollownetError as e:
        print(f"hollownet {args.command}: error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    verbose = getattr(args, "verbose", False)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is first imported
    _quiet_libraries(verbose)
    from hollownet.files import disk_error  # lazy

    from hollownet.signals import Stops, exit_code  # lazy

    args.stops = Stops()
    with warnings.catch_warnings(), args.stops.installed():
        if not verbose:
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.showwarning = _one_line_warning  # restored by catch_warnings
        try:
            return COMMANDS[args.command](args)
        except HollownetError as e:  # every user-facing error (photos, datasets, evaluation inputs too)
            print(f"hollownet {args.command}: error: {e}", file=sys.stderr)
            return 2
        except OSError as e:  # a write outside files.write_bytes (a folder made on a full / read-only disk)
            mapped = disk_error(e, e.filename or "the output")
            if mapped is None:
                raise
            print(f"hollownet {args.command}: error: {mapped}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (signals.Interrupted): 130 / 143
            signum = getattr(e, "signum", signal.SIGINT)
            kept = getattr(e, "kept", None) or "finished work is kept, rerun the same command to resume"  # generate's: exact
            print(f"hollownet {args.command}: interrupted ({signal.Signals(signum).name}); {kept}", file=sys.stderr)
            return exit_code(signum)


if __name__ == "__main__":
    sys.exit(main())
