"""Predict the memory of every stage without weights: ``hollownet plan``.

The prediction *runs the real code path* -- the trainer's builder and ``train_step`` (forward,
loss, backward, clipping, AdamW), stage 1's ``make_shard`` and the same text-encoder and VAE calls
-- on models whose tensors are fake (:class:`torch._subclasses.FakeTensorMode`: shapes and dtypes,
no storage) and counts live bytes with the same :class:`~hollownet.memory.tracker.MemoryTracker` that
``hollownet train`` uses to measure. So prediction and measurement are one code path: on the tiny
test model they agree to the byte, and an SD 2.x prediction takes seconds on a laptop CPU.

How each stage is modelled (exactly what ``precompute.py`` / ``train.py`` do, see there):

* **pre-compute** (stage 1) is three parts, each loaded, used and dropped before the next, so its
  peak is the largest part's: the text encoder embedding the prompts; the VAE *encoder* (decoder
  never loaded) encoding all photos in chunks of ``precompute_batch``; the U-Net encoder + hollow
  (the kept up blocks are never loaded) computing the first shard's hollow outputs, no grad.
* **training** (stage 2) is one optimizer step after the first (AdamW's state exists by then, so
  this step's peak is the run's; the first step's is never larger): the frozen weights in
  ``precision`` -- for ``hollow`` only the kept outer layers, the hollow stays on the meta device
  and costs nothing -- LoRA (or, for ``full``, every weight) in fp32 with its gradients and AdamW
  state, the store's batch (noisy latents, targets, hollow output) and prompt embeddings, and the
  activations of the forward and backward.
* **inference** is one denoising step of the U-Net alone, no gradients: every U-Net weight in
  ``precision`` + the activations of ``unet(latents, t, text)`` at batch 1 (the paper's inference
  figure) and at batch 2 (classifier-free guidance). Text encoder and VAE are not counted.

* **generation** (``hollownet generate``) is three parts, each model built, used and dropped before the
  next, so its peak is the largest part's: the text encoder (the prompt and the negative one); the
  U-Net denoising every image (two-path for a hollow LoRA, one batched forward through the kept down
  blocks; the LoRA unmerged in fp32; the CFG batch of 2); the VAE decoder (no encoder) decoding each.
  It is ``generate.generate`` itself on fake parts (``Parts`` from :class:`FakeSource` s), with the
  request's modes; at most :data:`GENERATE_PREDICT_STEPS` denoising steps are run, the peak repeating
  after them (the multistep sampler's history is full by the second step).

Counts are tensor storages (see ``memory.py``): a CUDA run adds the CUDA context, kernel workspaces
and allocator rounding/caching on top. The optimizer is torch's AdamW: ``adamw`` is its single-tensor
implementation (what the trainer runs on a CPU), ``adamw-foreach`` the multi-tensor one torch picks
by default on CUDA (larger temporaries in the step).
"""

from __future__ import annotations

import multiprocessing as mp
import time
from concurrent.futures import ProcessPoolExecutor

from hollownet.cut import meta_unet
from hollownet.memory.configs import ModelConfigs, load_model_configs
from hollownet.memory.dit import plan_dit
from hollownet.memory.fake import request_cut
from hollownet.memory.predict import param_info, predict_generate, predict_inference, predict_train
from hollownet.memory.report import MemoryPlan
from hollownet.memory.stage1 import plan_stage1
from hollownet.requests import PlanRequest
from hollownet.settings import LOW_MEMORY_STAGE1_BUDGET, Modes


def plan_memory(req: PlanRequest, *, stages=("precompute", "train", "inference", "generate"),
                model: ModelConfigs | None = None) -> MemoryPlan:
    """Predict the requested stages' peaks for ``req`` (``generate``: skipped, with a note, for a model whose
    text encoder or VAE config is not known)."""
    t0 = time.perf_counter()
    mc = model or load_model_configs(req.model)
    if mc.family.backbone == "transformer":  # SD3 / SD3.5: the prefix cut's own branch
        return plan_dit(req, mc, stages)
    req.train_config()  # validate the combination before spending time (e.g. full needs fp32)
    req.precompute_config()
    request_cut(meta_unet(mc.unet), req)  # an impossible fraction or cut fails here, in one line
    train = info = None
    if "train" in stages:
        train, info = predict_train(mc, req)
    else:
        skeleton = meta_unet(mc.unet)
        info = param_info(mc, req, request_cut(skeleton, req, rank=req.rank), None)
    pre = plan_stage1(mc, req) if "precompute" in stages else None
    if pre is not None and req.modes.stage1_unsettled and not pre.get("layer_major"):
        mc.notes.append(f"stage 1: sample-major, as its peak fits the {LOW_MEMORY_STAGE1_BUDGET} a low-memory run's "
                        "layer-major stage 1 would fill (--layer-major to run it layer-major anyway)")
    inference = {b: predict_inference(mc, req, b) for b in req.inference_batches} if "inference" in stages else {}
    gen = None
    if "generate" in stages:
        if not mc.knows_generation:
            mc.notes.append("generation: the text encoder or VAE config is not known; not predicted")
        else:
            gen = predict_generate(mc, req)
    return MemoryPlan(request=req, model=mc, precompute=pre, train=train, inference=inference, info=info,
                      seconds=time.perf_counter() - t0, generate=gen)


def predict_figures(settings: dict, stages=("precompute", "train", "inference")) -> dict:
    """``plan_memory`` of a flat ``settings`` dict (PlanRequest's and Modes' names), as JSON: a picklable
    entry point for worker processes."""
    modes, settings = Modes.split(settings)
    for key in ("lora_targets", "inference_batches"):
        if key in settings and settings[key] is not None:
            settings[key] = tuple(settings[key])
    return plan_memory(PlanRequest(**settings, modes=modes), stages=tuple(stages)).to_json()


def predict_many(tasks: list[tuple[dict, tuple[str, ...]]], jobs: int = 1, progress=None) -> list[dict]:
    """``predict_figures`` for many (settings, stages) pairs, in ``jobs`` worker processes; results in order."""
    if jobs <= 1 or len(tasks) <= 1:
        out = []
        for settings, stages in tasks:
            out.append(predict_figures(settings, stages))
            if progress:
                progress(out[-1])
        return out
    with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(predict_figures, settings, stages) for settings, stages in tasks]
        out = []
        for f in futures:
            out.append(f.result())
            if progress:
                progress(out[-1])
        return out
