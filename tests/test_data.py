"""Image folders: captions from metadata.jsonl or .txt, bad records skipped and counted, clear errors."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from helpers import write_bad_records, write_folder
from PIL import Image

from sdsweep.config.schema import DataConfig
from sdsweep.data.dataset import (
    BucketBatchSampler,
    CaptionedImages,
    collate,
    make_buckets,
    make_loader,
    nearest_bucket,
)
from sdsweep.data.folder import DataError, decode_image, scan_folder
from sdsweep.data.toy_world import ensure_toy_dataset
from sdsweep.model.conditioning import sdxl_time_ids
from sdsweep.sweep.trial import run_trial


@pytest.fixture
def make_cfg(make_cfg):
    """Training only: evaluation has its own tests (test_evaluate.py), and costs seconds per trial."""
    return lambda *overrides, **kwargs: make_cfg("eval.enabled=false", *overrides, **kwargs)


def test_builtin_set_is_deterministic_and_captioned(tmp_path):
    a = scan_folder(ensure_toy_dataset(str(tmp_path / "a")))
    b = scan_folder(ensure_toy_dataset(str(tmp_path / "b")))
    assert len(a.records) == 24 and [r.caption for r in a.records] == [r.caption for r in b.records]
    assert all(r.caption.endswith(", sdsweep style") for r in a.records)
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


# --- caption formats ----------------------------------------------------------------------------


def test_metadata_csv_is_read_with_quotes_commas_and_a_bom(tmp_path):
    folder = write_folder(tmp_path, n=2, captions="none")
    (folder / "metadata.csv").write_text('\ufefffile_name,text\nimg0.png,"a cat, sitting"\nimg1.png,a dog\n',
                                         encoding="utf-8")
    assert [r.caption for r in scan_folder(folder).records] == ["a cat, sitting", "a dog"]


def test_caption_column_names_the_field_of_jsonl_and_csv(tmp_path):
    folder = write_folder(tmp_path / "j", n=1, captions="none")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "img0.png", "caption": "from jsonl"}) + "\n")
    assert scan_folder(folder, caption_column="caption").records[0].caption == "from jsonl"
    with pytest.raises(DataError, match='no "text" field.*data.caption_column'):
        scan_folder(folder)
    folder = write_folder(tmp_path / "c", n=1, captions="none")
    (folder / "metadata.csv").write_text("file_name,caption\nimg0.png,from csv\n")
    assert scan_folder(folder, caption_column="caption").records[0].caption == "from csv"
    with pytest.raises(DataError, match=r"columns \['file_name', 'caption'\].*data.caption_column"):
        scan_folder(folder)


def test_jsonl_and_csv_together_are_ambiguous(tmp_path):
    folder = write_folder(tmp_path, n=1, captions="jsonl")
    (folder / "metadata.csv").write_text("file_name,text\nimg0.png,other\n")
    with pytest.raises(DataError, match="both metadata.jsonl and metadata.csv"):
        scan_folder(folder)


# --- image modes: converted, not skipped ----------------------------------------------------------


def _save_and_decode(tmp_path, name: str, img: Image.Image, **save) -> np.ndarray:
    img.save(tmp_path / name, **save)
    decoded = decode_image(tmp_path / name)
    assert decoded.mode == "RGB" and decoded.size == img.size
    return np.asarray(decoded).astype(int)


def test_cmyk_is_converted(tmp_path):
    rgb = _save_and_decode(tmp_path, "cmyk.jpg", Image.new("CMYK", (16, 16), (0, 255, 255, 0)), quality=95)
    assert rgb[..., 0].mean() > 200 and rgb[..., 2].mean() < 60  # CMYK (0, 100%, 100%, 0) is red


def test_palette_and_palette_with_transparency_are_converted(tmp_path):
    pal = Image.new("RGB", (16, 16), (30, 60, 200)).convert("P", palette=Image.ADAPTIVE, colors=4)
    assert (np.abs(_save_and_decode(tmp_path, "p.png", pal) - [30, 60, 200]).max()) <= 8
    transparent = Image.new("P", (16, 16), 1)
    transparent.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    transparent.paste(0, (0, 0, 8, 16))
    rgb = _save_and_decode(tmp_path, "pt.png", transparent, transparency=0)
    assert (rgb[:, :8] == 255).all()  # transparent index -> white, not black
    assert (rgb[:, 8:] == [255, 0, 0]).all()


def test_sixteen_bit_greyscale_keeps_its_range(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    rgb = _save_and_decode(tmp_path, "grey16.png", img)
    assert rgb.min() == 0 and rgb.max() == 255 and len(np.unique(rgb[..., 0])) > 16  # not clipped to white


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(tmp_path, mode):
    img = Image.new(mode, (16, 16), (40,) * (len(mode) - 1) + (255,))
    img.paste((0,) * len(mode), (0, 0, 8, 16))  # fully transparent left half
    rgb = _save_and_decode(tmp_path, f"{mode}.png", img)
    assert (rgb[:, :8] == 255).all() and (rgb[:, 8:] == 40).all()


def test_every_image_mode_survives_the_scan(tmp_path):
    Image.new("CMYK", (16, 16)).save(tmp_path / "a.jpg")
    Image.new("P", (16, 16)).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((16, 16), np.uint16)).save(tmp_path / "c.png")
    Image.new("RGBA", (16, 16)).save(tmp_path / "d.png")
    for name in "abcd":
        (tmp_path / f"{name}.txt").write_text("a caption")
    report = scan_folder(tmp_path)
    assert len(report.records) == 4 and not report.skipped


# --- bad records: skipped, counted, reported once ------------------------------------------------------


def test_each_kind_of_bad_record_is_skipped_counted_and_reported_once(tmp_path, caplog):
    expected = write_bad_records(tmp_path)
    with caplog.at_level(logging.WARNING, logger="sdsweep.data.folder"):
        report = scan_folder(tmp_path, min_size=8)
    assert sorted(r.path.name for r in report.records) == ["good0.png", "good1.png"]
    assert dict(report.skipped) == expected
    assert "truncated.jpg" in report.examples["unreadable image"] or "garbage.png" in report.examples["unreadable image"]
    assert "4x4 < data.min_size=8" in report.examples["too small"]
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for reason, n in expected.items():
        assert f"{n} {reason}" in warnings[0]


def test_a_truncated_jpeg_fails_on_decode_naming_the_problem(tmp_path):
    write_bad_records(tmp_path)
    with pytest.raises(OSError, match="truncated"):
        decode_image(tmp_path / "truncated.jpg")


def test_bad_records_are_reported_in_the_trial_metrics(make_cfg, tmp_path):
    expected = write_bad_records(tmp_path / "data")
    metrics = run_trial(make_cfg(f"data.path={tmp_path / 'data'}", steps=1), tmp_path / "trial")
    assert metrics["status"] == "finished", metrics.get("reason")
    assert metrics["data"]["images"] == 2 and metrics["data"]["skipped"] == expected


# --- aspect-ratio buckets ----------------------------------------------------------------------------


def test_buckets_keep_the_area_the_step_and_the_aspect_limit():
    buckets = make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in buckets and (768, 1344) in buckets and (1344, 768) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 1024 * 1024 and max(h, w) / min(h, w) <= 2.0
        assert h * w >= 0.85 * 1024 * 1024
    assert nearest_bucket(1600, 900, buckets) == (768, 1344)  # 16:9 landscape
    assert nearest_bucket(900, 1600, buckets) == (1344, 768)
    assert nearest_bucket(500, 500, buckets) == (1024, 1024)


def _mixed_folder(tmp_path):
    """Two landscape, two portrait, two square images."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    sizes = [(96, 48), (100, 50), (48, 96), (50, 100), (64, 64), (70, 70)]
    rows = []
    for i, size in enumerate(sizes):
        Image.effect_noise(size, 40).convert("RGB").save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"image {i}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_bucketed_batches_come_from_one_bucket_with_sdxl_time_ids(tmp_path):
    report = scan_folder(_mixed_folder(tmp_path))
    cfg = DataConfig(resolution=64, buckets=True, bucket_step=16, crop="random", hflip=True)
    ds = CaptionedImages(report.records, cfg)
    assert sorted(set(ds.targets)) == [(48, 80), (64, 64), (80, 48)]
    loader = make_loader(ds, batch_size=2, seed=0, start_sample=0, num_workers=0)
    seen = set()
    for _, batch in zip(range(9), loader):
        h, w = batch["pixel_values"].shape[-2:]
        assert (batch["target_size"] == torch.tensor([h, w])).all()
        ids = sdxl_time_ids(batch, torch.device("cpu"))
        assert ids[:, 4:].tolist() == [[h, w]] * 2  # target size is the bucket
        for i in range(2):
            orig_h, orig_w = batch["original_size"][i].tolist()
            top, left = batch["crop_top_left"][i].tolist()
            scale = max(w / orig_w, h / orig_h)
            assert 0 <= top <= round(orig_h * scale) - h and 0 <= left <= round(orig_w * scale) - w
        seen.add((h, w))
    assert seen == {(48, 80), (64, 64), (80, 48)}


def test_bucket_sampler_resumes_exactly_and_covers_every_image():
    targets = [(1, 2)] * 3 + [(2, 1)] * 4 + [(1, 1)]
    whole = BucketBatchSampler(targets, batch_size=2, seed=3)
    stream = [b for _, b in zip(range(20), whole)]
    resumed = BucketBatchSampler(targets, batch_size=2, seed=3, start=14)
    assert [b for _, b in zip(range(13), resumed)] == stream[7:]
    epoch = whole.epoch(0)
    assert len(epoch) == whole.per_epoch == 2 + 2 + 1
    assert {i for batch in epoch for i in batch} == set(range(8))
    for batch in stream:
        assert len({targets[i] for i, _ in batch}) == 1


def test_same_draw_same_bucketed_item(tmp_path):
    report = scan_folder(_mixed_folder(tmp_path))
    ds = CaptionedImages(report.records, DataConfig(resolution=64, buckets=True, bucket_step=16))
    a, b = collate([ds[(0, 5)]]), collate([ds[(0, 5)]])
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["pixel_values"].shape[-2:] == (48, 80)


def test_a_bucketed_trial_trains_and_resumes_like_an_uninterrupted_one(make_cfg, tmp_path):
    folder = _mixed_folder(tmp_path / "data")
    common = [f"data.path={folder}", "data.buckets=true", "data.bucket_step=16", "train.checkpoint_every=2"]
    whole = run_trial(make_cfg(*common, steps=4), tmp_path / "whole")
    assert whole["status"] == "finished", whole.get("reason")
    run_trial(make_cfg(*common, "debug.raise_at_step=3", steps=4), tmp_path / "resumed")
    resumed = run_trial(make_cfg(*common, steps=4), tmp_path / "resumed")
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)
