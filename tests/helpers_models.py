"""Tiny offline DINO-ViT and CLIP checkpoints for tests (random weights, saved with save_pretrained).

Shared by test_evaluate.py and test_bench.py; nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte -> printable unicode table (the BPE base alphabet), in CLIP's order."""
    from hollownet.singlefile import bytes_to_unicode

    return list(bytes_to_unicode().values())


def write_tiny_clip_tokenizer(folder: Path):
    """A CLIPTokenizer with a byte-level vocab and no merges (one token per character)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    # Positional args: (vocab_file, merges_file) in transformers 4.x, (vocab, merges) in 5.x.
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def build_tiny_vit(folder: Path) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=8
    )
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(folder)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def build_tiny_clip(folder: Path) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = write_tiny_clip_tokenizer(folder / "_tok")
    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            # The text pooler reads the EOS position, so the ids must match the tiny vocab.
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.rmtree(folder / "_tok")
    return folder
