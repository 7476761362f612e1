"""Generate images with fixed prompts and seeds from the components a trial has in memory."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from .models import Components


def image_name(prompt: str, seed: int) -> str:
    """A file name that says which prompt and seed drew the image."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"
    return f"{slug}_seed{seed}.png"


def pipeline_from(components: Components, unet: torch.nn.Module):
    """A diffusers pipeline sharing the trial's modules (no copy, adapters included)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if components.family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0], text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1], unet=unet,
            scheduler=_sampling_scheduler(components),
        )
    return StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0], unet=unet,
        scheduler=_sampling_scheduler(components), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )


def _sampling_scheduler(components: Components):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config(components.noise_scheduler.config)


@torch.no_grad()
def sample(
    components: Components,
    unet: torch.nn.Module,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    resolution: int,
    autocast_dtype: torch.dtype | None,
    out_dir: Path | None = None,
) -> list[tuple[str, int, object]]:
    """One image per (prompt, seed), each from its own seeded generator: the same cell of the
    grid draws the same noise in every trial, so images are comparable across trials."""
    pipe = pipeline_from(components, unet)
    pipe.set_progress_bar_config(disable=True)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    results = []
    try:
        for prompt in prompts:
            for seed in seeds:
                generator = torch.Generator(device="cpu").manual_seed(seed)
                with torch.autocast(device.type, dtype=autocast_dtype or torch.float32,
                                    enabled=autocast_dtype is not None):
                    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale,
                                 height=resolution, width=resolution, generator=generator).images[0]
                if out_dir is not None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    image.save(out_dir / image_name(prompt, seed))
                results.append((prompt, seed, image))
    finally:
        unet.train(was_training)
    return results
