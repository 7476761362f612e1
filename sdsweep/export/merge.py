"""The adapter fused into its base model, saved as one checkpoint nothing else is needed to load.

The base model is loaded as the trial loaded it (fp32, on the CPU), the adapter is loaded from the
trial's files with peft (saved.attach), and peft merges every adapted layer (the reference every export
is checked against). diffusers can read single-file checkpoints but has no writer for them, so the
weights are written here in the original Stable Diffusion key layout (names.py):

  sd15  model.diffusion_model.* (LDM UNet), first_stage_model.* (VAE), cond_stage_model.transformer.* (CLIP-L)
  sdxl  model.diffusion_model.* (SGM UNet), first_stage_model.*, conditioner.embedders.0.transformer.* (CLIP-L),
        conditioner.embedders.1.model.* (OpenCLIP bigG in open_clip's names: fused in_proj, text_projection
        transposed)

the layout of the released sd_xl_base_1.0.safetensors / v1-5-pruned-emaonly.safetensors, which ComfyUI's
Load Checkpoint, A1111/Forge's models/Stable-diffusion and diffusers' `from_single_file` load.
SD3: a diffusers folder (`save_pretrained`), which `StableDiffusion3Pipeline.from_pretrained` loads; SD3's
own single-file layout (fused qkv, the MMDiT's names) is not written.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from sdsweep.export.names import (
    CLIP_PREFIX,
    LDM_PREFIX,
    OPEN_CLIP_PREFIX,
    OPEN_CLIP_RENAMES,
    ldm_unet_name,
    ldm_vae_name,
    text_model_name,
)
from sdsweep.export.trial import Trial

ADAPTER_PARAM_PREFIXES = ("lora_", "hada_", "lokr_")


def fuse(modules: dict[str, torch.nn.Module]) -> None:
    """Merge every peft layer of `modules` into its base layer and put the base layer back in its place:
    plain modules again, as if the weights had always been these."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in modules.values():
        tuned = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
        for name, layer in tuned:
            layer.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, child, layer.get_base_layer())
        for attr in ("peft_config",):
            if hasattr(module, attr):
                delattr(module, attr)
        if hasattr(module, "_hf_peft_config_loaded"):
            module._hf_peft_config_loaded = False


def merged_components(trial: Trial):
    """The trial's base model components (fp32, CPU) with its saved adapter loaded and fused in."""
    from sdsweep.export import saved
    from sdsweep.model import load as models

    components = models.load_components(trial.cfg.model)
    modules = components.modules()
    saved.attach(modules, saved.from_folder(trial.dir.adapter, trial.config_dict().get("adapter")))
    fuse(modules)
    return components


def ldm_state_dict(family: str, components) -> dict[str, torch.Tensor]:
    """Every weight of the (fused) base model under its name in the original single-file layout."""
    unet, vae = components.denoiser, components.vae
    out = {LDM_PREFIX["unet"] + ldm_unet_name(k, unet.config): v for k, v in unet.state_dict().items()}
    ups = len(vae.config.up_block_types)
    for key, value in vae.state_dict().items():
        name = ldm_vae_name(key, ups)
        if ".mid.attn_1." in name and name.endswith(".weight") and value.dim() == 2:
            value = value[:, :, None, None]  # the original VAE's attention projections are 1x1 convolutions
        out[LDM_PREFIX["vae"] + name] = value
    encoders = components.text_encoders
    out.update({CLIP_PREFIX[(family, "text_encoder")] + text_model_name(k): v
                for k, v in encoders[0].state_dict().items()})
    if family == "sdxl":
        out.update(open_clip_state_dict(encoders[1].state_dict()))
    return out


def open_clip_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' CLIPTextModelWithProjection weights in open_clip's names, as SDXL's checkpoint holds
    its second text encoder (q/k/v fused into in_proj, positional_embedding a bare tensor, the text
    projection transposed: open_clip multiplies by it, transformers' Linear by its transpose)."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        key = text_model_name(key)
        if key == "text_model.embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key == "text_model.embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif ".self_attn.q_proj." in key or ".self_attn.k_proj." in key or ".self_attn.v_proj." in key:
            head, proj, param = key.rsplit(".", 2)
            fused.setdefault(f"{head}.in_proj_{param}", {})[proj] = value
        else:
            for old, new in OPEN_CLIP_RENAMES:
                key = key.replace(old, new)
            out[key] = value
    for key, parts in fused.items():
        for old, new in OPEN_CLIP_RENAMES:
            key = key.replace(old, new)
        out[key] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]])
    return {OPEN_CLIP_PREFIX + k: v for k, v in out.items()}


def write_merged(trial: Trial, out: Path, dtype: torch.dtype = torch.float16) -> Path:
    """Fuse the trial's adapter into its base and write it to `out` (a .safetensors file; SD3: a folder)."""
    from safetensors.torch import save_file

    from sdsweep.io import file_mode

    components = merged_components(trial)
    out = Path(out)
    if trial.family == "sd3":
        return _write_sd3_folder(components, out, dtype)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in ldm_state_dict(trial.family, components).items()}
    metadata = {"format": "pt", "sdsweep_trial": trial.name, "sdsweep_family": trial.family,
                "sdsweep_adapter_kind": trial.kind, "sdsweep_merged": "true"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")  # the file appears whole or not at all
    try:
        save_file(state, tmp, metadata=metadata)
        os.chmod(tmp, file_mode())  # as every file sdsweep writes: the user's umask, not safetensors' 0600
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write_sd3_folder(components, out: Path, dtype: torch.dtype) -> Path:
    from sdsweep.eval.sampling import build_pipeline
    from sdsweep.io import atomic_dir

    for module in components.modules().values():
        # T5 overflows fp16 (it was trained in bf16), as models.storage_dtypes keeps it
        t5 = type(module).__name__.startswith("T5")
        module.to(torch.bfloat16 if t5 and dtype == torch.float16 else dtype)
    with atomic_dir(out) as tmp:
        build_pipeline(components).save_pretrained(tmp)
    return out
