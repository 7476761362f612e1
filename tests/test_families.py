"""Model families: SD1.5, SDXL and SD3 load through one path, train with their own objective, and
their targets resolve to the right layers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sdsweep.config.schema import ConfigError, TrainConfig
from sdsweep.config.validate import validate
from sdsweep.model import adapters
from sdsweep.model import load as models
from sdsweep.model.conditioning import encode_text, prompt_embeddings
from sdsweep.sweep.trial import run_trial
from sdsweep.train.objectives import ddpm_loss, flow_matching_loss


@pytest.fixture
def make_cfg(make_cfg):
    """Training only: evaluation has its own tests (test_evaluate.py), and costs seconds per trial."""
    return lambda *overrides, **kwargs: make_cfg("eval.enabled=false", *overrides, **kwargs)

FAMILY_OF = {"tiny-sd15": "sd15", "tiny-sdxl": "sdxl", "tiny-sd3": "sd3"}


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl", "tiny-sd3"])
def test_the_tiny_model_is_saved_and_loaded_like_the_real_one(make_cfg, model):
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    cfg = make_cfg(f"model={model}")
    source = models.resolve_source(cfg.model)
    index = json.loads((models.Path(source) / "model_index.json").read_text())
    assert index["_class_name"] == models.pipeline_class(FAMILY_OF[model]).__name__
    c = models.load_components(cfg.model)
    n_encoders = {"sd15": 1, "sdxl": 2, "sd3": 3}[c.family]
    assert len(c.text_encoders) == len(c.tokenizers) == n_encoders
    if c.family == "sd3":
        assert isinstance(c.denoiser, SD3Transformer2DModel) and isinstance(c.noise_scheduler, FlowMatchEulerDiscreteScheduler)
        assert c.noise_scheduler.config.shift == 3.0 and c.vae.config.latent_channels == 16
        assert type(c.tokenizers[2]).__name__ == "T5Tokenizer"
    else:
        assert isinstance(c.denoiser, UNet2DConditionModel) and isinstance(c.noise_scheduler, DDPMScheduler)
    # captions are tokenized for real: CLIP's BPE knows these words as single tokens
    ids = c.tokenizers[0]("a red circle").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 5
    parts = encode_text(c, ["a red circle", ""], torch.device("cpu"))
    embeds, pooled = prompt_embeddings(c, parts)
    expected_tokens = 77 + 77 if c.family == "sd3" else 77
    assert embeds.shape[:2] == (2, expected_tokens) and (pooled is None) == (c.family == "sd15")
    assert not torch.equal(embeds[0], embeds[1])


@pytest.mark.parametrize("model", ["tiny-sd15", "tiny-sdxl", "tiny-sd3"])
def test_each_family_trains_a_few_steps(make_cfg, tmp_path, model):
    metrics = run_trial(make_cfg(f"model={model}", "train.lr=1e-3", steps=2), tmp_path)
    assert metrics["status"] == "finished", metrics.get("reason")
    assert len(metrics["losses"]) == 2 and all(v > 0 for v in metrics["losses"])
    assert (tmp_path / "adapter" / adapters.LORA_WEIGHTS).exists()


def test_sd3_drop_t5_trains_on_zeros_in_place_of_t5(make_cfg, tmp_path):
    cfg = make_cfg("model=tiny-sd3", "model.drop_t5=true", steps=2)
    c = models.load_components(cfg.model)
    assert len(c.text_encoders) == 2 and all("CLIP" in type(te).__name__ for te in c.text_encoders)
    embeds, _ = prompt_embeddings(c, encode_text(c, ["a red circle"], torch.device("cpu")))
    assert embeds.shape == (1, 77 + 77, 64) and not embeds[:, 77:].any()
    assert run_trial(cfg, tmp_path)["status"] == "finished"


def test_t5_is_never_stored_in_fp16(make_cfg):
    c = models.load_components(make_cfg("model=tiny-sd3").model)
    models.place(c, make_cfg("precision=fp16").precision, torch.device("cpu"))
    assert c.text_encoders[0].dtype == torch.float16 and c.text_encoders[2].dtype == torch.bfloat16



@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
def test_a_model_is_read_straight_into_the_dtypes_it_is_trained_in(make_cfg, model):
    """Loading with the precision halves the host memory of a half-precision trial (no fp32 copy first)
    and gives the very weights a fp32 load cast down would: the files are read once, cast once."""
    cfg = make_cfg(f"model={model}", "precision=fp16")
    direct = models.load_components(cfg.model, cfg.precision)
    assert direct.denoiser.dtype == torch.float16 and direct.vae.dtype == torch.float32
    assert [te.dtype for te in direct.text_encoders] == (
        [torch.float16, torch.float16, torch.bfloat16] if model == "tiny-sd3" else [torch.float16] * 2)
    cast = models.load_components(cfg.model)
    models.place(cast, cfg.precision, torch.device("cpu"))
    for name, module in direct.modules().items():
        theirs = cast.modules()[name].state_dict()
        for key, tensor in module.state_dict().items():
            assert tensor.dtype == theirs[key].dtype and torch.equal(tensor, theirs[key]), (name, key)
# --- targets ---------------------------------------------------------------------------------------


def test_targets_resolve_to_the_mmdit_attention_and_feed_forward(make_cfg):
    c = models.load_components(make_cfg("model=tiny-sd3").model)
    resolved = {}
    for option in ("attn", "self_attn", "cross_attn", "many"):
        patterns = adapters.denoiser_patterns(make_cfg(f"targets={option}").targets, "sd3")
        resolved[option] = set(adapters.resolve_targets(c.denoiser, patterns, "transformer"))
    assert "transformer_blocks.0.attn.to_q" in resolved["attn"] and "transformer_blocks.0.attn.add_q_proj" in resolved["attn"]
    assert resolved["self_attn"] | resolved["cross_attn"] == resolved["attn"]
    assert not resolved["self_attn"] & resolved["cross_attn"]
    assert all(".attn.add_" in n or n.endswith("to_add_out") for n in resolved["cross_attn"])
    assert resolved["attn"] < resolved["many"]
    assert {"transformer_blocks.0.ff.net.2", "transformer_blocks.0.ff_context.net.0.proj", "context_embedder"} <= resolved["many"]
    # the UNet patterns would match nothing here: that is why the group has transformer_patterns
    with pytest.raises(adapters.TargetError):
        adapters.resolve_targets(c.denoiser, list(make_cfg("targets=attn").targets.patterns), "transformer")


def test_sd3_without_transformer_patterns_or_with_min_snr_is_refused(make_cfg):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("model=tiny-sd3", "targets.transformer_patterns=[]", "train.snr_gamma=5.0",
                          "train.weighting_scheme=uniform"))
    text = str(err.value)
    assert "transformer_patterns" in text and "train.snr_gamma" in text and "train.weighting_scheme=" in text
    with pytest.raises(ConfigError, match="model.drop_t5"):
        validate(make_cfg("model.drop_t5=true"))


# --- objectives --------------------------------------------------------------------------------------


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


@pytest.mark.parametrize("precondition", [True, False])
@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "none"])
def test_flow_matching_is_zero_for_the_true_velocity_and_positive_otherwise(precondition, scheme):
    scheduler = _flow_scheduler()
    cfg = TrainConfig(weighting_scheme=scheme, precondition_outputs=precondition)
    latents = torch.randn(4, 16, 8, 8)
    seen = {}

    def oracle(noisy, timesteps):
        # recover the noise from x_t = (1 - s) x0 + s n, with s looked up like the objective does
        s = scheduler.sigmas[(scheduler.timesteps[None] == timesteps[:, None].cpu()).float().argmax(1)].view(-1, 1, 1, 1)
        seen["sigmas"] = s
        noise = (noisy - (1 - s) * latents) / s
        return noise - latents

    torch.manual_seed(0)
    assert flow_matching_loss(oracle, scheduler, cfg, latents).abs().max() < 1e-3
    assert ((seen["sigmas"] > 0) & (seen["sigmas"] <= 1)).all()
    torch.manual_seed(0)
    assert (flow_matching_loss(lambda x, t: torch.zeros_like(x), scheduler, cfg, latents) > 0).all()


def test_flow_matching_samples_shifted_sigmas_around_the_middle():
    scheduler, latents, sigmas = _flow_scheduler(), torch.zeros(512, 1, 1, 1), []

    def record(noisy, timesteps):
        sigmas.append(timesteps / 1000)
        return noisy

    torch.manual_seed(0)
    flow_matching_loss(record, scheduler, TrainConfig(), latents)
    s = sigmas[0]
    # logit-normal u (median 0.5) through SD3's shift 3: median sigma 0.75
    assert 0.68 < s.median() < 0.82 and s.min() > 0 and s.max() <= 1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_target_follows_the_scheduler_config(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    latents = torch.randn(3, 4, 8, 8)
    captured = {}

    def oracle(noisy, timesteps):
        a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noise = (noisy - a.sqrt() * latents) / (1 - a).sqrt()
        captured["noise"] = noise
        return scheduler.get_velocity(latents, noise, timesteps) if prediction_type == "v_prediction" else noise

    torch.manual_seed(0)
    assert ddpm_loss(oracle, scheduler, TrainConfig(), latents).abs().max() < 1e-4
    torch.manual_seed(0)
    assert ddpm_loss(oracle, scheduler, TrainConfig(snr_gamma=5.0), latents).abs().max() < 1e-4


def test_a_v_prediction_model_trains_on_velocity(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("model=tiny-sd15")
    folder = tmp_path / "tiny-sd15-v"
    shutil.copytree(models.resolve_source(cfg.model), folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "prediction_type": "v_prediction"}))
    cfg = make_cfg("model=tiny-sd15", f"model.pretrained={folder}", "model.build_tiny=false", steps=1)
    assert models.load_components(cfg.model).noise_scheduler.config.prediction_type == "v_prediction"
    velocity_calls = []
    from diffusers import DDPMScheduler

    original = DDPMScheduler.get_velocity
    monkeypatch.setattr(DDPMScheduler, "get_velocity", lambda self, *a: velocity_calls.append(1) or original(self, *a))
    assert run_trial(cfg, tmp_path / "trial")["status"] == "finished"
    assert velocity_calls


# --- other ways to name the weights -------------------------------------------------------------------


def test_a_separate_vae_folder_is_used(make_cfg, tmp_path):
    source = models.resolve_source(make_cfg().model)
    vae_folder = tmp_path / "my-vae"
    shutil.copytree(f"{source}/vae", vae_folder)
    c = models.load_components(make_cfg(f"model.vae={vae_folder}").model)
    assert c.vae.config.latent_channels == 4 and str(vae_folder) in str(c.vae.config._name_or_path)


def test_single_file_checkpoints_go_through_from_single_file(make_cfg, tmp_path):
    """model.pretrained=FILE.safetensors in the original (LDM / A1111 / kohya) layout: diffusers'
    from_single_file converts it, with model.single_file_config's configs and tokenizers, back to the
    very weights it was saved from."""
    from safetensors import safe_open
    from single_file import configs_only, save_sd15_checkpoint

    tiny_cfg = make_cfg("model=tiny-sd15").model
    tiny = models.load_components(tiny_cfg)
    checkpoint = save_sd15_checkpoint(tiny, tmp_path / "my-model.safetensors")
    with safe_open(str(checkpoint), "pt") as f:  # laid out as a downloaded SD1.5 checkpoint, no diffusers names
        assert {k.split(".")[0] for k in f.keys()} == {"model", "first_stage_model", "cond_stage_model"}
        assert f.get_slice("first_stage_model.encoder.mid.attn_1.q.weight").get_shape() == [16, 16, 1, 1]
        assert "model.diffusion_model.output_blocks.1.2.conv.weight" in f.keys()  # up block 0's upsampler
    # configs without weights: a component missing from the file fails instead of loading from the folder
    configs = configs_only(Path(models.resolve_source(tiny_cfg)), tmp_path / "configs")
    cfg = make_cfg("model=tiny-sd15", f"model.pretrained={checkpoint}", "model.build_tiny=false",
                   f"model.single_file_config={configs}")
    loaded = models.load_components(cfg.model)
    assert (loaded.family, loaded.source, type(loaded.denoiser)) == ("sd15", str(checkpoint), type(tiny.denoiser))
    assert loaded.modules().keys() == tiny.modules().keys() == {"unet", "vae", "text_encoder"}
    assert dict(loaded.noise_scheduler.config) == dict(tiny.noise_scheduler.config)  # configs from the folder
    assert loaded.tokenizers[0]("a red circle").input_ids == tiny.tokenizers[0]("a red circle").input_ids
    for name, module in tiny.modules().items():
        expected, got = module.state_dict(), loaded.modules()[name].state_dict()
        assert got.keys() == expected.keys(), name
        for key, tensor in expected.items():
            assert got[key].device.type == "cpu" and torch.equal(got[key], tensor), (name, key)


def test_a_single_file_missing_weights_fails_naming_them(make_cfg, tmp_path):
    """diffusers loads a file that lacks some of a component's weights and leaves them on the meta
    device; load_components refuses it, naming the component and a missing tensor."""
    from safetensors.torch import load_file, save_file
    from single_file import configs_only, save_sd15_checkpoint

    tiny_cfg = make_cfg("model=tiny-sd15").model
    full = load_file(save_sd15_checkpoint(models.load_components(tiny_cfg), tmp_path / "full.safetensors"))
    partial = tmp_path / "partial.safetensors"
    save_file({k: v for k, v in full.items() if "final_layer_norm" not in k}, partial)
    configs = configs_only(Path(models.resolve_source(tiny_cfg)), tmp_path / "configs")
    cfg = make_cfg("model=tiny-sd15", f"model.pretrained={partial}", "model.build_tiny=false",
                   f"model.single_file_config={configs}")
    with pytest.raises(models.ModelLoadError, match="text_encoder: 2 tensors, e.g. final_layer_norm"):
        models.load_components(cfg.model)


def test_a_checkpoint_diffusers_cannot_read_fails_naming_the_keys_to_set(make_cfg, tmp_path):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "diffusers-keys.safetensors"
    save_file({"unet.conv_in.weight": torch.zeros(4, 4, 3, 3)}, checkpoint)
    cfg = make_cfg(f"model.pretrained={checkpoint}", "model.build_tiny=false")
    with pytest.raises(models.ModelLoadError) as err:
        models.load_components(cfg.model)
    assert f"model.pretrained={checkpoint}" in str(err.value) and "model.single_file_config" in str(err.value)
    with pytest.raises(models.ModelLoadError, match="no such file"):
        models.load_components(make_cfg(f"model.pretrained={tmp_path / 'missing.safetensors'}",
                                        "model.build_tiny=false").model)
