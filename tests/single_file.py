"""Diffusers weights -> one `.safetensors` in the original single-file layout (LDM / A1111 / kohya),
the way a user's downloaded checkpoint is laid out, for tests of `model.pretrained=FILE`.

It is the inverse of diffusers' own conversion in `diffusers/loaders/single_file_utils.py`
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`), as
diffusers' `scripts/convert_diffusers_to_original_stable_diffusion.py` is, but derived from each
model's config rather than SD1.5's fixed four blocks of two layers, so the tiny models convert too.
Every weight must find its original name: a layer this mapping does not know fails here, loudly,
instead of going missing from the file.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD1.x: transformers' CLIPTextModel state dict, as is

# inside a ResNet block: diffusers' name -> the original's
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
# the VAE's mid-block attention: linear layers in diffusers, 1x1 convolutions in the original
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_prefixes(config: dict) -> dict[str, str]:
    """diffusers prefix -> original prefix for a UNet2DConditionModel of this config.

    The original numbers its blocks flat: input_blocks.0 is conv_in, then each down block's layers
    and its downsampler; output_blocks count each up block's layers + 1 (the upsampler rides on the
    last, after the attention when the block has one).
    """
    per_block = config["layers_per_block"] + 1
    pairs = {
        "conv_in.": "input_blocks.0.0.", "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.", "add_embedding.linear_1.": "label_emb.0.0.",
        "add_embedding.linear_2.": "label_emb.0.2.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
        "mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
        "mid_block.resnets.1.": "middle_block.2.",
    }
    for b, up_type in enumerate(config["up_block_types"]):
        for j in range(per_block - 1):
            pairs[f"down_blocks.{b}.resnets.{j}."] = f"input_blocks.{1 + b * per_block + j}.0."
            pairs[f"down_blocks.{b}.attentions.{j}."] = f"input_blocks.{1 + b * per_block + j}.1."
        pairs[f"down_blocks.{b}.downsamplers.0.conv."] = f"input_blocks.{(b + 1) * per_block}.0.op."
        for j in range(per_block):
            pairs[f"up_blocks.{b}.resnets.{j}."] = f"output_blocks.{b * per_block + j}.0."
            pairs[f"up_blocks.{b}.attentions.{j}."] = f"output_blocks.{b * per_block + j}.1."
        slot = 2 if "CrossAttn" in up_type else 1
        pairs[f"up_blocks.{b}.upsamplers.0.conv."] = f"output_blocks.{b * per_block + per_block - 1}.{slot}.conv."
    return pairs


def vae_prefixes(config: dict) -> dict[str, str]:
    """diffusers prefix -> original prefix for an AutoencoderKL of this config (the decoder's up
    blocks are numbered the other way round in the original: up.0 is the last, full-resolution one)."""
    n, layers = len(config["down_block_types"]), config["layers_per_block"]
    pairs = {f"{k}.": f"{k}." for k in ("quant_conv", "post_quant_conv")}
    for side in ("encoder", "decoder"):
        pairs |= {f"{side}.conv_in.": f"{side}.conv_in.", f"{side}.conv_out.": f"{side}.conv_out.",
                  f"{side}.conv_norm_out.": f"{side}.norm_out.", f"{side}.mid_block.resnets.0.": f"{side}.mid.block_1.",
                  f"{side}.mid_block.resnets.1.": f"{side}.mid.block_2.",
                  f"{side}.mid_block.attentions.0.": f"{side}.mid.attn_1."}
    for i in range(n):
        for j in range(layers):
            pairs[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        pairs[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
        for j in range(layers + 1):
            pairs[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{n - 1 - i}.block.{j}."
        pairs[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{n - 1 - i}.upsample.conv."
    return pairs


def _rename_inside(rest: str, renames: dict[str, str]) -> str:
    """`rest` (the name after a block's prefix, e.g. `conv1.weight`) with its layer renamed."""
    for new, old in renames.items():
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _original_name(key: str, prefixes: dict[str, str], inner: dict[str, dict[str, str]]) -> str:
    """The original name of diffusers weight `key`; `inner`: renames inside blocks whose prefix has that part."""
    matches = [p for p in prefixes if key.startswith(p)]
    if not matches:
        raise KeyError(f"{key}: no original single-file name known for it (extend tests/single_file.py)")
    prefix = max(matches, key=len)
    rest = key[len(prefix):]
    for part, renames in inner.items():
        if part in prefix:
            rest = _rename_inside(rest, renames)
    return prefixes[prefix] + rest


def unet_to_original(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefixes = unet_prefixes(dict(unet.config))
    return {UNET_PREFIX + _original_name(k, prefixes, {".resnets.": UNET_RESNET}): v
            for k, v in unet.state_dict().items()}


def vae_to_original(vae: torch.nn.Module) -> dict[str, torch.Tensor]:
    prefixes = vae_prefixes(dict(vae.config))
    out = {}
    for key, tensor in vae.state_dict().items():
        name = _original_name(key, prefixes, {".resnets.": VAE_RESNET, ".attentions.": VAE_ATTENTION})
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # Linear -> the original's 1x1 Conv2d
        out[VAE_PREFIX + name] = tensor
    return out


def clip_to_original(text_encoder: torch.nn.Module, prefix: str = CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model's weights under `prefix`, named as transformers < 5.6 named them:
    `text_model.` first (diffusers strips it again for the flattened CLIPTextModel of newer versions)."""
    wrapped = hasattr(text_encoder, "text_model")
    return {prefix + ("" if wrapped else "text_model.") + k: v for k, v in text_encoder.state_dict().items()}


def save_sd15_checkpoint(components, path: Path) -> Path:
    """An SD1.x single-file checkpoint (UNet, VAE, CLIP text encoder) of `components` at `path`."""
    assert components.family == "sd15", components.family
    tensors = {**unet_to_original(components.denoiser), **vae_to_original(components.vae),
               **clip_to_original(components.text_encoders[0])}
    save_file({k: v.detach().clone().contiguous() for k, v in tensors.items()}, str(path))
    return path


def configs_only(folder: Path, dest: Path) -> Path:
    """A copy of diffusers folder `folder` without its weights: the configs and tokenizers that
    `from_single_file(config=...)` reads (what diffusers downloads from a hub id for a single file).

    Without weights beside the configs, a component diffusers does not find in the checkpoint fails to
    load instead of being read from the folder, so a load can only pass on the file's own weights."""
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    return dest
