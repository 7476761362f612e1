"""Encoders follow the model (config/encoders.py), and a stand-in never judges a real model silently (issue 15)."""

from __future__ import annotations

import pytest

from sdsweep.config.encoders import clip_choice
from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate


@pytest.mark.parametrize("overrides,expected", [
    ([], ("toy", None)),  # the embedded default: the toy CLIP trained on the same world
    (["model=tiny-sdxl"], ("tiny", None)),  # a random model: the random stand-in, shapes only
    (["model=tiny-sd3"], ("tiny", None)),
    (["model=sdxl"], ("ViT-L-14", "openai")),  # a real model: the field's CLIP
    (["model=tiny-sd15", "model.build_tiny=false", "model.pretrained=/models/mine"], ("ViT-L-14", "openai")),
    (["model=sdxl", "eval.clip_pretrained=/weights/vit-l-14.safetensors"], ("ViT-L-14", "/weights/vit-l-14.safetensors")),
    (["model=sdxl", "eval.clip_model=ViT-B-32", "eval.clip_pretrained=laion2b_s34b_b79k"], ("ViT-B-32", "laion2b_s34b_b79k")),
    (["eval=clip"], ("ViT-L-14", "openai")),
])
def test_auto_picks_the_encoder_of_the_model(make_cfg, overrides, expected):
    assert clip_choice(make_cfg(*overrides, evaluate=True)) == expected


@pytest.mark.parametrize("stand_in", ["tiny", "toy"])
def test_a_stand_in_on_a_real_model_is_refused_before_launch_unless_asked_for(make_cfg, stand_in):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("model=sdxl", f"eval.clip_model={stand_in}", evaluate=True))
    assert f"eval.clip_model={stand_in} would score model=sdxl" in str(err.value)
    assert "eval.clip_model=auto" in str(err.value) and "eval.allow_stand_in=true" in str(err.value)
    validate(make_cfg("model=sdxl", f"eval.clip_model={stand_in}", "eval.allow_stand_in=true", evaluate=True))
    validate(make_cfg("model=sdxl", f"eval.clip_model={stand_in}"))  # evaluation off: nothing is scored
    validate(make_cfg("model=tiny-sdxl", f"eval.clip_model={stand_in}", evaluate=True))  # built in code: fine
    validate(make_cfg("model=sdxl", evaluate=True))  # auto: ViT-L-14, checked by name only (no download here)


def test_every_row_of_the_board_names_the_encoder_that_scored_it(make_cfg, tmp_path):
    from sdsweep.board.leaderboard import collect
    from sdsweep.sweep.trial import run_trial

    (tmp_path / "multirun.yaml").write_text("{}\n")
    run_trial(make_cfg("eval.metrics=[clip_score]", steps=1, evaluate=True), tmp_path / "a", {}, ["adapter=lora"])
    board = collect(tmp_path).board
    assert list(board["scored_by"]) == ["toy (trained on the toy world)"] * 2  # the base model and the trial
    from sdsweep.board.report import render

    assert "Scored by: toy (trained on the toy world)" in render(tmp_path, collect(tmp_path))
