"""Trials one after another in one process keep the base model loaded and swap only the adapter."""

from __future__ import annotations

import pytest
import torch

from sdsweep.model import kept_base
from sdsweep.model import load as models
from sdsweep.sweep.trial import run_trial

NO_EVAL = "eval.enabled=false"


@pytest.fixture(autouse=True)
def _nothing_kept_before_or_after():
    kept_base.drop()
    yield
    kept_base.drop()


def _count_loads(monkeypatch) -> list[int]:
    calls = [0]
    real = models.load_components

    def counting(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(models, "load_components", counting)
    return calls


def test_the_next_trial_reuses_the_base_and_trains_exactly_as_after_a_fresh_load(make_cfg, tmp_path, monkeypatch):
    loads = _count_loads(monkeypatch)
    # the first trial leaves DoRA layers on many modules and text-encoder adapters behind it
    first = run_trial(make_cfg("adapter=dora", "targets=many", "text_encoder=lora", NO_EVAL, steps=2), tmp_path / "a")
    kept = run_trial(make_cfg("adapter=lokr", steps=3, evaluate=True), tmp_path / "b")
    assert first["status"] == kept["status"] == "finished"
    assert (first["base_reused"], kept["base_reused"]) == (False, True) and loads[0] == 1
    kept_base.drop()
    fresh = run_trial(make_cfg("adapter=lokr", "sweep.keep_base_loaded=false", steps=3, evaluate=True), tmp_path / "c")
    assert fresh["base_reused"] is False and loads[0] == 2
    assert kept["losses"] == fresh["losses"]  # bit for bit: the stripped base is the loaded base
    assert kept["trainable_params"] == fresh["trainable_params"]
    scores = [k for k in fresh if k.startswith("eval/") and isinstance(fresh[k], float)]
    assert scores and all(kept[k] == pytest.approx(fresh[k], rel=1e-5) for k in scores)


def test_stripping_restores_every_module_to_the_loaded_weights(make_cfg, tmp_path):
    from peft.tuners.tuners_utils import BaseTunerLayer

    cfg = make_cfg("adapter=dora", "targets=many", "text_encoder=lora", "train.gradient_checkpointing=true", steps=2)
    run_trial(cfg, tmp_path / "a")
    components, reused = kept_base.acquire(cfg, torch.device("cpu"))
    fresh = models.load_components(cfg.model)
    models.place(fresh, cfg.precision, torch.device("cpu"))
    assert reused
    for name, module in components.modules().items():
        assert not any(isinstance(m, BaseTunerLayer) for m in module.modules()), name
        assert not any(p.requires_grad for p in module.parameters()) and not module.training, name
        state, expected = module.state_dict(), fresh.modules()[name].state_dict()
        assert state.keys() == expected.keys(), name
        assert all(torch.equal(state[k], expected[k]) for k in expected), name
    assert not components.denoiser.is_gradient_checkpointing


def test_another_precision_or_keep_off_or_a_failed_trial_loads_afresh(make_cfg, tmp_path, monkeypatch):
    loads = _count_loads(monkeypatch)
    assert run_trial(make_cfg(NO_EVAL, steps=1), tmp_path / "a")["base_reused"] is False
    assert run_trial(make_cfg("precision=bf16", NO_EVAL, steps=1), tmp_path / "b")["base_reused"] is False
    failed = run_trial(make_cfg("precision=bf16", "debug.raise_at_step=1", NO_EVAL, steps=1), tmp_path / "c")
    assert failed["status"] == "failed" and failed["base_reused"] is True
    # a failed trial may leave its modules in any state: they are never handed on
    assert run_trial(make_cfg("precision=bf16", NO_EVAL, steps=1), tmp_path / "d")["base_reused"] is False
    off = make_cfg("precision=bf16", "sweep.keep_base_loaded=false", NO_EVAL, steps=1)
    assert run_trial(off, tmp_path / "e")["base_reused"] is False
    assert loads[0] == 4


def test_modules_whose_outputs_are_cached_leave_the_gpu_while_training(make_cfg, tmp_path):
    cached = run_trial(make_cfg(NO_EVAL, f"cache.dir={tmp_path / 'f'}", steps=1), tmp_path / "a")
    assert cached["offloaded_during_training"] == ["vae", "text_encoder", "text_encoder_2"]
    trains_text = run_trial(make_cfg(NO_EVAL, "text_encoder=lora", f"cache.dir={tmp_path / 'f'}", steps=1), tmp_path / "b")
    assert trains_text["offloaded_during_training"] == ["vae"]  # the encoders train: they stay
    live = run_trial(make_cfg(NO_EVAL, "cache.enabled=false", steps=1), tmp_path / "c")
    assert live["offloaded_during_training"] == []


def test_vae_tiling_decodes_tile_by_tile_and_switches_back_off(make_cfg, monkeypatch):
    from sdsweep.eval import sampling

    cfg = make_cfg("eval.resolution=128", "eval.vae_tiling=true")
    components, _ = kept_base.acquire(cfg, torch.device("cpu"))
    pipe = sampling.build_pipeline(components)
    vae, tiled = pipe.vae, []
    real = type(vae).tiled_decode
    monkeypatch.setattr(type(vae), "tiled_decode", lambda self, *a, **k: tiled.append(1) or real(self, *a, **k))
    latents = torch.randn(1, 4, 16, 16)
    (image,) = sampling.decode(pipe, latents, tiling=True)
    assert tiled and image.size == (128, 128) and not vae.use_tiling
    sampling.decode(pipe, latents, tiling=False)
    assert len(tiled) == 1
