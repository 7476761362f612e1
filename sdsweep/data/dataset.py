"""Captioned image sets: the built-in set, image folders, safe decoding, transforms, buckets.

A folder follows the diffusers / Hugging Face imagefolder convention: `metadata.jsonl` with
one `{"file_name": ..., "text": ...}` per line or `metadata.csv` with the same columns, or a
`.txt` caption beside each image (kohya's convention). A Hugging Face dataset is exported to
such a folder once (`hf.py`). Every image is decoded once at set-up; what cannot be used
is skipped, counted and reported in one warning, not discovered as a crash mid-training.

`resolve_source` is the one place that turns data.dataset / data.path / nothing into the folder a
trial trains on: training (`load_dataset`) and evaluation (its style references, the base model's
key) both ask it, so they can never disagree about which images the trial learnt from.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps

from sdsweep.config.schema import DataConfig
from sdsweep.data.builtin import BUILTIN_VERSION, ensure_builtin_dataset

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated JPEG must fail here, not load half grey


class DataError(ValueError):
    """The data set cannot be used; the message says what to change."""


@dataclass
class Record:
    path: Path
    caption: str
    width: int = 0
    """Size of the decoded image (after EXIF rotation), measured by the scan."""
    height: int = 0


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

    def log_once(self, total: int, folder: Path) -> None:
        """One warning for all skipped records of a scan, with an example of each reason."""
        if self.skipped:
            details = "; ".join(f"{n} {reason} (e.g. {self.examples[reason]})" for reason, n in self.skipped.items())
            log.warning("data: using %d of %d images in %s; skipped %s", len(self.records), total, folder, details)


# --- folders ----------------------------------------------------------------------------------


EXPORT_REPORT = ".sdsweep-export.json"  # records dropped while exporting a Hugging Face dataset
EXPORT_CAPTION_COLUMN = "text"  # the caption field of an exported dataset's metadata.jsonl


def caption_text(value: Any) -> str:
    """A caption cell as text: lists (several captions per image) give their first string."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    return "" if value is None else str(value)


def _captions_from_jsonl(path: Path, column: str) -> dict[str, str]:
    captions, seen_column = {}, False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                captions[row["file_name"]] = caption_text(row.get(column))
                seen_column |= column in row
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise DataError(
                    f"{path} line {lineno} is not a JSON object with "
                    f'"file_name" and "{column}" ({e}): fix or remove that line'
                ) from e
    if captions and not seen_column:
        raise DataError(f'{path} has no "{column}" field on any line: set data.caption_column to its caption field')
    return captions


def _captions_from_csv(path: Path, column: str) -> dict[str, str]:
    with open(path, encoding="utf-8-sig", newline="") as f:  # -sig: spreadsheets write a BOM
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if "file_name" not in fields or column not in fields:
            raise DataError(
                f"{path} has columns {fields}: it needs file_name and {column} "
                "(set data.caption_column to the caption column's name)"
            )
        return {row["file_name"]: caption_text(row[column]) for row in reader}


def captions_from_metadata(folder: Path, column: str = "text") -> dict[str, str] | None:
    """file_name -> caption from metadata.jsonl or metadata.csv; None when the folder has neither."""
    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    if jsonl.exists() and table.exists():
        raise DataError(f"{folder} has both metadata.jsonl and metadata.csv: keep one of them")
    if jsonl.exists():
        return _captions_from_jsonl(jsonl, column)
    if table.exists():
        return _captions_from_csv(table, column)
    return None


def decode_image(path: Path) -> Image.Image:
    """Decode fully (a truncated file fails here) and convert any mode to 8-bit RGB with care.

    Transparent images are composited on white (not on black, which converting RGBA to RGB
    does); 16-bit and 32-bit greyscale are rescaled (a plain convert clips them to white);
    CMYK and palette images are converted.
    """
    with Image.open(path) as im:
        im.load()
        im = ImageOps.exif_transpose(im)  # phone photos store "rotate 90" as a tag, not as pixels
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


def _seed_from_export(folder: Path, report: ScanReport) -> None:
    """Records dropped while exporting a Hugging Face dataset count as skipped here too."""
    if (folder / EXPORT_REPORT).exists():
        dropped = json.loads((folder / EXPORT_REPORT).read_text())
        report.skipped.update(dropped.get("skipped", {}))
        report.examples.update(dropped.get("examples", {}))


def scan_folder(folder: Path, min_size: int = 8, caption_column: str = "text") -> ScanReport:
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
    captions = captions_from_metadata(folder, caption_column)
    report = ScanReport(records=[])
    _seed_from_export(folder, report)
    for path in images:
        if captions is not None:
            caption = captions.get(path.relative_to(folder).as_posix())
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
        report.records.append(Record(path, caption, img.width, img.height))
    if report.skipped["no caption"] == len(images):
        raise DataError(
            f"data.path={folder} has {len(images)} images but no captions: add metadata.jsonl with one "
            '{"file_name": "img.png", "text": "a caption"} per line (or metadata.csv with columns '
            "file_name,text), or a .txt caption beside each image"
        )
    if not report.records:
        raise DataError(f"data.path={folder}: none of the {len(images)} images is usable: {report.summary()}")
    report.log_once(len(images), folder)
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


# --- geometry: resize, crop, flip, buckets -------------------------------------------------------


def make_buckets(resolution: int, step: int, max_aspect: float) -> list[tuple[int, int]]:
    """(height, width) buckets with sides multiples of `step` and an area of at most resolution^2."""
    area, buckets = resolution * resolution, {(resolution, resolution)}
    for width in range(step, int(resolution * max_aspect) + 1, step):
        height = area // width // step * step
        if height >= step and max(width, height) / min(width, height) <= max_aspect:
            buckets.add((height, width))
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log space: 2:1 and 1:2 are as far from 1:1)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[1] / b[0]) - aspect))


def cover_size(width: int, height: int, target: tuple[int, int]) -> tuple[int, int]:
    """(width, height) after resizing so the image covers `target` (h, w) keeping its aspect ratio."""
    th, tw = target
    scale = max(tw / width, th / height)
    return max(tw, round(width * scale)), max(th, round(height * scale))


@dataclass(frozen=True)
class View:
    """Everything random about one draw of an item: what is cut out of which image, and the caption."""

    index: int
    target: tuple[int, int]
    """(height, width) of the training image: (resolution, resolution), or its bucket."""
    resized: tuple[int, int]
    """(width, height) of the image after resizing, before cropping."""
    top: int
    left: int
    flip: bool
    caption: str

    @property
    def crop_top_left(self) -> tuple[int, int]:
        # SDXL's crop conditioning describes the flipped image: mirror the crop's left edge
        left = self.resized[0] - self.left - self.target[1] if self.flip else self.left
        return self.top, left


# --- the training set ---------------------------------------------------------------------------


class CaptionedImages(torch.utils.data.Dataset):
    """Images resized and cropped to `resolution` (or their bucket), with SDXL's micro-conditioning.

    Indexed by (index, draw): `draw` seeds the random crop, flip and caption dropout, so a
    resumed trial sees exactly the batches an uninterrupted one would have seen.

    `latents` and `texts` are set by the feature cache (`cache.py`): an item then carries the
    cached latent distribution instead of pixels, and/or the cached text-encoder outputs of
    its caption. What is drawn (the `View`) does not change.
    """

    def __init__(self, records: list[Record], cfg: DataConfig):
        self.records, self.cfg = records, cfg
        res = cfg.resolution
        if cfg.buckets:
            buckets = make_buckets(res, cfg.bucket_step, cfg.max_aspect)
            self.targets = [nearest_bucket(r.width, r.height, buckets) for r in records]
        else:
            self.targets = [(res, res)] * len(records)
        self.latents: Any = None
        self.texts: Any = None

    def __len__(self) -> int:
        return len(self.records)

    def view(self, key: tuple[int, int]) -> View:
        index, draw = key
        rng = random.Random(draw)
        record, target = self.records[index], self.targets[index]
        resized = cover_size(record.width, record.height, target)
        if self.cfg.crop == "center":
            top, left = (resized[1] - target[0]) // 2, (resized[0] - target[1]) // 2
        else:
            top, left = rng.randint(0, resized[1] - target[0]), rng.randint(0, resized[0] - target[1])
        flip = self.cfg.hflip and rng.random() < 0.5
        caption = "" if rng.random() < self.cfg.caption_dropout else record.caption
        return View(index, target, resized, top, left, flip, caption)

    def fixed_views(self) -> list[View] | None:
        """Every view training can draw, when there are few: one crop per image (centre crop,
        or an image that already has its target's shape) times the flips. None when a random
        crop can cut an image in many places (its latents then cannot be cached exactly)."""
        views = []
        for index, (record, target) in enumerate(zip(self.records, self.targets)):
            resized = cover_size(record.width, record.height, target)
            if self.cfg.crop == "random" and resized != (target[1], target[0]):
                return None
            top, left = (resized[1] - target[0]) // 2, (resized[0] - target[1]) // 2
            for flip in (False, True) if self.cfg.hflip else (False,):
                views.append(View(index, target, resized, top, left, flip, record.caption))
        return views

    def pixels(self, view: View) -> torch.Tensor:
        """The view's pixels in [-1, 1], (3, h, w)."""
        record = self.records[view.index]
        img = decode_image(record.path)
        if img.size != (record.width, record.height):
            raise DataError(f"{record.path} changed since the data set was scanned: start the trial again")
        th, tw = view.target
        img = img.resize(view.resized, Image.BICUBIC).crop((view.left, view.top, view.left + tw, view.top + th))
        if view.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

    def __getitem__(self, key: tuple[int, int]) -> dict:
        view = self.view(key)
        record = self.records[view.index]
        item = {
            "key": torch.tensor(key),  # (image, draw): which sample this is (debug.trace_data)
            "caption": view.caption,
            "original_size": torch.tensor((record.height, record.width)),
            "crop_top_left": torch.tensor(view.crop_top_left),
            "target_size": torch.tensor(view.target),
        }
        if self.latents is not None:
            item["latent_dist"] = self.latents.load(record, view)
        else:
            item["pixel_values"] = self.pixels(view)
        if self.texts is not None:
            item["text_features"] = self.texts.load(view.caption)
        return item


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


class BucketBatchSampler(torch.utils.data.Sampler):
    """Endless batches of (index, draw) keys, each batch from a single bucket.

    Per epoch (seeded by (seed, epoch)): shuffle each bucket, cut it into full batches (a
    bucket's last batch is filled up with its own first images), shuffle the batches. Every
    epoch has the same number of batches, so `start` samples in it resumes exactly; draws are
    numbered by sample position as in `StepSampler`.
    """

    def __init__(self, targets: list[tuple[int, int]], batch_size: int, seed: int, start: int = 0):
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for index, target in enumerate(targets):
            groups[target].append(index)
        self.groups = [groups[k] for k in sorted(groups)]
        self.batch_size, self.seed, self.start = batch_size, seed, start
        self.per_epoch = sum(math.ceil(len(g) / batch_size) for g in self.groups)

    def epoch(self, epoch: int) -> list[list[int]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        batches = []
        for group in self.groups:
            order = [group[i] for i in torch.randperm(len(group), generator=gen).tolist()]
            filled = order + [order[k % len(order)] for k in range(-len(order) % self.batch_size)]
            batches += [filled[i : i + self.batch_size] for i in range(0, len(filled), self.batch_size)]
        return [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]

    def __iter__(self):
        position = self.start - self.start % self.batch_size
        epoch, offset = divmod(position // self.batch_size, self.per_epoch)
        while True:
            for batch in self.epoch(epoch)[offset:]:
                yield [(i, self.seed * 1_000_003 + position + k) for k, i in enumerate(batch)]
                position += self.batch_size
            epoch, offset = epoch + 1, 0


def collate(batch: list[dict]) -> dict:
    """Stack every tensor field; captions stay a list of strings."""
    out: dict = {"captions": [b["caption"] for b in batch]}
    for key, value in batch[0].items():
        if isinstance(value, torch.Tensor):
            out[key] = torch.stack([b[key] for b in batch])
        elif isinstance(value, dict):
            out[key] = {k: torch.stack([b[key][k] for b in batch]) for k in value}
    return out


# --- where the images come from -------------------------------------------------------------------


@dataclass(frozen=True)
class DataSource:
    """The folder a trial trains on and how to read it; `identity` names it in keys (the base model's)."""

    folder: Path
    caption_column: str
    """The caption field of the folder's metadata (an exported Hugging Face dataset always writes "text")."""
    min_size: int
    identity: str
    """The same for the same records whatever the process or working directory, different for another
    data set, folder, caption column or minimum size."""

    def scan(self) -> ScanReport:
        return scan_folder(self.folder, self.min_size, self.caption_column)


def resolve_source(cfg: DataConfig, cache_dir: str) -> DataSource:
    """data.dataset (exported once to a folder), data.path, or the built-in set: the only dispatch of the three."""
    if cfg.dataset:
        from sdsweep.data.hf import export_dataset  # `datasets` is optional: imported only when asked for

        folder = export_dataset(cfg, cache_dir)
        # the export folder's name holds the data set, split, both columns and its fingerprint
        return _source(folder, EXPORT_CAPTION_COLUMN, cfg.min_size, f"hf:{folder.name}")
    if cfg.path:
        folder = Path(cfg.path).expanduser()
        return _source(folder, cfg.caption_column, cfg.min_size, f"folder:{folder.resolve()}")
    return _source(ensure_builtin_dataset(cache_dir), "text", cfg.min_size, f"builtin-v{BUILTIN_VERSION}")


def _source(folder: Path, caption_column: str, min_size: int, origin: str) -> DataSource:
    identity = f"{origin}|caption_column={caption_column}|min_size={min_size}"
    return DataSource(folder, caption_column, min_size, identity)


def load_dataset(cfg: DataConfig, cache_dir: str) -> tuple[CaptionedImages, ScanReport]:
    """The records of data.dataset, data.path or the built-in set (`resolve_source`), scanned, as a training set."""
    report = resolve_source(cfg, cache_dir).scan()
    return CaptionedImages(report.records, cfg), report


class Shard(torch.utils.data.Sampler):
    """One process's share of an endless sampler under a multi-process launch (one trial on
    several GPUs): of every `world` consecutive groups of `group` items (a global micro-batch),
    the `rank`-th. The processes draw disjoint samples, and together exactly the samples (with
    the same crops, flips and caption dropout) that one process with `world` times the batch
    would draw, so a resumed trial resumes at the same sample however it was launched."""

    def __init__(self, sampler: torch.utils.data.Sampler, group: int, rank: int, world: int):
        self.sampler, self.group, self.rank, self.world = sampler, group, rank, world

    def __iter__(self):
        for i, item in enumerate(self.sampler):
            if (i // self.group) % self.world == self.rank:
                yield item


def make_loader(dataset: CaptionedImages, batch_size: int, seed: int, start_sample: int, num_workers: int,
                rank: int = 0, world: int = 1):
    """Endless batches of `batch_size` from global sample `start_sample` on; with `world` > 1
    processes, this process's share of each global batch of `batch_size * world` samples."""
    common = dict(collate_fn=collate, num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                  persistent_workers=num_workers > 0)
    if dataset.cfg.buckets:
        # a bucket sampler yields whole batches: each process takes every world-th one
        batches = BucketBatchSampler(dataset.targets, batch_size, seed, start_sample)
        if world > 1:
            batches = Shard(batches, 1, rank, world)
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, **common)
    sampler = StepSampler(len(dataset), seed, start_sample)
    if world > 1:
        sampler = Shard(sampler, batch_size, rank, world)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, **common)
