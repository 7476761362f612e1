"""Saved adapters load where users load them, and change what the model draws."""

from __future__ import annotations

import json

import pytest
import torch

from sdsweep.model import adapters
from sdsweep.model import load as models
from sdsweep.sweep.trial import run_trial


def _sample(pipe, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle, sdsweep style", num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt").images


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15", "tiny-sd3"])
def test_lora_and_dora_load_into_the_diffusers_pipeline_and_change_its_output(make_cfg, tmp_path, kind, model):
    from diffusers import DiffusionPipeline

    cfg = make_cfg(f"adapter={kind}", f"model={model}", "train.lr=1e-2", "text_encoder=lora", steps=3)
    assert run_trial(cfg, tmp_path)["status"] == "finished"
    pipe = DiffusionPipeline.from_pretrained(models.resolve_source(cfg.model))
    before = _sample(pipe)
    pipe.load_lora_weights(tmp_path / "adapter")
    after = _sample(pipe)
    assert (before - after).abs().max() > 1e-3
    # the text encoders' adapters came along too
    assert getattr(pipe.text_encoder, "_hf_peft_config_loaded", False)
    denoiser = pipe.transformer if model == "tiny-sd3" else pipe.unet
    # every layer the trial adapted came back, not just enough of them to change the image
    from peft.tuners.lora import LoraLayer

    family = cfg.model.family
    fresh = models.load_components(cfg.model).denoiser
    trained = set(adapters.resolve_targets(fresh, adapters.denoiser_patterns(cfg.targets, family), "denoiser"))
    assert {n for n, m in denoiser.named_modules() if isinstance(m, LoraLayer)} == trained
    if kind == "dora":
        assert any("lora_magnitude_vector" in n for n, _ in denoiser.named_parameters())
    # the file does not depend on the process's string hashing (peft keeps target_modules as a set)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter" / adapters.LORA_WEIGHTS, "pt") as f:
        saved = json.loads(f.metadata()["lora_adapter_metadata"])
    denoiser_name = "transformer" if model == "tiny-sd3" else "unet"
    targets = saved[f"{denoiser_name}.target_modules"]
    assert targets == sorted(targets)


@pytest.mark.parametrize("kind", ["loha", "lokr"])
def test_loha_and_lokr_are_saved_in_peft_format_and_load_back(make_cfg, tmp_path, kind):
    from diffusers import StableDiffusionXLPipeline

    cfg = make_cfg(f"adapter={kind}", "train.lr=1e-2", steps=3)
    assert run_trial(cfg, tmp_path)["status"] == "finished"
    assert (tmp_path / "adapter" / "unet" / "adapter_model.safetensors").exists()
    pipe = StableDiffusionXLPipeline.from_pretrained(models.resolve_source(cfg.model))
    before = _sample(pipe)
    adapters.load_adapter(tmp_path / "adapter", {"unet": pipe.unet})
    assert (before - _sample(pipe)).abs().max() > 1e-3


def test_dora_on_many_layers_loads_every_layer_into_the_pipeline(make_cfg, tmp_path):
    """Attention and convolution adapters in one file: diffusers must load all of them."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open

    cfg = make_cfg("adapter=dora", "targets=many", steps=1)
    assert run_trial(cfg, tmp_path)["status"] == "finished"
    with safe_open(tmp_path / "adapter" / "pytorch_lora_weights.safetensors", "pt") as f:
        saved = {k for k in f.keys() if ".lora_A." in k}
    pipe = StableDiffusionXLPipeline.from_pretrained(models.resolve_source(cfg.model))
    pipe.load_lora_weights(tmp_path / "adapter")
    loaded = {n for n, _ in pipe.unet.named_parameters() if ".lora_A." in n}
    assert len(loaded) == len(saved) > 0
