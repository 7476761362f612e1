"""SDXL's real architecture with random weights, placed and stepped as sdsweep's trainer does it.

Speed and memory do not depend on the weight values, so the benchmarks build SDXL from
`sdsweep/architectures.py` (no download) and run LoRA steps the way `train.setup` and
`train.train` run them: the VAE encodes with the UNet parked in CPU memory (as while the cache
is filled), then the VAE and text encoders wait in CPU memory (their outputs are cached) while
the UNet trains under autocast, loss scaling and the trial's optimizer.

`save_random_sdxl` writes the same model as a diffusers folder instead, so that whole trials and
sweeps (`benchmarks/sweep_speed.py --set model=sdxl model.pretrained=DIR`) load it through the
`from_pretrained` path that loads stabilityai/stable-diffusion-xl-base-1.0:

    python benchmarks/sdxl_random.py /tmp/sdxl-random      # about 7 GB in fp16
"""

from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from sdsweep.config.store import register_configs  # noqa: E402
from sdsweep.model import adapters  # noqa: E402
from sdsweep.model import load as models  # noqa: E402
from sdsweep.model.architectures import family_components, instantiate  # noqa: E402
from sdsweep.model.precision import autocast, autocast_dtype_of  # noqa: E402


def compose_cfg(*overrides: str):
    """The config `python -m sdsweep model=sdxl OVERRIDES` would train (LoRA rank 16 on attention, batch 1)."""
    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[
            "model=sdxl", "train.batch_size=1", "adapter.rank=16", "targets=attn", *overrides])


def cap_memory(gib: float | None) -> str:
    """This process's CUDA memory capped at `gib` (torch.cuda.set_per_process_memory_fraction), so a larger
    GPU measures what fits a T4's 16 GB; the line that says so."""
    if gib is None:
        return "GPU memory not capped"
    if not torch.cuda.is_available():
        return f"no CUDA GPU here: nothing to cap at {gib:g} GiB"
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(min(1.0, gib / total))
    return f"{torch.cuda.get_device_name()}: capped at {gib:g} of {total:.0f} GiB"


def save_random_sdxl(folder: str, dtype: torch.dtype = torch.float16) -> None:
    """SDXL base's architecture with random weights, its real CLIP tokenizers and training
    scheduler, saved with `save_pretrained` as a pipeline folder (weights in `dtype`)."""
    import tempfile
    from pathlib import Path

    from sdsweep.model.tiny import sdxl_pipeline

    torch.manual_seed(0)
    parts = {name: instantiate(cls, config).to(dtype) for name, (cls, config) in family_components("sdxl").items()}
    with tempfile.TemporaryDirectory() as tmp:
        sdxl_pipeline(Path(tmp), **parts).save_pretrained(folder)


_BUILT: dict[str, torch.nn.Module] | None = None


def random_parts() -> dict[str, torch.nn.Module]:
    """SDXL's modules with random weights, built once per process and handed out as copies. Building them
    takes 46 s on 2 CPU threads (every weight initialised in fp32), copying a few seconds; step_speed.py and
    estimate_vs_measured.py build a trainer per config, and each trainer changes its own copy (adapter,
    dtype, device)."""
    import copy

    global _BUILT
    if _BUILT is None:
        _BUILT = {name: instantiate(cls, config) for name, (cls, config) in family_components("sdxl").items()}
    return copy.deepcopy(_BUILT)


class SdxlTrainer:
    """The UNet with its adapter, optimizer and scaler, and one batch of latents and conditioning."""

    def __init__(self, cfg, device: torch.device, parts: dict[str, torch.nn.Module] | None = None):
        """`parts`: the pipeline's modules by name (default: SDXL's real architecture, random weights);
        the tests pass the tiny SDXL's, so this GPU-only benchmark code is exercised on a CPU too."""
        from sdsweep.train.setup import build_optimizer, compiled

        if parts is None:
            parts = random_parts()
        for m in parts.values():
            m.requires_grad_(False)
        comps = models.Components("sdxl", "random", parts["unet"], parts["vae"],
                                  [parts["text_encoder"], parts["text_encoder_2"]], [], None)
        models.place(comps, cfg.precision, device)
        res, batch = cfg.data.resolution, cfg.train.batch_size
        comps.denoiser.to("cpu")  # parked while the VAE encodes
        with torch.no_grad():
            pixels = torch.randn(batch, 3, res, res, device=device, dtype=next(comps.vae.parameters()).dtype)
            self.latents = comps.vae.encode(pixels).latent_dist.sample().float() * 0.13025
            del pixels
        comps.denoiser.to(device)
        for m in (comps.vae, *comps.text_encoders):  # outputs cached: off the GPU while training
            m.to("cpu")
        self.unet = comps.denoiser
        adapters.attach(self.unet, cfg.adapter, list(cfg.targets.patterns), "unet")
        if cfg.train.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        if cfg.train.compile:
            self.unet = compiled(self.unet, cfg.train)
        self.params = adapters.trainable_parameters(self.unet)
        self.optimizer = build_optimizer(cfg, [{"params": self.params, "lr": 1e-4}], device)
        self.dtype = autocast_dtype_of(cfg.precision)  # None: full precision (precision=fp32)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision.mixed_precision == "fp16")
        # the conditioning's widths from the UNet's config (SDXL: 2048 per token, a pooled 1280 + 6 time ids x 256)
        unet_cfg = comps.denoiser.config
        pooled = unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
        self.embeds = torch.randn(batch, 77, unet_cfg.cross_attention_dim, device=device, dtype=self.dtype or torch.float32)
        self.added = {"text_embeds": torch.randn(batch, pooled, device=device, dtype=self.dtype or torch.float32),
                      "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * batch, device=device,
                                               dtype=torch.float32)}
        self.device = device

    def forward_loss(self) -> torch.Tensor:
        noise = torch.randn_like(self.latents)
        t = torch.randint(0, 1000, (self.latents.shape[0],), device=self.device)
        with autocast(self.device, self.dtype):
            pred = self.unet(self.latents + noise, t, self.embeds, added_cond_kwargs=self.added).sample
            return torch.nn.functional.mse_loss(pred.float(), noise)

    def step(self) -> None:
        self.scaler.scale(self.forward_loss()).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Save a random-weight SDXL as a diffusers pipeline folder.")
    parser.add_argument("folder")
    save_random_sdxl(parser.parse_args().folder)
    print(f"random-weight SDXL saved in {sys.argv[1]}: model=sdxl model.pretrained={sys.argv[1]}")
