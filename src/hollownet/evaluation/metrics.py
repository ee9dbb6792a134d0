"""DreamBooth-style subject-fidelity metrics: DINO, CLIP-I and CLIP-T.

Definitions follow the DreamBooth paper (Ruiz et al., 2023), which the Hollowed
Net paper reuses:

* DINO   -- mean cosine similarity of DINO ViT-S/16 CLS embeddings over every
            (generated image, real subject image) pair.
* CLIP-I -- the same with CLIP image embeddings.
* CLIP-T -- mean cosine similarity between each generated image's CLIP image
            embedding and the CLIP text embedding of its prompt with the subject
            identifier (e.g. "sks") removed.

All scores are raw cosines in [-1, 1]; no x2.5 (CLIPScore) or x100 scaling.

The code is split in three layers (k-diffusion style): pure metric math on
feature tensors, small frozen feature extractors, and `evaluate_folder`, which
reads a generated folder's manifest and ties the two together.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Sequence
from urllib.parse import urlparse

import torch
import torch.nn.functional as F
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from PIL import Image, ImageOps
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPModel, ViTModel

from hollownet.errors import HollownetError
from hollownet.photos import IMAGE_EXTENSIONS
from hollownet.settings import DEFAULT_CLIP_MODEL, DEFAULT_DINO_MODEL, DEFAULT_IDENTIFIER

SCALE_NOTE = "raw cosine"
MANIFEST_NAMES = ("manifest.json", "manifest.csv")
METRICS = ("dino", "clip_i", "clip_t")  # the bench table's columns (DinoClipScorer)

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "DEFAULT_DINO_MODEL",
    "ClipExtractor",
    "DinoClipScorer",
    "DinoExtractor",
    "cosine_matrix",
    "evaluate_folder",
    "format_markdown",
    "list_images",
    "load_image",
    "mean_matched_cosine",
    "mean_pairwise_cosine",
    "read_manifest",
    "strip_identifier",
]


# --------------------------------------------------------------------------
# Metric math: pure functions on feature tensors.
# --------------------------------------------------------------------------


def cosine_matrix(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[N, D] x [M, D] -> [N, M] cosine similarities (inputs need not be normalized)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise HollownetError(f"expected [N, D] and [M, D] features, got {tuple(a.shape)} and {tuple(b.shape)}")
    # float64 so the mean over many pairs does not drift.
    a = F.normalize(a.double(), dim=-1)
    b = F.normalize(b.double(), dim=-1)
    return a @ b.T


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all N*M pairs (a_i, b_j): the DINO / CLIP-I score."""
    if len(a) == 0 or len(b) == 0:
        raise HollownetError("mean_pairwise_cosine needs at least one feature on each side")
    return float(cosine_matrix(a, b).mean())


def mean_matched_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of row-aligned pairs (a_i, b_i): the CLIP-T score with b_i = text of image i."""
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise HollownetError(f"expected two non-empty [N, D] features of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(F.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def strip_identifier(prompt: str, identifier: str | None = DEFAULT_IDENTIFIER) -> str:
    """Remove the subject identifier as a whole word: "a photo of sks dog" -> "a photo of dog".

    CLIP-T measures prompt fidelity, and CLIP has never seen "sks", so the
    identifier only adds noise to the text embedding.
    """
    if not identifier:
        return " ".join(prompt.split())
    # Word-boundary lookarounds instead of \b so identifiers like "<sks>" also work.
    pattern = r"(?<!\w)" + re.escape(identifier) + r"(?!\w)"
    return " ".join(re.sub(pattern, " ", prompt, flags=re.IGNORECASE).split())


# --------------------------------------------------------------------------
# Images and manifests.
# --------------------------------------------------------------------------


def load_image(path: str | Path) -> Image.Image:
    """Open an image upright (EXIF orientation applied) and in RGB."""
    try:
        with Image.open(path) as im:
            # Phone photos store rotation in EXIF; without this the subject is sideways.
            return ImageOps.exif_transpose(im).convert("RGB")
    except OSError as e:  # includes PIL.UnidentifiedImageError
        raise HollownetError(f"cannot read image {path} ({_first_line(e)}); replace or remove the file") from None


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside `folder`, sorted by name."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def read_manifest(folder: str | Path) -> list[dict[str, str]] | None:
    """Entries {"file", "prompt"} from manifest.json (preferred) or manifest.csv; None if neither exists."""
    folder = Path(folder)
    json_path, csv_path = (folder / n for n in MANIFEST_NAMES)
    if json_path.is_file():
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise HollownetError(f"{json_path} is not valid JSON ({e}); regenerate it with `hollownet generate`") from None
        entries = data.get("images") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise HollownetError(f'{json_path} has no "images" list; expected {{"images": [{{"file": ..., "prompt": ...}}]}}')
        source = json_path
    elif csv_path.is_file():
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "file" not in reader.fieldnames:
                raise HollownetError(f"{csv_path} needs a header row with columns file,prompt")
            entries = list(reader)
        source = csv_path
    else:
        return None
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or not e.get("file"):
            raise HollownetError(f'{source} entry {i} has no "file"; every entry needs a file and a prompt')
        out.append({"file": str(e["file"]), "prompt": "" if e.get("prompt") is None else str(e["prompt"])})
    return out


def _generated_entries(generated_dir: Path, prompt: str | None) -> list[tuple[Path, str]]:
    """(path, prompt) for every generated image, validated."""
    manifest = read_manifest(generated_dir)
    if manifest is None:
        if prompt is None:
            raise HollownetError(
                f"{generated_dir} has no manifest.json or manifest.csv; "
                "generate it with `hollownet generate` or pass the prompt explicitly (prompt=... / --prompt)"
            )
        # The override makes a manifest unnecessary: every image gets the given prompt.
        entries = [(p, prompt) for p in list_images(generated_dir)]
    else:
        # Manifest paths are relative to the folder (an absolute path stays absolute).
        entries = [(generated_dir / e["file"], e["prompt"] if prompt is None else prompt) for e in manifest]
        missing = [e["file"] for e in manifest if not (generated_dir / e["file"]).is_file()]
        if missing:
            shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
            raise HollownetError(
                f"manifest in {generated_dir} names {len(missing)} missing file(s): {shown}; "
                "regenerate the images or fix the manifest"
            )
        unprompted = [e["file"] for (_, pr), e in zip(entries, manifest) if not pr.strip()]
        if unprompted:
            raise HollownetError(
                f"manifest in {generated_dir} has no prompt for {unprompted[0]}; add prompts or pass prompt=... / --prompt"
            )
    if not entries:
        raise HollownetError(
            f"{generated_dir} contains no generated images ({', '.join(IMAGE_EXTENSIONS)}); run `hollownet generate` first"
        )
    return entries


def _reference_paths(reference_dir: Path) -> list[Path]:
    if not reference_dir.is_dir():
        raise HollownetError(f"reference folder {reference_dir} does not exist; pass the folder of real subject photos")
    paths = list_images(reference_dir)
    if not paths:
        raise HollownetError(
            f"reference folder {reference_dir} contains no photos ({', '.join(IMAGE_EXTENSIONS)}); "
            "pass the folder of real subject photos used for training"
        )
    return paths


# --------------------------------------------------------------------------
# Frozen feature extractors.
# --------------------------------------------------------------------------


def _first_line(e: Exception) -> str:
    # transformers errors span several lines; ours must stay one line.
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _resolve_model(model: str | Path, example: str) -> str:
    """Model id or folder as a string; fail early on a path-like argument that does not exist."""
    text = str(model)
    if text.startswith("~"):
        text = str(Path(text).expanduser())
    # A missing absolute/explicitly relative path would otherwise surface as a confusing hub repo-id error.
    if (isinstance(model, Path) or text.startswith(("/", "./", "../"))) and not Path(text).exists():
        raise HollownetError(
            f"model folder {text!r} does not exist; pass a folder written by save_pretrained or a hub id (e.g. {example})"
        )
    if not Path(text).exists():
        _check_hub_reachable(text, example)
    return text


def _check_hub_reachable(model_id: str, example: str) -> None:
    """A hub id that is not in the local cache needs the hub: refuse at once when it cannot be reached, rather
    than after the hub client's retries (~25 s)."""
    if isinstance(try_to_load_from_cache(model_id, "config.json"), str):  # a path: cached (else None or a sentinel)
        return
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    if not hf_constants.HF_HUB_OFFLINE:
        try:
            socket.create_connection((host, 443), timeout=3).close()
            return
        except OSError:
            pass
    raise HollownetError(f"{model_id!r} is not on this machine and the hub cannot be reached (offline); pass a local copy "
                     f"(a folder written by save_pretrained, e.g. of {example}), or for a run of the bundled toy model "
                     "use 'hollownet eval --model toy' (its own metrics, offline)")


def _load_config(model: str, expected: str, example: str):
    """Load a config and check its model_type before paying for the weights."""
    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError, KeyError) as e:
        raise HollownetError(
            f"could not load a model config from {model!r} ({_first_line(e)}); pass a folder written by "
            f"save_pretrained or a cached hub id of a {expected} model (e.g. {example})"
        ) from None
    return config


def _check_type(model: str | Path, config, allowed: tuple[str, ...], expected: str, example: str) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in allowed:
        raise HollownetError(f"{model!r} is a {model_type!r} model, expected a {expected} model (e.g. {example})")


def _load_processor(model: str | Path):
    try:
        return AutoImageProcessor.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise HollownetError(
            f"{model!r} has no usable image processor ({_first_line(e)}); save one next to the weights "
            "with image_processor.save_pretrained(path)"
        ) from None


def _load_tokenizer(model: str):
    fix = "save one next to the weights with tokenizer.save_pretrained(path)"
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise HollownetError(f"{model!r} has no usable tokenizer ({_first_line(e)}); {fix}") from None
    # transformers 5 silently builds an empty-vocab tokenizer when the files are missing;
    # every word would then map to the unknown token and CLIP-T would be meaningless.
    ids = tokenizer("a photo of a dog")["input_ids"]
    inner = [i for i in ids if i not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    if not inner or tokenizer.unk_token_id in inner:
        raise HollownetError(f"{model!r} has no usable tokenizer (its vocabulary is empty or missing); {fix}")
    return tokenizer


def _batches(items: Sequence, batch_size: int) -> Iterable[Sequence]:
    for i in range(0, len(items), batch_size):
        yield items[i : i + batch_size]


def _as_pil(images: Sequence[Image.Image | str | Path]) -> list[Image.Image]:
    return [im.convert("RGB") if isinstance(im, Image.Image) else load_image(im) for im in images]


def _pooled(out) -> torch.Tensor:
    # transformers 4.x returns a tensor from get_*_features; 5.x returns a model output.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _Extractor:
    """Shared plumbing: frozen eval-mode model, batched no-grad image encoding."""

    model_id: str

    def __init__(self, model, processor, model_id: str, device: str | torch.device, batch_size: int):
        if batch_size < 1:
            raise HollownetError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.processor = processor
        self.model_id = model_id
        self.batch_size = batch_size

    def _encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """[N, D] L2-normalized float32 embeddings (on CPU) of PIL images or image paths."""
        dtype = next(self.model.parameters()).dtype
        feats = []
        for batch in _batches(list(images), self.batch_size):
            pixels = self.processor(images=_as_pil(batch), return_tensors="pt")["pixel_values"]
            feats.append(self._encode_pixels(pixels.to(self.device, dtype)).float().cpu())
        if not feats:
            return torch.empty(0, 0)
        return F.normalize(torch.cat(feats), dim=-1)


class DinoExtractor(_Extractor):
    """DINO ViT CLS-token embeddings (the DreamBooth DINO metric uses facebook/dino-vits16)."""

    def __init__(self, model: str | Path = DEFAULT_DINO_MODEL, device: str | torch.device = "cpu", batch_size: int = 16):
        example = DEFAULT_DINO_MODEL
        model = _resolve_model(model, example)
        config = _load_config(model, "DINO ViT", example)
        _check_type(model, config, ("vit",), "DINO ViT", example)
        processor = _load_processor(model)
        # The CLS token is read from last_hidden_state, so the (often absent) pooler is not built.
        vit = ViTModel.from_pretrained(model, add_pooling_layer=False)
        super().__init__(vit, processor, model, device, batch_size)

    def _encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


class ClipExtractor(_Extractor):
    """CLIP image and text embeddings in the shared projection space."""

    def __init__(self, model: str | Path = DEFAULT_CLIP_MODEL, device: str | torch.device = "cpu", batch_size: int = 16):
        example = DEFAULT_CLIP_MODEL
        model = _resolve_model(model, example)
        config = _load_config(model, "CLIP", example)
        _check_type(model, config, ("clip",), "CLIP", example)
        processor = _load_processor(model)
        self.tokenizer = _load_tokenizer(model)
        clip = CLIPModel.from_pretrained(model)
        super().__init__(clip, processor, model, device, batch_size)
        self.max_length = clip.config.text_config.max_position_embeddings

    def _encode_pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return _pooled(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] L2-normalized float32 text embeddings (on CPU); prompts are truncated to CLIP's 77 tokens."""
        feats = []
        for batch in _batches(list(texts), self.batch_size):
            tok = self.tokenizer(
                list(batch), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            out = self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device)
            )
            feats.append(_pooled(out).float().cpu())
        if not feats:
            return torch.empty(0, 0)
        return F.normalize(torch.cat(feats), dim=-1)


# --------------------------------------------------------------------------
# Folder evaluation.
# --------------------------------------------------------------------------


def evaluate_folder(
    generated_dir: str | Path,
    reference_dir: str | Path,
    prompt: str | None = None,
    identifier: str | None = DEFAULT_IDENTIFIER,
    dino_model: str | Path | DinoExtractor = DEFAULT_DINO_MODEL,
    clip_model: str | Path | ClipExtractor = DEFAULT_CLIP_MODEL,
    device: str | torch.device = "cpu",
    batch_size: int = 16,
) -> dict:
    """Score a folder of generated images against real subject photos.

    `prompt` overrides the manifest prompts (and makes the manifest optional).
    `dino_model` / `clip_model` may be a model id / folder or an already built
    extractor, so several folders can be scored without reloading models.
    Returns a JSON-able dict; all scores are raw cosines.
    """
    generated_dir, reference_dir = Path(generated_dir), Path(reference_dir)
    if not generated_dir.is_dir():
        raise HollownetError(f"generated folder {generated_dir} does not exist; run `hollownet generate` first")
    # Validate all inputs before loading any model: those errors are cheap to find.
    entries = _generated_entries(generated_dir, prompt)
    ref_paths = _reference_paths(reference_dir)

    # Decode each image once (unreadable files fail before models load) and share it between extractors.
    gen_images = [load_image(p) for p, _ in entries]
    ref_images = [load_image(p) for p in ref_paths]

    dino = dino_model if isinstance(dino_model, DinoExtractor) else DinoExtractor(dino_model, device, batch_size)
    clip = clip_model if isinstance(clip_model, ClipExtractor) else ClipExtractor(clip_model, device, batch_size)
    gen_dino, ref_dino = dino.images(gen_images), dino.images(ref_images)
    gen_clip, ref_clip = clip.images(gen_images), clip.images(ref_images)

    # Group image indices by prompt, keeping manifest order.
    groups: OrderedDict[str, list[int]] = OrderedDict()
    for i, (_, p) in enumerate(entries):
        groups.setdefault(p, []).append(i)
    stripped = {p: strip_identifier(p, identifier) for p in groups}
    text_feats = dict(zip(groups, clip.texts([stripped[p] for p in groups])))
    # One text embedding per image, so CLIP-T overall is a mean over images.
    img_text = torch.stack([text_feats[p] for _, p in entries])

    per_prompt = []
    for p, idx in groups.items():
        ix = torch.tensor(idx)
        per_prompt.append(
            {
                "prompt": p,
                "clip_t_prompt": stripped[p],
                "n_images": len(idx),
                "dino": mean_pairwise_cosine(gen_dino[ix], ref_dino),
                "clip_i": mean_pairwise_cosine(gen_clip[ix], ref_clip),
                "clip_t": mean_matched_cosine(gen_clip[ix], img_text[ix]),
            }
        )

    return {
        "dino": mean_pairwise_cosine(gen_dino, ref_dino),
        "clip_i": mean_pairwise_cosine(gen_clip, ref_clip),
        "clip_t": mean_matched_cosine(gen_clip, img_text),
        "scale": SCALE_NOTE,
        "per_prompt": per_prompt,
        "n_generated": len(entries),
        "n_reference": len(ref_paths),
        "n_prompts": len(groups),
        "identifier": identifier,
        "dino_model": dino.model_id,
        "clip_model": clip.model_id,
        "generated_dir": str(generated_dir),
        "reference_dir": str(reference_dir),
    }


def model_label(model) -> str:
    """How a --dino-model / --clip-model (an id, a folder or a built extractor) is recorded."""
    return model if isinstance(model, str) else getattr(model, "model_id", type(model).__name__)


class DinoClipScorer:
    """The bench's scorer for Stable Diffusion: DINO, CLIP-I, CLIP-T of a cell's images against the subject's photos.

    The toy model's is ``toy.bench.ToyScorer``; both have ``metrics``, ``config`` (what a cell's result
    depends on besides its images), ``extra_prompts`` (other folders to generate), ``load`` and ``score``.
    """

    metrics = METRICS
    extra_prompts: dict[str, tuple[str, ...]] = {}

    def __init__(self, dino_model=DEFAULT_DINO_MODEL, clip_model=DEFAULT_CLIP_MODEL, identifier: str | None = DEFAULT_IDENTIFIER,
                 device: str | torch.device = "cpu"):
        self.dino, self.clip, self.identifier, self.device = dino_model, clip_model, identifier, device
        self.config = {"dino_model": model_label(dino_model), "clip_model": model_label(clip_model)}

    def load(self) -> DinoClipScorer:
        """Build the extractors (once per run, before any training: a bad --dino-model fails in seconds)."""
        try:
            if not isinstance(self.dino, DinoExtractor):
                self.dino = DinoExtractor(self.dino, self.device)
            if not isinstance(self.clip, ClipExtractor):
                self.clip = ClipExtractor(self.clip, self.device)
        except ValueError as e:
            raise HollownetError(str(e)) from None
        return self

    def score(self, cell_folder: Path, subject) -> dict:
        self.load()
        return evaluate_folder(cell_folder / "images", subject.folder, identifier=self.identifier, dino_model=self.dino,
                               clip_model=self.clip, device=self.device)


def _fmt(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.4f}"


def format_markdown(result: dict) -> str:
    """Markdown table with one row per prompt and a bold overall row."""

    def cell(text: str) -> str:
        # A literal "|" or a newline would break the table row.
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = [
        "| prompt | images | DINO | CLIP-I | CLIP-T |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result.get("per_prompt", []):
        scores = " | ".join(_fmt(row[k]) for k in ("dino", "clip_i", "clip_t"))
        lines.append(f"| {cell(row['prompt'])} | {row['n_images']} | {scores} |")
    lines.append(
        f"| **overall** | **{result['n_generated']}** | **{_fmt(result['dino'])}** | "
        f"**{_fmt(result['clip_i'])}** | **{_fmt(result['clip_t'])}** |"
    )
    ident = result.get("identifier")
    stripped = f"identifier {ident!r} removed from prompts for CLIP-T" if ident else "prompts used as-is for CLIP-T"
    lines.append("")
    lines.append(
        f"Scores are {result.get('scale', SCALE_NOTE)} similarities; {result['n_reference']} reference photo(s); "
        f"DINO: `{result.get('dino_model', '?')}`, CLIP: `{result.get('clip_model', '?')}`; {stripped}."
    )
    return "\n".join(lines) + "\n"
