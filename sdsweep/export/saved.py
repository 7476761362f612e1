"""A trial's adapter as export reads it: from the live modules while the trial saves, or from the adapter
folder as `model/adapters.py:save_adapter` writes it (today and before the kohya file existed):

  lora/dora  pytorch_lora_weights.safetensors: diffusers' format, peft's key names under the component
             (`unet.`, `transformer.`, `text_encoder.`, `text_encoder_2.`), peft's configs as JSON metadata
             (`lora_adapter_metadata`: {"unet.r": 8, "unet.lora_alpha": 8.0, ...})
  loha/lokr  <component>/adapter_model.safetensors + adapter_config.json: peft's own format
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdsweep.export.kohya import Component, ExportError

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the same name as model/adapters.py's (not imported: no cycle)
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")


def from_modules(modules: Mapping[str, torch.nn.Module]) -> dict[str, Component]:
    """The adapted ones of `modules` ({pipeline component name: module}) as export's Components."""
    from peft.utils import get_peft_model_state_dict

    out = {}
    for name, module in modules.items():
        if not getattr(module, "_hf_peft_config_loaded", False):
            continue
        config = module.peft_config["default"].to_dict()
        # sets (target_modules) sorted: a set's order follows the process's string hashing, so the saved
        # files would differ between two runs of one trial
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        model_config = dict(module.config) if name == "unet" and hasattr(module, "config") else None
        out[name] = Component(dict(get_peft_model_state_dict(module)), config, model_config)
    return out


def has_adapter(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / LORA_WEIGHTS).is_file() or any((folder / c / PEFT_WEIGHTS).is_file() for c in COMPONENTS)


def from_folder(folder: Path, fallback_config: Mapping[str, Any] | None = None) -> dict[str, Component]:
    """The adapter saved in `folder`. `fallback_config`: the trial's `adapter` group, for a LoRA file
    whose metadata lacks peft's config (rank and alpha are then the trial's)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    if (folder / LORA_WEIGHTS).is_file():
        with safe_open(folder / LORA_WEIGHTS, "pt") as f:
            metadata = f.metadata() or {}
        state = load_file(folder / LORA_WEIGHTS)
        configs = _lora_configs(metadata.get("lora_adapter_metadata"))
        out = {}
        for component in COMPONENTS:
            prefix = component + "."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if not sub:
                continue
            config = configs.get(component) or _config_from_trial(fallback_config, folder)
            out[component] = Component(sub, config)
        if leftover := [k for k in state if not k.startswith(tuple(c + "." for c in COMPONENTS))]:
            raise ExportError(f"{folder / LORA_WEIGHTS}: tensors of no known component, e.g. {leftover[:3]}")
        return out
    out = {}
    for component in COMPONENTS:
        sub = folder / component
        if (sub / PEFT_WEIGHTS).is_file():
            config = json.loads((sub / PEFT_CONFIG).read_text(encoding="utf-8"))
            out[component] = Component(load_file(sub / PEFT_WEIGHTS), config)
    return out


def _lora_configs(raw: str | None) -> dict[str, dict]:
    """diffusers' packed `lora_adapter_metadata` ({"unet.r": 8, ...}) as {"unet": {"r": 8, ...}}."""
    if not raw:
        return {}
    out: dict[str, dict] = {}
    for key, value in json.loads(raw).items():
        component, _, name = key.partition(".")
        out.setdefault(component, {})[name] = value
    return out


def _config_from_trial(adapter: Mapping[str, Any] | None, folder: Path) -> dict:
    if not adapter or "rank" not in adapter:
        raise ExportError(f"{folder / LORA_WEIGHTS} has no peft config in its metadata and the trial's config "
                          "(.hydra/config.yaml) has no adapter.rank: cannot tell its alpha")
    return {"r": int(adapter["rank"]), "lora_alpha": float(adapter.get("alpha", adapter["rank"]))}


def attach(modules: Mapping[str, torch.nn.Module], components: Mapping[str, Component]) -> None:
    """Load `components` (read by from_folder) onto the matching `modules` with peft itself: each adapted
    layer by its full name, every tensor checked in. (diffusers' load_lora_weights drops DoRA's magnitudes
    of the text encoders with transformers 5.x: their keys miss the `.weight` transformers' loader wants.)
    `modules` are named as in a pipeline ("unet" or "transformer" for the denoiser)."""
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict

    from sdsweep.export.kohya import adapter_kind, layers

    kind = adapter_kind(components)
    for name, c in components.items():
        module = modules.get(name) if name in modules else modules.get("unet" if name == "transformer" else name)
        if module is None:
            raise ExportError(f"the adapter has a {name} part but the model has no {name}")
        config = dict(c.config)
        config.setdefault("peft_type", "LORA" if kind in ("lora", "dora") else kind.upper())
        config["target_modules"] = sorted(layers(c.state))
        config["inference_mode"] = True
        module.add_adapter(PeftConfig.from_peft_type(**config))
        result = set_peft_model_state_dict(module, c.state)
        if unexpected := list(getattr(result, "unexpected_keys", []) or []):
            raise ExportError(f"{name}: {len(unexpected)} adapter tensors did not load, e.g. {unexpected[:3]}")
