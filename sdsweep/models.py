"""Load a model family, freeze it, and place each component's dtype and device.

One loading path for everything: the tiny models are saved as diffusers folders first and
then go through the same `from_pretrained` calls as a user's SDXL from the hub.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import ModelConfig, PrecisionConfig
from .tiny import ensure_tiny_model

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class ModelLoadError(RuntimeError):
    """The configured weights could not be loaded; the message says what to set instead."""


@dataclass
class Components:
    """Everything a trial needs from the base model."""

    family: str
    source: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object
    extra: dict = field(default_factory=dict)

    def modules(self) -> dict[str, torch.nn.Module]:
        named = {"unet": self.unet, "vae": self.vae}
        for i, te in enumerate(self.text_encoders):
            named["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
        return named


def resolve_device(name: str, trial_number: int = 0) -> torch.device:
    """`auto`: CUDA when present; with several GPUs, trial N gets GPU N mod count, so trials
    run in parallel (hydra/launcher=parallel) each have a GPU of their own."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", trial_number % torch.cuda.device_count())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but torch sees no CUDA GPU: use device=cpu or device=auto")
    return torch.device(name)


def resolve_source(cfg: ModelConfig) -> str:
    """The folder or hub id to load from; builds the tiny model first when asked to."""
    if cfg.build_tiny and not cfg.pretrained:
        return str(ensure_tiny_model(cfg.cache_dir, cfg.family, seed=0))
    assert cfg.pretrained, "validate() guarantees model.pretrained when build_tiny is false"
    path = Path(os.path.expanduser(cfg.pretrained))
    if path.exists():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"model.pretrained={cfg.pretrained} is a folder but not a diffusers model "
                "(no model_index.json): point it at the folder saved by save_pretrained"
            )
        return str(path)
    if cfg.pretrained.startswith((".", "/", "~")):
        raise ModelLoadError(f"model.pretrained={cfg.pretrained}: no such folder")
    return cfg.pretrained


def _load(cls, source: str, subfolder: str | None, cfg: ModelConfig | None = None):
    revision, variant = (cfg.revision, cfg.variant) if cfg else (None, None)
    try:
        return cls.from_pretrained(source, subfolder=subfolder, revision=revision, variant=variant)
    except (OSError, ValueError) as e:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        hint = (
            "HF_HUB_OFFLINE is set, so only models already in the Hugging Face cache load: "
            f"download it first (`hf download {source}`) or set model.pretrained=/path/to/diffusers/folder"
            if offline
            else f"check the id (model.pretrained={source}), your network and `hf auth login` for gated models, "
            "or set model.pretrained=/path/to/diffusers/folder"
        )
        raise ModelLoadError(f"could not load {subfolder or 'the model'} of {source!r}: {hint}\n  ({type(e).__name__}: {e})") from e


def load_components(cfg: ModelConfig) -> Components:
    """Load tokenizers, text encoders, VAE, UNet and the training noise scheduler (fp32, CPU)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    source = resolve_source(cfg)
    tokenizers = [_load(CLIPTokenizer, source, "tokenizer", cfg)]
    text_encoders = [_load(CLIPTextModel, source, "text_encoder", cfg)]
    if cfg.family == "sdxl":
        tokenizers.append(_load(CLIPTokenizer, source, "tokenizer_2", cfg))
        text_encoders.append(_load(CLIPTextModelWithProjection, source, "text_encoder_2", cfg))
    if cfg.vae:  # a separate VAE, e.g. the fp16-fix one: a hub id or a folder, no subfolder
        vae = _load(AutoencoderKL, os.path.expanduser(cfg.vae), None)
    else:
        vae = _load(AutoencoderKL, source, "vae", cfg)
    unet = _load(UNet2DConditionModel, source, "unet", cfg)
    # Training always uses DDPM's forward process; prediction_type (epsilon or v) comes
    # from the model's own scheduler config, as in the diffusers training examples.
    noise_scheduler = _load(DDPMScheduler, source, "scheduler", cfg)
    components = Components(cfg.family, source, unet, vae, text_encoders, tokenizers, noise_scheduler)
    for module in components.modules().values():
        module.requires_grad_(False)
        module.eval()
    return components


def quantize_unet(unet: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Swap the UNet's frozen nn.Linear layers for bitsandbytes int8 / nf4 layers (CUDA only).

    peft then attaches its adapters to the quantized layers (its bnb LoRA/DoRA layers), which
    is QLoRA. Convolutions stay in `compute_dtype`.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"precision={mode} quantizes the base weights with bitsandbytes, which needs a CUDA GPU; "
            "none is visible here: use precision=fp16, bf16 or fp32 on this machine"
        )
    import bitsandbytes as bnb

    def replace(parent: torch.nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear):
                if mode == "int8":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False,
                                                 has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.float16), requires_grad=False,
                                                 quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, name, q)
            else:
                replace(child)

    replace(unet)
    return unet.to("cuda")  # bitsandbytes quantizes the weights when they move to the GPU


def place(components: Components, precision: PrecisionConfig, device: torch.device) -> None:
    """Cast and move every component for training under `precision`.

    Frozen UNet and text encoders are stored in `base_dtype` (half precision on a GPU is
    what lets SDXL fit a T4); the VAE in `vae_dtype` (fp32 by default: the SDXL VAE
    overflows in fp16). Adapter weights are upcast to fp32 after they are attached.
    """
    base = DTYPES[precision.base_dtype]
    if precision.quantize != "none":
        quantize_unet(components.unet, precision.quantize, base)
        components.unet.to(device)
    else:
        components.unet.to(device, dtype=base)
    components.vae.to(device, dtype=DTYPES[precision.vae_dtype])
    for te in components.text_encoders:
        te.to(device, dtype=base)
