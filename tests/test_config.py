"""The config groups compose, and what a type cannot say is caught by validate()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUP_OPTIONS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("adapter", "targets", "text_encoder", "precision", "optimizer", "model", "data", "eval")
}
DEFAULT_OPTION = {"adapter": "lora", "targets": "attn", "text_encoder": "frozen", "precision": "fp32",
                  "optimizer": "adamw", "model": "toy-sdxl", "data": "builtin", "eval": "default"}  # conf/config.yaml
OUTSIDE_ITS_GROUP = {("optimizer", "prodigy"): {"train"}}  # @package _global_: it sets train.lr=1.0
# the default model=toy-sdxl sets its own train.lr and class-image sampler (data.class_steps, data.class_guidance_scale;
# @package _global_): every other model keeps config.yaml's and the schema's
OUTSIDE_ITS_GROUP.update({("model", option): {"train", "data"} for option in GROUP_OPTIONS["model"]
                          if option != "toy-sdxl"})


def test_every_group_lists_the_options_the_issue_asks_for():
    assert GROUP_OPTIONS["adapter"] == ["dora", "full", "loha", "lokr", "lora", "textual_inversion"]
    assert GROUP_OPTIONS["targets"] == ["attn", "cross_attn", "many", "self_attn"]
    assert GROUP_OPTIONS["text_encoder"] == ["frozen", "lora"]
    assert GROUP_OPTIONS["precision"] == ["bf16", "fp16", "fp32", "int8", "nf4"]
    assert GROUP_OPTIONS["optimizer"] == ["adamw", "adamw8bit", "prodigy"]
    assert {"toy-sdxl", "tiny-sdxl", "sdxl", "sd15"} <= set(GROUP_OPTIONS["model"])


def _chosen(composed: dict, group: str) -> str:
    """The option a composed config holds for `group`: the adapter says it as `kind`, every other group's
    YAML as `name`."""
    return composed["adapter"]["kind"] if group == "adapter" else composed[group]["name"]


_COMPOSED: dict[str, dict] = {}  # override -> composed config: composing takes a third of a second


def _plain(make_cfg, override: str | None = None, cfg=None) -> dict:
    """The config composed with `override` (or `cfg`, composed already) as plain containers, interpolations
    unresolved (eval.resolution stays ${data.resolution}); composed once per test session."""
    key = override or ""
    if key not in _COMPOSED:
        _COMPOSED[key] = OmegaConf.to_container(cfg if cfg is not None else make_cfg(*([override] if override else [])))
    return _COMPOSED[key]


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_option_composes_and_validates(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}")
    validate(cfg)
    composed, default = _plain(make_cfg, f"{group}={option}", cfg), _plain(make_cfg)
    assert _chosen(composed, group) == option and _chosen(default, group) == DEFAULT_OPTION[group]
    if option == DEFAULT_OPTION[group]:
        assert composed == default
        return
    assert composed[group] != default[group]  # the option changes its group...
    changed_elsewhere = {k for k in composed if k != group and composed[k] != default[k]}
    assert changed_elsewhere == OUTSIDE_ITS_GROUP.get((group, option), set())  # ...and nothing it does not say


@pytest.mark.parametrize("group", GROUP_OPTIONS)
def test_no_two_options_of_a_group_compose_alike(make_cfg, group):
    composed = {json.dumps(_plain(make_cfg, f"{group}={option}")[group], sort_keys=True)
                for option in GROUP_OPTIONS[group]}
    assert len(composed) == len(GROUP_OPTIONS[group])


def test_prodigy_sets_its_own_learning_rate_but_the_command_line_wins(make_cfg):
    assert make_cfg("optimizer=prodigy").train.lr == 1.0
    assert make_cfg("optimizer=prodigy", "train.lr=0.5").train.lr == 0.5


def test_misspelt_key_fails_at_composition(make_cfg):
    with pytest.raises(ConfigCompositionException, match="adapter.rnak"):
        make_cfg("adapter.rnak=4")


def test_wrong_type_fails_at_composition(make_cfg):
    with pytest.raises((ValidationError, ConfigCompositionException), match="max_steps"):
        make_cfg("train.max_steps=many")


def test_unknown_option_fails_naming_the_available_ones(make_cfg):
    with pytest.raises(ConfigCompositionException) as err:
        make_cfg("adapter=lorra")
    assert "lorra" in str(err.value) and "lora" in str(err.value)


def test_validate_collects_every_problem_at_once(make_cfg):
    cfg = make_cfg("adapter.rank=0", "train.lr=-1", "data.resolution=100", "adapter.dropout=1.5")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    text = str(err.value)
    for key in ("adapter.rank=0", "train.lr=-1", "data.resolution=100", "adapter.dropout=1.5"):
        assert key in text
    assert len(err.value.problems) == 4


def test_a_key_the_schema_does_not_define_is_refused_with_the_key_meant(make_cfg):
    """`+adapter.rnak=4` composes (the + adds the key) and nothing would read it: refused, naming adapter.rank."""
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("+adapter.rnak=4", "+trian.lr=1e-3"))
    text = str(err.value)
    assert "adapter.rnak is not a key of sdsweep's config" in text and "did you mean adapter.rank?" in text
    assert "trian is not a key" in text and "did you mean train?" in text
    validate(make_cfg("++eval.score_weights.kid=0.5"))  # a dict node's entries are its keys
