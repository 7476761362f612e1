"""Captioned image sets: the built-in set, image folders, safe decoding, transforms.

A folder follows the diffusers / Hugging Face imagefolder convention: `metadata.jsonl` with
one `{"file_name": ..., "text": ...}` per line, or a `.txt` caption beside each image
(kohya's convention). Every image is decoded once at set-up; what cannot be used is
skipped, counted and reported in one warning, not discovered as a crash mid-training.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile

from .config import DataConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
BUILTIN_VERSION = 1
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail here, not load half grey


class DataError(ValueError):
    """The data set cannot be used; the message says what to change."""


@dataclass
class Record:
    path: Path
    caption: str


@dataclass
class ScanReport:
    records: list[Record]
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    truncated_captions: int = 0

    def skip(self, reason: str, path: Path, detail: str = "") -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, f"{path.name}{': ' + detail if detail else ''}")

    def summary(self) -> dict:
        return {"images": len(self.records), "skipped": dict(self.skipped), "examples": dict(self.examples),
                "truncated_captions": self.truncated_captions}


# --- the built-in set -----------------------------------------------------------------------

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
    from .io import atomic_dir

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


# --- folders ----------------------------------------------------------------------------------


def _captions_from_metadata(folder: Path) -> dict[str, str]:
    captions = {}
    with open(folder / "metadata.jsonl", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row["file_name"]] = row.get("text") or ""
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{folder / 'metadata.jsonl'} line {lineno} is not a JSON object with "
                    f'"file_name" and "text" ({e}): fix or remove that line'
                ) from e
    return captions


def decode_image(path: Path) -> Image.Image:
    """Decode fully (a truncated file fails here) and convert any mode to 8-bit RGB with care.

    Transparent images are composited on white (not on black, which converting RGBA to RGB
    does); 16-bit and 32-bit greyscale are rescaled (a plain convert clips them to white);
    CMYK and palette images are converted.
    """
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
            return Image.fromarray(scaled.astype(np.uint8)).convert("RGB")
        if im.mode == "P" or im.mode == "PA":
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "La", "RGBa"):
            im = im.convert("RGBA")
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, im).convert("RGB")
        return im.convert("RGB")


def scan_folder(folder: Path, min_size: int = 8) -> ScanReport:
    """Find every usable (image, caption) pair in `folder`; count and explain the rest."""
    if not folder.exists():
        raise DataError(f"data.path={folder} does not exist: point data.path at a folder of images")
    if not folder.is_dir():
        raise DataError(f"data.path={folder} is not a folder")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataError(
            f"data.path={folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}): add images or fix the path"
        )
    from_metadata = (folder / "metadata.jsonl").exists()
    captions = _captions_from_metadata(folder) if from_metadata else {}
    report = ScanReport(records=[])
    for path in images:
        rel = path.relative_to(folder).as_posix()
        if from_metadata:
            caption = captions.get(rel)
        else:
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.exists() else None
        if caption is None:
            report.skip("no caption", path)
            continue
        caption = " ".join(caption.split())
        if not caption:
            report.skip("empty caption", path)
            continue
        try:
            img = decode_image(path)
        except Exception as e:  # PIL raises many types for broken files
            report.skip("unreadable image", path, f"{type(e).__name__}: {e}")
            continue
        if min(img.size) < min_size:
            report.skip("too small", path, f"{img.size[0]}x{img.size[1]} < data.min_size={min_size}")
            continue
        report.records.append(Record(path, caption))
    if report.skipped["no caption"] == len(images):
        raise DataError(
            f"data.path={folder} has {len(images)} images but no captions: add metadata.jsonl with one "
            '{"file_name": "img.png", "text": "a caption"} per line, or a .txt caption beside each image'
        )
    if not report.records:
        raise DataError(f"data.path={folder}: none of the {len(images)} images is usable: {report.summary()}")
    if report.skipped:
        details = "; ".join(f"{n} {reason} (e.g. {report.examples[reason]})" for reason, n in report.skipped.items())
        log.warning("data: using %d of %d images in %s; skipped %s", len(report.records), len(images), folder, details)
    return report


def count_long_captions(records: list[Record], tokenizers: list) -> int:
    """Captions longer than the tokenizers' window (77 CLIP tokens) are cut at training time,
    as in every SD trainer; say so once, with an example, instead of silently."""
    long = []
    for tokenizer in tokenizers[:1]:
        limit = tokenizer.model_max_length
        ids = tokenizer([r.caption for r in records], truncation=False).input_ids
        long = [r for r, i in zip(records, ids) if len(i) > limit]
        if long:
            log.warning("data: %d of %d captions are longer than %d tokens and will be truncated (e.g. %s: %r...)",
                        len(long), len(records), limit, long[0].path.name, long[0].caption[:80])
    return len(long)


# --- the training set ---------------------------------------------------------------------------


class CaptionedImages(torch.utils.data.Dataset):
    """Images resized and cropped to a square `resolution`, with SDXL's micro-conditioning.

    Indexed by (index, draw): `draw` seeds the random crop, flip and caption dropout, so a
    resumed trial sees exactly the batches an uninterrupted one would have seen.
    """

    def __init__(self, records: list[Record], cfg: DataConfig):
        self.records, self.cfg = records, cfg

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, draw = key
        rng = random.Random(draw)
        record, res = self.records[index], self.cfg.resolution
        img = decode_image(record.path)
        original_size = (img.height, img.width)
        scale = res / min(img.size)
        img = img.resize((max(res, round(img.width * scale)), max(res, round(img.height * scale))), Image.BICUBIC)
        if self.cfg.crop == "center":
            top, left = (img.height - res) // 2, (img.width - res) // 2
        else:
            top, left = rng.randint(0, img.height - res), rng.randint(0, img.width - res)
        resized_width = img.width
        img = img.crop((left, top, left + res, top + res))
        if self.cfg.hflip and rng.random() < 0.5:
            # SDXL's crop conditioning describes the flipped image: mirror the crop's left edge
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            left = resized_width - left - res
        caption = "" if rng.random() < self.cfg.caption_dropout else record.caption
        pixels = torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0
        return {
            "pixel_values": pixels,
            "caption": caption,
            "original_size": torch.tensor(original_size),
            "crop_top_left": torch.tensor((top, left)),
        }


class StepSampler(torch.utils.data.Sampler):
    """Endless (index, draw) keys: a fresh permutation per epoch, seeded by (seed, epoch).

    Starting at `start` samples in, it yields what an uninterrupted run would yield from there.
    """

    def __init__(self, n: int, seed: int, start: int = 0):
        self.n, self.seed, self.start = n, seed, start

    def __iter__(self):
        position = self.start
        while True:
            epoch, offset = divmod(position, self.n)
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for i in order[offset:].tolist():
                yield (i, self.seed * 1_000_003 + position)
                position += 1


def collate(batch: list[dict]) -> dict:
    return {
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
        "captions": [b["caption"] for b in batch],
        "original_size": torch.stack([b["original_size"] for b in batch]),
        "crop_top_left": torch.stack([b["crop_top_left"] for b in batch]),
    }


def load_dataset(cfg: DataConfig, cache_dir: str) -> tuple[CaptionedImages, ScanReport]:
    folder = Path(cfg.path).expanduser() if cfg.path else ensure_builtin_dataset(cache_dir)
    report = scan_folder(folder, cfg.min_size)
    return CaptionedImages(report.records, cfg), report


def make_loader(dataset: CaptionedImages, batch_size: int, seed: int, start_sample: int, num_workers: int):
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=StepSampler(len(dataset), seed, start_sample),
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        drop_last=True,
    )
