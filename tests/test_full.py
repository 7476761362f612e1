"""adapter=full: the denoiser trained in full, the baseline the adapters are measured against (issue 16).

Every weight changes, the saved diffusers folder is the trained model bit for bit and is what evaluation
samples with, the kept base is not handed on dirty, the cells it cannot run are pruned with their reason,
and the estimator predicts full gradients and optimizer state."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdsweep.config.validate import warnings as config_warnings
from sdsweep.layout import TrialDir
from sdsweep.model import kept_base
from sdsweep.model import load as models
from sdsweep.model.adapters import DENOISER_WEIGHTS, load_denoiser
from sdsweep.sweep.estimate import estimate_peak
from sdsweep.sweep.preflight import repeated_cell_reason
from sdsweep.sweep.prune import prune_reason
from sdsweep.sweep.trial import run_trial
from sdsweep.train.checkpoints import ADAPTER, list_checkpoints

CHEAP_EVAL = ["eval.prompts=[house]", "eval.seeds=[0]", "eval.steps=2", "eval.guidance_scale=1",
              "eval.metrics=[random_style]", "eval.max_reference_images=2"]
# a high learning rate, so that two steps move every weight far enough to change an 8-bit image
pytestmark = pytest.mark.xdist_group("full_trial")  # the module fixture trains once, on one worker
FULL = ("model=tiny-sd15", "adapter=full", "train.lr=1e-2", "train.checkpoint_every=2", "train.gradient_checkpointing=true",
        *CHEAP_EVAL)


@pytest.fixture(scope="module")
def full_trial(cache_dir, tmp_path_factory):
    from conftest import config_maker

    cfg = config_maker(cache_dir)(*FULL, steps=2, evaluate=True)
    trial = TrialDir(tmp_path_factory.mktemp("full") / "trial")
    metrics = run_trial(cfg, trial.path)
    assert metrics["status"] == "finished", metrics.get("reason")
    return cfg, trial, metrics


def test_every_denoiser_weight_changes_and_the_saved_folder_is_the_trained_model(full_trial):
    cfg, trial, metrics = full_trial
    base = models.load_base_denoiser(cfg.model, cfg.precision, torch.device("cpu"))
    saved = load_file(trial.adapter / "unet" / DENOISER_WEIGHTS)
    params = dict(base.named_parameters())
    assert set(params) <= set(saved) and metrics["trainable_params"] == sum(p.numel() for p in params.values())
    unchanged = [name for name, p in params.items() if torch.equal(p, saved[name])]
    assert not unchanged, f"weights a full fine-tune left as they were: {unchanged[:5]}"
    # the last checkpoint holds the trained weights as training left them: the saved folder is exactly them
    trained = load_file(list_checkpoints(trial.checkpoints)[-1] / ADAPTER)
    assert {f"unet.{k}" for k in params} == set(trained)
    for name in params:
        assert torch.equal(trained[f"unet.{name}"], saved[name]), name
    assert metrics["adapter_mb"] == pytest.approx((trial.adapter / "unet" / DENOISER_WEIGHTS).stat().st_size / 2**20,
                                                  rel=0.01)


def test_diffusers_from_pretrained_reproduces_the_trained_denoisers_output(full_trial):
    cfg, trial, _ = full_trial
    base = models.load_base_denoiser(cfg.model, cfg.precision, torch.device("cpu"))
    loaded = load_denoiser(trial.adapter, "unet", base)  # UNet2DConditionModel.from_pretrained(adapter/unet)
    trained = load_file(list_checkpoints(trial.checkpoints)[-1] / ADAPTER)
    base.load_state_dict({k.removeprefix("unet."): v for k, v in trained.items()}, strict=False)
    torch.manual_seed(0)
    latents = torch.randn(1, base.config.in_channels, 8, 8)
    text = torch.randn(1, 5, base.config.cross_attention_dim)
    with torch.no_grad():
        assert torch.equal(loaded(latents, 10, text).sample, base(latents, 10, text).sample)


def test_evaluation_samples_the_saved_denoiser_against_the_untouched_base(full_trial):
    _, trial, metrics = full_trial
    assert "eval_error" not in metrics and metrics["eval/gram_distance"] is not None
    base_images = sorted(p for p in trial.base(metrics["eval/base_key"]).path.rglob("*.png"))
    trial_images = sorted(trial.samples.glob("*.png"))
    assert base_images and [p.name for p in base_images] == [p.name for p in trial_images]
    for ours, theirs in zip(trial_images, base_images):
        assert Image.open(ours).tobytes() != Image.open(theirs).tobytes()
    # the base's images are the base's: a fresh (LoRA) trial of the same sweep finds the same ones
    assert not kept_base._kept, "a fully fine-tuned denoiser was kept as the next trial's base"


def test_the_base_images_of_a_full_trial_equal_those_of_an_adapter_trial(full_trial, cache_dir, tmp_path):
    """Evaluation put the base's own weights back before sampling the base: an untrained LoRA sampled the
    same noise into the same images."""
    from conftest import config_maker

    _, trial, metrics = full_trial
    lora = run_trial(config_maker(cache_dir)("model=tiny-sd15", *CHEAP_EVAL, steps=1, evaluate=True), tmp_path / "lora")
    assert lora["eval/base_key"] == metrics["eval/base_key"]
    theirs = sorted(TrialDir(tmp_path / "lora").base(lora["eval/base_key"]).path.rglob("*.png"))
    ours = sorted(trial.base(metrics["eval/base_key"]).path.rglob("*.png"))
    assert [Image.open(p).tobytes() for p in ours] == [Image.open(p).tobytes() for p in theirs]


def test_cells_full_fine_tuning_cannot_run_are_pruned_with_the_reason(make_cfg):
    assert "a quantized base cannot be fine-tuned in full" in prune_reason(make_cfg("adapter=full", "precision=int8"))
    assert "trains the denoiser only" in prune_reason(make_cfg("adapter=full", "text_encoder=lora"))
    assert prune_reason(make_cfg("adapter=full")) is None
    ignored = config_warnings(make_cfg("adapter=full", "targets=many", "adapter.rank=16"))
    assert any(w.startswith("targets=many does nothing with adapter=full") for w in ignored)
    assert any(w.startswith("adapter.rank=16 does nothing with adapter=full") for w in ignored)


def test_a_full_cell_that_differs_only_in_what_full_ignores_repeats_the_first(make_cfg, tmp_path):
    """adapter=lora,full x adapter.rank=1,16 (the SD3 study's shape): the rank=1 full cell trains, rank=16's is pruned."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text(json.dumps({"hydra": {
        "sweeper": {"params": {"adapter.rank": "1,16"}}, "overrides": {"task": ["adapter=lora,full", "seed=3"]}}}))
    cfg = make_cfg("adapter=full")
    first = ["adapter.rank=1", "adapter=full", "seed=3"]
    assert repeated_cell_reason(cfg, sweep / "first", first) is None
    reason = repeated_cell_reason(cfg, sweep / "second", ["adapter.rank=16", "adapter=full", "seed=3"])
    assert reason.startswith("adapter=full ignores adapter.rank") and "[adapter.rank=1 adapter=full seed=3]" in reason
    assert repeated_cell_reason(make_cfg("adapter=lora"), sweep / "lora", ["adapter.rank=16", "adapter=lora", "seed=3"]) is None
    assert repeated_cell_reason(cfg, tmp_path / "single", first) is None  # not a sweep: nothing to repeat


@pytest.mark.parametrize("family", ["tiny-sdxl", "tiny-sd15", "tiny-sd3"])
def test_the_estimate_of_a_full_fine_tune_exceeds_the_adapters_in_every_family(make_cfg, family):
    lora = estimate_peak(make_cfg(f"model={family}", "adapter=lora"))
    full = estimate_peak(make_cfg(f"model={family}", "adapter=full"))
    denoiser = "transformer" if family == "tiny-sd3" else "unet"
    assert full.trainable_params == full.params[denoiser] > lora.trainable_params
    assert full.adapter_gb > lora.adapter_gb and full.phases["training step"] > lora.phases["training step"]


def test_sdxl_full_fine_tuning_on_a_16_gb_budget_is_pruned_with_its_predicted_peak(make_cfg, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sdxl = ("model=sdxl", "precision=fp16", "device=auto", "data.resolution=1024", "train.batch_size=1",
            "train.gradient_checkpointing=true", "optimizer=adamw8bit", "sweep.vram_budget_gb=16")
    reason = prune_reason(make_cfg(*sdxl, "adapter=full"))
    assert reason is not None and "predicted peak" in reason and "sweep.vram_budget_gb=16" in reason


def test_the_export_command_says_the_saved_folder_already_is_the_usable_model(full_trial):
    from helpers import export_refusal

    cfg, trial, _ = full_trial
    assert "already is the trained denoiser as a diffusers folder" in export_refusal(cfg, trial)
