"""Image folders: captions from metadata.jsonl or .txt, bad records skipped and counted, clear errors."""

from __future__ import annotations

import pytest
import torch
from helpers import write_folder

from sdsweep.config import DataConfig
from sdsweep.data import CaptionedImages, DataError, ensure_builtin_dataset, scan_folder


def test_builtin_set_is_deterministic_and_captioned(tmp_path):
    a = scan_folder(ensure_builtin_dataset(str(tmp_path / "a")))
    b = scan_folder(ensure_builtin_dataset(str(tmp_path / "b")))
    assert len(a.records) == 12 and [r.caption for r in a.records] == [r.caption for r in b.records]
    assert all("sdsweep style" in r.caption for r in a.records)
    assert a.records[0].path.read_bytes() == b.records[0].path.read_bytes()


@pytest.mark.parametrize("captions", ["jsonl", "txt"])
def test_both_caption_conventions_are_read(tmp_path, captions):
    report = scan_folder(write_folder(tmp_path, n=3, captions=captions))
    assert [r.caption for r in report.records] == [f"picture {i}, test style" for i in range(3)]


def test_missing_folder_names_the_key(tmp_path):
    with pytest.raises(DataError, match="data.path=.*does not exist"):
        scan_folder(tmp_path / "nope")


def test_folder_without_images(tmp_path):
    (tmp_path / "notes.md").write_text("hi")
    with pytest.raises(DataError, match="holds no images"):
        scan_folder(tmp_path)


def test_folder_without_captions_says_how_to_add_them(tmp_path):
    with pytest.raises(DataError, match="no captions.*metadata.jsonl.*txt"):
        scan_folder(write_folder(tmp_path, captions="none"))


def test_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path, caplog):
    folder = write_folder(tmp_path, n=3, captions="txt")
    (folder / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    report = scan_folder(folder)
    assert len(report.records) == 2
    assert report.skipped["unreadable image"] == 1 and "img1.png" in report.examples["unreadable image"]
    assert sum("skipped 1 unreadable image" in r.message for r in caplog.records) == 1


def test_only_corrupt_images_is_an_error(tmp_path):
    folder = write_folder(tmp_path, n=2, captions="txt")
    for p in folder.glob("*.png"):
        p.write_bytes(b"garbage")
    with pytest.raises(DataError, match="none of the 2 images is usable"):
        scan_folder(folder)


def test_items_are_cropped_to_resolution_with_sdxl_conditioning(tmp_path):
    report = scan_folder(write_folder(tmp_path, n=1, size=(80, 40)))
    item = CaptionedImages(report.records, DataConfig(resolution=32, crop="center", hflip=False))[(0, 7)]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert item["original_size"].tolist() == [40, 80]  # (height, width) before resizing
    assert item["crop_top_left"].tolist() == [0, 16]  # 64x32 after resize, centre crop of 32


def test_the_same_draw_gives_the_same_item(tmp_path):
    report = scan_folder(write_folder(tmp_path, n=1, size=(80, 40)))
    ds = CaptionedImages(report.records, DataConfig(resolution=32, crop="random", hflip=True, caption_dropout=0.5))
    a, b = ds[(0, 123)], ds[(0, 123)]
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["caption"] == b["caption"]
