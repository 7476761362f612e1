"""A Hugging Face dataset (`data.dataset=NAME`) exported once to an ordinary image folder.

The image bytes are written as they are stored (no re-encoding) with a metadata.jsonl, under
`model.cache_dir/datasets/NAME-FINGERPRINT/`, and then read by the same scan as any folder:
one decoding path, one bad-record report, and file identities the feature cache can hash.
Rows without an image are dropped here and counted in the folder's export report, which the
scan adds to its own.

The `datasets` package is optional (pip install 'sdsweep[hf]'); it is imported only here.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from PIL import Image

from sdsweep.config.schema import DataConfig
from sdsweep.data.folder import EXPORT_CAPTION_COLUMN, EXPORT_REPORT, DataError, caption_text
from sdsweep.io import atomic_dir

log = logging.getLogger(__name__)
EXPORT_VERSION = 1


def _offline() -> bool:
    return any(os.environ.get(k, "0").lower() not in ("0", "", "false") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            "data.dataset needs the Hugging Face `datasets` package, which is not installed: "
            "pip install 'sdsweep[hf]' (or pip install datasets), or export the images to a folder "
            "and set data.path=FOLDER instead"
        ) from e
    return datasets


def open_dataset(cfg: DataConfig):
    """The `data.split` split of `data.dataset`: a folder from save_to_disk, or a hub name."""
    datasets = _import_datasets()
    local = Path(cfg.dataset).expanduser()
    if local.exists():
        ds = datasets.load_from_disk(str(local))
    else:
        try:
            ds = datasets.load_dataset(cfg.dataset, split=cfg.split)
        except Exception as e:  # ConnectionError offline, DatasetNotFoundError, HTTP errors...
            if _offline():
                hint = (
                    f"HF_HUB_OFFLINE is set and data.dataset={cfg.dataset} is not in the Hugging Face cache: "
                    "run once with the network (or `hf download "
                    f"{cfg.dataset} --repo-type dataset`) to fill the cache, or set data.path=FOLDER"
                )
            else:
                hint = (
                    f"check the name (data.dataset={cfg.dataset}), your network and `hf auth login` for "
                    "gated data sets, or set data.path=FOLDER"
                )
            raise DataError(f"could not load data.dataset={cfg.dataset}: {hint}\n  ({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"data.split={cfg.split} is not a split of {cfg.dataset}: it has {sorted(ds)}")
        ds = ds[cfg.split]
    for key in ("image_column", "caption_column"):
        if getattr(cfg, key) not in ds.column_names:
            raise DataError(
                f"data.{key}={getattr(cfg, key)} is not a column of {cfg.dataset} "
                f"(its columns: {ds.column_names}): set data.{key}"
            )
    return ds


def _image_bytes(value: Any) -> bytes | None:
    """The stored bytes of an image cell: an undecoded Image feature, a path, or a PIL image."""
    if value is None:
        return None
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        return Path(value["path"]).read_bytes() if value.get("path") else None
    if isinstance(value, str):
        return Path(value).read_bytes()
    if isinstance(value, Image.Image):
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    return None


def _suffix(data: bytes) -> str:
    """The file suffix of `data` from its header (no decoding); .png for what PIL cannot identify,
    so the scan still sees the file and reports it as unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp",
                    "TIFF": ".tif"}.get(im.format or "", ".png")
    except Exception:  # noqa: BLE001 - an unidentifiable image is reported by the scan
        return ".png"


def export_dataset(cfg: DataConfig, cache_dir: str) -> Path:
    """Export `data.dataset` once to a folder of images + metadata.jsonl; return the folder."""
    ds = open_dataset(cfg)
    datasets = _import_datasets()
    if isinstance(ds.features.get(cfg.image_column), datasets.Image):
        ds = ds.cast_column(cfg.image_column, datasets.Image(decode=False))  # keep the stored bytes
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", cfg.dataset.strip("/"))[-60:]
    fingerprint = getattr(ds, "_fingerprint", "nofingerprint")
    name = f"{slug}-{cfg.split}-{cfg.image_column}-{cfg.caption_column}-{fingerprint}-v{EXPORT_VERSION}"
    folder = Path(cache_dir).expanduser() / "datasets" / name
    if (folder / "metadata.jsonl").exists():
        return folder
    log.info("data: exporting %d rows of %s to %s (once)", len(ds), cfg.dataset, folder)
    skipped, examples = Counter(), {}
    with atomic_dir(folder) as tmp:
        lines = []
        for i, row in enumerate(ds):
            data = _image_bytes(row[cfg.image_column])
            if not data:
                skipped["no image"] += 1
                examples.setdefault("no image", f"row {i}")
                continue
            file_name = f"{i:06d}{_suffix(data)}"
            (tmp / file_name).write_bytes(data)
            caption = caption_text(row[cfg.caption_column])
            lines.append(json.dumps({"file_name": file_name, EXPORT_CAPTION_COLUMN: caption}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        (tmp / EXPORT_REPORT).write_text(json.dumps({"skipped": skipped, "examples": examples}))
    return folder
