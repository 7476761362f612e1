"""Every trial logs loss, speed and memory per step, and a summary, to W&B and to its folder."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from wandb_reader import read_run

from sdsweep.sweep.trial import run_trial

STEP_KEYS = {"train/loss", "train/loss_smoothed", "train/grad_norm", "train/lr_unet"}
SPEED_KEYS = {"perf/step_time_s", "perf/it_per_s", "perf/images_per_s"}


def _run_file(trial_dir):
    files = list(trial_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_offline_run_holds_per_step_figures_summary_group_and_axes(make_cfg, tmp_path):
    trial = tmp_path / "sweep-a" / "adapter=dora"
    choices = {"adapter": "dora", "targets": "attn", "text_encoder": "frozen", "precision": "fp32",
               "optimizer": "adamw"}
    metrics = run_trial(make_cfg("tracking.mode=offline", "adapter=dora", steps=4), trial, choices=choices,
                        group="sweep-a")
    assert metrics["status"] == "finished"
    run = read_run(_run_file(trial))
    assert run["run"]["group"] == "sweep-a" and run["run"]["name"] == "adapter=dora"
    config = run["run"]["config"]
    for axis, option in choices.items():
        assert config[f"{axis}_option"] == option  # top-level keys a dashboard can group by
    assert config["adapter"]["rank"] == 8 and config["train"]["max_steps"] == 4  # the full resolved config
    history = run["history"]
    assert [row["step"] for row in history] == [1, 2, 3, 4]
    for row in history:
        assert STEP_KEYS <= row.keys() and math.isfinite(row["train/loss"])
        assert SPEED_KEYS <= row.keys() and row["perf/it_per_s"] > 0
        assert row["sys/rss_gb"] > 0 and row["sys/max_rss_gb"] >= row["sys/rss_gb"]
    summary = run["summary"]
    assert summary["status"] == "finished" and summary["steps_per_s"] > 0 and summary["peak_memory_mb"] > 0
    assert math.isfinite(summary["final_loss"]) and summary["trainable_params"] > 0 and summary["adapter_mb"] > 0
    # the same figures, per step, in the trial folder
    lines = [json.loads(line) for line in (trial / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [1, 2, 3, 4]
    assert lines[-1]["train/loss"] == pytest.approx(metrics["final_loss"])


def test_disabled_tracking_writes_the_same_metrics_and_no_wandb_folder(make_cfg, tmp_path):
    on = run_trial(make_cfg("tracking.mode=offline"), tmp_path / "on")
    off = run_trial(make_cfg("tracking.mode=disabled"), tmp_path / "off")
    assert not (tmp_path / "off" / "wandb").exists()
    assert on.keys() == off.keys()
    assert off["losses"] == pytest.approx(on["losses"])
    assert (tmp_path / "off" / "train_log.jsonl").exists()


def test_online_without_a_reachable_server_degrades_to_offline(make_cfg, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    started = time.perf_counter()
    metrics = run_trial(make_cfg("tracking.mode=online", "tracking.init_timeout=5"), tmp_path)
    assert metrics["status"] == "finished"
    assert time.perf_counter() - started < 120
    assert any("logging offline instead" in r.message or "could not start" in r.message for r in caplog.records)


def test_failed_trial_is_summarised_as_failed(make_cfg, tmp_path):
    metrics = run_trial(make_cfg("tracking.mode=offline", "debug.nan_at_step=2"), tmp_path)
    assert metrics["status"] == "failed"
    summary = read_run(_run_file(tmp_path))["summary"]
    assert summary["status"] == "failed" and "step 2" in summary["reason"]


def test_validation_images_at_the_interval_and_the_end(make_cfg, tmp_path):
    run_trial(make_cfg("tracking.validation_every=2", "eval.seeds=[0,1]", steps=3), tmp_path)
    for step in ("step-000002", "step-000003"):
        names = sorted(p.name for p in (tmp_path / "validation" / step).glob("*.png"))
        assert len(names) == 4 and "00_a-portrait-of-a-person-sdsweep-style_seed1.png" in names


def test_profiler_trace_is_saved(make_cfg, tmp_path):
    run_trial(make_cfg("tracking.profile=true", steps=6), tmp_path)
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    assert "Self CPU" in (tmp_path / "profile" / "summary.txt").read_text()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_each_trial_reports_its_own_cuda_peak(make_cfg, tmp_path):
    big = run_trial(make_cfg("device=cuda", "train.batch_size=8", "data.resolution=128"), tmp_path / "big")
    small = run_trial(make_cfg("device=cuda", "train.batch_size=1"), tmp_path / "small")
    assert small["peak_vram_mb"] < big["peak_vram_mb"]
