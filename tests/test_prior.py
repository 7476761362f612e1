"""DreamBooth prior preservation: the class images are the base model's, drawn once per sweep; the loss
is instance + train.prior_loss_weight * class, computed on them; off, a trial trains as before."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate, warnings
from sdsweep.data.dataset import make_loader, with_class_examples
from sdsweep.eval import sampling
from sdsweep.sweep import estimate
from sdsweep.sweep.trial import run_trial
from sdsweep.train import loop, objectives
from sdsweep.train.setup import setup

TINY = {"sdxl": "model=tiny-sdxl", "sd15": "model=tiny-sd15", "sd3": "model=tiny-sd3"}
# class images as cheap as they can be: 2 steps without guidance
CHEAP_CLASS = ["data.class_steps=2", "data.class_guidance_scale=1"]


def _prior(prompt: str, n: int = 2, *more: str) -> list[str]:
    """Overrides of a trial with `n` class images of `prompt` (a prompt per test: its own cached images)."""
    return [f"data.num_class_images={n}", f"data.class_prompt={prompt}", *CHEAP_CLASS, *more]


@pytest.fixture
def draws(monkeypatch) -> list[list[int]]:
    """The seeds of every call that draws class images with the base model (the sampler set-up uses)."""
    calls: list[list[int]] = []
    real = sampling.generate

    def counted(pipe, prompts, seeds, *args, **kwargs):
        calls.append(list(seeds))
        return real(pipe, prompts, seeds, *args, **kwargs)

    monkeypatch.setattr(sampling, "generate", counted)
    return calls


# --- configuration -----------------------------------------------------------------------------------


def test_invalid_prior_settings_are_refused_naming_the_key(make_cfg, tmp_path):
    problems = {
        "data.num_class_images=4": "data.class_prompt",
        "data.num_class_images=-1": "data.num_class_images=-1",
        "train.prior_loss_weight=-1": "train.prior_loss_weight=-1",
        f"data.class_data_dir={tmp_path / 'nowhere'}": "data.class_data_dir=",
        "data.class_steps=0": "data.class_steps=0",
        "data.buckets=true": "data.buckets=true",
    }
    for override, key in problems.items():
        more = [] if override.startswith("data.num_class_images") else ["data.num_class_images=4",
                                                                         "data.class_prompt=a photo"]
        with pytest.raises(ConfigError) as e:
            validate(make_cfg(override, *more))
        assert key in str(e.value), (override, str(e.value))
    validate(make_cfg(*_prior("a photo", 4)))  # a valid one


def test_prior_settings_without_class_images_are_warned_about_as_ignored(make_cfg):
    said = warnings(make_cfg("data.class_prompt=a photo", "train.prior_loss_weight=0.5"))
    assert any(w.startswith("data.class_prompt='a photo' is ignored with data.num_class_images=0") for w in said)
    assert any(w.startswith("train.prior_loss_weight=0.5 is ignored") for w in said)
    assert not any("class" in w for w in warnings(make_cfg()))  # model=toy-sdxl's own class_steps: no warning
    assert not any("ignored" in w for w in warnings(make_cfg(*_prior("a photo"))))


# --- the loss ------------------------------------------------------------------------------------------


def _mean_latents(s, batch):
    """latents_of without its random draw: the latent distribution's mean, scaled."""
    vae = s.components.vae
    mean = batch["latent_dist"][:, : batch["latent_dist"].shape[1] // 2]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((mean - shift) * vae.config.scaling_factor).float().contiguous()


def _fixed_draws(monkeypatch):
    """Noise and timesteps that depend on each example alone, not on its place in the batch: the loss of
    a joined batch can then be compared with each half's loss computed on its own."""
    import diffusers.training_utils

    monkeypatch.setattr(loop, "latents_of", _mean_latents)
    monkeypatch.setattr(objectives, "_noise", lambda latents, cfg: torch.sin(3 * latents + 1))
    monkeypatch.setattr(torch, "randint", lambda low, high, size, device=None: torch.full(size, 500, device=device))
    monkeypatch.setattr(diffusers.training_utils, "compute_density_for_timestep_sampling",
                        lambda scheme, n, **kw: torch.full((n,), 0.5))


def _half(batch: dict, part: slice) -> dict:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            out[k] = v[part]
        elif isinstance(v, dict):
            out[k] = {name: t[part] for name, t in v.items()}
        elif isinstance(v, list):
            out[k] = v[part]
    return out


@pytest.mark.parametrize("family", ["sdxl", "sd15", "sd3"])
def test_the_prior_loss_is_computed_on_the_class_images(make_cfg, monkeypatch, family):
    cfg = make_cfg(TINY[family], *_prior(f"a photo of {family}", 3), "train.batch_size=2", "data.crop=center")
    s = setup(cfg)
    assert len(s.class_dataset) == 3
    class_folder = Path(s.data_report["class_images"]["folder"])
    assert all(r.path.parent == class_folder and r.caption == f"a photo of {family}" for r in s.class_dataset.records)
    batch = next(with_class_examples(iter(make_loader(s.dataset, 2, 0, 0, 0)),
                                     iter(make_loader(s.class_dataset, 2, 1, 0, 0))))
    assert batch["class_examples"] == 2 and len(batch["captions"]) == 4
    assert batch["captions"][2:] == [f"a photo of {family}"] * 2
    # the class half holds the class images' cached latents and the class prompt's text features
    for row, key in enumerate(batch["key"][2:].tolist(), start=2):
        view = s.class_dataset.view(tuple(key))
        assert torch.equal(batch["latent_dist"][row], s.class_dataset.latents.load(s.class_dataset.records[view.index],
                                                                                 view))
    prompt_features = s.class_dataset.texts.load(f"a photo of {family}")
    for name, tensor in batch["text_features"].items():
        assert torch.equal(tensor[2], prompt_features[name]) and torch.equal(tensor[3], prompt_features[name])
    if family == "sdxl":  # the class images' own micro-conditioning (their size, crop) rides along
        assert batch["original_size"][2:].tolist() == [[64, 64], [64, 64]]

    _fixed_draws(monkeypatch)
    with torch.no_grad():
        joined = loop.per_sample_loss(s, cfg, batch)
        instance = loop.per_sample_loss(s, cfg, _half(batch, slice(0, 2)))
        klass = loop.per_sample_loss(s, cfg, _half(batch, slice(2, 4)))
        assert joined == pytest.approx(torch.cat([instance, klass]), rel=1e-4, abs=1e-6)
        assert not torch.allclose(instance, klass)  # the two halves really are different images
        for weight in (0.0, 0.5, 2.0):
            total, prior = objectives.prior_preservation_loss(joined, 2, weight)
            assert float(prior) == pytest.approx(float(klass.mean()), rel=1e-4)
            assert float(total) == pytest.approx(float(instance.mean() + weight * klass.mean()), rel=1e-4)
        # weight 0: the instance images' loss alone
        only = loop.diffusion_loss(s, cfg, _half(batch, slice(0, 2)))
        assert float(objectives.prior_preservation_loss(joined, 2, 0.0)[0]) == pytest.approx(float(only), rel=1e-4)


def test_without_class_images_a_trial_trains_exactly_as_before(make_cfg, tmp_path, monkeypatch):
    """num_class_images=0 (whatever the other prior keys say) is the loop without the feature: no class
    stream, the same losses bit for bit, and no train/prior_loss."""
    joined = []
    monkeypatch.setattr(loop, "with_class_examples", lambda *a: joined.append(1) or pytest.fail("joined"))
    plain = run_trial(make_cfg("model=tiny-sdxl", steps=3), tmp_path / "plain")
    off = run_trial(make_cfg("model=tiny-sdxl", "data.num_class_images=0", "data.class_prompt=a photo",
                             "train.prior_loss_weight=3", steps=3), tmp_path / "off")
    assert plain["status"] == off["status"] == "finished"
    assert off["losses"] == plain["losses"]  # exact
    assert "class_images" not in off["data"] and "class_images_s" not in off
    rows = [json.loads(line) for line in (tmp_path / "off" / "train_log.jsonl").read_text().splitlines()]
    assert rows and not any("train/prior_loss" in r for r in rows)
    assert not joined


def test_the_prior_weight_changes_what_is_trained_and_prior_loss_is_logged(make_cfg, tmp_path):
    common = ["model=tiny-sdxl", *_prior("a photo of a weight", 2)]
    one = run_trial(make_cfg(*common, steps=2), tmp_path / "one")
    zero = run_trial(make_cfg(*common, "train.prior_loss_weight=0", steps=2), tmp_path / "zero")
    assert one["status"] == zero["status"] == "finished"
    rows = [json.loads(line) for line in (tmp_path / "one" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["train/prior_loss"] > 0 for r in rows)
    # step 1 trains on the same batch and draws: the total differs by the weighted prior loss alone
    zero_rows = [json.loads(line) for line in (tmp_path / "zero" / "train_log.jsonl").read_text().splitlines()]
    assert zero_rows[0]["train/prior_loss"] == pytest.approx(rows[0]["train/prior_loss"], rel=1e-5)
    assert rows[0]["train/loss"] == pytest.approx(zero_rows[0]["train/loss"] + rows[0]["train/prior_loss"], rel=1e-5)
    assert one["losses"][1] != pytest.approx(zero["losses"][1], rel=1e-6)  # and then different weights


def test_a_resumed_trial_with_class_images_reproduces_the_uninterrupted_one(make_cfg, tmp_path):
    common = ["model=tiny-sdxl", *_prior("a photo of a resume", 3), "train.checkpoint_every=2"]
    whole = run_trial(make_cfg(*common, steps=4), tmp_path / "whole")
    crashed = run_trial(make_cfg(*common, "debug.raise_at_step=3", steps=4), tmp_path / "resumed")
    assert crashed["status"] == "failed"
    resumed = run_trial(make_cfg(*common, steps=4), tmp_path / "resumed")
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)


# --- drawn once per sweep --------------------------------------------------------------------------------


def test_class_images_are_drawn_once_per_sweep_not_per_trial(make_cfg, tmp_path, draws):
    common = ["model=tiny-sdxl", *_prior("a photo of a sweep", 3)]
    first = run_trial(make_cfg(*common, "adapter=lora"), tmp_path / "lora")
    assert first["status"] == "finished" and sum(map(len, draws)) == 3
    folder = Path(first["data"]["class_images"]["folder"])
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == ["seed-00000.png", "seed-00001.png", "seed-00002.png"]
    stamps = [(f.stat().st_mtime_ns, f.stat().st_ino) for f in files]
    assert first["data"]["class_images"] | {"seconds": 0} == {
        "requested": 3, "from_folder": 0, "cached": 0, "drawn": 3, "damaged": 0, "seconds": 0, "folder": str(folder)}
    assert first["class_images_s"] > 0  # timed into the set-up figures

    # another cell of the sweep (the base kept loaded), and one that loads the base afresh: nothing drawn
    for i, more in enumerate((["adapter=loha"], ["adapter=lokr", "sweep.keep_base_loaded=false"])):
        other = run_trial(make_cfg(*common, *more), tmp_path / f"other{i}")
        assert other["status"] == "finished" and other["data"]["class_images"]["cached"] == 3
        assert other["data"]["class_images"]["drawn"] == 0 and sum(map(len, draws)) == 3
        assert other["data"]["class_cache"]["latents"]["computed"] == 0  # their latents are cached too
    assert [(f.stat().st_mtime_ns, f.stat().st_ino) for f in files] == stamps  # untouched

    # more class images: only the new one is drawn; a damaged one is drawn again
    files[0].write_bytes(files[0].read_bytes()[:100])
    more = run_trial(make_cfg("model=tiny-sdxl", *_prior("a photo of a sweep", 4)), tmp_path / "more")
    assert more["data"]["class_images"]["drawn"] == 2 and more["data"]["class_images"]["damaged"] == 1
    assert draws[-1] == [0, 3]
    # another prompt is another set
    other_prompt = run_trial(make_cfg("model=tiny-sdxl", *_prior("a photo of something else", 1)), tmp_path / "x")
    assert Path(other_prompt["data"]["class_images"]["folder"]) != folder and draws[-1] == [0]


NAMESPACE = """
import sys, torch
from hydra import compose, initialize_config_module
from sdsweep.config.store import register_configs
from sdsweep.data.class_images import class_namespace
from sdsweep.model import load as models
register_configs()
with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
    cfg = compose(config_name="config", overrides=sys.argv[1:])
components = models.load_components(cfg.model, cfg.precision)
models.place(components, cfg.precision, torch.device("cpu"))
print(class_namespace(cfg, components, None))
"""


def test_another_process_finds_the_same_class_images(make_cfg, cache_dir, tmp_path):
    """A resumed sweep or a parallel launcher's worker is another process, with another hash seed."""
    import subprocess
    import sys

    from sdsweep.data.class_images import class_namespace
    from sdsweep.model import load as models

    overrides = ["model=tiny-sdxl", f"model.cache_dir={cache_dir}", "device=cpu", *_prior("a photo")]
    cfg = make_cfg(*overrides)
    components = models.load_components(cfg.model, cfg.precision)
    here = class_namespace(cfg, components, None)
    env = {**os.environ, "PYTHONHASHSEED": "1"}  # this process's is random: another order of every set
    there = subprocess.run([sys.executable, "-c", NAMESPACE, *overrides], env=env, capture_output=True, text=True,
                           check=True, cwd=tmp_path).stdout.split()[-1]
    assert there == here


def test_the_class_data_dir_is_used_first_and_only_the_missing_images_are_drawn(make_cfg, tmp_path, draws):
    from PIL import Image

    own = tmp_path / "class"
    own.mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), (40 * i, 90, 160)).save(own / f"mine{i}.png")
    cfg = make_cfg("model=tiny-sdxl", *_prior("a photo of my class", 3, f"data.class_data_dir={own}"))
    s = setup(cfg)
    paths = [r.path for r in s.class_dataset.records]
    assert paths[:2] == [own / "mine0.png", own / "mine1.png"] and paths[2].parent != own
    assert draws == [[0]] and sorted(os.listdir(own)) == ["mine0.png", "mine1.png"]  # nothing written there


def test_evaluation_references_stay_the_instance_images(make_cfg):
    """Class images are training data only: evaluation's data source (its style references) is unchanged."""
    from sdsweep.data.dataset import resolve_source

    with_prior = make_cfg(*_prior("a photo", 2))
    assert resolve_source(with_prior.data, with_prior.model.cache_dir) == resolve_source(make_cfg().data,
                                                                                         make_cfg().model.cache_dir)


# --- memory ----------------------------------------------------------------------------------------------


def test_the_estimate_counts_the_class_half_of_the_batch(make_cfg):
    def traced(*overrides):
        return estimate._estimate(make_cfg("model=tiny-sdxl", "data.crop=center", *overrides))

    plain, prior, double = traced(), traced(*_prior("a photo", 4)), traced("train.batch_size=4")
    assert prior.phases["training step"] > plain.phases["training step"]
    assert prior.phases["training step"] == pytest.approx(double.phases["training step"], rel=1e-6)
    assert estimate.cache_key(make_cfg(*_prior("a photo", 4))) != estimate.cache_key(make_cfg())
