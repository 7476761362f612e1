"""A trial trains what its config says: every option, parameter counts, resume, failures."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate
from sdsweep.sweep import trial as trial_mod
from sdsweep.sweep.trial import run_trial
from sdsweep.train.loop import train
from sdsweep.train.setup import setup

TRAINABLE_OPTIONS = [
    ("adapter", "lora"), ("adapter", "dora"), ("adapter", "loha"), ("adapter", "lokr"),
    ("targets", "attn"), ("targets", "self_attn"), ("targets", "cross_attn"), ("targets", "many"),
    ("text_encoder", "frozen"), ("text_encoder", "lora"),
    ("precision", "fp32"), ("precision", "fp16"), ("precision", "bf16"),
    ("optimizer", "adamw"), ("optimizer", "adamw8bit"), ("optimizer", "prodigy"),
    ("model", "tiny-sdxl"), ("model", "tiny-sd15"),
]


def _snapshot(module: torch.nn.Module, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in module.named_parameters() if p.requires_grad == trainable}


@pytest.mark.parametrize("group,option", TRAINABLE_OPTIONS)
def test_every_option_trains_the_adapter_and_leaves_the_base_alone(make_cfg, tmp_path, group, option):
    overrides = [f"{group}={option}", "train.lr=1e-3"]
    if group == "optimizer" and option == "prodigy":
        overrides = [f"{group}={option}"]
    cfg = make_cfg(*overrides, steps=3)
    s = setup(cfg)
    unet = s.accelerator.unwrap_model(s.components.denoiser)
    adapter_before, base_before = _snapshot(unet, True), _snapshot(unet, False)
    te_before = [_snapshot(te, False) for te in s.components.text_encoders]
    metrics = train(cfg, s, tmp_path)
    assert all(math.isfinite(v) for v in metrics["losses"]) and len(metrics["losses"]) == 3
    adapter_after, base_after = _snapshot(unet, True), _snapshot(unet, False)
    assert any(not torch.equal(adapter_before[n], adapter_after[n]) for n in adapter_before), "adapter did not change"
    assert all(torch.equal(base_before[n], base_after[n]) for n in base_before), "a frozen base weight changed"
    for te, before in zip(s.components.text_encoders, te_before):
        assert all(torch.equal(before[n], p.detach().float()) for n, p in te.named_parameters() if n in before)
    if option == "fp16" or option == "bf16":
        dtype = torch.float16 if option == "fp16" else torch.bfloat16
        assert unet.conv_in.weight.dtype == dtype  # the frozen base really is stored in half precision
        assert next(iter(s.components.vae.parameters())).dtype == torch.float32  # the VAE stays fp32
        assert all(p.dtype == torch.float32 for p in s.trainable.values())  # adapters train in fp32


@pytest.mark.parametrize("option", ["int8", "nf4"])
def test_quantized_base_without_cuda_is_pruned_with_a_clear_message(make_cfg, tmp_path, option):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the GPU path is covered by test_quantized_base_trains_on_gpu")
    metrics = run_trial(make_cfg(f"precision={option}"), tmp_path)
    assert metrics["status"] == "pruned"  # known before anything loads: never started, not failed
    assert "needs a CUDA GPU" in metrics["reason"] and "precision=fp16" in metrics["reason"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("option", ["int8", "nf4"])
def test_quantized_base_trains_on_gpu(make_cfg, tmp_path, option):
    metrics = run_trial(make_cfg(f"precision={option}", "device=cuda"), tmp_path)
    assert metrics["status"] == "finished", metrics.get("reason")


def _trainable_counts(make_cfg, *overrides) -> dict[str, int]:
    cfg = make_cfg(*overrides)
    s = setup(cfg)
    counts = {name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in s.components.modules().items()}
    trial_mod._release(cfg, s, clean=True)  # adapters stripped: the next count starts from the bare base
    return counts


def test_trainable_parameter_counts_order_as_the_options_promise(make_cfg):
    many = _trainable_counts(make_cfg, "targets=many")["unet"]
    attn = _trainable_counts(make_cfg, "targets=attn")["unet"]
    cross = _trainable_counts(make_cfg, "targets=cross_attn")["unet"]
    assert many > attn > cross > 0
    frozen = _trainable_counts(make_cfg, "text_encoder=frozen")
    with_te = _trainable_counts(make_cfg, "text_encoder=lora")
    assert frozen["text_encoder"] == frozen["text_encoder_2"] == 0
    assert with_te["text_encoder"] > 0 and with_te["text_encoder_2"] > 0
    lora = _trainable_counts(make_cfg, "adapter=lora")["unet"]
    dora = _trainable_counts(make_cfg, "adapter=dora")["unet"]
    assert dora > lora  # DoRA's magnitude vectors
    rank4 = _trainable_counts(make_cfg, "adapter.rank=4")["unet"]
    assert lora == 2 * rank4  # LoRA parameters are linear in the rank


def test_the_trial_writes_metrics_and_a_diffusers_adapter(make_cfg, tmp_path):
    metrics = run_trial(make_cfg(), tmp_path, choices={"adapter": "lora"})
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["status"] == metrics["status"] == "finished"
    for key in ("steps", "final_loss", "mean_loss", "wall_s", "steps_per_s", "peak_memory_mb",
                "trainable_params", "total_params", "adapter_mb"):
        assert on_disk[key] is not None and on_disk[key] > 0, key
    assert on_disk["trainable_params"] < on_disk["total_params"]
    assert (tmp_path / "adapter" / "pytorch_lora_weights.safetensors").exists()
    assert on_disk["choices"] == {"adapter": "lora"}


def test_a_trial_stopped_after_a_checkpoint_resumes_at_that_step(make_cfg, tmp_path):
    whole = run_trial(make_cfg("train.checkpoint_every=2", steps=5), tmp_path / "whole")
    crashed = run_trial(make_cfg("train.checkpoint_every=2", "debug.raise_at_step=3", steps=5), tmp_path / "resumed")
    assert crashed["status"] == "failed" and "simulated crash" in crashed["reason"]
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-000002"]
    resumed = run_trial(make_cfg("train.checkpoint_every=2", steps=5), tmp_path / "resumed")
    assert resumed["status"] == "finished"
    assert resumed["resumed_from_step"] == 2 and whole["resumed_from_step"] is None
    # steps 3..5 of the resumed trial reproduce the uninterrupted one
    assert resumed["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # the logged curve too: the smoothed loss continues from the checkpoint's history, not from the raw loss
    assert _logged(tmp_path / "resumed", "train/loss_smoothed") == _logged(tmp_path / "whole", "train/loss_smoothed")


def _logged(trial_dir, key: str) -> list[float]:
    """`key` per step from train_log.jsonl; a step logged again after a resume counts once, as last logged."""
    rows = [json.loads(line) for line in (trial_dir / "train_log.jsonl").read_text().splitlines()]
    by_step = {row["step"]: row[key] for row in rows}
    return [by_step[step] for step in sorted(by_step)]


def test_every_logged_step_has_its_own_learning_rate(make_cfg, tmp_path):
    """train.log_every=2 logs two steps at once; each row still has its step's learning rate (linear warmup)."""
    warmup = ["optimizer.scheduler=linear", "optimizer.warmup_steps=4", "train.lr=1e-4"]
    run_trial(make_cfg(*warmup, "train.log_every=2", steps=4), tmp_path / "every2")
    run_trial(make_cfg(*warmup, "train.log_every=1", steps=4), tmp_path / "every1")
    expected = [0.0, 2.5e-5, 5e-5, 7.5e-5]  # lr x step / warmup_steps, before each step's update
    assert _logged(tmp_path / "every2", "train/lr_unet") == pytest.approx(expected, abs=1e-12)
    assert _logged(tmp_path / "every1", "train/lr_unet") == pytest.approx(expected, abs=1e-12)


def test_a_checkpoint_is_written_whatever_log_every_is(make_cfg, tmp_path):
    """train.checkpoint_every=3 with train.log_every=2: step 3 is checkpointed although it is no logging step."""
    metrics = run_trial(make_cfg("train.checkpoint_every=3", "train.log_every=2", steps=4), tmp_path)
    assert metrics["status"] == "finished"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-000003"]
    state = json.loads((tmp_path / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["step"] == 3 and state["losses"] == metrics["losses"][:3]


def test_nan_loss_is_recorded_with_its_step(make_cfg, tmp_path):
    metrics = run_trial(make_cfg("debug.nan_at_step=2", steps=3), tmp_path)
    assert metrics["status"] == "failed"
    assert metrics["reason"] == "NonFiniteLoss: loss became nan at step 2"  # the step as train_log numbers it
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_sys_exit_inside_a_trial_is_a_failed_trial_not_the_end_of_the_sweep(make_cfg, tmp_path, monkeypatch):
    def exits(*args, **kwargs):
        raise SystemExit(3)

    monkeypatch.setattr(trial_mod, "setup", exits)
    metrics = run_trial(make_cfg(), tmp_path)
    assert metrics["status"] == "failed" and "SystemExit" in metrics["reason"]


def test_simulated_out_of_memory_is_recorded_as_such(make_cfg, tmp_path, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(trial_mod, "train", oom)
    metrics = run_trial(make_cfg(), tmp_path)
    assert metrics["status"] == "failed" and metrics["reason"] == "out of memory"
    assert "Tried to allocate" in metrics["detail"]


def test_targets_matching_nothing_name_the_patterns_and_real_modules(make_cfg, tmp_path):
    metrics = run_trial(make_cfg("targets.patterns=[.*no_such_layer]"), tmp_path)
    assert metrics["status"] == "failed"
    assert ".*no_such_layer" in metrics["reason"] and ".transformer_blocks.0.attn" in metrics["reason"]


def test_options_change_the_training_not_just_the_name(make_cfg, tmp_path):
    """Plain keys change the loss curve: noise offset, min-SNR, dropout, gradient accumulation."""
    base = run_trial(make_cfg(steps=2), tmp_path / "base")["losses"]
    for i, override in enumerate(["train.noise_offset=0.1", "train.snr_gamma=1.0", "adapter.dropout=0.5",
                                  "train.grad_accum=2", "data.crop=center", "seed=1"]):
        losses = run_trial(make_cfg(override, steps=2), tmp_path / str(i))["losses"]
        assert losses != pytest.approx(base, rel=1e-6), override


def test_nan_policy_skip_drops_the_step_and_goes_on(make_cfg, tmp_path):
    metrics = run_trial(make_cfg("train.nan_policy=skip", "debug.nan_at_step=2", steps=3), tmp_path / "a")
    assert metrics["status"] == "finished" and metrics["nan_skipped_steps"] == [2]
    assert math.isfinite(metrics["final_loss"]) and math.isfinite(metrics["mean_loss"])
    limited = run_trial(make_cfg("train.nan_policy=skip", "train.max_nan_skips=0", "debug.nan_at_step=2", steps=3),
                        tmp_path / "b")
    assert limited["status"] == "failed" and "max_nan_skips=0" in limited["reason"]


def test_captions_longer_than_the_tokenizer_are_truncated_with_one_warning(make_cfg, tmp_path, caplog):
    from helpers import write_folder

    folder = write_folder(tmp_path / "data", n=2, captions="txt")
    (folder / "img0.txt").write_text("a very long caption " * 40)
    metrics = run_trial(make_cfg(f"data.path={folder}", steps=1), tmp_path / "t")
    assert metrics["status"] == "finished" and metrics["data"]["truncated_captions"] == 1
    assert sum("will be truncated" in r.message for r in caplog.records) == 1


def test_an_unknown_model_offline_fails_saying_how_to_get_it(make_cfg, tmp_path):
    metrics = run_trial(make_cfg("model=sdxl", "model.pretrained=nobody/no-such-model"), tmp_path)
    assert metrics["status"] == "failed"
    assert "ModelLoadError" in metrics["reason"] and "model.pretrained=/path/to/diffusers/folder" in metrics["reason"]


def test_prodigy_trains_the_text_encoders_at_its_own_single_lr(make_cfg, tmp_path):
    """Prodigy refuses per-group learning rates: text_encoder.lr gives way to train.lr (its multiplier)."""
    metrics = run_trial(make_cfg("optimizer=prodigy", "text_encoder=lora", steps=1), tmp_path)
    assert metrics["status"] == "finished", metrics.get("reason")


def test_compile_trains_through_dynamo_graphs_and_leaves_a_plain_unet(make_cfg, tmp_path):
    """train.compile=true: every training forward runs the graphs torch.compile captured (a counting
    backend here; inductor on a GPU), the losses are the uncompiled ones, and the adapter is saved and
    the base kept for the next trial without the compile wrapper."""
    import torch._dynamo

    from sdsweep.model import kept_base

    graph_calls: list[int] = []

    @torch._dynamo.register_backend(name="sdsweep_test_counting")
    def counting(gm, example_inputs):  # runs the captured FX graph as it is, counting its calls
        def run(*args):
            graph_calls.append(1)
            return gm.forward(*args)
        return run

    plain = run_trial(make_cfg("eval.enabled=false", steps=3), tmp_path / "plain")
    compiled = run_trial(make_cfg("eval.enabled=false", "train.compile=true",
                                  "train.compile_backend=sdsweep_test_counting", steps=3), tmp_path / "compiled")
    assert compiled["status"] == "finished", compiled.get("reason")
    assert len(graph_calls) >= 3  # at least one graph per training forward
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=1e-4)
    assert (tmp_path / "compiled" / "adapter" / "pytorch_lora_weights.safetensors").exists()
    kept = kept_base._kept["components"].denoiser
    assert type(kept).__name__ == "UNet2DConditionModel"  # not an OptimizedModule


def test_compile_options_are_checked_before_anything_loads(make_cfg):
    with pytest.raises(ConfigError) as err:
        validate(make_cfg("train.compile=true", "train.compile_backend=nope", "train.compile_mode=fastest"))
    text = str(err.value)
    assert "train.compile_backend='nope'" in text and "inductor" in text
    assert "train.compile_mode='fastest'" in text and "reduce-overhead" in text
