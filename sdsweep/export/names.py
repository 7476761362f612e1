"""Where a diffusers module lives in the original Stable Diffusion layout, and the kohya names built from it.

Two namings of one network meet here:
  - diffusers' (`down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q`), which peft's keys use;
  - the original LDM/SGM one (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`), which single-file
    checkpoints use and which kohya's sd-scripts writes for SDXL (it trains SDXL on its own copy of the
    SGM UNet, and SD1.x on a UNet with diffusers' names).

Every kohya-format reader maps these names back to its model: ComfyUI (`comfy/lora.py`
model_lora_keys_unet: `lora_unet_` + the LDM name, and the diffusers name through
`utils.unet_to_diffusers`), A1111/Forge (`lora_unet_` -> `diffusion_model_`, and
`convert_diffusers_name_to_compvis` for the diffusers names), diffusers (`_maybe_map_sgm_blocks_to_diffusers`
then `_convert_unet_lora_key`) and LyCORIS (the module names of the UNet it is given). So a file names
its UNet layers as kohya does: SDXL with the SGM names, SD1.5 with diffusers' names. SD3's transformer
has no kohya naming that ComfyUI reads; its `lora_transformer_` + diffusers name is the one ComfyUI maps
(OneTrainer's). The text encoders are `lora_te_` (SD1.5's one) or `lora_te1_`/`lora_te2_` + the
transformers CLIP module name.

The same UNet mapping, applied to parameter names, writes the merged single-file checkpoint (merge.py),
which diffusers' own `convert_ldm_unet_checkpoint` reads back: that round trip is what checks it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

# the resnet's inner layers: diffusers -> LDM
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# layers outside the block structure: diffusers -> LDM (diffusers' DIFFUSERS_TO_LDM_MAPPING["unet"] says the same)
_UNET_TOP = {
    "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding.linear_1": "label_emb.0.0", "class_embedding.linear_2": "label_emb.0.2",
}


class UnmappedName(KeyError):
    """A module or parameter name the original layout has no place for; the message names it."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _split(path: str, prefix: str) -> str | None:
    """`path` without `prefix` (whole name parts only): '.conv1.weight' for 'x.conv1.weight', '' for 'x'."""
    if path == prefix:
        return ""
    return path[len(prefix):] if path.startswith(prefix + ".") else None


def _resnet(rest: str) -> str:
    """'.conv1.weight' -> '.in_layers.2.weight' (the resnet's own layers renamed, the rest kept)."""
    if not rest:
        return rest
    head, _, tail = rest[1:].partition(".")
    return "." + _RESNET.get(head, head) + (f".{tail}" if tail else "")


def unet_layout(config: Mapping) -> tuple[int, list[bool]]:
    """(layers per block, whether each up block has attentions) of a UNet2DConditionModel config."""
    per_block = config["layers_per_block"]
    if not isinstance(per_block, int):
        raise UnmappedName(f"layers_per_block={per_block!r}: the original SD layout has one number of layers per "
                           "block; this UNet has none, so it has no kohya/LDM names")
    return per_block, ["CrossAttn" in t for t in config["up_block_types"]]


def ldm_unet_name(path: str, config: Mapping) -> str:
    """The LDM/SGM name of a diffusers UNet module or parameter path (no `model.diffusion_model.` prefix)."""
    per_block, up_attention = unet_layout(config)
    step = per_block + 1  # input/output blocks per level: the resnets (+ attentions) and the down/up sampler
    for name, ldm in _UNET_TOP.items():
        if (rest := _split(path, name)) is not None:
            return ldm + rest
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..*)?", path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        block = f"input_blocks.{1 + i * step + j}"
        return f"{block}.0{_resnet(rest)}" if kind == "resnets" else f"{block}.1{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv(\..*)?", path):
        return f"input_blocks.{(int(m[1]) + 1) * step}.0.op{m[2] or ''}"
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(\..*)?", path):
        kind, j, rest = m[1], int(m[2]), m[3] or ""
        return f"middle_block.{2 * j}{_resnet(rest)}" if kind == "resnets" else f"middle_block.1{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)(\..*)?", path):
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4] or ""
        block = f"output_blocks.{i * step + j}"
        return f"{block}.0{_resnet(rest)}" if kind == "resnets" else f"{block}.1{rest}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv(\..*)?", path):
        i = int(m[1])
        return f"output_blocks.{i * step + per_block}.{2 if up_attention[i] else 1}.conv{m[2] or ''}"
    raise UnmappedName(f"the UNet layer {path!r} has no place in the original SD layout")


def text_model_name(path: str) -> str:
    """A CLIP text encoder's module path as the original checkpoints name it: under `text_model.`
    (transformers >= 5.6 flattened CLIPTextModel, whose modules now start at `encoder.`)."""
    if path.startswith(("embeddings.", "encoder.", "final_layer_norm")):
        return f"text_model.{path}"
    return path


def kohya_prefix(family: str, component: str) -> str:
    if component == "transformer":
        return "lora_transformer"
    if component == "unet":
        return "lora_unet"
    if component == "text_encoder":
        return "lora_te" if family == "sd15" else "lora_te1"
    if component == "text_encoder_2":
        return "lora_te2"
    raise UnmappedName(f"no kohya prefix for the component {component!r}")


def kohya_name(family: str, component: str, path: str, unet_config: Mapping | None = None) -> str:
    """The kohya/LyCORIS layer name of module `path` of `component` (e.g. lora_unet_input_blocks_4_1_...)."""
    if component == "unet" and family == "sdxl":
        if unet_config is None:
            raise UnmappedName("SDXL's kohya names follow the SGM UNet: the UNet's config is needed to map them")
        path = ldm_unet_name(path, unet_config)
    elif component in TEXT_ENCODERS:
        path = text_model_name(path)
    return f"{kohya_prefix(family, component)}_{path.replace('.', '_')}"


# --- the merged single-file checkpoint: every parameter's name in the original layout ------------------

LDM_PREFIX = {"unet": "model.diffusion_model.", "vae": "first_stage_model."}
CLIP_PREFIX = {("sd15", "text_encoder"): "cond_stage_model.transformer.",
               ("sdxl", "text_encoder"): "conditioner.embedders.0.transformer."}
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL's OpenCLIP bigG, in open_clip's own names


def ldm_vae_name(path: str, num_up_blocks: int) -> str:
    """The LDM name of a diffusers AutoencoderKL parameter (no `first_stage_model.` prefix)."""
    path = path.replace("conv_norm_out", "norm_out")
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", path):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", path):
        inner = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
        head, _, param = m[2].rpartition(".")
        return f"{m[1]}.mid.attn_1.{inner.get(head, head)}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", path):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", path):
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", path):
        level = num_up_blocks - 1 - int(m[1])  # LDM numbers the decoder's levels from the bottom up
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", path):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out|norm_out)\.(weight|bias)|(post_)?quant_conv\.(weight|bias)",
                    path):
        return path
    raise UnmappedName(f"the VAE parameter {path!r} has no place in the original SD layout")


OPEN_CLIP_RENAMES = (("text_model.encoder.layers.", "transformer.resblocks."), (".self_attn.", ".attn."),
                     (".layer_norm1.", ".ln_1."), (".layer_norm2.", ".ln_2."), (".mlp.fc1.", ".mlp.c_fc."),
                     (".mlp.fc2.", ".mlp.c_proj."), ("text_model.final_layer_norm.", "ln_final."))
