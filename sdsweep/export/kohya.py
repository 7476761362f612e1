"""peft adapters -> one kohya/LyCORIS `.safetensors` file, the format ComfyUI, A1111/Forge and LyCORIS read.

Per adapted layer, under its kohya name (names.py):
  LoRA   lora_down.weight (= peft lora_A), lora_up.weight (= lora_B), alpha
  DoRA   the same + dora_scale: peft's magnitude, reshaped to the (out, 1) / (out, 1, 1, 1) layout LyCORIS
         3.2+ reads (it rebuilds its module with the magnitude on the output axis, wd_on_out=True, and copies
         the tensor in, so the shape must be exactly that: peft keeps (out,) for Linear, (1, out, 1, 1) for Conv2d)
  LoHa   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b (hada_t1/t2 with effective conv), alpha
  LoKr   lokr_w1 or lokr_w1_a/_b, lokr_w2 or lokr_w2_a/_b (lokr_t2), alpha

Scales, where the formats disagree, are baked into the weights so every reader builds the same
weight as peft: `alpha` is written as peft's scale x the layer's rank (readers compute alpha / rank; so
rank_pattern, alpha_pattern and rsLoRA come out right), and LoKr, which peft scales by alpha / r always
but ComfyUI, A1111 and LyCORIS only when a Kronecker factor is rank-decomposed, has alpha / r multiplied
into lokr_w1 when neither factor is (its alpha is then r: scale 1 for a reader that applies it too).

No module of sdsweep.model is imported here: model/adapters.py calls in when a trial saves its adapter.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdsweep.export.names import DENOISERS, kohya_name

LORA_KINDS = ("lora", "dora")
KINDS = ("lora", "dora", "loha", "lokr")
# peft's parameter names of each adapter kind, as its state dicts spell them (the adapter name removed)
PEFT_PARAMS = {
    "lora": ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector", "lora_magnitude_vector.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
}
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0", "sd3": "sd3"}
MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1", "sdxl": "stable-diffusion-xl-v1-base",
                          "sd3": "stable-diffusion-3-medium"}


class ExportError(ValueError):
    """An adapter that cannot be written in the kohya format; the message says why and what to do."""


@dataclass
class Component:
    """One adapted component's peft state dict (keys relative to the component, no adapter name) and
    peft config (as `PeftConfig.to_dict()`), e.g. the UNet's."""

    state: dict[str, torch.Tensor]
    config: dict[str, Any]
    model_config: Mapping | None = field(default=None)
    """The component's own config (a UNet's config.json): SDXL's kohya names need its block layout."""


def adapter_kind(components: Mapping[str, Component]) -> str:
    """lora, dora, loha or lokr, from the tensors themselves (a saved file says what it holds)."""
    keys = [k for c in components.values() for k in c.state]
    if any(".hada_" in k for k in keys):
        return "loha"
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(".lora_magnitude_vector" in k for k in keys):
        return "dora"
    if any(".lora_A." in k for k in keys):
        return "lora"
    raise ExportError(f"no LoRA/DoRA/LoHa/LoKr weights among {len(keys)} tensors (e.g. {keys[:3]})")


def layers(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """peft's flat state dict grouped by adapted module: {module path: {param name: tensor}}."""
    names = sorted({p for params in PEFT_PARAMS.values() for p in params}, key=len, reverse=True)
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        param = next((p for p in names if key.endswith("." + p)), None)
        if param is None:
            raise ExportError(f"peft tensor {key!r} is not a LoRA/DoRA/LoHa/LoKr weight this exporter knows "
                              "(lora_bias, trainable tokens and modules_to_save have no kohya form)")
        grouped.setdefault(key[: -len(param) - 1], {})[param.removesuffix(".weight") if "magnitude" in param
                                                      else param] = tensor
    return grouped


def _pattern_value(patterns: Mapping[str, Any] | None, path: str, default):
    """peft's per-layer override (rank_pattern / alpha_pattern), matched as peft matches it."""
    if not patterns:
        return default
    from peft.utils.other import get_pattern_key

    key = get_pattern_key(list(patterns), path)
    return patterns.get(key, default)


def peft_rank_and_scale(config: Mapping[str, Any], path: str) -> tuple[int, float]:
    """The rank peft gave the layer at `path` and the scale it multiplies the update by."""
    rank = int(_pattern_value(config.get("rank_pattern"), path, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), path, config.get("lora_alpha", config.get("alpha"))))
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32).contiguous()


def kohya_layer(kind: str, params: Mapping[str, torch.Tensor], rank: int, scale: float) -> dict[str, torch.Tensor]:
    """One layer's tensors under their kohya/LyCORIS suffixes, scales baked where the formats disagree."""
    if kind in LORA_KINDS:
        down, up = _f32(params["lora_A.weight"]), _f32(params["lora_B.weight"])
        out = {"lora_down.weight": down, "lora_up.weight": up,
               "alpha": torch.tensor(scale * down.shape[0], dtype=torch.float32)}
        if "lora_magnitude_vector" in params:
            out["dora_scale"] = _f32(params["lora_magnitude_vector"]).reshape(up.shape[0], *[1] * (up.dim() - 1))
        return out
    if kind == "loha":
        out = {k: _f32(v) for k, v in params.items()}
        out["alpha"] = torch.tensor(scale * out["hada_w1_b"].shape[0], dtype=torch.float32)
        return out
    if kind == "lokr":
        out = {k: _f32(v) for k, v in params.items()}
        decomposed = [out[k] for k in ("lokr_w2_b", "lokr_w1_b") if k in out]
        if decomposed:  # every reader applies alpha / rank here, as peft does
            out["alpha"] = torch.tensor(scale * decomposed[0].shape[0], dtype=torch.float32)
        else:  # readers apply no scale to two full factors; peft applies alpha / r: bake it in
            factor = "lokr_w1" if "lokr_w1" in out else "lokr_w1_a"
            out[factor] = out[factor] * scale
            out["alpha"] = torch.tensor(float(rank), dtype=torch.float32)
        return out
    raise ExportError(f"adapter kind {kind!r} has no kohya form (one of {', '.join(KINDS)})")


def kohya_state_dict(family: str, components: Mapping[str, Component], kind: str | None = None) -> dict[str, torch.Tensor]:
    """Every adapted layer of `components` ({"unet" | "transformer" | "text_encoder" | ...: Component})
    as one kohya/LyCORIS state dict."""
    kind = kind or adapter_kind(components)
    out: dict[str, torch.Tensor] = {}
    for component, c in components.items():
        if component not in (*DENOISERS, "text_encoder", "text_encoder_2"):
            raise ExportError(f"component {component!r} has no kohya prefix (unet, transformer, text_encoder, "
                              "text_encoder_2)")
        for path, params in sorted(layers(c.state).items()):
            rank, scale = peft_rank_and_scale(c.config, path)
            name = kohya_name(family, component, path, c.model_config)
            for suffix, tensor in kohya_layer(kind, params, rank, scale).items():
                out[f"{name}.{suffix}"] = tensor
    return out


# --- metadata, as kohya's sd-scripts writes it (ss_*), plus the trial's own -------------------------------


def config_value(config: Mapping | None, dotted: str, default=None):
    """`config["a"]["b"]` for "a.b", or `default` where a part is missing (a trial's config as a plain mapping)."""
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return default
        node = node[part]
    return node


def _has_conv(components: Mapping[str, Component]) -> bool:
    return any(t.dim() == 4 for c in components.values() for t in c.state.values())


def network_args(kind: str, rank: int, alpha: float, components: Mapping[str, Component]) -> dict[str, str]:
    """ss_network_args: what kohya/LyCORIS would have been told to train this adapter."""
    conv = {"conv_dim": str(rank), "conv_alpha": str(alpha)} if _has_conv(components) else {}
    if kind == "lora":
        return conv
    if kind == "dora":
        return {"algo": "lora", "dora_wd": "True", "wd_on_output": "True", **conv}
    if kind == "loha":
        return {"algo": "loha", **conv}
    config = next(iter(components.values())).config
    return {"algo": "lokr", "factor": str(config.get("decompose_factor", -1)),
            "decompose_both": str(bool(config.get("decompose_both", False))), **conv}


def kohya_metadata(family: str, kind: str, components: Mapping[str, Component],
                   trial_config: Mapping | None = None, trial_name: str | None = None) -> dict[str, str]:
    """safetensors metadata: kohya's ss_* keys (network, base model, resolution, steps, training settings),
    the modelspec.* keys, and the trial's resolved config as JSON (`sdsweep_config`)."""
    first = next(iter(components.values())).config
    rank = int(first["r"])
    alpha = float(first.get("lora_alpha", first.get("alpha", rank)))
    resolution = config_value(trial_config, "data.resolution")
    steps = config_value(trial_config, "train.max_steps")
    base = config_value(trial_config, "model.pretrained") or config_value(trial_config, "model.name")
    text_lr = config_value(trial_config, "text_encoder.lr") or config_value(trial_config, "train.lr")
    meta: dict[str, Any] = {
        "ss_network_module": "networks.lora" if kind == "lora" else "lycoris.kohya",
        "ss_network_dim": rank,
        "ss_network_alpha": alpha,
        "ss_network_dropout": config_value(trial_config, "adapter.dropout"),
        "ss_network_args": json.dumps(network_args(kind, rank, alpha, components)),
        "ss_base_model_version": BASE_MODEL_VERSION.get(family, family),
        "ss_v2": False,
        "ss_sd_model_name": base,
        "ss_resolution": f"({resolution}, {resolution})" if resolution else None,
        "ss_steps": steps,
        "ss_max_train_steps": steps,
        "ss_learning_rate": config_value(trial_config, "train.lr"),
        "ss_unet_lr": config_value(trial_config, "train.lr"),
        "ss_text_encoder_lr": text_lr if any(c not in DENOISERS for c in components) else None,
        "ss_batch_size_per_device": config_value(trial_config, "train.batch_size"),
        "ss_gradient_accumulation_steps": config_value(trial_config, "train.grad_accum"),
        "ss_gradient_checkpointing": config_value(trial_config, "train.gradient_checkpointing"),
        "ss_mixed_precision": config_value(trial_config, "precision.mixed_precision"),
        "ss_optimizer": config_value(trial_config, "optimizer.name"),
        "ss_lr_scheduler": config_value(trial_config, "optimizer.scheduler"),
        "ss_max_grad_norm": config_value(trial_config, "train.max_grad_norm"),
        "ss_noise_offset": config_value(trial_config, "train.noise_offset"),
        "ss_caption_dropout_rate": config_value(trial_config, "data.caption_dropout"),
        "ss_seed": config_value(trial_config, "seed"),
        "ss_output_name": trial_name,
        "ss_training_comment": f"sdsweep trial {trial_name}" if trial_name else "sdsweep",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": f"{MODELSPEC_ARCHITECTURE.get(family, family)}/{'lora' if kind == 'lora' else 'lycoris'}",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": trial_name,
        "modelspec.resolution": f"{resolution}x{resolution}" if resolution else None,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "sdsweep_adapter_kind": kind,
        "sdsweep_family": family,
        "sdsweep_components": ",".join(components),
        "sdsweep_config": json.dumps(trial_config, sort_keys=True, default=str) if trial_config else None,
    }
    return {k: str(v) for k, v in meta.items() if v is not None}


def write_kohya(path: Path, family: str, components: Mapping[str, Component], kind: str | None = None,
                trial_config: Mapping | None = None, trial_name: str | None = None,
                dtype: torch.dtype = torch.float32) -> Path:
    """Write the kohya/LyCORIS file of `components` to `path`, atomically; returns `path`."""
    from safetensors.torch import save

    from sdsweep.io import atomic_write_bytes

    if not components:
        raise ExportError("no adapted component to export (the adapter file holds no weights)")
    kind = kind or adapter_kind(components)
    state = {k: v.to(dtype) for k, v in kohya_state_dict(family, components, kind).items()}
    atomic_write_bytes(Path(path), save(state, kohya_metadata(family, kind, components, trial_config, trial_name)))
    return Path(path)
