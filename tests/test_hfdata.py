"""data.dataset: a Hugging Face dataset by name or from save_to_disk, exported once, clear errors offline."""

from __future__ import annotations

import io
import sys

import pytest
from PIL import Image

from sdsweep.config.schema import DataConfig
from sdsweep.data.dataset import load_dataset
from sdsweep.data.folder import DataError
from sdsweep.sweep.trial import run_trial


@pytest.fixture
def make_cfg(make_cfg):
    """Training only: evaluation has its own tests (test_evaluate.py), and costs seconds per trial."""
    return lambda *overrides, **kwargs: make_cfg("eval.enabled=false", *overrides, **kwargs)


def _png(colour, size=(40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def saved_dataset(tmp_path):
    """A dataset with its own column names, saved with save_to_disk: 3 good rows, 1 without image, 1 empty caption."""
    datasets = pytest.importorskip("datasets")
    rows = {
        "picture": [_png((200, 0, 0)), _png((0, 200, 0)), None, _png((0, 0, 200)), _png((9, 9, 9))],
        "description": ["red square", "green square", "no image here", "blue square", ""],
    }
    features = datasets.Features({"picture": datasets.Image(), "description": datasets.Value("string")})
    ds = datasets.Dataset.from_dict(
        {"picture": [{"bytes": b, "path": None} if b else None for b in rows["picture"]],
         "description": rows["description"]},
        features=features,
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


def test_a_saved_dataset_with_its_own_columns_is_exported_and_scanned(saved_dataset, tmp_path):
    cfg = DataConfig(dataset=str(saved_dataset), image_column="picture", caption_column="description")
    ds, report = load_dataset(cfg, str(tmp_path / "cache"))
    assert [r.caption for r in ds.records] == ["red square", "green square", "blue square"]
    assert dict(report.skipped) == {"no image": 1, "empty caption": 1}
    folder = ds.records[0].path.parent
    assert folder.parent.name == "datasets" and (folder / "metadata.jsonl").exists()
    # exported once: the second load reads the same files
    mtime = ds.records[0].path.stat().st_mtime_ns
    again, _ = load_dataset(cfg, str(tmp_path / "cache"))
    assert again.records[0].path.stat().st_mtime_ns == mtime


def test_wrong_column_names_list_the_real_ones(saved_dataset, tmp_path):
    with pytest.raises(DataError, match=r"data.image_column=image is not a column.*\['picture', 'description'\]"):
        load_dataset(DataConfig(dataset=str(saved_dataset), caption_column="description"), str(tmp_path))


def test_offline_hub_dataset_fails_naming_the_fix(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    name = "lambdalabs/naruto-blip-captions"
    try:
        datasets.load_dataset(name, split="train")
        pytest.skip(f"{name} is in this machine's Hugging Face cache, so it loads offline")
    except Exception:  # noqa: BLE001 - the expected case: not cached, offline
        pass
    with pytest.raises(DataError) as err:
        load_dataset(DataConfig(dataset=name), str(tmp_path))
    text = str(err.value)
    assert "HF_HUB_OFFLINE is set" in text and f"hf download {name} --repo-type dataset" in text
    assert "data.path=FOLDER" in text


def test_without_the_datasets_package_the_message_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'sdsweep\[hf\]'"):
        load_dataset(DataConfig(dataset="lambdalabs/naruto-blip-captions"), str(tmp_path))


def test_a_trial_trains_on_a_dataset(saved_dataset, make_cfg, tmp_path):
    cfg = make_cfg(f"data.dataset={saved_dataset}", "data.image_column=picture", "data.caption_column=description",
                   steps=1)
    metrics = run_trial(cfg, tmp_path / "trial")
    assert metrics["status"] == "finished", metrics.get("reason")
    assert metrics["data"]["images"] == 3
