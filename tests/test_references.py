"""Evaluation scores style against the trial's own training images, whatever the data source (issue 12)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdsweep.data.dataset import load_dataset, resolve_source
from sdsweep.data.folder import decode_image
from sdsweep.data.toy_world import finetune_items, render
from sdsweep.eval.base import base_samples_key
from sdsweep.eval.scorer import evenly_spaced, reference_images
from sdsweep.sweep.trial import run_trial

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200)]
SIZE = (24, 16)


def _solid(colour: tuple[int, int, int], size: tuple[int, int] = SIZE) -> Image.Image:
    return Image.new("RGB", size, colour)


def _png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    _solid(colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def caption_folder(tmp_path) -> Path:
    """Five images captioned in metadata.jsonl under "caption" (not "text"), and one too small to train on."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    rows = []
    for i, colour in enumerate(COLOURS):
        _solid(colour).save(folder / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "caption": f"colour number {i}"})
    _solid((0, 0, 0), (4, 4)).save(folder / "zz-tiny.png")  # last in scan order: skipped by data.min_size=8
    rows.append({"file_name": "zz-tiny.png", "caption": "too small"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def saved_dataset(tmp_path) -> Path:
    """The same five images as a Hugging Face dataset with its own column names, saved with save_to_disk."""
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"picture": datasets.Image(), "description": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"picture": [{"bytes": _png(c), "path": None} for c in COLOURS],
         "description": [f"colour number {i}" for i in range(len(COLOURS))]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def _folder_overrides(folder: Path) -> list[str]:
    return [f"data.path={folder}", "data.caption_column=caption"]


def _dataset_overrides(saved: Path) -> list[str]:
    return [f"data.dataset={saved}", "data.image_column=picture", "data.caption_column=description"]


def _assert_references(cfg, picks: list[int], expected: list[Image.Image]) -> None:
    """The references are the training set's records `picks`, decoded, and look like `expected`."""
    references = reference_images(cfg, resolve_source(cfg.data, cfg.model.cache_dir))
    training, _ = load_dataset(cfg.data, cfg.model.cache_dir)
    assert len(references) == len(picks)
    for reference, index, known in zip(references, picks, expected):
        pixels = np.asarray(reference)
        assert np.array_equal(pixels, np.asarray(decode_image(training.records[index].path))), index
        assert np.array_equal(pixels, np.asarray(known)), index


def test_evenly_spaced_takes_first_and_last_and_spreads_the_rest():
    assert evenly_spaced(12, 5) == [0, 3, 6, 8, 11]
    assert evenly_spaced(5, 3) == [0, 2, 4]
    assert evenly_spaced(2, 32) == [0, 1]
    assert evenly_spaced(0, 32) == []


def test_references_of_a_folder_read_its_caption_column(caption_folder, make_cfg):
    cfg = make_cfg(*_folder_overrides(caption_folder), "eval.max_reference_images=3")
    _assert_references(cfg, [0, 2, 4], [_solid(COLOURS[i]) for i in (0, 2, 4)])


def test_references_of_a_hugging_face_dataset_are_its_exported_images(saved_dataset, make_cfg):
    cfg = make_cfg(*_dataset_overrides(saved_dataset), "eval.max_reference_images=3")
    _assert_references(cfg, [0, 2, 4], [_solid(COLOURS[i]) for i in (0, 2, 4)])


def test_references_of_the_builtin_set_are_its_drawings(make_cfg):
    cfg = make_cfg("eval.max_reference_images=5")
    picks = [0, 6, 12, 17, 23]  # evenly spaced over the toy world's 24 styled pictures
    items = finetune_items()
    _assert_references(cfg, picks, [render(*items[i]) for i in picks])


def _base_key(cfg) -> str:
    return base_samples_key(cfg, "tiny", torch.device("cpu"), resolve_source(cfg.data, cfg.model.cache_dir).identity)[0]


def test_the_base_key_names_the_data_source(caption_folder, saved_dataset, make_cfg, tmp_path, monkeypatch):
    sources = {"folder": _folder_overrides(caption_folder), "dataset": _dataset_overrides(saved_dataset),
               "builtin": []}
    keys = {name: _base_key(make_cfg(*overrides)) for name, overrides in sources.items()}
    assert len(set(keys.values())) == 3, keys
    # the same source gives the same key: composed again, after the export exists, from another directory
    monkeypatch.chdir(tmp_path)
    assert {name: _base_key(make_cfg(*overrides)) for name, overrides in sources.items()} == keys
    relative = _base_key(make_cfg(f"data.path={caption_folder.relative_to(tmp_path)}", "data.caption_column=caption"))
    assert relative == keys["folder"]
    # the caption column selects the records (and so the references): another column, another key
    assert _base_key(make_cfg(f"data.path={caption_folder}", "data.caption_column=text")) != keys["folder"]


def test_a_trial_on_a_folder_with_its_own_caption_column_is_evaluated(caption_folder, make_cfg, tmp_path):
    cfg = make_cfg(*_folder_overrides(caption_folder), "eval.prompts=[house]", "eval.steps=1", steps=2, evaluate=True)
    metrics = run_trial(cfg, tmp_path / "trial")
    assert metrics["status"] == "finished", metrics.get("reason")
    assert "eval_error" not in metrics, metrics["eval_error"]
    assert metrics["data"]["images"] == 5
    assert metrics["eval/references"] == 5  # every training image, and only those
