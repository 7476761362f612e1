"""train.ema_decay: a moving average of the adapter's weights, updated every step, saved and evaluated in
place of the last step's weights, carried by checkpoints (issue 16)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate
from sdsweep.layout import TrialDir
from sdsweep.model.adapters import LORA_WEIGHTS
from sdsweep.sweep.estimate import estimate_peak
from sdsweep.sweep.trial import run_trial
from sdsweep.train.checkpoints import ADAPTER, EMA, list_checkpoints

DECAY = 0.9


def _decay(update: int) -> float:
    """diffusers' EMAModel.get_decay at its `update`-th step (no warm-up offset): 0 first, then (1+t)/(10+t) capped."""
    t = update - 1
    return 0.0 if t <= 0 else min(DECAY, (1 + t) / (10 + t))


def _saved_adapter(trial: TrialDir) -> dict[str, torch.Tensor]:
    return load_file(trial.adapter / LORA_WEIGHTS)


EMA_TRIAL = (f"train.ema_decay={DECAY}", "train.ema_on_cpu=true", "train.checkpoint_every=1", "train.checkpoints_keep=10")


@pytest.fixture(scope="module")
def whole(cache_dir, tmp_path_factory) -> TrialDir:
    """4 steps with the average (kept on the CPU: the offload path), a checkpoint after every step."""
    from conftest import config_maker

    trial = TrialDir(tmp_path_factory.mktemp("ema") / "whole")
    assert run_trial(config_maker(cache_dir)(*EMA_TRIAL, steps=4), trial.path)["status"] == "finished"
    return trial


def test_the_average_follows_emamodels_recurrence_over_every_steps_weights_and_is_what_is_saved(whole):
    steps = list_checkpoints(whole.checkpoints)
    assert len(steps) == 4
    live = [load_file(step / ADAPTER) for step in steps]  # the weights after each step
    averaged = [load_file(step / EMA) for step in steps]
    expected = None
    for update, weights in enumerate(live, start=1):
        d = _decay(update)
        expected = {k: (d * expected[k] + (1 - d) * w) if expected else w.clone() for k, w in weights.items()}
        for k in weights:
            torch.testing.assert_close(averaged[update - 1][k], expected[k], rtol=0, atol=1e-7)
    # the average differs from the last step's weights, and the saved adapter is the average
    assert any(not torch.equal(averaged[-1][k], live[-1][k]) for k in live[-1])
    peft = {k.split("unet.", 1)[1]: v for k, v in _saved_adapter(whole).items() if k.startswith("unet.")}
    names = [k for k in averaged[-1] if k.startswith("unet.")]
    assert names and len(peft) == len(names)
    for k in names:  # "unet.<module>.lora_A.default.weight" -> peft's "<module>.lora_A.weight"
        torch.testing.assert_close(peft[k.removeprefix("unet.").replace(".default", "")], averaged[-1][k], rtol=0, atol=0)


def test_a_trial_with_ema_resumed_from_a_checkpoint_ends_as_the_uninterrupted_one(whole, make_cfg, tmp_path):
    cut = TrialDir(tmp_path / "cut")
    assert run_trial(make_cfg(*EMA_TRIAL, "debug.raise_at_step=3", steps=4), cut.path)["status"] == "failed"
    assert run_trial(make_cfg(*EMA_TRIAL, steps=4), cut.path)["status"] == "finished"
    a, b = _saved_adapter(whole), _saved_adapter(cut)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_off_by_default_no_average_is_kept(make_cfg, tmp_path):
    trial = TrialDir(tmp_path / "plain")
    run_trial(make_cfg("train.checkpoint_every=1", steps=1), trial.path)
    (step,) = list_checkpoints(trial.checkpoints)
    assert (step / ADAPTER).exists() and not (step / EMA).exists()


def test_the_estimate_counts_the_average_unless_it_is_kept_on_the_cpu(make_cfg):
    plain = estimate_peak(make_cfg("sweep.estimate=always"))
    ema = estimate_peak(make_cfg("sweep.estimate=always", f"train.ema_decay={DECAY}"))
    offloaded = estimate_peak(make_cfg("sweep.estimate=always", f"train.ema_decay={DECAY}", "train.ema_on_cpu=true"))
    extra = (ema.adapter_gb - plain.adapter_gb) * 2**30
    assert extra == pytest.approx(plain.trainable_params * 4)
    assert offloaded.adapter_gb == pytest.approx(plain.adapter_gb)
    with pytest.raises(ConfigError, match=r"train.ema_decay=1.0: must be in \[0, 1\)"):
        validate(make_cfg("train.ema_decay=1.0"))
