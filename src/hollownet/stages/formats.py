"""LoRA file layouts: diffusers/peft (what ``load_lora_weights`` reads) and kohya (what ComfyUI, Forge and
AUTOMATIC1111 read), and lossless conversion between them.

diffusers layout: ``unet.<module path>.lora_A.weight`` / ``.lora_B.weight`` (older files: ``.lora.down`` /
``.lora.up``), alphas in the ``lora_adapter_metadata`` JSON (peft's ``lora_alpha`` / ``alpha_pattern``);
without it every module's alpha is its rank.

kohya layout: ``lora_unet_<module path, dots as _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``
(a 0-d tensor; scale = alpha / rank, alpha = rank when absent), plus ``ss_*`` metadata strings.

Keys are converted with diffusers' own converters: ``convert_state_dict_to_kohya`` one way, and
diffusers' kohya reader (``StableDiffusionPipeline.lora_state_dict``) then
``convert_unet_state_dict_to_peft`` the other. (``convert_all_state_dict_to_peft`` is not used on the way
back: for the reader's ``...attn1.processor.to_q_lora.down`` keys it picks the text-encoder mapping and
names U-Net layers ``q_proj``.) Every read is checked by converting the result forward again: a file whose
names do not come back exactly is refused, never guessed at. ``convert_state_dict_to_kohya`` writes each
``.alpha`` as the rank, which is wrong whenever alpha differs from the rank; the true alphas are written.

SDXL is different: kohya's sd-scripts build SDXL's U-Net in SAI's own (sgm / ldm) layout, so its LoRA
names are SAI's module paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``,
``lora_unet_middle_block_1_...``, ``lora_unet_output_blocks_0_1_...``), and ComfyUI maps them with its
``unet_to_diffusers`` table. :func:`sai_module` is that table's rule for one module; SDXL files are
written and read with it (diffusers' own SDXL loader reads them through ``_maybe_map_sgm_blocks_to_diffusers``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError, safe_open

from hollownet.cut import load_unet_config, meta_unet
from hollownet.errors import HollownetError
from hollownet.families import SDXL_FAMILY, family_of_config
from hollownet.peft_internals import pattern_key
from hollownet.files import read_json, save_tensors, temp_name

DIFFUSERS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # the name diffusers' own SDXL training script uses
LAYOUTS = ("diffusers", "kohya")
SDXL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version of SDXL
# text-encoder layers are refused, never dropped: without them the LoRA would draw something else, silently
UNET_ONLY = ("hollownet reads U-Net LoRAs only and will not drop text-encoder layers silently: use a LoRA trained "
             "without them (kohya: --network_train_unet_only)")


@dataclass
class Lora:
    """A U-Net LoRA independent of file layout: peft tensors and one alpha per module."""

    tensors: dict[str, torch.Tensor]  # "<module>.lora_A.weight" / "<module>.lora_B.weight", no "unet." prefix
    alphas: dict[str, float]  # module -> alpha (scale = alpha / rank)
    metadata: dict[str, str] = field(default_factory=dict)  # kohya-style strings carried along (ss_*, hollownet_*)

    def modules(self) -> list[str]:
        return [k[: -len(".lora_A.weight")] for k in self.tensors if k.endswith(".lora_A.weight")]

    def rank(self, module: str) -> int:
        return int(self.tensors[f"{module}.lora_A.weight"].shape[0])

    def scale(self, module: str) -> float:
        return self.alphas[module] / self.rank(module)

    def common(self) -> tuple[int, float, dict[str, int], dict[str, float]]:
        """Most common rank and alpha, and the modules that differ (peft's rank_pattern / alpha_pattern)."""
        mods = self.modules()
        rank = Counter(self.rank(m) for m in mods).most_common(1)[0][0]
        alpha = Counter(self.alphas[m] for m in mods).most_common(1)[0][0]
        return (rank, alpha, {m: self.rank(m) for m in mods if self.rank(m) != rank},
                {m: self.alphas[m] for m in mods if self.alphas[m] != alpha})


# ---- from a trained model ------------------------------------------------------------------------------


def from_peft_model(unet, adapter: str | None = None) -> Lora:
    """The LoRA of a peft-adapted U-Net, with each module's alpha as peft resolves it."""
    name = adapter or next(iter(unet.peft_config))
    cfg = unet.peft_config[name]
    if getattr(cfg, "use_dora", False) or getattr(cfg, "use_rslora", False):
        raise HollownetError("DoRA / rsLoRA adapters have no kohya equivalent; train without use_dora / use_rslora")
    state = get_peft_model_state_dict(unet, adapter_name=name)
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
    lora = Lora(tensors, {})
    lora.alphas = {m: peft_alpha(cfg.lora_alpha, cfg.alpha_pattern or {}, m) for m in lora.modules()}
    return lora


def peft_alpha(default: float, pattern: dict[str, float], module: str) -> float:
    """peft's rule: the first ``alpha_pattern`` key matching the end of the module name, else ``lora_alpha``."""
    key = pattern_key(list(pattern), module)
    return float(pattern.get(key, default))


# ---- kohya ---------------------------------------------------------------------------------------------


def kohya_names(modules: list[str]) -> dict[str, str]:
    """module -> kohya LoRA name, by diffusers' ``convert_state_dict_to_kohya``."""
    out = {}
    for m in modules:
        (key,) = [k for k in convert_state_dict_to_kohya({f"unet.{m}.lora_A.weight": torch.zeros(1)}) if k.endswith(".lora_down.weight")]
        out[m] = key[: -len(".lora_down.weight")]
    return out


# ---- SDXL: SAI's module paths --------------------------------------------------------------------------

# ComfyUI's unet_to_diffusers tables (comfy/utils.py: UNET_MAP_RESNET, UNET_MAP_BASIC), as module paths
SAI_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
              "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
SAI_TOP = {"conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
           "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
           "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def sai_module(module: str, unet_config: dict) -> str:
    """A diffusers U-Net module path as SAI's (sgm) path, by ComfyUI's ``unet_to_diffusers`` rule: with L
    layers per block, down block x's layer i is ``input_blocks.{1 + (L+1)x + i}`` (``.0`` resnet, ``.1``
    attention), its downsampler ``input_blocks.{1 + (L+1)x + L}.0.op``; the mid block is ``middle_block.0``
    (resnet), ``.1`` (attention), ``.2`` (resnet); up block x's layer i (L+1 of them) is
    ``output_blocks.{(L+1)x + i}``, its upsampler the last layer's ``.1`` or, after an attention, ``.2``.
    Inside an attention the names are the same; inside a resnet they follow :data:`SAI_RESNET`."""
    for top, sai in SAI_TOP.items():
        if module == top or module.startswith(top + "."):
            return sai + module[len(top):]
    layers = unet_config["layers_per_block"]
    if not isinstance(layers, int):
        raise HollownetError("kohya's SDXL names need one layers_per_block for every block (SDXL's 2)")
    parts = module.split(".")
    if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 4:
        x, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if parts[0] == "down_blocks":
            n = 1 + (layers + 1) * x
            if kind == "downsamplers" and rest[0] == "conv":
                return ".".join([f"input_blocks.{n + layers}.0.op", *rest[1:]])
            if kind in ("resnets", "attentions"):
                return ".".join([f"input_blocks.{n + i}.{0 if kind == 'resnets' else 1}", *_sai_inner(kind, rest)])
        else:
            n = (layers + 1) * x
            if kind == "upsamplers" and rest[0] == "conv":
                c = 2 if unet_config["up_block_types"][x].startswith("CrossAttn") else 1
                return ".".join([f"output_blocks.{n + layers}.{c}.conv", *rest[1:]])
            if kind in ("resnets", "attentions"):
                return ".".join([f"output_blocks.{n + i}.{0 if kind == 'resnets' else 1}", *_sai_inner(kind, rest)])
    if parts[0] == "mid_block" and len(parts) > 3 and parts[1] in ("resnets", "attentions"):
        n = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return ".".join([f"middle_block.{n}", *_sai_inner(parts[1], parts[3:])])
    raise HollownetError(f"U-Net module {module} has no name in kohya's SDXL layout; train without it in --lora-targets")


def _sai_inner(kind: str, rest: list[str]) -> list[str]:
    if kind == "resnets" and rest and rest[0] in SAI_RESNET:
        return [SAI_RESNET[rest[0]], *rest[1:]]
    return rest


def kohya_sdxl_name(module: str, unet_config: dict) -> str:
    return "lora_unet_" + sai_module(module, unet_config).replace(".", "_")


def is_sdxl(unet_config) -> bool:
    return unet_config is not None and family_of_config(unet_config) is SDXL_FAMILY


def _sdxl_names(lora: Lora, unet_config: dict) -> dict[str, str]:
    return {m: kohya_sdxl_name(m, unet_config) for m in lora.modules()}


def to_kohya(lora: Lora, unet_config=None) -> dict[str, torch.Tensor]:
    """kohya tensors: diffusers' converter for the names (SDXL U-Nets: SAI's names, :func:`sai_module`),
    then each ``.alpha`` set to the true alpha."""
    if is_sdxl(unet_config):
        out = {}
        for m, name in _sdxl_names(lora, dict(unet_config)).items():
            out[f"{name}.lora_down.weight"] = lora.tensors[f"{m}.lora_A.weight"]
            out[f"{name}.lora_up.weight"] = lora.tensors[f"{m}.lora_B.weight"]
            out[f"{name}.alpha"] = torch.tensor(float(lora.alphas[m]))
        return {k: v.contiguous() for k, v in out.items()}
    out = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in lora.tensors.items()})
    names = kohya_names(lora.modules())
    for m, name in names.items():
        if f"{name}.alpha" not in out:
            raise HollownetError(f"diffusers' kohya converter wrote no alpha for {m}")
        out[f"{name}.alpha"] = torch.tensor(float(lora.alphas[m]))  # kohya (and ComfyUI, A1111) read .alpha as a scalar
    return {k: v.contiguous() for k, v in out.items()}


def kohya_metadata(lora: Lora, *, base_model_version: str | None = None, method: str | None = None,
                   hollow_blocks: list[str] | None = None) -> dict[str, str]:
    """The metadata strings kohya's sd-scripts write (those the tools show), plus hollownet's own."""
    rank, alpha, _, _ = lora.common()
    meta = dict(lora.metadata)
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha))})
    if base_model_version:
        meta["ss_base_model_version"] = base_model_version
        meta["ss_v2"] = str(base_model_version.startswith("sd_v2"))
    if method:
        meta["hollownet_method"] = method
    if hollow_blocks is not None:
        meta["hollownet_hollow_blocks"] = json.dumps(hollow_blocks)
    return meta


SAI_BLOCKS = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def from_kohya_sdxl(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                    unet_config: dict | None = None) -> Lora:
    """A kohya SDXL U-Net LoRA (SAI names), each name mapped back by :func:`sai_module` over the U-Net's
    modules (``unet_config``; default: SDXL 1.0's, whose names every SDXL base model shares)."""
    unet_config = dict(unet_config) if unet_config is not None else load_unet_config("sdxl")
    by_name = {kohya_sdxl_name(m, unet_config): m for m, mod in meta_unet(unet_config).named_modules()
               if isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)) and _has_sai_name(m, unet_config)}
    lora = Lora({}, {}, {k: v for k, v in (metadata or {}).items() if k.startswith(("ss_", "hollownet_"))})
    for name in sorted({k.split(".")[0] for k in tensors}):
        if name not in by_name:
            raise HollownetError(f"kohya LoRA name '{name}' is no module of an SDXL U-Net by kohya's / ComfyUI's rule; refusing to guess")
        m = by_name[name]
        if f"{name}.lora_down.weight" not in tensors or f"{name}.lora_up.weight" not in tensors:
            raise HollownetError(f"kohya LoRA module '{name}' lacks its lora_down or lora_up weight")
        lora.tensors[f"{m}.lora_A.weight"] = tensors[f"{name}.lora_down.weight"]
        lora.tensors[f"{m}.lora_B.weight"] = tensors[f"{name}.lora_up.weight"]
        a = tensors.get(f"{name}.alpha")
        lora.alphas[m] = float(a.item()) if a is not None else float(lora.rank(m))  # kohya: no alpha = rank
    return lora


def _has_sai_name(module: str, unet_config: dict) -> bool:
    try:
        sai_module(module, unet_config)
    except HollownetError:
        return False
    return True


def from_kohya(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Lora:
    """A kohya U-Net LoRA, read by diffusers' kohya reader, then checked by converting it back
    (SDXL's SAI names: :func:`from_kohya_sdxl`)."""
    others = sorted({k.split(".")[0] for k in tensors if not k.startswith("lora_unet_")})
    if others:
        raise HollownetError(f"kohya LoRA has layers outside the U-Net (e.g. {others[0]}); {UNET_ONLY}")
    names = {k.split(".")[0] for k in tensors}
    bad = sorted(k for k in tensors if k.split(".", 1)[1] not in ("lora_down.weight", "lora_up.weight", "alpha"))
    if bad:
        raise HollownetError(f"kohya LoRA key '{bad[0]}' is not a plain LoRA (lora_down / lora_up / alpha); LyCORIS / DoRA are not supported")
    if any(k.startswith(SAI_BLOCKS) for k in tensors):
        return from_kohya_sdxl(tensors, metadata)
    pairs = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(dict(pairs))
        peft = convert_unet_state_dict_to_peft(converted)
    except (ValueError, KeyError) as e:
        raise HollownetError(f"diffusers cannot read this kohya LoRA ({str(e).splitlines()[0][:120]})") from None
    peft = {k.removeprefix("unet."): v for k, v in peft.items()}
    lora = Lora(peft, {}, {k: v for k, v in (metadata or {}).items() if k.startswith(("ss_", "hollownet_"))})
    back = kohya_names(lora.modules())
    if set(back.values()) != names:
        odd = sorted(names - set(back.values())) or sorted(set(back.values()) - names)
        raise HollownetError(f"kohya LoRA name '{odd[0]}' does not map back to one U-Net module by diffusers' rules; refusing to guess")
    for m, name in back.items():
        a = tensors.get(f"{name}.alpha")
        lora.alphas[m] = float(a.item()) if a is not None else float(lora.rank(m))  # kohya: no alpha = rank
    return lora


# ---- diffusers -----------------------------------------------------------------------------------------


def from_diffusers(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Lora:
    """A diffusers/peft LoRA file's U-Net part; alphas from its ``lora_adapter_metadata``, else rank."""
    others = sorted({k.split(".")[0] for k in tensors if not k.startswith("unet.")})
    if others:
        raise HollownetError(f"LoRA has layers outside the U-Net (prefix '{others[0]}.'); {UNET_ONLY}")
    peft = {k.removeprefix("unet."): v for k, v in convert_unet_state_dict_to_peft(dict(tensors)).items()}
    bad = sorted(k for k in peft if not k.endswith((".lora_A.weight", ".lora_B.weight")))
    if bad:
        raise HollownetError(f"LoRA key 'unet.{bad[0]}' is not a plain LoRA weight (lora_A / lora_B); DoRA and LoRA biases are not supported")
    metadata = metadata or {}
    cfg = {}
    if "lora_adapter_metadata" in metadata:
        raw = json.loads(metadata["lora_adapter_metadata"])
        cfg = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise HollownetError("DoRA / rsLoRA adapters have no kohya equivalent")
    lora = Lora(peft, {}, {k: v for k, v in metadata.items() if k.startswith(("ss_", "hollownet_"))})
    for m in lora.modules():
        if f"{m}.lora_B.weight" not in peft:
            raise HollownetError(f"LoRA module 'unet.{m}' has a down but no up weight")
        lora.alphas[m] = peft_alpha(cfg["lora_alpha"], cfg.get("alpha_pattern") or {}, m) if "lora_alpha" in cfg else float(lora.rank(m))
    return lora


def adapter_metadata(lora: Lora) -> dict:
    """peft ``LoraConfig`` (as diffusers stores it) that gives every module its rank and alpha."""
    rank, alpha, rank_pattern, alpha_pattern = lora.common()
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted(lora.modules()), rank_pattern=rank_pattern,
                     alpha_pattern=alpha_pattern, init_lora_weights="gaussian").to_dict()
    return json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


# ---- files ---------------------------------------------------------------------------------------------


def detect_layout(keys) -> str:
    """'kohya' or 'diffusers' from the key names; anything else is refused in one line."""
    keys = list(keys)
    if not keys:
        raise HollownetError("the LoRA file holds no tensors")
    if all(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        return "kohya"
    if all(k.startswith(("unet.", "text_encoder.", "text_encoder_2.")) for k in keys) and any(
        s in k for k in keys for s in (".lora_A.", ".lora.down.", "_lora.down.", ".lora_linear_layer.")
    ):
        return "diffusers"
    raise HollownetError(f"unknown LoRA layout (first key '{keys[0]}'): expected diffusers "
                         "(unet.<module>.lora_A.weight) or kohya (lora_unet_<module>.lora_down.weight)")


def lora_file(path: str | os.PathLike) -> Path:
    """A LoRA file, or the one in a LoRA folder (diffusers file first, then the kohya one)."""
    path = Path(path)
    if path.is_dir():
        for name in (DIFFUSERS_FILE, KOHYA_FILE):
            if (path / name).exists():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise HollownetError(f"no LoRA file in '{path}' (looked for {DIFFUSERS_FILE} and {KOHYA_FILE})")
    if not path.exists():
        raise HollownetError(f"LoRA '{path}' not found")
    if path.suffix != ".safetensors":
        raise HollownetError(f"'{path}' is not a .safetensors file; only safetensors LoRAs are read")
    return path


def read_lora(path: str | os.PathLike) -> tuple[Lora, str]:
    """(LoRA, layout) of a LoRA file or folder."""
    f = lora_file(path)
    try:
        with safe_open(f, framework="pt") as sf:
            metadata = sf.metadata() or {}
            tensors = {k: sf.get_tensor(k) for k in sf.keys()}
    except (SafetensorError, OSError) as e:  # e.g. a truncated file
        raise HollownetError(f"cannot read LoRA '{f}' as safetensors ({str(e).splitlines()[0][:160]}): the file is "
                             "damaged or incomplete; copy or export it again") from None
    check_finite(tensors, f)
    layout = detect_layout(tensors)
    lora = from_kohya(tensors, metadata) if layout == "kohya" else from_diffusers(tensors, metadata)
    return lora, layout


def check_finite(tensors: dict[str, torch.Tensor], path) -> None:
    """Refuse NaN / inf in any tensor (alphas included): such a LoRA draws black or noise images, silently."""
    for key, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise HollownetError(f"LoRA '{path}' holds non-finite values (NaN or inf) in '{key}': the file is damaged "
                                 "or its training diverged; export or train it again, or use another file")


def write_kohya(lora: Lora, path: str | os.PathLike, metadata: dict[str, str] | None = None, unet_config=None) -> Path:
    """The kohya file; ``unet_config``: the U-Net's (an SDXL one gets SAI's names)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt", **(metadata if metadata is not None else kohya_metadata(lora))}
    save_tensors(path, to_kohya(lora, unet_config), metadata=meta)  # the one atomic write path (full disk: one line)
    return path


def write_diffusers(lora: Lora, path: str | os.PathLike) -> Path:
    """A file ``StableDiffusionPipeline.load_lora_weights`` reads, written by diffusers' ``save_lora_weights``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)  # a folder: diffusers writes its own file name into it
    shutil.rmtree(tmp, ignore_errors=True)
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=lora.tensors, unet_lora_adapter_metadata=adapter_metadata(lora),
                                              safe_serialization=True)
    os.replace(tmp / DIFFUSERS_FILE, path)
    shutil.rmtree(tmp, ignore_errors=True)
    return path


def base_model_version(unet_config) -> str | None:
    """kohya's ``ss_base_model_version`` from a U-Net config: sd_v1, sd_v2 or sdxl_base_v1-0."""
    get = unet_config.get if isinstance(unet_config, dict) else lambda k, d=None: getattr(unet_config, k, d)
    if get("addition_embed_type") == "text_time":
        return SDXL_VERSION
    return {768: "sd_v1", 1024: "sd_v2"}.get(get("cross_attention_dim"))


def convert(src: str | os.PathLike, dst: str | os.PathLike, to: str | None = None) -> dict:
    """Rewrite a LoRA file (or folder) in the other layout (or ``to``). ``dst``: a file, or a folder.

    Returns what was done: layouts, module count, and the largest difference of the effective
    weights (scale * B @ A) between what was read and what was written back, which is 0 when lossless.
    """
    lora, layout = read_lora(src)
    to = to or ("diffusers" if layout == "kohya" else "kohya")
    if to not in LAYOUTS:
        raise HollownetError(f"--to {to!r} is not one of {', '.join(LAYOUTS)}")
    dst = Path(dst)
    if dst.is_dir() or not dst.suffix:
        dst = dst / (KOHYA_FILE if to == "kohya" else DIFFUSERS_FILE)
    if dst.resolve() == lora_file(src).resolve():
        raise HollownetError(f"'{dst}' is the input file; choose another output")
    info = {}
    src_dir = Path(src) if Path(src).is_dir() else Path(src).parent
    if (src_dir / "hollownet.json").exists():
        info = read_json(src_dir / "hollownet.json", "restore it, or convert the LoRA file alone (pass its path)")
    if to == "kohya":
        version = info.get("base_model_version") or lora.metadata.get("ss_base_model_version")
        meta = kohya_metadata(lora, base_model_version=version,
                              method=info.get("method") or lora.metadata.get("hollownet_method"),
                              hollow_blocks=info.get("hollow_blocks") if "hollow_blocks" in info else
                              (json.loads(lora.metadata["hollownet_hollow_blocks"]) if "hollownet_hollow_blocks" in lora.metadata else None))
        sdxl = version == SDXL_VERSION or info.get("family") == SDXL_FAMILY.name
        write_kohya(lora, dst, meta, unet_config=load_unet_config("sdxl") if sdxl else None)
    else:
        write_diffusers(lora, dst)
    again, _ = read_lora(dst)
    return {"input": str(lora_file(src)), "from": layout, "output": str(dst), "to": to, "modules": len(lora.modules()),
            "max_abs_diff": max_weight_diff(lora, again)}


def delta(lora: Lora, module: str) -> torch.Tensor:
    """The module's weight update scale * B @ A (convolutions flattened)."""
    a = lora.tensors[f"{module}.lora_A.weight"].double().flatten(1)
    b = lora.tensors[f"{module}.lora_B.weight"].double().flatten(1)
    return lora.scale(module) * (b @ a)


def max_weight_diff(a: Lora, b: Lora) -> float:
    if set(a.modules()) != set(b.modules()):
        raise HollownetError("the written LoRA has other modules than the one read")
    return max((delta(a, m) - delta(b, m)).abs().max().item() for m in a.modules())
