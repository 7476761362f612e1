"""DreamBooth prior preservation: the class images, drawn by the base model once and shared by a sweep.

What a user of diffusers' DreamBooth-LoRA scripts expects (`--with_prior_preservation --class_prompt
--num_class_images --class_data_dir --prior_loss_weight`): data.num_class_images images of
data.class_prompt, taken from data.class_data_dir first and drawn by the base model (no adapter) for
the rest; every batch holds train.batch_size instance and as many class examples, and the loss is
instance + train.prior_loss_weight * class (train/loop.py). The class images go through the same
crop, flip and feature cache as the instance images; evaluation never sees them (its references are
the training images).

Drawn once, not per trial: image i is drawn from seed i, and is named by a hash of everything that
determines it (the base model's modules, the prompt, the resolution, the sampler's steps and
guidance, the autocast dtype): a second trial, a resumed sweep or another process of a parallel
launcher finds it on disk; raising data.num_class_images from 50 to 100 draws only the 50 new ones.
A FileLock keeps two processes from drawing the same images; each PNG is written atomically and
carries the SHA-256 of its pixels, checked before it is trusted (a damaged one is drawn again).

Layout (the cache module owns the root): `class_images_root/<namespace>/seed-NNNNN.png`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock
from PIL import Image, PngImagePlugin

from sdsweep.data.cache import (
    _hash,
    _public_config,
    chunks,
    class_images_root,
    held,
    module_fingerprint,
    tokenizer_fingerprint,
)
from sdsweep.data.folder import IMAGE_SUFFIXES, DataError, Record, decode_image
from sdsweep.io import atomic_write_bytes

log = logging.getLogger(__name__)
CLASS_IMAGES_VERSION = 1
Draw = Callable[[str, list[int]], list[Image.Image]]
"""(prompt, seeds) -> one image per seed, drawn by the base model."""


def prior_on(cfg) -> bool:
    """Whether the trial trains with prior preservation."""
    return cfg.data.num_class_images > 0


def class_seed(seed: int) -> int:
    """The class images' sampler is seeded apart from the instance images' (another order, other draws)."""
    return seed + 7_919


def examples_per_batch(cfg) -> int:
    """Examples in one micro-batch: train.batch_size, twice that with class images beside them."""
    return cfg.train.batch_size * (2 if prior_on(cfg) else 1)


def class_namespace(cfg, components, autocast_dtype: torch.dtype | None) -> str:
    """Everything but the seed that determines a drawn class image; the same in every process (the scheduler's
    `_use_default_values`, a set whose order changes with the process's hash seed, is left out)."""
    modules = [module_fingerprint(m) for m in (components.denoiser, components.vae, *components.text_encoders)]
    tokenizers = [tokenizer_fingerprint(t) for t in components.tokenizers]
    d = cfg.data
    return _hash("class_images", CLASS_IMAGES_VERSION, components.family, modules, tokenizers,
                 _public_config(components.noise_scheduler), str(autocast_dtype), components.extra.get("t5_max_length"),
                 d.class_prompt, d.resolution, d.class_steps, float(d.class_guidance_scale))[:32]


def _pixel_digest(image: Image.Image) -> str:
    return hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).hexdigest()


def _png_bytes(image: Image.Image) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("sdsweep_sha256", _pixel_digest(image))
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def _intact(path: Path) -> bool:
    """The PNG decodes and its pixels are those it was written with."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.text.get("sdsweep_sha256") == _pixel_digest(im)
    except Exception:  # noqa: BLE001 - any damage means "draw it again"
        return False


@dataclass
class ClassReport:
    """What set-up did about the class images, for metrics.json (data.class_images)."""

    requested: int = 0
    from_folder: int = 0
    cached: int = 0
    drawn: int = 0
    damaged: int = 0
    seconds: float = 0.0
    folder: str = ""
    records: list[Record] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "records"}


def _user_images(cfg) -> list[Path]:
    """data.class_data_dir's images (sorted), at most data.num_class_images of them."""
    if not cfg.data.class_data_dir:
        return []
    folder = Path(cfg.data.class_data_dir).expanduser()
    if not folder.is_dir():
        raise DataError(f"data.class_data_dir={folder} is not a folder of images")
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return images[: cfg.data.num_class_images]


def _record(path: Path, prompt: str) -> Record:
    try:
        image = decode_image(path)
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"data.class_data_dir: {path} cannot be decoded ({type(e).__name__}: {e})") from e
    return Record(path, prompt, image.width, image.height)


def ensure_class_images(cfg, namespace: str, draw: Draw, batch_size: int = 1) -> ClassReport:
    """data.num_class_images class images as training records: data.class_data_dir's, then those the
    base model drew (from the cache, or drawn now under the namespace's lock)."""
    started = time.perf_counter()
    prompt = " ".join(str(cfg.data.class_prompt).split())
    report = ClassReport(requested=cfg.data.num_class_images)
    report.records = [_record(p, prompt) for p in _user_images(cfg)]
    report.from_folder = len(report.records)
    missing = report.requested - report.from_folder
    folder = class_images_root(cfg) / namespace
    report.folder = str(folder)
    if missing > 0:
        folder.mkdir(parents=True, exist_ok=True)
        paths = [folder / f"seed-{seed:05d}.png" for seed in range(missing)]
        with held(FileLock(str(folder / ".lock")),
                  f"class images: another trial is drawing them into {folder}; waiting for it"):
            todo = []
            for seed, path in enumerate(paths):
                if _intact(path):
                    report.cached += 1
                    continue
                if path.exists():
                    report.damaged += 1
                    log.warning("class images: %s is damaged; drawing it again", path)
                todo.append(seed)
            for seeds in chunks(todo, max(1, batch_size)):
                for seed, image in zip(seeds, draw(prompt, seeds)):
                    atomic_write_bytes(paths[seed], _png_bytes(image))
                    report.drawn += 1
        report.records += [_record(p, prompt) for p in paths]
    report.seconds = time.perf_counter() - started
    log.info("class images (data.num_class_images=%d, data.class_prompt=%r): %d from data.class_data_dir, "
             "%d cached, %d drawn by the base model in %.1f s under %s", report.requested, prompt,
             report.from_folder, report.cached, report.drawn, report.seconds, folder)
    return report
