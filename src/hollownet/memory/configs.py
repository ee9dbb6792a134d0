"""The configs a memory prediction reads (a bundled name's or a diffusers folder's): no weights."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from hollownet.cut import BUNDLED_UNETS, CONFIG_DIR, load_unet_config
from hollownet.errors import HollownetError
from hollownet.families import added_cond_shapes, family_of_config
from hollownet.settings import SD3_MODELS, is_sd3_folder
from hollownet.singlefile import plan_model
from hollownet.toy import NAME as TOY, model_dir as toy_model_dir


@dataclass
class ModelConfigs:
    """The configs a prediction needs: a bundled name's or a diffusers folder's. No weights."""

    name: str
    unet: dict  # the denoiser's config: a U-Net's, or an SD3 transformer's (``family.backbone`` says which)
    text_encoder: dict | None = None
    text_encoder_2: dict | None = None  # SDXL's second encoder (its states are concatenated to the first's)
    vae: dict | None = None
    scheduler: dict | None = None
    text_len: int = 77  # tokens per prompt (the tokenizer's model_max_length)
    pipeline_config: dict = field(default_factory=dict)  # model_index.json (generation: SDXL's force_zeros_for_empty_prompt)
    notes: list[str] = field(default_factory=list)

    @property
    def family(self):
        """The model's family (``families.py``): its text encoders, and its backbone (``unet`` or ``transformer``)."""
        return family_of_config(self.unet)

    @property
    def text_configs(self) -> dict[str, dict | None]:
        """The family's text encoders (folder -> config or None if not known)."""
        known = {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}
        return {folder: known[folder] for folder in family_of_config(self.unet).text_encoders}

    @property
    def knows_generation(self) -> bool:
        """Every model generation builds has a known config (the family's text encoders and the VAE)."""
        return self.vae is not None and None not in self.text_configs.values()

    @property
    def text_dim(self) -> int:
        if self.text_encoder:
            return int(self.text_encoder["hidden_size"]) + int((self.text_encoder_2 or {}).get("hidden_size", 0))
        dim = self.unet.get("cross_attention_dim", 768)
        return int(dim[0] if isinstance(dim, (list, tuple)) else dim)

    @property
    def added_cond(self) -> dict | None:
        """SDXL-style U-Nets need pooled text embeddings and time ids: their shapes per sample."""
        return added_cond_shapes(self.unet)


def _strip(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_note")}


def _read_json(path: Path) -> dict | None:
    return _strip(json.loads(path.read_text())) if path.is_file() else None


def load_model_configs(model: str | Path) -> ModelConfigs:
    """``sd15``, ``sd21``, ``sdxl``, ``sd3m``, ``sd35m``, ``sd35l`` (bundled configs), ``toy`` (the bundled toy
    model), a single-file checkpoint or a diffusers folder (its ``*/config.json``)."""
    name = plan_model(str(model))  # a single-file checkpoint: its converted folder, or its type's bundled configs
    if name in SD3_MODELS or is_sd3_folder(name):
        return _sd3_configs(name)
    if name in BUNDLED_UNETS:
        mc = ModelConfigs(
            name=name,
            unet=load_unet_config(name),
            text_encoder=_read_json(CONFIG_DIR / f"{name}_text_encoder.json"),
            text_encoder_2=_read_json(CONFIG_DIR / f"{name}_text_encoder_2.json"),
            vae=_read_json(CONFIG_DIR / f"{name}_vae.json"),
            scheduler=_read_json(CONFIG_DIR / f"{name}_scheduler.json"),
        )
        if mc.text_encoder is None:
            mc.notes.append(f"stage 1 for {name}: its text encoder(s) and VAE are not modelled (U-Net part only)")
        return mc
    path = toy_model_dir() if name == TOY else Path(name).expanduser()
    if not (path / "unet" / "config.json").is_file():
        raise HollownetError(
            f"unknown model '{name}': give sd15, sd21, sdxl, {', '.join(SD3_MODELS)} or a diffusers model folder "
            "(one with unet/config.json or an SD3 transformer/config.json)"
        )
    unet = _read_json(path / "unet" / "config.json")
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise HollownetError(f"'{path / 'unet'}' holds a {unet.get('_class_name')}; hollownet plans UNet2DConditionModel U-Nets")
    text = _read_json(path / "text_encoder" / "config.json")
    if text is not None and text.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
        text = None
    mc = ModelConfigs(
        name=str(path),
        unet=unet,
        text_encoder=text,
        text_encoder_2=_read_json(path / "text_encoder_2" / "config.json"),
        vae=_read_json(path / "vae" / "config.json"),
        scheduler=_read_json(path / "scheduler" / "scheduler_config.json"),
        pipeline_config=_read_json(path / "model_index.json") or {},
    )
    tok = _read_json(path / "tokenizer" / "tokenizer_config.json") or {}
    max_pos = int((text or {}).get("max_position_embeddings", 77))
    mc.text_len = int(tok.get("model_max_length", max_pos))
    if mc.text_len > max_pos:  # tokenizers without a limit store a huge sentinel
        mc.text_len = max_pos
    for part, known in (("text encoder", None not in mc.text_configs.values()), ("VAE", mc.vae is not None)):
        if not known:
            mc.notes.append(f"stage 1: no usable {part} config in '{path}'; that part is not modelled")
    return mc


def _sd3_configs(name: str) -> ModelConfigs:
    """An SD3 / SD3.5 model's configs: bundled (its transformer's own; the two CLIP encoders, the VAE and the
    scheduler shared by SD3 and SD3.5) or a folder's. The T5 encoder is not among them: hollownet runs SD3
    without it (``text_encoder_3=None``), its 256 tokens zeros."""
    if name in SD3_MODELS:
        mc = ModelConfigs(name=name, unet=_read_json(CONFIG_DIR / f"{name}_transformer.json"),
                          text_encoder=_read_json(CONFIG_DIR / "sd3_text_encoder.json"),
                          text_encoder_2=_read_json(CONFIG_DIR / "sd3_text_encoder_2.json"),
                          vae=_read_json(CONFIG_DIR / "sd3_vae.json"), scheduler=_read_json(CONFIG_DIR / "sd3_scheduler.json"))
    else:
        path = Path(name).expanduser()
        mc = ModelConfigs(name=str(path), unet=_read_json(path / "transformer" / "config.json"),
                          text_encoder=_read_json(path / "text_encoder" / "config.json"),
                          text_encoder_2=_read_json(path / "text_encoder_2" / "config.json"),
                          vae=_read_json(path / "vae" / "config.json"),
                          scheduler=_read_json(path / "scheduler" / "scheduler_config.json"),
                          pipeline_config=_read_json(path / "model_index.json") or {})
        tok = _read_json(path / "tokenizer" / "tokenizer_config.json") or {}
        mc.text_len = min(int(tok.get("model_max_length", 77)), int((mc.text_encoder or {}).get("max_position_embeddings", 77)))
    missing = [part for part, config in (("text_encoder", mc.text_encoder), ("text_encoder_2", mc.text_encoder_2),
                                         ("vae", mc.vae), ("scheduler", mc.scheduler)) if config is None]
    if missing:
        raise HollownetError(f"'{name}' has an SD3 transformer but no {', '.join(missing)} config: point --model at a "
                             "folder saved by StableDiffusion3Pipeline.save_pretrained")
    mc.notes.append("SD3 without its T5 encoder, as hollownet runs it (text_encoder_3=None: its 256 tokens are zeros); "
                    "a run with T5-XXL holds it too (4.7B parameters)")
    return mc
