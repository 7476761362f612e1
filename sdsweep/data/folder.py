"""Image folders: captions, safe decoding, the scan that keeps what can be trained on.

A folder follows the diffusers / Hugging Face imagefolder convention: `metadata.jsonl` with
one `{"file_name": ..., "text": ...}` per line or `metadata.csv` with the same columns, or a
`.txt` caption beside each image (kohya's convention). A Hugging Face dataset is exported to
such a folder once (`hf.py`). Every image is decoded once at set-up; what cannot be used
is skipped, counted and reported in one warning, not discovered as a crash mid-training.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

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


UTF16_BOMS = (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)


def read_text_file(path: Path) -> str:
    """The text of a caption or metadata file, decoded strictly: UTF-8, with or without the byte-order
    mark spreadsheets write (Excel's "CSV UTF-8"), or UTF-16 with its byte-order mark (Excel's "Unicode
    text", Windows Notepad), which names its encoding unambiguously. Anything else is a DataError naming
    the file: a caption must never be trained on with characters replaced by U+FFFD."""
    data = path.read_bytes()
    utf16 = data.startswith(UTF16_BOMS)
    if b"\x00" in data and not utf16:  # no caption holds NUL: UTF-16 written without a BOM (ASCII's high bytes)
        order = "utf-16be" if data.startswith(b"\x00") else "utf-16le"
        raise DataError(f"{path} holds NUL bytes: it is probably UTF-16 without a byte-order mark; re-save it "
                        f"as UTF-8, e.g. `iconv -f {order} -t utf-8 {path} > {path.name}.utf8`")
    text = _decode_utf16(path, data) if utf16 else _decode_utf8(path, data)
    if "\x00" in text:  # a UTF-32 file starts with the UTF-16 little-endian BOM, then decodes to NULs
        raise DataError(f"{path} is not UTF-8 or UTF-16 (UTF-32?): re-save it as UTF-8")
    return text


def _decode_utf16(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-16")  # the BOM says which byte order; the decoder drops it
    except UnicodeDecodeError as e:
        raise DataError(f"{path} starts with a UTF-16 byte-order mark but is not valid UTF-16 "
                        f"(at offset {e.start}): re-save it as UTF-8") from e


def _decode_utf8(path: Path, data: bytes) -> str:
    body = data.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as e:
        offset = e.start + len(data) - len(body)
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path} is not UTF-8 (byte 0x{data[offset]:02x} at offset {offset}, line {line}): re-save it as "
            f"UTF-8, e.g. for Latin-1 / Windows-1252 text `iconv -f latin1 -t utf-8 {path} > {path.name}.utf8` "
            "and move that over the original"
        ) from e


def _captions_from_jsonl(path: Path, column: str) -> dict[str, str]:
    captions, seen_column = {}, False
    # the line breaks of a text-mode read (not str.splitlines: U+2028 and friends may sit inside a caption;
    # a raw \r cannot, JSON escapes it)
    lines = read_text_file(path).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    for lineno, line in enumerate(lines, 1):
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
    reader = csv.DictReader(io.StringIO(read_text_file(path), newline=""))
    fields = reader.fieldnames or []
    if "file_name" not in fields or column not in fields:
        raise DataError(
            f"{path} has columns {fields}: it needs file_name and {column} "
            "(set data.caption_column to the caption column's name)"
        )
    return {row["file_name"]: caption_text(row[column]) for row in reader}


def captions_from_sidecars(folder: Path, images: list[Path]) -> dict[str, str]:
    """file_name -> caption from the `.txt` beside each image (kohya's convention); images without one are
    left out. Caption files that cannot be decoded are one DataError naming them, before any image is decoded."""
    captions: dict[str, str] = {}
    bad: list[tuple[Path, DataError]] = []
    for image in images:
        sidecar = image.with_suffix(".txt")
        if not sidecar.exists():
            continue
        try:
            captions[image.relative_to(folder).as_posix()] = read_text_file(sidecar)
        except DataError as e:
            bad.append((sidecar, e))
    if bad:
        others = [p.name for p, _ in bad[1:]]
        also = f" (so are {len(others)} more: {', '.join(others[:3])}{', ...' * (len(others) > 3)})" if others else ""
        raise DataError(f"{bad[0][1]}{also}") from bad[0][1]
    return captions


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
    if captions is None:
        captions = captions_from_sidecars(folder, images)
    report = ScanReport(records=[])
    _seed_from_export(folder, report)
    for path in images:
        caption = captions.get(path.relative_to(folder).as_posix())
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


