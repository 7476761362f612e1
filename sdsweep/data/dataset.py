"""The training set of a trial: where its images come from, their geometry (resize, crop, flip,
buckets), the dataset and the samplers that feed the loop.

`resolve_source` is the one place that turns data.dataset / data.path / nothing into the folder a
trial trains on: training (`load_dataset`) and evaluation (its style references, the base model's
key) both ask it, so they can never disagree about which images the trial learnt from.
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdsweep.config.schema import DataConfig
from sdsweep.data.folder import (
    EXPORT_CAPTION_COLUMN,
    DataError,
    Record,
    ScanReport,
    decode_image,
    scan_folder,
)
from sdsweep.data.toy_world import TOY_WORLD_VERSION, ensure_toy_dataset

log = logging.getLogger(__name__)


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

    def fixed_views(self) -> list[View]:
        """Every view training draws when each image has one crop (cache.latents_cached decides
        when), times the flips."""
        views = []
        for index, (record, target) in enumerate(zip(self.records, self.targets)):
            resized = cover_size(record.width, record.height, target)
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


def with_class_examples(instances, classes):
    """Each instance batch with a class batch after it, joined along the batch (diffusers' DreamBooth
    collate_fn): one forward for both; `class_examples` says how many of the last examples are class images."""
    for instance, klass in zip(instances, classes):
        batch = {k: _join(instance[k], klass[k]) for k in instance}
        batch["class_examples"] = len(klass["captions"])
        yield batch


def _join(a, b):
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return list(a) + list(b)


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
    return _source(ensure_toy_dataset(cache_dir), "text", cfg.min_size, f"builtin-toy-world-v{TOY_WORLD_VERSION}")


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
