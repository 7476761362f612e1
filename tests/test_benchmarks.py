"""The benchmark scripts that only run on a lent GPU (benchmarks/gpu_check.sh) are exercised here on a
CPU with the tiny SDXL, so that a refactor that breaks them is caught before the GPU time is spent."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _import_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_the_sdxl_step_benchmark_trains_the_adapter_of_a_tiny_sdxl(cache_dir):
    """SdxlTrainer is what step_speed.py and estimate_vs_measured.py time on the GPU: here its steps change
    the LoRA weights and nothing else, with the conditioning widths read from the UNet's config."""
    from sdsweep.model.load import load_components

    sdxl_random = _import_benchmark("sdxl_random")
    cfg = sdxl_random.compose_cfg("model=tiny-sdxl", f"model.cache_dir={cache_dir}", "precision=fp32",
                                  "optimizer=adamw", "data.resolution=64", "train.batch_size=2")
    c = load_components(cfg.model)
    parts = {"unet": c.denoiser, "vae": c.vae, "text_encoder": c.text_encoders[0], "text_encoder_2": c.text_encoders[1]}
    trainer = sdxl_random.SdxlTrainer(cfg, torch.device("cpu"), parts)
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}

    trainer.step()
    trainer.step()

    changed = {n for n, p in trainer.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert len(changed) == len(trainer.params)  # every adapter tensor learned, the base none
    assert torch.isfinite(trainer.forward_loss())
