"""The frozen base model, kept loaded from one trial to the next in the same process.

Hydra's basic launcher runs every cell of a sweep in one process, one after another, and
most cells of an ablation matrix share the base model, its precision and its device: only
the adapter differs. Loading SDXL costs 35-120 s on a T4, so the next trial gets the same
modules back, with the previous trial's adapter layers removed (peft wraps the layers it
adapts; the frozen weights themselves are never written, so removing the wrappers restores
the base bit for bit).

Anything unusual drops the kept model instead of trying to repair it: a failed trial, a
different model/precision/device, or `sweep.keep_base_loaded=false`.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging

import torch
from omegaconf import DictConfig, OmegaConf

from sdsweep.model import load as models

log = logging.getLogger(__name__)

_kept: dict = {}  # {"key": str, "components": Components}; at most one base model at a time


def base_key(cfg: DictConfig, device: torch.device) -> str:
    """What decides the loaded and placed base: the model group, the precision group, the device."""
    parts = {"model": OmegaConf.to_container(cfg.model, resolve=True),
             "precision": OmegaConf.to_container(cfg.precision, resolve=True), "device": str(device)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def acquire(cfg: DictConfig, device: torch.device) -> tuple[models.Components, bool]:
    """(components loaded and placed for `cfg` on `device`, whether they were reused)."""
    key = base_key(cfg, device)
    if cfg.sweep.keep_base_loaded and _kept.get("key") == key:
        log.info("base model kept loaded from the previous trial (only the adapter changes)")
        components = _kept.pop("components")
        _kept.clear()  # handed out: until given back clean, nothing is kept
        return components, True
    drop()
    components = models.load_components(cfg.model, cfg.precision)
    models.place(components, cfg.precision, device)
    return components, False


def give_back(cfg: DictConfig, components: models.Components | None, device: torch.device, clean: bool) -> None:
    """Keep `components` for the next trial (adapters stripped) if the trial ended cleanly, else free them."""
    if components is None:
        return
    if not (clean and cfg.sweep.keep_base_loaded):
        return  # the caller drops its references; nothing kept here
    if cfg.adapter.kind in ("full", "textual_inversion"):
        return  # it trained the base's own weights (denoiser, token embeddings): the next trial loads it again
    strip_adapters(components)
    _kept.update(key=base_key(cfg, device), components=components)


def holds_model() -> bool:
    """Whether a base model is kept loaded now."""
    return bool(_kept)


def drop() -> None:
    """Forget the kept base model and return its memory."""
    if _kept:
        _kept.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def strip_adapters(components: models.Components) -> None:
    """Return every module to the frozen base as loaded: peft layers out, checkpointing off, eval mode."""
    from diffusers.utils import recurse_remove_peft_layers
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in components.modules().items():
        recurse_remove_peft_layers(module)
        if hasattr(module, "peft_config"):
            del module.peft_config
        if hasattr(module, "_hf_peft_config_loaded"):
            module._hf_peft_config_loaded = False
        if models.is_checkpointing(module):
            models.set_checkpointing(module, False)
        module.requires_grad_(False)
        module.eval()
        left = [n for n, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
        if left:  # never hand a half-stripped model to the next trial
            raise RuntimeError(f"adapter layers left in {name} after stripping: {left[:3]}")
