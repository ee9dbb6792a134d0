"""Stage 2's memory on an SD3 / SD3.5 transformer, predicted without weights: LoRA FT against prefix cuts.

A seed for ``hollownet plan --model sd35m|sd35l`` (issue 26): one training step -- forward, fp32 MSE
loss, backward, AdamW -- runs on fake tensors (``FakeTensorMode``: shapes, no storage) and the same
:class:`~hollownet.memory.tracker.MemoryTracker` the U-Net planner uses counts its live bytes. The step
measured is a run's second (AdamW's state exists, made by a first step on zero gradients), so its peak is
the run's. For a prefix cut ``k`` only the suffix's weights exist (the prefix stays on the meta device:
never loaded) and the batch is the stored :class:`~hollownet.dit_split.Prefix`; LoRA FT (``k=None``)
holds every weight and runs the whole transformer from the latent and the text embeddings. Frozen
weights in ``dtype``, LoRA and its AdamW state in fp32. Counts are tensor storages: a CUDA run adds its
context, workspaces and allocator rounding. Not yet counted: stage 1, generation, the text encoders and
the VAE (``memory/dit.py`` adds them: ``hollownet plan`` on SD3).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch._subclasses import FakeTensorMode

from hollownet.builder import add_lora, init_lora
from hollownet.dit_cut import SD3_TEXT_TOKENS, meta_transformer, suffix_lora_targets
from hollownet.dit_split import Prefix, num_blocks, prefix_modules, run_prefix, run_suffix, suffix_modules
from hollownet.memory.fake import materialize
from hollownet.memory.tracker import MemoryReport, MemoryTracker


def _inputs(net, k: int | None, batch: int, latent_hw, text_tokens: int, dtype) -> dict:
    """What a step reads: the stored prefix (a cut) or the latent and the text embeddings (LoRA FT)."""
    cfg, width = net.config, net.inner_dim
    patches = (latent_hw[0] // cfg.patch_size) * (latent_hw[1] // cfg.patch_size)
    target = torch.zeros(batch, cfg.out_channels, *latent_hw, dtype=dtype)
    if k is None:
        return dict(target=target, hidden_states=torch.zeros(batch, cfg.in_channels, *latent_hw, dtype=dtype),
                    encoder_hidden_states=torch.zeros(batch, text_tokens, cfg.joint_attention_dim, dtype=dtype),
                    pooled_projections=torch.zeros(batch, cfg.pooled_projection_dim, dtype=dtype),
                    timestep=torch.zeros(batch, dtype=dtype))
    text = torch.zeros(batch, text_tokens, cfg.caption_projection_dim, dtype=dtype) if k < num_blocks(net) else None
    return dict(target=target, prefix=Prefix(k, torch.zeros(batch, patches, width, dtype=dtype), text,
                                             torch.zeros(batch, width, dtype=dtype), tuple(latent_hw)))


def predict_train_step(config: dict, k: int | None, *, latent_hw: tuple[int, int], batch: int = 1, rank: int = 16,
                       dtype: torch.dtype = torch.bfloat16, text_tokens: int = SD3_TEXT_TOKENS,
                       grad_checkpointing: bool = False, fake: bool = True) -> MemoryReport:
    """The peak of one stage-2 step at prefix cut ``k`` (``None``: LoRA FT). ``fake=False`` runs the same
    code on real tensors (uninitialised values: only their bytes matter), to check the prediction."""
    net = meta_transformer(config)
    add_lora(net, suffix_lora_targets(net, k or 0), rank)  # on meta: peft cannot move fake tensors
    net.requires_grad_(False)
    with FakeTensorMode() if fake else nullcontext():
        materialize(net, dtype, skip=prefix_modules(net, k) if k is not None else ())
        params = init_lora(net, dtype, "cpu")  # fp32, as the trainer's builder makes them
        if grad_checkpointing:
            net.enable_gradient_checkpointing()
        net.train()
        optimizer = torch.optim.AdamW(params, foreach=False)
        for p in params:  # a first step makes AdamW's state: the measured step is the run's peak
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        inputs = _inputs(net, k, batch, latent_hw, text_tokens, dtype)
        tracker = MemoryTracker(device="cpu").add_resident(net, optimizer)
        tracker.add_resident(*[t for t in _tensors(inputs)], kind="batch")
        with tracker:
            with tracker.phase("forward"):
                target = inputs["target"]
                if k is None:
                    out = net(**{n: v for n, v in inputs.items() if n != "target"}).sample
                else:
                    out = run_suffix(net, inputs["prefix"])
                loss = (out.float() - target.float()).pow(2).mean()
            with tracker.phase("backward"):
                loss.backward()
            with tracker.phase("optimizer"):
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
    return tracker.report


def predict_forward(config: dict, k: int | None, *, latent_hw: tuple[int, int], batch: int = 1,
                    dtype: torch.dtype = torch.bfloat16, text_tokens: int = SD3_TEXT_TOKENS, fake: bool = True) -> MemoryReport:
    """The peak of a no-grad transformer pass: stage 1's prefix at cut ``k`` (only the prefix's weights
    exist; what it returns is what the store keeps), or with ``k=None`` one denoising step of the whole
    transformer (inference; ``batch=2`` for classifier-free guidance). Text encoders and VAE not counted."""
    net = meta_transformer(config)
    with FakeTensorMode() if fake else nullcontext(), torch.no_grad():
        materialize(net, dtype, skip=suffix_modules(net, k) if k is not None else ())
        net.requires_grad_(False).eval()
        inputs = _inputs(net, None, batch, latent_hw, text_tokens, dtype)
        del inputs["target"]
        tracker = MemoryTracker(device="cpu").add_resident(net)
        tracker.add_resident(*inputs.values(), kind="batch")
        with tracker, tracker.phase("forward"):
            out = net(**inputs).sample if k is None else run_prefix(net, k, **inputs)
        del out
    return tracker.report


def _tensors(inputs: dict) -> list[torch.Tensor]:
    out = []
    for v in inputs.values():
        out += list(v.tensors().values()) if isinstance(v, Prefix) else [v]
    return out


def train_table(config: dict, ks: list[int], *, latent_hw: tuple[int, int], **kw) -> list[dict]:
    """LoRA FT and each prefix cut: predicted stage-2 peak and its breakdown, and the transformer's part of
    stage 1 (its prefix pass; none for LoRA FT), one row each."""
    forward_kw = {n: v for n, v in kw.items() if n in ("batch", "dtype", "text_tokens")}
    rows = []
    for k in [None, *ks]:
        report = predict_train_step(config, k, latent_hw=latent_hw, **kw)
        stage1 = None if k is None else predict_forward(config, k, latent_hw=latent_hw, **forward_kw).peak_bytes
        rows.append(dict(method="LoRA FT" if k is None else f"prefix k={k}", k=k, peak_bytes=report.peak_bytes,
                         peak_phase=report.peak_phase, breakdown=dict(report.breakdown), stage1_transformer_bytes=stage1))
    return rows
