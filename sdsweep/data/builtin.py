"""The built-in data set: 12 captioned images in one procedural "sdsweep style".

Generated deterministically and written once as an ordinary folder (PNG + metadata.jsonl),
then read through the same scan as a user's folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

BUILTIN_VERSION = 1


_SUBJECTS = ["circle", "square", "triangle", "house", "star", "tree"]
_COLOURS = {"red": (220, 60, 60), "blue": (60, 90, 210), "green": (60, 170, 90), "yellow": (235, 200, 50)}


def _draw_builtin(index: int, size: int = 96) -> tuple[Image.Image, str]:
    """One image of the built-in 'sdsweep style': flat colours, thick outlines, dotted paper."""
    rng = random.Random(index)
    subject = _SUBJECTS[index % len(_SUBJECTS)]
    colour_name = list(_COLOURS)[(index // len(_SUBJECTS) + index) % len(_COLOURS)]
    colour = _COLOURS[colour_name]
    img = Image.new("RGB", (size, size), (250, 240, 220))
    draw = ImageDraw.Draw(img)
    for y in range(4, size, 8):  # the halftone-dot paper that makes the style recognisable
        for x in range(4 + (y // 8 % 2) * 4, size, 8):
            draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=(225, 205, 180))
    c, r = size // 2 + rng.randint(-8, 8), size // 4 + rng.randint(-4, 6)
    box = [c - r, c - r, c + r, c + r]
    outline = dict(fill=colour, outline=(20, 20, 20), width=4)
    if subject == "circle":
        draw.ellipse(box, **outline)
    elif subject == "square":
        draw.rectangle(box, **outline)
    elif subject == "triangle":
        draw.polygon([(c, c - r), (c - r, c + r), (c + r, c + r)], fill=colour, outline=(20, 20, 20), width=4)
    elif subject == "house":
        draw.rectangle([c - r, c, c + r, c + r], **outline)
        draw.polygon([(c - r, c), (c, c - r), (c + r, c)], fill=(120, 60, 40), outline=(20, 20, 20), width=4)
    elif subject == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r // 2
            ang = np.pi / 2 + k * np.pi / 5
            pts.append((c + rad * np.cos(ang), c - rad * np.sin(ang)))
        draw.polygon(pts, fill=colour, outline=(20, 20, 20), width=4)
    else:
        draw.rectangle([c - 4, c, c + 4, c + r], fill=(120, 80, 40), outline=(20, 20, 20), width=3)
        draw.ellipse([c - r, c - r, c + r, c + r // 2], **outline)
    return img, f"a {colour_name} {subject} on dotted paper, sdsweep style"


def ensure_builtin_dataset(cache_dir: str, count: int = 12) -> Path:
    """Write the built-in set (PNG + metadata.jsonl) once; it is then read like any folder."""
    from sdsweep.io import atomic_dir

    folder = Path(cache_dir).expanduser() / f"builtin-data-v{BUILTIN_VERSION}"
    if (folder / "metadata.jsonl").exists():
        return folder
    with atomic_dir(folder) as tmp:
        lines = []
        for i in range(count):
            img, caption = _draw_builtin(i)
            img.save(tmp / f"{i:03d}.png")
            lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": caption}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder
