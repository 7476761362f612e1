"""One list of keys that change nothing trained, used by folder names, resume and early stopping."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from sdsweep.board.leaderboard import build
from sdsweep.config.identity import folder_excluded_keys, trained_on, training_fingerprint
from sdsweep.sweep.early_stop import _trained_on
from sdsweep.sweep.preflight import expand_cells, preflight
from sdsweep.sweep.resume import fingerprints
from sdsweep.sweep.trial import run_trial

# keys the review found handled differently by folder names, resume and early stopping
UNTRAINED_EXAMPLES = ["model.cache_dir=/elsewhere", "tracking.group=mine", "tracking.init_timeout=3",
                      "data.num_workers=2", "cache.enabled=false", "sweep.early_stop.enabled=true", "device=cpu"]
EVAL_EXAMPLES = ["eval.steps=7", "eval.seeds=[3,4]", "eval.score_weights.kid=2", "eval=clip"]
TRAINED_EXAMPLES = ["adapter.rank=4", "train.lr=3e-4", "data.resolution=32", "seed=1", "model=tiny-sd15"]


def _folder_name(overrides: list[str]) -> str:
    """The trial folder name Hydra gives a cell, with the exclude_keys conf/config.yaml resolves to."""
    from hydra._internal.config_loader_impl import get_overrides_dirname

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
    exclude = list(cfg.hydra.job.config.override_dirname.exclude_keys)
    return get_overrides_dirname(OverridesParser.create().parse_overrides(overrides), exclude, ",", "=")


def test_the_folder_names_exclude_exactly_the_listed_keys():
    assert _folder_name(["adapter=dora", *UNTRAINED_EXAMPLES, *EVAL_EXAMPLES]) == "adapter=dora"
    for trained in TRAINED_EXAMPLES:
        assert _folder_name(["adapter=dora", trained]) == ",".join(sorted(["adapter=dora", trained]))
    assert set(folder_excluded_keys()) >= {"model.cache_dir", "tracking.group", "tracking.init_timeout", "eval.steps"}


@pytest.mark.parametrize("override", UNTRAINED_EXAMPLES + EVAL_EXAMPLES)
def test_keys_that_change_nothing_trained_keep_the_training_fingerprint(make_cfg, override):
    assert training_fingerprint(make_cfg(override)) == training_fingerprint(make_cfg())


@pytest.mark.parametrize("override", TRAINED_EXAMPLES)
def test_keys_that_change_the_training_change_its_fingerprint(make_cfg, override):
    assert training_fingerprint(make_cfg(override)) != training_fingerprint(make_cfg())


def test_early_stopping_peers_ignore_the_same_keys(make_cfg):
    base = _trained_on(make_cfg())
    for override in UNTRAINED_EXAMPLES:
        assert _trained_on(make_cfg(override)) == base, override
    assert _trained_on(make_cfg("data.resolution=32")) != base
    assert trained_on(make_cfg(), ("model",)) == {"model": base["model"]}


def test_eval_settings_only_differ_in_the_eval_fingerprint(make_cfg):
    a, b = fingerprints(make_cfg()), fingerprints(make_cfg("eval.steps=7"))
    assert a["config_fingerprint"] == b["config_fingerprint"] and a["eval_fingerprint"] != b["eval_fingerprint"]


def test_a_sweep_whose_cells_would_share_a_folder_is_not_launched(cache_dir):
    problems = preflight(["eval.steps=1,2", f"model.cache_dir={cache_dir}"])
    assert len(problems) == 1 and "would share one trial folder" in problems[0]
    assert "python -m sdsweep.eval TRIAL_DIR" in problems[0]
    assert len(expand_cells(["adapter=lora,dora", "eval.steps=1"])) == 2
    assert preflight(["adapter=lora,dora", "eval.steps=1", f"model.cache_dir={cache_dir}"]) == []


def test_a_resumed_trial_is_kept_rescored_or_retrained_as_its_keys_say(make_cfg, tmp_path):
    """Another tracking.group keeps the trial byte for byte; other eval settings re-score its saved
    adapter without training (and the board compares it with the base model's images of the new
    settings only); another learning rate trains it again."""
    sweep = tmp_path
    (sweep / "multirun.yaml").write_text("{}\n")  # a cell of a sweep: the base images go to <sweep>/base
    tmp_path = sweep / "trial"
    cheap = ["eval.prompts=[house]", "eval.steps=1", "eval.metrics=[random_style]", "eval.max_reference_images=2"]
    first = run_trial(make_cfg(*cheap, steps=2, evaluate=True), tmp_path)
    assert first["status"] == "finished" and "eval/gram_distance" in first
    on_disk = (tmp_path / "metrics.json").read_bytes()
    assert run_trial(make_cfg(*cheap, "tracking.group=other", steps=2, evaluate=True), tmp_path) == first
    assert (tmp_path / "metrics.json").read_bytes() == on_disk

    rescored = run_trial(make_cfg(*cheap, "eval.steps=2", steps=2, evaluate=True), tmp_path)
    assert rescored["losses"] == first["losses"] and rescored["train_s"] == first["train_s"]  # not trained again
    assert rescored["eval/gram_distance"] != first["eval/gram_distance"]  # sampled with 2 steps, not 1
    assert rescored["eval_fingerprint"] != first["eval_fingerprint"]
    assert json.loads((tmp_path / "metrics.json").read_text())["eval/gram_distance"] == rescored["eval/gram_distance"]
    assert len(list((sweep / "base").iterdir())) == 2  # both settings' base images are kept on disk
    board, _ = build(sweep)
    reference = board[board["status"] == "reference"]
    assert list(reference["eval_base_key"]) == [rescored["eval/base_key"]] and reference["n_seeds"].isna().all()

    retrained = run_trial(make_cfg(*cheap, "train.lr=3e-4", steps=2, evaluate=True), tmp_path)
    assert retrained["losses"] != first["losses"]


def test_a_trial_fingerprinted_before_identity_py_is_kept(make_cfg, tmp_path):
    """metrics.json written before this list existed holds the old fingerprint (everything but
    tracking, cache and sweep, as sha256 of the sorted JSON): such a trial is kept, not retrained."""
    import hashlib

    from omegaconf import OmegaConf

    from sdsweep.sweep.resume import kept_trial

    cfg = make_cfg()
    old = OmegaConf.to_container(cfg, resolve=True)
    for node in ("tracking", "cache", "sweep"):
        old.pop(node)
    stored = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:16]
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "finished", "config_fingerprint": stored}))
    kept = kept_trial(tmp_path, cfg)
    assert kept is not None and kept.rescore is False
    assert kept_trial(tmp_path, make_cfg("train.lr=3e-4")) is None


# keys of features that are off: they train nothing, so they do not change what a trial is
INERT_EXAMPLES = ["adapter.token='<x>'", "adapter.num_vectors=3", "data.class_prompt=a", "train.prior_loss_weight=2",
                  "data.class_steps=5", "train.ema_on_cpu=true"]
# the same keys once their feature is on
LIVE_EXAMPLES = [("adapter=textual_inversion", "adapter.num_vectors=3"),
                 ("data.num_class_images=2", "data.class_prompt=a", "train.prior_loss_weight=2"),
                 ("train.ema_decay=0.9", "train.ema_on_cpu=true")]


@pytest.mark.parametrize("override", INERT_EXAMPLES)
def test_the_keys_of_a_feature_that_is_off_keep_the_training_fingerprint(make_cfg, override):
    assert training_fingerprint(make_cfg(override)) == training_fingerprint(make_cfg())


@pytest.mark.parametrize("overrides", LIVE_EXAMPLES)
def test_the_keys_of_a_feature_that_is_on_change_the_training_fingerprint(make_cfg, overrides):
    switch, *keys = overrides
    assert training_fingerprint(make_cfg(switch, *keys)) != training_fingerprint(make_cfg(switch))


def test_a_trial_finished_before_ema_prior_preservation_and_textual_inversion_existed_keeps_its_fingerprint(make_cfg):
    """Its fingerprint was the digest of a config without their keys: the same digest today."""
    from omegaconf import OmegaConf

    from sdsweep.config.identity import EVALUATION, UNTRAINED, _digest, _without

    cfg = make_cfg()
    older = _without(cfg, (*UNTRAINED, *EVALUATION))
    for node, keys in {"train": ("ema_decay", "ema_on_cpu", "prior_loss_weight"),
                       "data": ("num_class_images", "class_prompt", "class_data_dir", "class_steps",
                                "class_guidance_scale"),
                       "adapter": ("token", "num_vectors", "initializer_token")}.items():
        for key in keys:
            assert OmegaConf.select(cfg, f"{node}.{key}") is not None or key in ("class_prompt", "class_data_dir")
            del older[node][key]
    assert training_fingerprint(cfg) == _digest(older)
