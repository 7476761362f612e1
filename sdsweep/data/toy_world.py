"""The toy world: coloured subjects drawn procedurally, in a plain style and in "sdsweep style".

The base toy model (sdsweep/model/toy.py) learns the PLAIN world: a flat subject on a light,
plain background, captioned "a red circle". The fine-tuning set shows the same subjects in the
style the base model does not have: thick black outlines on dotted paper, captioned
"a red circle, sdsweep style". Some colour x subject combinations never appear in the
fine-tuning set (HELD_OUT_COMBOS), so an evaluation can ask whether a style learned on some
subjects carries over to others.

COLOURS, SUBJECTS and the combination lists below are the single source of truth: the training
script, the toy CLIP's zero-shot prompts and the tests all read them from here.

Every image is a pure function of (colour, subject, style, seed): drawn at 4x with PIL and
reduced by box filtering (anti-aliased edges), its jitter drawn from numpy's legacy RandomState,
whose streams numpy guarantees stable across versions.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TOY_WORLD_VERSION = 1  # bump when a drawing, a caption or a combination list below changes

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "orange": (245, 140, 25),
    "yellow": (240, 210, 40),
    "green": (45, 160, 60),
    "blue": (40, 90, 220),
    "purple": (140, 55, 190),
}
SUBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "house", "star", "tree")
STYLES: tuple[str, ...] = ("plain", "sdsweep")
STYLE_SUFFIX = ", sdsweep style"

SIZE = 64  # image side in pixels: the toy models' resolution (an 8x8 latent)
_SUPER = 4  # drawn at 4x, then box-filtered down
_PLAIN_BACKGROUND = (236, 239, 243)
_PAPER = (250, 240, 220)
_PAPER_DOT = (205, 180, 145)
_OUTLINE = (25, 25, 25)
_TRUNK = (115, 75, 40)


@dataclass(frozen=True)
class Item:
    """What one picture shows."""

    colour: str
    subject: str
    style: str = "plain"

    @property
    def styled(self) -> bool:
        return self.style == "sdsweep"

    @property
    def caption(self) -> str:
        return caption(self.colour, self.subject, self.styled)


def caption(colour: str, subject: str, styled: bool) -> str:
    """ "a red circle", "an orange star" or "a red circle, sdsweep style"."""
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {subject}" + (STYLE_SUFFIX if styled else "")


def parse_prompt(prompt: str) -> Item:
    """The colour, subject and style a prompt asks for (the inverse of `caption`)."""
    match = re.fullmatch(r"an? (\w+) (\w+)(, sdsweep style)?", prompt.strip())
    if not match or match[1] not in COLOURS or match[2] not in SUBJECTS:
        raise ValueError(f"not a toy-world prompt: {prompt!r}")
    return Item(match[1], match[2], "sdsweep" if match[3] else "plain")


# --- which combinations go where --------------------------------------------------------------

def _combo(colour_index: int, subject_index: int) -> tuple[str, str]:
    return list(COLOURS)[colour_index % len(COLOURS)], SUBJECTS[subject_index % len(SUBJECTS)]


ALL_COMBOS: tuple[tuple[str, str], ...] = tuple(_combo(c, s) for c in range(len(COLOURS)) for s in range(len(SUBJECTS)))
# Two diagonals of the colour x subject table (subject index - colour index = 0 or 3 mod 6): every
# colour and every subject is held out twice and seen styled four times.
HELD_OUT_COMBOS: tuple[tuple[str, str], ...] = tuple(_combo(c, c + d) for d in (0, 3) for c in range(len(COLOURS)))
FINETUNE_COMBOS: tuple[tuple[str, str], ...] = tuple(x for x in ALL_COMBOS if x not in HELD_OUT_COMBOS)

# Evaluation prompts: each set names every colour once and every subject once.
IN_DISTRIBUTION_PROMPTS: tuple[str, ...] = tuple(caption(*_combo(c, c + 1), styled=True) for c in range(len(COLOURS)))
HELD_OUT_PROMPTS: tuple[str, ...] = tuple(caption(*_combo(c, c), styled=True) for c in range(len(COLOURS)))


# --- drawing ----------------------------------------------------------------------------------

def _darker(colour: tuple[int, int, int], factor: float = 0.6) -> tuple[int, int, int]:
    return tuple(int(v * factor) for v in colour)


def _star(cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):
        radius = r if k % 2 == 0 else 0.45 * r
        angle = np.pi / 2 + k * np.pi / 5
        points.append((cx + radius * np.cos(angle), cy - radius * np.sin(angle)))
    return points


def _paper(draw: ImageDraw.ImageDraw, side: int) -> None:
    """Halftone dots every 8 output pixels, rows offset by half a period; symmetric under a
    horizontal flip (dots at x = 4 + 8k and 8k), so flipped training images keep the pattern."""
    period, radius = 8 * _SUPER, 1.3 * _SUPER
    for row, y in enumerate(range(period // 2, side, period)):
        for x in range(period // 2 if row % 2 == 0 else 0, side + 1, period):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=_PAPER_DOT)


def _subject(draw: ImageDraw.ImageDraw, item: Item, cx: float, cy: float, r: float) -> None:
    colour = COLOURS[item.colour]
    line = dict(outline=_OUTLINE, width=3 * _SUPER) if item.styled else {}
    if item.subject == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour, **line)
    elif item.subject == "square":
        h = 0.85 * r
        draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=colour, **line)
    elif item.subject == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + 0.8 * r), (cx + r, cy + 0.8 * r)], fill=colour, **line)
    elif item.subject == "house":
        draw.rectangle([cx - 0.75 * r, cy - 0.1 * r, cx + 0.75 * r, cy + 0.9 * r], fill=colour, **line)
        draw.polygon([(cx - r, cy - 0.1 * r), (cx, cy - r), (cx + r, cy - 0.1 * r)], fill=_darker(colour), **line)
    elif item.subject == "star":
        draw.polygon(_star(cx, cy, r), fill=colour, **line)
    elif item.subject == "tree":
        draw.rectangle([cx - 0.18 * r, cy + 0.1 * r, cx + 0.18 * r, cy + r], fill=_TRUNK, **line)
        draw.ellipse([cx - 0.8 * r, cy - r, cx + 0.8 * r, cy + 0.4 * r], fill=colour, **line)
    else:
        raise ValueError(f"unknown subject {item.subject!r}")


def render(item: Item, seed: int, size: int = SIZE) -> Image.Image:
    """The picture of `item` for `seed`: position and size jittered by a RandomState of (seed, item)."""
    key = [seed, list(COLOURS).index(item.colour), SUBJECTS.index(item.subject), STYLES.index(item.style)]
    rng = np.random.RandomState(key)
    side = size * _SUPER
    img = Image.new("RGB", (side, side), _PAPER if item.styled else _PLAIN_BACKGROUND)
    draw = ImageDraw.Draw(img)
    if item.styled:
        _paper(draw, side)
    r = side * rng.uniform(0.22, 0.32)
    cx, cy = side * (0.5 + rng.uniform(-0.12, 0.12)), side * (0.5 + rng.uniform(-0.12, 0.12))
    _subject(draw, item, cx, cy, r)
    return img.resize((size, size), Image.Resampling.BOX)


def render_array(item: Item, seed: int, size: int = SIZE) -> np.ndarray:
    """`render` as a uint8 (size, size, 3) array."""
    return np.asarray(render(item, seed, size))


# --- the fine-tuning set ----------------------------------------------------------------------

def finetune_items() -> list[tuple[Item, int]]:
    """The styled training set: one picture per fine-tuning combination, (item, seed)."""
    return [(Item(colour, subject, "sdsweep"), i) for i, (colour, subject) in enumerate(FINETUNE_COMBOS)]


def write_finetune_set(folder: Path) -> None:
    """The styled set as an ordinary data folder: NNN.png + metadata.jsonl ({"file_name", "text"})."""
    lines = []
    for i, (item, seed) in enumerate(finetune_items()):
        render(item, seed).save(folder / f"{i:03d}.png")
        lines.append(json.dumps({"file_name": f"{i:03d}.png", "text": item.caption}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def ensure_toy_dataset(cache_dir: str) -> Path:
    """Write the styled fine-tuning set once (atomically); it is then read like any folder."""
    from sdsweep.io import atomic_dir

    folder = Path(cache_dir).expanduser() / f"toy-world-data-v{TOY_WORLD_VERSION}"
    if (folder / "metadata.jsonl").exists():
        return folder
    with atomic_dir(folder) as tmp:
        write_finetune_set(tmp)
    return folder
