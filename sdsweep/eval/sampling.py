"""Sampling: a diffusers pipeline over a trial's modules, fixed prompts x seeds, decoding.

Used by evaluation (the base model and every trial) and by validation images while training.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from sdsweep.model.precision import autocast


@dataclass
class Sample:
    prompt: str
    seed: int
    file: str
    image: Image.Image


def read_prompts(e: DictConfig) -> list[str]:
    """`eval.prompts_file` (one prompt a line, blank lines and '#' comments skipped) or `eval.prompts`."""
    if e.prompts_file:
        lines = Path(e.prompts_file).expanduser().read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return list(e.prompts)


def image_name(index: int, prompt: str, seed: int) -> str:
    """`03_bill-gates-in-naruto-style_seed1.png`: the prompt's position keeps similar prompts apart."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"
    return f"{index:02d}_{slug}_seed{seed}.png"

# --- the pipeline ------------------------------------------------------------------------------


def build_pipeline(components):
    """A diffusers pipeline over `components` (shared modules, no copy), with Euler sampling."""
    from accelerate.utils import extract_model_from_parallel
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = extract_model_from_parallel(components.denoiser)
    if components.family == "sd3":
        return _sd3_pipeline(components, unet)
    scheduler = EulerDiscreteScheduler.from_config(components.noise_scheduler.config)
    if components.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0], text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1], unet=unet,
            scheduler=scheduler, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_pipeline(components, transformer):
    """SD3: the MMDiT transformer, three text encoders (T5 absent with model.drop_t5), flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tes, toks = components.text_encoders, components.tokenizers
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=components.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
        text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1], tokenizer_2=toks[1],
        text_encoder_3=tes[2] if len(tes) > 2 else None, tokenizer_3=toks[2] if len(toks) > 2 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe

def pipeline_denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def adaptable_modules(pipe) -> dict[str, torch.nn.Module]:
    """The modules an adapter may be attached to, under the names adapters.save_adapter uses."""
    named = {"unet": pipeline_denoiser(pipe), "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        named["text_encoder_2"] = pipe.text_encoder_2
    return named


def load_saved_adapter(pipe, adapter_dir: Path, kind: str) -> None:
    """Load the trial's adapter from its saved files, the way a user would."""
    from sdsweep.model import textual_inversion
    from sdsweep.model.adapters import FULL, LORA_WEIGHTS, load_adapter, load_denoiser

    if kind == textual_inversion.KIND:
        textual_inversion.load(pipe, Path(adapter_dir))
    elif kind == FULL:  # the trained denoiser takes the base's place, read from its diffusers folder
        slot = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
        setattr(pipe, slot, load_denoiser(Path(adapter_dir), slot, pipeline_denoiser(pipe)))
    elif kind in ("lora", "dora"):
        pipe.load_lora_weights(str(adapter_dir), weight_name=LORA_WEIGHTS)
        if kind == "dora":
            _restore_text_encoder_magnitudes(pipe, Path(adapter_dir) / LORA_WEIGHTS)
    else:
        load_adapter(adapter_dir, adaptable_modules(pipe))


def _restore_text_encoder_magnitudes(pipe, weights: Path) -> None:
    """diffusers' load_lora_weights drops DoRA's magnitudes of the text encoders (with transformers 5.x their
    keys lack the `.weight` transformers' loader wants), which left them at the base weight's norms: set
    every text-encoder tensor of the file again with peft, into the adapter diffusers created."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(weights)
    for name in ("text_encoder", "text_encoder_2"):
        module, prefix = getattr(pipe, name, None), f"{name}."
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if module is not None and sub and getattr(module, "peft_config", None):
            set_peft_model_state_dict(module, sub, adapter_name=next(iter(module.peft_config)))


def sampling_batch(cfg: DictConfig) -> int:
    """Images drawn per pipeline call: eval.batch_size, or (null) every cell at once for a model built
    in code (toy, tiny: per-image calls cost 4x on a CPU, their memory is nothing) and 1 for a real one
    (an SDXL batch at 1024 px with guidance would not fit the 16 GB the training peak was sized for)."""
    from sdsweep.config.encoders import built_in

    if cfg.eval.batch_size is not None:
        return int(cfg.eval.batch_size)
    prompts = len(read_prompts(cfg.eval)) + cfg.eval.caption_prompts
    return prompts * len(cfg.eval.seeds) if built_in(cfg.model) else 1


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], e: DictConfig, autocast_dtype: torch.dtype | None,
             batch_size: int = 1) -> list[Sample]:
    """One image per (prompt, seed), each from its own CPU generator: the same cell of the grid
    starts from the same noise in every trial and in the base model, on any device, whatever the
    batch (diffusers draws each latent of a batch from its own generator)."""
    for module in adaptable_modules(pipe).values():
        module.eval()
    device = pipeline_denoiser(pipe).device
    cells = [(i, prompt, int(seed)) for i, prompt in enumerate(prompts) for seed in seeds]
    samples = []
    for start in range(0, len(cells), max(1, batch_size)):
        batch = cells[start:start + max(1, batch_size)]
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _, _, seed in batch]
        with autocast(device, autocast_dtype):
            latents = pipe([prompt for _, prompt, _ in batch], num_inference_steps=e.steps,
                           guidance_scale=e.guidance_scale, height=e.resolution, width=e.resolution,
                           generator=generators, output_type="latent").images
        images = decode(pipe, latents, e.vae_tiling)
        samples += [Sample(prompt, seed, image_name(i, prompt, seed), image)
                    for (i, prompt, seed), image in zip(batch, images)]
    return samples


def decode(pipe, latents: torch.Tensor, tiling: bool = False) -> list[Image.Image]:
    """Decode a batch of latents outside autocast, in the VAE's own dtype (fp32 by default: the SDXL VAE
    overflows in fp16); with `tiling`, tile by tile (the VAE is shared with training and the next trial:
    switched back off)."""
    vae = pipe.vae
    if tiling:
        vae.enable_tiling()
        try:
            return decode(pipe, latents, tiling=False)
        finally:
            vae.disable_tiling()
    latents = latents.to(next(vae.parameters()).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(view).to(latents) / vae.config.scaling_factor
        latents = latents + torch.tensor(mean).view(view).to(latents)
    else:
        # SD3's VAE also shifts its latents (shift_factor); SD1.5/SDXL's have none
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")


def sample_validation(cfg: DictConfig, components, autocast_dtype: torch.dtype | None, out: Path) -> list[Sample]:
    """The eval prompts and seeds sampled with the modules as they are mid-training (adapters included),
    saved into `out`; the modules go back to training mode afterwards."""
    from sdsweep.model import textual_inversion

    pipe = build_pipeline(components)  # shares the trial's modules, no copy
    prompts = read_prompts(cfg.eval)
    if cfg.adapter.kind == textual_inversion.KIND:  # the tokenizers know the new word mid-training: ask for it
        prompts = [textual_inversion.with_token(p, cfg.adapter.token) for p in prompts]
    samples = generate(pipe, prompts, list(cfg.eval.seeds), cfg.eval, autocast_dtype, sampling_batch(cfg))
    for module in components.modules().values():  # generate() put them in eval mode
        module.train(any(p.requires_grad for p in module.parameters()))
    from sdsweep.io import atomic_dir

    with atomic_dir(out) as staged:  # a kill mid-save leaves no half-written PNG in validation/step-N
        for sample in samples:
            sample.image.save(staged / sample.file)
    return samples
