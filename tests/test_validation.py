"""Options a combination would ignore are warned about once, naming the key (never silently dropped)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sdsweep.config.validate import warnings as config_warnings
from sdsweep.sweep.preflight import preflight
from sdsweep.sweep.trial import run_trial

CONF = Path(__file__).resolve().parent.parent / "conf"

IGNORED = [
    (["optimizer=adamw", "optimizer.d_coef=2"], "optimizer.d_coef=2.0 is Prodigy's"),
    (["optimizer=adamw8bit", "optimizer.d_coef=2"], "optimizer.d_coef=2.0 is Prodigy's"),
    (["optimizer=prodigy", "optimizer.warmup_steps=10"], "optimizer.warmup_steps=10 does nothing with optimizer.scheduler=constant"),
    (["adapter=loha", "adapter.init=kaiming"], "adapter.init=kaiming does nothing with adapter=loha"),
    (["adapter=lokr", "adapter.init=kaiming"], "adapter.init=kaiming does nothing with adapter=lokr"),
    (["train.weighting_scheme=mode"], "train.weighting_scheme=mode is for sd3's flow matching"),
    (["model=tiny-sd15", "train.logit_std=2"], "train.logit_std=2.0 is for sd3's flow matching"),
    (["train.precondition_outputs=false"], "train.precondition_outputs=False is for sd3's flow matching"),
    (["model.t5_max_length=256"], "model.t5_max_length=256 does nothing: model.family=sdxl has no T5"),
    (["model=tiny-sd3", "model.drop_t5=true", "model.t5_max_length=256"], "does nothing: model.drop_t5=true"),
    (["text_encoder.lr=1e-5"], "text_encoder.lr=1e-05 does nothing with text_encoder=frozen"),
    (["data.bucket_step=16"], "data.bucket_step=16 does nothing without data.buckets=true"),
]


@pytest.mark.parametrize("overrides,message", IGNORED)
def test_an_ignored_option_is_named(make_cfg, overrides, message):
    found = config_warnings(make_cfg(*overrides))
    assert len(found) == 1 and message in found[0], found


@pytest.mark.parametrize("overrides", [
    ["optimizer=prodigy", "optimizer.d_coef=2"], ["optimizer.scheduler=constant_with_warmup", "optimizer.warmup_steps=10"],
    ["adapter=lora", "adapter.init=kaiming"], ["model=tiny-sd3", "train.weighting_scheme=mode", "model.t5_max_length=256"],
    ["text_encoder=lora", "text_encoder.lr=1e-5"], ["data.buckets=true", "data.bucket_step=16"],
])
def test_the_same_option_where_it_acts_is_not_warned_about(make_cfg, overrides):
    assert config_warnings(make_cfg(*overrides)) == []


@pytest.mark.parametrize("group,option", [(p.parent.name, p.stem) for p in sorted(CONF.glob("*/*.yaml"))
                                          if p.parent.name not in ("hydra", "experiment", "scale", "recipe")])
def test_no_shipped_option_sets_something_it_ignores(make_cfg, group, option):
    assert config_warnings(make_cfg(f"{group}={option}")) == []


def test_a_sweep_warns_once_and_every_trial_records_it(make_cfg, cache_dir, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert preflight(["adapter=lora,dora", "optimizer.d_coef=2", f"model.cache_dir={cache_dir}"]) == []
    assert sum("optimizer.d_coef=2.0" in r.getMessage() for r in caplog.records) == 1
    metrics = run_trial(make_cfg("optimizer.d_coef=2", steps=1), tmp_path)
    assert metrics["status"] == "finished" and metrics["config_warnings"] == [
        "optimizer.d_coef=2.0 is Prodigy's and does nothing with optimizer=adamw"]
