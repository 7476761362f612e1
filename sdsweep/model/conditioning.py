"""What the denoiser is conditioned on: text-encoder outputs and SDXL's micro-conditioning.

Text encoding is split in two so the feature cache can sit in the middle:
`encode_text` runs the text encoders and returns their raw outputs by name (what the cache
stores, per caption), and `prompt_embeddings` assembles the tensors the denoiser takes. Live
and cached training both go through `prompt_embeddings`, so they condition identically.
"""

from __future__ import annotations

import torch

from sdsweep.model.load import Components


def _tokens(tokenizer, captions: list[str], device: torch.device, max_length: int | None = None) -> torch.Tensor:
    return tokenizer(captions, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


def encode_text(components: Components, captions: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Per-caption text-encoder outputs, as the diffusers training examples compute them.

    sd15: `hidden` (last layer). sdxl: `hidden` (penultimate layers of both encoders,
    concatenated) and `pooled` (the projection encoder's text_embeds). sd3: `clip` (penultimate
    layers of CLIP-L and CLIP-G, concatenated), `pooled` (both pooled outputs) and `t5` (T5's
    last layer; absent when model.drop_t5 is set).
    """
    family, encoders, tokenizers = components.family, components.text_encoders, components.tokenizers
    if family == "sd15":
        return {"hidden": encoders[0](_tokens(tokenizers[0], captions, device)).last_hidden_state}
    hidden, pooled = [], []
    for tokenizer, encoder in zip(tokenizers[:2], encoders[:2]):
        out = encoder(_tokens(tokenizer, captions, device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # SDXL and SD3 condition on the penultimate layer
        pooled.append(out[0])  # text_embeds of a projection encoder; unused for SDXL's first encoder
    if family == "sdxl":
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled[1]}
    parts = {"clip": torch.cat(hidden, dim=-1), "pooled": torch.cat(pooled, dim=-1)}
    if len(encoders) > 2:
        ids = _tokens(tokenizers[2], captions, device, components.extra.get("t5_max_length"))
        # T5 overflows in fp16: outside any fp16 autocast, in its own (bf16/fp32) weights
        with torch.autocast(device.type, enabled=False):
            parts["t5"] = encoders[2](ids)[0]
    return parts


def prompt_embeddings(components: Components, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-token embeddings, pooled embedding or None) for the denoiser, from `encode_text`'s parts."""
    if components.family != "sd3":
        return parts["hidden"], parts.get("pooled")
    clip = parts["clip"]
    joint_dim = components.denoiser.config.joint_attention_dim
    t5 = parts.get("t5")
    if t5 is None:
        # no T5 (model.drop_t5): zeros in its place, as StableDiffusion3Pipeline does without text_encoder_3
        length = components.extra.get("t5_max_length", 77)
        t5 = torch.zeros(clip.shape[0], length, joint_dim, device=clip.device, dtype=clip.dtype)
    clip = torch.nn.functional.pad(clip, (0, joint_dim - clip.shape[-1]))
    return torch.cat([clip, t5.to(clip.dtype)], dim=-2), parts["pooled"]


def sdxl_time_ids(batch: dict, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning: original size, crop top-left, target size (each (h, w)).

    The target size is the item's own: (resolution, resolution), or its bucket.
    """
    parts = [batch["original_size"], batch["crop_top_left"], batch["target_size"]]
    return torch.cat(parts, dim=1).to(device, torch.float32)
