"""Build the peft adapter config from the `adapter` and `targets` groups, attach, save.

peft provides LoRA, DoRA, LoHa and LoKr; this module only turns the config into peft
configs, resolves target patterns against the loaded network (so a pattern set that
matches nothing is caught with real module names in the message), and saves the result
in the format diffusers' `load_lora_weights` reads. `adapter=full` is the baseline the adapters
are measured against: no adapter, every weight of the denoiser trains (in fp32), and the
trained denoiser is saved as a diffusers model folder that `from_pretrained` reads.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sdsweep.config.schema import AdapterConfig
from sdsweep.io import atomic_dir

if TYPE_CHECKING:
    from sdsweep.export.kohya import Component

log = logging.getLogger(__name__)
# Layer types peft can wrap with every adapter kind we offer.
ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FULL = "full"
DENOISER_WEIGHTS = "diffusion_pytorch_model.safetensors"  # diffusers' file name inside a model folder


class TargetError(ValueError):
    """A targets pattern set matched no adaptable module."""


def resolve_targets(model: torch.nn.Module, patterns: list[str], what: str) -> list[str]:
    """Names of the Linear/Conv2d modules of `model` that full-match any of `patterns`."""
    compiled = [re.compile(p) for p in patterns]
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, ADAPTABLE) and any(c.fullmatch(name) for c in compiled)
    ]
    if not names:
        examples = [n for n, m in model.named_modules() if isinstance(m, ADAPTABLE)]
        step = max(1, len(examples) // 8)
        raise TargetError(
            f"the {what} target patterns {list(patterns)} match no Linear/Conv2d module of the {what}. "
            f"Some real module names: {examples[::step][:8]}. Fix the patterns in the targets "
            "(or text_encoder) group, e.g. targets.patterns='[.*attn1\\.to_q]'"
        )
    return names


def denoiser_patterns(targets, family: str) -> list[str]:
    """The targets group's patterns for this family's denoiser: UNet or MMDiT transformer."""
    return list(targets.transformer_patterns if family == "sd3" else targets.patterns)


def pipeline_component(family: str, name: str) -> str:
    """The name a module has in the family's diffusers pipeline (Components calls every denoiser unet)."""
    return "transformer" if family == "sd3" and name == "unet" else name


def peft_config(cfg: AdapterConfig, target_names: list[str]):
    """The peft config for `cfg`, targeting exactly `target_names`."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    if cfg.kind in ("lora", "dora"):
        return LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            init_lora_weights="gaussian" if cfg.init == "gaussian" else True,
            use_dora=cfg.kind == "dora",
            target_modules=target_names,
        )
    cls = LoHaConfig if cfg.kind == "loha" else LoKrConfig
    return cls(r=cfg.rank, alpha=cfg.alpha, module_dropout=cfg.dropout, target_modules=target_names, init_weights=True)


def attach(model: torch.nn.Module, cfg: AdapterConfig, patterns: list[str], what: str) -> list[str]:
    """Attach a `cfg` adapter to the modules of `model` matching `patterns`; upcast it to fp32.
    adapter=full: no adapter; every parameter of `model` trains, in fp32 (patterns are not read).

    Adapter weights train in fp32 whatever the base's dtype (diffusers' cast_training_params):
    fp16 weights would underflow their small updates. A full fine-tune keeps an fp32 copy of the
    whole denoiser for the same reason (diffusers' train_text_to_image trains the UNet in fp32).
    """
    if cfg.kind == FULL:
        model.requires_grad_(True)
        for param in model.parameters():
            param.data = param.data.float()
        return [name for name, _ in model.named_parameters()]
    names = resolve_targets(model, patterns, what)
    model.add_adapter(peft_config(cfg, names))
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    return names


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(module: torch.nn.Module, trainable: bool) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def adapter_state_dicts(modules: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """peft's state dict of each adapted module, by component name ("unet", "text_encoder", ...)."""
    from peft.utils import get_peft_model_state_dict

    return {
        name: get_peft_model_state_dict(module)
        for name, module in modules.items()
        if getattr(module, "_hf_peft_config_loaded", False)
    }


def save_adapter(folder: Path, family: str, kind: str, modules: dict[str, torch.nn.Module],
                 trial_config: Mapping | None = None) -> Path:
    """Save the trained adapters of `modules` into `folder`, atomically.

    lora/dora: one `pytorch_lora_weights.safetensors` in diffusers' format (with peft's config
    as metadata), which `pipeline.load_lora_weights(folder)` reads.
    Components are named as in the family's pipeline (SD3's denoiser: `transformer`).
    loha/lokr: diffusers' loader does not read peft's LyCORIS layers, so each component is
    saved in peft's own format (`<component>/adapter_model.safetensors` and
    `adapter_config.json`), loadable with `load_adapter` below or peft's `set_peft_model_state_dict`.
    Every kind: also `kohya.safetensors`, the whole adapter in one kohya/LyCORIS file (ComfyUI,
    A1111/Forge), and the model card `README.md` (sdsweep/export). `trial_config`: the trial's resolved
    config for their metadata; None reads the trial folder's `.hydra/config.yaml` when there is one.
    """
    if kind == FULL:
        with atomic_dir(folder) as tmp:
            save_denoiser(tmp, family, modules["unet"])
        return folder
    from sdsweep.export import saved

    # each adapter's tensors and config read once (peft filters the whole model's state dict for them)
    # for every file below
    adapted = saved.from_modules({pipeline_component(family, n): m for n, m in modules.items()})
    with atomic_dir(folder) as tmp:
        if kind in ("lora", "dora"):
            _save_diffusers_lora(tmp, family, adapted)
        else:
            _save_peft(tmp, adapted)
        _save_exports(tmp, Path(folder), family, kind, adapted, trial_config)
    return folder


def save_denoiser(folder: Path, family: str, denoiser: torch.nn.Module) -> Path:
    """adapter=full: the trained denoiser as a diffusers model folder (`unet/` or SD3's `transformer/`:
    config.json and diffusion_pytorch_model.safetensors), which `UNet2DConditionModel.from_pretrained` /
    `SD3Transformer2DModel.from_pretrained` read and a pipeline takes as its denoiser. In fp32, the dtype
    it trained in (as diffusers' train_text_to_image saves it): casting to fp16 here would round away a
    short fine-tune's updates. Written tensor by tensor, so the live model is neither cast nor copied."""
    from safetensors.torch import save_file

    sub = Path(folder) / pipeline_component(family, "unet")
    sub.mkdir(parents=True)
    denoiser.save_config(sub)
    state = {k: v.detach().float().contiguous().cpu() for k, v in denoiser.state_dict().items()}
    save_file(state, sub / DENOISER_WEIGHTS, metadata={"format": "pt"})
    return sub


def load_denoiser(folder: Path, component: str, like: torch.nn.Module) -> torch.nn.Module:
    """The denoiser `save_denoiser` wrote (`component`: unet or transformer), read with diffusers'
    from_pretrained the way a user would, on `like`'s device and in its dtype (the base's sampling dtype)."""
    sub = Path(folder) / component
    parameter = next(like.parameters())
    return type(like).from_pretrained(sub, torch_dtype=parameter.dtype).to(parameter.device).eval()


def _save_exports(tmp: Path, folder: Path, family: str, kind: str, adapted: dict[str, Component],
                  trial_config: Mapping | None) -> None:
    """The kohya/LyCORIS file and the model card beside the files above. They must never cost the trained
    adapter: a failure is a warning naming the cause (and the command that writes them later), not an error."""
    from omegaconf import DictConfig, OmegaConf

    from sdsweep.export import card, kohya
    from sdsweep.export.trial import read_config
    from sdsweep.layout import KOHYA_ADAPTER, TrialDir

    trial = TrialDir(folder.parent)
    try:
        if isinstance(trial_config, DictConfig):
            config = OmegaConf.to_container(trial_config, resolve=True)
        else:
            config = dict(trial_config) if trial_config is not None else read_config(trial.path)
        kohya.write_kohya(tmp / KOHYA_ADAPTER, family, adapted, kind, config, trial.name)
        card.write_card(tmp, family, kind, config, trial)
    except Exception as e:  # noqa: BLE001 - the adapter itself is saved; these are copies of it
        log.warning("%s / %s not written (%s: %s); `python -m sdsweep.export %s --format kohya` writes them "
                    "from the saved adapter", KOHYA_ADAPTER, card.CARD, type(e).__name__, e, trial.path)


def _save_diffusers_lora(folder: Path, family: str, adapted: dict[str, Component]) -> None:
    from sdsweep.model.load import pipeline_class

    kwargs = {}
    for name, component in adapted.items():
        # peft's key names, which every diffusers LoRA loader reads. convert_state_dict_to_diffusers
        # would rename only the attention keys (lora.down/up) and leave conv keys as lora_A/B: a
        # mix the SD/SDXL loader half-reads with only a warning (targets=many lost its attention
        # layers), and SD3's loader does not read the old names at all.
        kwargs[f"{name}_lora_layers"] = _portable(component.state)
        kwargs[f"{name}_lora_adapter_metadata"] = component.config
    pipeline_class(family).save_lora_weights(folder, weight_name=LORA_WEIGHTS, **kwargs)


def _portable(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 on the CPU, as every adapter file is written whatever the trial trained in."""
    return {k: v.detach().float().contiguous().cpu() for k, v in state.items()}


def _save_peft(folder: Path, adapted: dict[str, Component]) -> None:
    from safetensors.torch import save_file

    for name, component in adapted.items():
        sub = folder / name
        sub.mkdir(parents=True)
        save_file(_portable(component.state), sub / "adapter_model.safetensors")
        (sub / "adapter_config.json").write_text(json.dumps(component.config, indent=2, default=str))


def load_adapter(folder: Path, modules: dict[str, torch.nn.Module]) -> None:
    """Load a peft-format adapter saved by `save_adapter` (loha/lokr) onto fresh `modules`."""
    from peft import PeftConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    for name, module in modules.items():
        sub = Path(folder) / name
        if not (sub / "adapter_config.json").exists():
            continue
        config = PeftConfig.from_pretrained(str(sub))
        module.add_adapter(config)
        set_peft_model_state_dict(module, load_file(sub / "adapter_model.safetensors"))
