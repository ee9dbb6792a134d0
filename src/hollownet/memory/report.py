"""What ``hollownet plan`` prints: the predicted peaks of every stage, as text and as JSON (the keys scripts read)."""

from __future__ import annotations

from dataclasses import dataclass

from hollownet.memory.configs import ModelConfigs
from hollownet.memory.predict import INFERENCE_DEFINITION
from hollownet.memory.sizes import GiB, format_bytes
from hollownet.memory.tracker import KINDS, MemoryReport
from hollownet.requests import PlanRequest


@dataclass
class MemoryPlan:
    """Everything ``hollownet plan`` prints."""

    request: PlanRequest
    model: ModelConfigs
    precompute: dict | None
    train: MemoryReport | None
    inference: dict[int, MemoryReport]
    info: dict
    seconds: float
    generate: dict | None = None  # generate.memory_record of the prediction: peak, part, breakdown, parts

    @property
    def backbone(self) -> str:
        """What the plan calls the denoiser: ``U-Net`` or ``transformer`` (SD3 / SD3.5: ``memory/dit.py``)."""
        return "transformer" if self.model.family.backbone == "transformer" else "U-Net"

    @property
    def inference_definition(self) -> str:
        return INFERENCE_DEFINITION.replace("U-Net", self.backbone)

    @property
    def generate_peak(self) -> int:
        return self.generate["peak_bytes"] if self.generate else 0

    @property
    def whole_run_peak(self) -> int:
        """The whole experience: the largest of stage 1, stage 2 and generation."""
        return max(self.precompute_peak, self.train_peak, self.generate_peak)

    @property
    def precompute_peak(self) -> int:
        return self.precompute["peak_bytes"] if self.precompute else 0

    @property
    def train_peak(self) -> int:
        return self.train.peak_bytes if self.train else 0

    @property
    def inference_peak(self) -> int:
        return self.inference[min(self.inference)].peak_bytes if self.inference else 0

    @property
    def peak(self) -> int:
        """What a personalization run needs: its larger stage."""
        return max(self.precompute_peak, self.train_peak)

    def to_json(self) -> dict:
        req = self.request
        inf1 = self.inference.get(1)
        d = {
            "model": self.model.name,
            "method": req.method,
            "backbone": self.backbone,
            "prefix_k": self.info.get("prefix_k"),  # SD3: the prefix cut (blocks frozen); None for a U-Net or LoRA FT
            "hollow_blocks": self.info.get("hollow_blocks"),
            "fraction": self.info.get("fraction"),
            "depth": self.info.get("depth"),
            "cut_why": self.info.get("cut_why"),
            "lora_targets_removed_share": self.info.get("lora_targets_removed_share"),  # of the modules LoRA targets
            "rank": req.rank if req.method != "full" else None,
            "resolution": req.resolution,
            "batch": req.batch,
            "precision": req.modes.precision,
            "compute_dtype": req.modes.compute,
            "grad_checkpointing": req.modes.checkpointing,  # as run: streaming turns it on
            "stream_weights": req.modes.stream_weights,
            "optimizer": req.modes.optimizer,
            "units": "bytes",
            "precompute_peak_bytes": self.precompute_peak if self.precompute else None,  # None: stage not predicted
            "train_peak_bytes": self.train_peak if self.train else None,
            "inference_peak_bytes": (inf1.peak_bytes if inf1 else self.inference_peak) if self.inference else None,
            "inference_peak_bytes_by_batch": {str(b): r.peak_bytes for b, r in self.inference.items()},
            "peak_bytes": self.peak,
            "generate_peak_bytes": self.generate_peak if self.generate else None,
            "whole_run_peak_bytes": self.whole_run_peak if self.generate else None,
            "generate_peak_part": self.generate["peak_part"] if self.generate else None,
            "generate": ({"steps": req.gen_steps, "guidance": req.guidance, "num_images": req.num_images,
                          "path": "merged" if req.merged else ("two-path" if req.method == "hollow" and self.backbone == "U-Net" else "one pass"),
                          "precision": req.modes.precision, "compute_dtype": req.modes.compute}
                         if self.generate else None),
            "train_over_inference_bytes": self.train_peak - self.inference_peak if self.inference and self.train else None,
            "train_over_inference_ratio": round(self.train_peak / self.inference_peak, 4) if self.inference and self.train else None,
            "breakdown": {
                "train": dict(self.train.breakdown) if self.train else None,
                "train_weights": {"frozen": self.info.get("frozen_weight_bytes"), "trainable": self.info.get("trainable_weight_bytes")},
                "precompute": dict(self.precompute["breakdown"]) if self.precompute else None,
                "precompute_parts": dict(self.precompute["parts"]) if self.precompute else None,
                "inference": dict(inf1.breakdown) if inf1 else None,
                "generate": dict(self.generate["breakdown"]) if self.generate else None,
                "generate_parts": dict(self.generate["parts"]) if self.generate else None,
            },
            "train_peak_phase": self.train.peak_phase if self.train else None,
            "train_phase_peaks": dict(self.train.phase_peaks) if self.train else None,
            "precompute_peak_part": self.precompute["peak_phase"] if self.precompute else None,
            "params": {k: self.info.get(k) for k in ("unet_params", "hollow_params", "kept_params", "trainable_params", "lora_bytes_fp32")},
            "hollow_out_shape": self.info.get("hollow_out_shape"),
            "stage1": {"photos": req.photos, "class_photos": req.class_photos, "precompute_batch": req.precompute_batch,
                       "shard_samples": min(req.shard_size, req.num_samples), "precision": req.modes.compute,
                       "layer_major": bool(self.precompute and self.precompute.get("layer_major")),
                       "memory_budget_bytes": self.precompute.get("memory_budget") if self.precompute else None},
            "largest_streamed_unit_bytes": self.info.get("largest_streamed_unit_bytes"),
            "inference_definition": self.inference_definition,
            "notes": list(self.model.notes),
            "seconds": round(self.seconds, 2),
        }
        return d

    def format(self) -> str:
        req, info = self.request, self.info
        g = lambda n: f"{n / GiB:6.2f} GiB"  # noqa: E731
        net = self.backbone
        if req.method == "hollow" and info.get("prefix_k") is not None:
            what = (f"hollow, prefix cut k={info['prefix_k']} of {info['num_blocks']} blocks ({info['fraction']:.1%} of "
                    f"transformer params frozen), LoRA r={req.rank}")
        elif req.method == "hollow":
            what = f"hollow ({info['fraction']:.1%} of U-Net params hollowed: {', '.join(info['hollow_blocks'])}), LoRA r={req.rank}"
        elif req.method == "lora":
            what = f"LoRA r={req.rank} on the whole {net}"
        else:
            what = "full fine-tuning"
        modes = req.modes
        weights = modes.precision + (f" (computed in {modes.compute})" if modes.precision != modes.compute else "")
        weights += ", streamed block by block" if modes.stream_weights else ""
        lines = [f"{self.model.name}: {what}"]
        if req.method == "hollow":
            lines += [f"  cut: {info['cut_why']}",
                      f"  the cut removes {info['lora_targets_removed_share']:.1%} of the layers LoRA targets "
                      f"({', '.join(req.lora_targets)})"]
        lines += [
            f"  {req.resolution} px, batch {req.batch}, frozen weights {weights}, "
            f"{'with' if modes.checkpointing else 'no'} gradient checkpointing, {modes.optimizer}",
            "",
            "predicted peak tensor memory (1 GiB = 2^30 bytes; fake tensors, no weights loaded)",
        ]
        if self.precompute:
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.precompute["parts"].items())
            how = "largest part of"
            if self.precompute.get("layer_major"):
                budget = self.precompute.get("memory_budget")
                how = ("layer-major" + (f", budget {budget / 2**20:.0f} MiB" if budget else "")
                       + f", {modes.compute}; peak at {self.precompute['peak_phase']}; largest layer per part")
            lines.append(f"  pre-compute (stage 1)  {g(self.precompute_peak)}   {how}: {parts}")
        if self.train:
            lines.append(f"  training (stage 2)     {g(self.train_peak)}   peak in {self.train.peak_phase}")
        for b, r in self.inference.items():
            label = "inference" + (f", batch {b}" if b != 1 else "")
            what = (f"{net} only ({modes.compute}), one denoising step, no grad"
                    + (", batch 2 = classifier-free guidance" if b == 2 else ""))
            lines.append(f"  {label:<22} {g(r.peak_bytes)}   {what}")
        if self.generate:
            parts = ", ".join(f"{k} {v / GiB:.2f}" for k, v in self.generate["parts"].items())
            path = "merged" if req.merged else ("two-path" if req.method == "hollow" and self.backbone == "U-Net" else "one pass")
            lines.append(f"  generation             {g(self.generate_peak)}   {modes.precision}, {path}, "
                         f"{'CFG batch 2' if req.guidance > 1 else 'no CFG'}, each part in turn: {parts}")
            lines.append(f"  whole run              {g(self.whole_run_peak)}   the largest of pre-compute, training and generation")
            if self.backbone == "U-Net":
                lines.append("  (train --sample-every: each sample image is this generation, the training state freed meanwhile)")
        if self.train and self.inference:
            delta = self.train_peak - self.inference_peak
            lines.append(f"  training - inference   {delta / GiB:+6.2f} GiB   "
                         f"({self.train_peak / self.inference_peak - 1:+.1%} vs batch-1 inference; the paper's 'Comp. w/ Inf.')")
        if self.train:
            bd = dict(self.train.breakdown)
            frozen, trainable = info.get("frozen_weight_bytes", 0), info.get("trainable_weight_bytes", 0)
            lines += ["", "breakdown at the training peak"]
            rows = [("weights (frozen)", frozen), ("weights (trained)", trainable),
                    ("weights (other)", bd.get("weights", 0) - frozen - trainable)]
            rows += [(k, bd.get(k, 0)) for k in KINDS if k != "weights"]
            for k, v in rows:
                if k == "weights (other)" and v == 0:
                    continue
                lines.append(f"  {k:<18} {format_bytes(v):>12}  {100 * v / max(1, self.train_peak):5.1f}%")
        m = lambda n: f"{n / 1e6:.1f}M"  # noqa: E731
        lines += ["", f"parameters: {net} {m(info['unet_params'])}"
                  + (f", hollowed {m(info['hollow_params'])} (never loaded in stage 2), kept {m(info['kept_params'])}" if req.method == "hollow" else "")
                  + (f", trained {m(info['trainable_params'])}" + (f" (LoRA file {info['lora_bytes_fp32'] / 2**20:.0f} MiB fp32)" if req.method != "full" else ""))]
        lines.append(f"inference = {self.inference_definition}")
        lines += [f"note: {n}" for n in self.model.notes]
        lines.append(f"({self.seconds:.1f} s)")
        return "\n".join(lines)
