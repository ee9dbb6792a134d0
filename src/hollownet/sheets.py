"""Contact sheets: labelled rows of images in one PNG (the demo's before / after, training's sample rows)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

from hollownet.files import save_image


def contact_sheet(rows: dict[str, list], path: Path, caption: str = "", cell: int = 128) -> None:
    """One labelled row of images per entry (upscaled to ``cell`` px, nearest: a 64 px image stays crisp)."""
    label_w, pad = 110, 4
    cols = max(len(v) for v in rows.values())
    sheet = Image.new("RGB", (label_w + cols * (cell + pad), len(rows) * (cell + pad) + 24), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows.items()):
        y = r * (cell + pad)
        draw.text((6, y + cell // 2 - 6), label, fill=(0, 0, 0))
        for c, img in enumerate(images):
            sheet.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (label_w + c * (cell + pad), y))
    draw.text((6, len(rows) * (cell + pad) + 4), caption[:160], fill=(60, 60, 60))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_image(Path(path), sheet)  # the one write path (files.write_bytes): atomic, disk errors in one line
