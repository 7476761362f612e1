"""Early stopping of hopeless trials: the median stopping rule against the sweep's finished trials."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import run_in_process
from omegaconf import OmegaConf

from sdsweep.config.schema import Config
from sdsweep.sweep.early_stop import _trained_on, check_steps, peer_losses, verdict, window_mean
from sdsweep.sweep.trial import run_trial


def _trial(sweep, name, cfg, losses, status="finished", steps=None):
    """A finished (or other) trial folder as a sweep leaves it: metrics.json and .hydra/config.yaml."""
    folder = sweep / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"status": status, "steps": steps or len(losses), "losses": losses}))
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    return folder


@pytest.fixture
def sweep(tmp_path):
    (tmp_path / "multirun.yaml").write_text("{}\n")
    return tmp_path


@pytest.fixture
def es_cfg(make_cfg):
    return make_cfg("sweep.early_stop.enabled=true", "sweep.early_stop.window=2", steps=8)


def test_check_steps_are_fractions_of_max_steps(make_cfg):
    assert check_steps(make_cfg(steps=8)) == []  # off by default
    assert check_steps(make_cfg("sweep.early_stop.enabled=true", "sweep.early_stop.at=[0.25,0.5,0.99]", steps=8)) == [2, 4, 7]


def test_the_smoothed_loss_is_the_mean_of_the_window_up_to_the_step():
    assert window_mean([4.0, 3.0, 2.0, 1.0], 3, 2) == 2.5
    assert window_mean([4.0, 3.0], 3, 2) is None  # the step was not reached
    assert window_mean([4.0, None, 2.0], 3, 2) is None  # a NaN step (stored as null) is no evidence


def test_a_trial_worse_than_the_median_of_its_finished_peers_stops(sweep, es_cfg):
    _trial(sweep, "a", es_cfg, [1.0, 0.8, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    _trial(sweep, "b", es_cfg, [1.0, 0.9, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    _trial(sweep, "c", es_cfg, [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], status="failed")  # not a peer
    _trial(sweep, "d", es_cfg, [9.0] * 16)  # another train.max_steps: not a peer
    _trial(sweep, "e", es_cfg, [9.0, 9.0], status="stopped")  # stopped trials are not peers either
    other_data = OmegaConf.merge(es_cfg, {"data": {"resolution": 32}})
    _trial(sweep, "f", other_data, [9.0] * 8)  # trained on other data: another loss scale
    me = sweep / "me"
    stop = verdict(es_cfg, me, [1.0, 1.2, 1.4, 1.6], step=4)
    assert stop is not None and (stop.step, stop.peers, stop.steps_saved) == (4, 2, 4)
    assert stop.loss == pytest.approx(1.5) and stop.median == pytest.approx((0.55 + 0.65) / 2)
    assert "step 4 of 8" in stop.reason() and "1.5 > median 0.6" in stop.reason() and "2 finished trials" in stop.reason()
    assert verdict(es_cfg, me, [1.0, 0.8, 0.5, 0.5], step=4) is None  # better than the median: goes on


def test_no_stop_without_enough_peers_or_outside_a_sweep(tmp_path, sweep, es_cfg, make_cfg):
    _trial(sweep, "a", es_cfg, [1.0] * 8)
    assert verdict(es_cfg, sweep / "me", [5.0] * 4, step=4) is None  # 1 finished peer < min_trials=2
    lone = make_cfg("sweep.early_stop.enabled=true", "sweep.early_stop.min_trials=1", steps=8)
    assert verdict(lone, sweep / "me", [5.0] * 4, step=4) is not None
    single = tmp_path / "outputs"  # single runs side by side are not a sweep
    _trial(single, "a", es_cfg, [1.0] * 8)
    _trial(single, "b", es_cfg, [1.0] * 8)
    assert peer_losses(single / "me", 4, 8, 2, _trained_on(es_cfg)) == []


def test_bad_early_stop_settings_are_refused(make_cfg):
    from sdsweep.config.schema import ConfigError
    from sdsweep.config.validate import validate

    with pytest.raises(ConfigError, match="sweep.early_stop.at"):
        validate(make_cfg("sweep.early_stop.enabled=true", "sweep.early_stop.at=[1.5]"))


@pytest.mark.slow
def test_a_hopeless_trial_of_a_sweep_is_stopped_half_way_and_the_others_finish(cache_dir, tmp_path):
    """Three trials in order (basic launcher); the third is made hopeless by a noise offset far larger
    than anything the model can predict: its loss is far behind the first two at the check step."""
    sweep = tmp_path / "sweep"
    result = run_in_process(["-m", "train.noise_offset=0.0,0.01,2.0", "train.max_steps=4", "sweep.early_stop.enabled=true",
                             "eval.enabled=false", f"model.cache_dir={cache_dir}", "tracking.mode=disabled",
                             f"hydra.sweep.dir={sweep}"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # the early-stop keys stay out of the folder names, so a resumed sweep finds its trials
    folders = {p.parent.name.split("train.noise_offset=")[1].split(",")[0]: p.parent for p in sweep.glob("*/metrics.json")}
    assert all("early_stop" not in f.name for f in folders.values())
    trials = {k: json.loads((f / "metrics.json").read_text()) for k, f in folders.items()}
    assert trials["0.0"]["status"] == trials["0.01"]["status"] == "finished"
    hopeless = trials["2.0"]
    assert hopeless["status"] == "stopped" and hopeless["early_stopped_at_step"] == 2 and hopeless["steps_saved"] == 2
    assert len(hopeless["losses"]) == 2 and "stopped early at step 2 of 4" in hopeless["reason"]
    assert hopeless["early_stop"]["peers"] == 2 and hopeless["early_stop"]["loss"] > hopeless["early_stop"]["median"]
    assert (folders["2.0"] / "adapter" / "pytorch_lora_weights.safetensors").exists()
    out = result.stdout + result.stderr
    assert "2 finished, 0 failed, 0 pruned, 1 stopped early" in out and "2 of 12 training steps saved (17%)" in out
    with open(sweep / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["status"] == "stopped" and "stopped early at step 2" in rows[-1]["reason"]
    # a resumed sweep keeps the verdict: the stopped trial is not trained again (the result of a sweep
    # must not depend on whether it was interrupted); run_trial is what a resumed sweep runs per cell
    kept = (folders["2.0"] / "metrics.json").read_bytes()
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(folders["2.0"] / ".hydra" / "config.yaml"))
    assert run_trial(cfg, folders["2.0"])["status"] == "stopped"
    assert (folders["2.0"] / "metrics.json").read_bytes() == kept
