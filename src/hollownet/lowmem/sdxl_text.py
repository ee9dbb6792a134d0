"""SDXL's two text encoders, layer-major: ``families.SDXL.encode_prompts`` one layer in memory at a time.

The walk is ``layerwise.text_encoder_layers``'s (embeddings, each encoder layer, final norm), cut
where SDXL reads it: the penultimate hidden state (``hidden_states[-2]``, the output of the
second-to-last layer), so the first encoder's last layer and norm never load; the second encoder runs
to its final norm and adds one layer, the pooled projection (the end-of-text token's state through
``text_projection``), as ``CLIPTextModelWithProjection`` computes it. The same loop runs on fake
weights for the planner (``simulate``), as ``layerwise.predict_peak`` does for SD's one encoder.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from hollownet import encoders as E
from hollownet.loading import weight_files
from hollownet.lowmem import layerwise as LW
from hollownet.unet_split import Step

#: (folder, tokenizer folder, measured part name, pooled projection?) of SDXL's encoders, in order
ENCODERS = (("text_encoder", "tokenizer", "text encoder", False), ("text_encoder_2", "tokenizer_2", "text encoder 2", True))
PENULTIMATE, POOLED = "penultimate", "pooled"


def build(config_or_folder, pooled: bool) -> nn.Module:
    """The encoder on the meta device (``CLIPTextModelWithProjection`` if ``pooled``), from a config dict or folder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # lazily: seconds to import

    config = (CLIPTextConfig(**config_or_folder) if isinstance(config_or_folder, dict)
              else CLIPTextConfig.from_pretrained(config_or_folder))
    with torch.device("meta"):
        model = (CLIPTextModelWithProjection if pooled else CLIPTextModel)(config)
    return model.requires_grad_(False).eval()


def eos_positions(ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """Where ``CLIPTextTransformer`` pools: the first end-of-text token (the highest id when eos is 2, its legacy rule)."""
    return ids.argmax(dim=-1) if eos_token_id == 2 else (ids == eos_token_id).int().argmax(dim=-1)


def layers(model: nn.Module, ids: torch.Tensor, pooled: bool, convert=lambda t: t) -> tuple[list[Step], torch.Tensor]:
    """The encoder's layers up to what SDXL reads, module names rooted at ``model``; and the remapped ids.
    ``convert``: applied to the tensors the layers hold (a ``FakeTensorMode``'s ``from_tensor`` when simulated)."""
    inner = model.text_model if pooled else model
    steps, remapped, _ = LW.text_encoder_layers(inner, ids)
    if pooled:  # names under text_model., as the checkpoint and the model have them
        steps = [replace(s, modules=[f"text_model.{m}" for m in s.modules],
                         rows={f"text_model.{k}": v for k, v in s.rows.items()}) for s in steps]
    n = len(inner.encoder.layers)
    penultimate = f"encoder.layers.{n - 2}"
    if not pooled:
        steps = steps[: n]  # embeddings and layers 0 .. n-2: nothing after the penultimate state runs
    eos = convert(eos_positions(ids, model.config.eos_token_id))

    def project(rows, x):
        return model.text_projection(x[torch.arange(x.shape[0], device=x.device), eos[rows].to(x.device)])

    if pooled:
        steps.append(Step("text_projection", ["text_projection"], [steps[-1].output], POOLED, project))
    steps = [replace(s, output=PENULTIMATE) if s.output == penultimate else _renamed(s, penultimate) for s in steps]
    return steps, convert(remapped)


def _renamed(step: Step, penultimate: str) -> Step:
    """The step reading the penultimate state reads it under its new name."""
    return replace(step, inputs=[PENULTIMATE if i == penultimate else i for i in step.inputs])


def run(remapped: torch.Tensor, steps: list[Step], weights, opts: LW.RunOptions, *, part: str, scratch=None,
        simulate: bool = False) -> tuple[dict[str, torch.Tensor], list]:
    """The steps over every prompt; ``{"penultimate": [P, L, D], "pooled": [P, Dp] (encoder 2)}`` fp32 on the CPU, and the stats."""
    arrays = LW.Arrays(remapped.shape[0], scratch, opts.budget, simulate=simulate)
    outs = [o for o in (PENULTIMATE, POOLED) if any(s.output == o for s in steps)]
    try:
        arrays.adopt("ids", remapped)
        stats = LW.run_layers(steps, arrays, weights, opts, keep=set(outs), part=part)
        got = {o: arrays.read(o, 0, arrays.n).float().cpu().clone() for o in outs}
    finally:
        arrays.close()
    return got, stats


def encode_prompts(model_dir: Path, prompts: list[str], dtype, device, meter, *, budget=None, batch_size: int = 4,
                   scratch=None) -> tuple[dict[str, torch.Tensor], dict[str, list]]:
    """``families.SDXL.encode_prompts``, layer by layer from the model folder: ``({"embeds", "text_embeds"}, stats)``."""
    states, pooled, stats = [], None, {}
    for folder, tokenizer, part, has_pool in ENCODERS:
        model = build(model_dir / folder, has_pool)
        ids = E.prompt_ids(model_dir, prompts, tokenizer)
        steps, remapped = layers(model, ids, has_pool)
        weights = LW.FileWeights(model, weight_files(model_dir, folder), dtype, device)
        got, stats[part] = run(remapped, steps, weights, LW.RunOptions(device, meter, budget, batch_size), part=part,
                               scratch=None if scratch is None else Path(scratch) / folder)
        states.append(got[PENULTIMATE])
        pooled = got.get(POOLED, pooled)
    return {"embeds": torch.cat(states, dim=-1), "text_embeds": pooled}, stats


def predict_peak(configs: tuple[dict, dict], *, prompts: int, meter, budget=None, batch_size: int = 4, dtype=torch.float32,
                 device="cpu", prompt_tokens: int = 8) -> dict[str, list]:
    """Both encoders' layer-major run on fake weights (``layerwise.predict_peak``'s way), measured into ``meter``
    under the parts the real run uses; ``configs``: the two encoders' configs. Returns the stats by part."""
    from torch._subclasses import FakeTensorMode

    stats = {}
    for (_, _, part, has_pool), config in zip(ENCODERS, configs):
        model = build(config, has_pool)
        ids = torch.zeros(prompts, model.config.max_position_embeddings, dtype=torch.long)
        ids[:, :prompt_tokens] = torch.arange(1, prompt_tokens + 1)  # the used token rows need real ids
        mode = FakeTensorMode()
        steps, remapped = layers(model, ids, has_pool, convert=mode.from_tensor)
        with mode:
            _, stats[part] = run(remapped, steps, LW.EmptyWeights(model, dtype, device),
                                 LW.RunOptions(device, meter, budget, batch_size), part=part, simulate=True)
    return stats
