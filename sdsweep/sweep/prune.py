"""Cells that are valid but cannot run on this machine, and why.

A quantized base without CUDA, bf16 on a GPU that only emulates it, an adapter peft cannot put on
quantized layers, text-encoder adapters that the installed transformers refuses with the installed
peft, a predicted peak over sweep.vram_budget_gb: such a cell is not an error. It is pruned, with
its reason in the trial's metrics.json and the sweep summary, before anything is loaded.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from sdsweep.sweep.estimate import Estimate, estimate_peak


def runs_on_cuda(cfg: DictConfig) -> bool:
    return torch.cuda.is_available() and cfg.device != "cpu"


def estimate_wanted(cfg: DictConfig) -> bool:
    """Whether this cell's peak VRAM is predicted (sweep.estimate): by default only where it can prune."""
    return {"always": True, "never": False}.get(cfg.sweep.estimate, runs_on_cuda(cfg))


NOT_ESTIMATED = ("not estimated: a CPU run has no VRAM to budget (sweep.estimate=always predicts the peak "
                 "a CUDA run of this cell would have)")


def planned_estimate(cfg: DictConfig) -> Estimate:
    """estimate_peak(cfg) where sweep.estimate wants one, else an empty estimate that says why: a CPU run
    pays nothing for a figure no budget reads."""
    if estimate_wanted(cfg):
        return estimate_peak(cfg)
    reason = "not estimated: sweep.estimate=never" if cfg.sweep.estimate == "never" else NOT_ESTIMATED
    return Estimate(total_gb=None, reason=reason)


def prune_reason(cfg: DictConfig) -> str | None:
    """Why this cell cannot run on this machine, or None."""
    pr, cuda = cfg.precision, runs_on_cuda(cfg)
    if cfg.adapter.kind == "full" and (reason := full_fine_tuning_reason(cfg)):
        return reason
    if cfg.adapter.kind == "textual_inversion" and (reason := textual_inversion_reason(cfg)):
        return reason
    if pr.quantize != "none" and not cuda:
        return (f"precision={pr.name} quantizes the base with bitsandbytes, which needs a CUDA GPU; "
                "use precision=fp16, bf16 or fp32 here")
    if pr.quantize != "none" and cfg.adapter.kind in ("loha", "lokr"):
        return (f"adapter={cfg.adapter.kind} with precision={pr.name}: peft has no {cfg.adapter.kind} layer for "
                "bitsandbytes-quantized weights; use adapter=lora or dora with a quantized base")
    if cuda and "bf16" in (pr.mixed_precision, pr.base_dtype) and torch.cuda.get_device_capability() < (8, 0):
        name = torch.cuda.get_device_name()
        return (f"precision={pr.name} on {name} (compute capability "
                f"{'.'.join(map(str, torch.cuda.get_device_capability()))}): bf16 is emulated before Ampere "
                "(8.0) and runs several times slower; use precision=fp16")
    if cfg.text_encoder.train and (reason := text_encoder_peft_reason()):
        return reason
    if cuda:
        return over_budget_reason(cfg)
    return None


def full_fine_tuning_reason(cfg: DictConfig) -> str | None:
    """Why an adapter=full cell cannot train, or None. Pruned rather than refused: in a matrix such as
    adapter=lora,full x precision=bf16,int8 the other cells of the row are valid."""
    if cfg.precision.quantize != "none":
        return (f"adapter=full with precision={cfg.precision.name}: a bitsandbytes-quantized weight has no "
                "gradient, so a quantized base cannot be fine-tuned in full; use precision=bf16, fp16 or fp32 "
                "(the quantized cells are for the adapters)")
    if cfg.text_encoder.train:
        return (f"adapter=full with text_encoder={cfg.text_encoder.name}: full fine-tuning trains the denoiser "
                "only (as diffusers' train_text_to_image does); use text_encoder=frozen")
    return None


def textual_inversion_reason(cfg: DictConfig) -> str | None:
    """Why an adapter=textual_inversion cell cannot train, or None."""
    if cfg.model.family == "sd3":
        return ("adapter=textual_inversion with model.family=sd3: diffusers' SD3 pipeline has no textual-inversion "
                "loader (and T5 no embedding format), so the result could be neither evaluated nor used; "
                "use model=sd15 or sdxl")
    if cfg.text_encoder.train:
        return (f"adapter=textual_inversion with text_encoder={cfg.text_encoder.name}: textual inversion trains "
                "only its new embeddings; use text_encoder=frozen")
    return None


def text_encoder_peft_reason() -> str | None:
    """Why transformers refuses adapters on its text encoders with the installed peft, or None.

    transformers checks its own minimum peft version when an adapter is added, not in its package
    metadata, so pip happily installs a transformers that needs a peft not yet released (5.24 needs
    peft 0.22). The UNet's adapters are unaffected; only text_encoder=lora cells cannot train."""
    from importlib.metadata import version

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # an older transformers without the constant: its integration takes any peft
        return None
    installed = version("peft")
    if Version(installed) >= Version(MIN_PEFT_VERSION):
        return None
    return (f"text_encoder=lora: the installed transformers {version('transformers')} puts adapters on text "
            f"encoders only with peft>={MIN_PEFT_VERSION}, and peft {installed} is installed; "
            f"pip install 'peft>={MIN_PEFT_VERSION}' or reinstall sdsweep (pip install -e .), "
            "whose requirements keep the two compatible")


def over_budget_reason(cfg: DictConfig) -> str | None:
    """Why this cell would not fit `sweep.vram_budget_gb`, or None (no budget, fits, or no prediction).

    Only for trials that will run on CUDA: a CPU trial has no VRAM to exhaust (its prediction is
    still recorded in metrics.json by run_trial)."""
    budget = cfg.sweep.vram_budget_gb
    if not budget or not estimate_wanted(cfg):
        return None
    estimate = estimate_peak(cfg)
    if estimate.fits(budget):
        return None
    fixes = []
    if not cfg.train.gradient_checkpointing:
        fixes.append("train.gradient_checkpointing=true")
    if cfg.optimizer.name != "adamw8bit":
        fixes.append("optimizer=adamw8bit")
    if cfg.precision.base_dtype == "fp32":
        fixes.append("precision=fp16 (bf16 on Ampere or newer)")
    if cfg.train.batch_size > 1:
        fixes.append("a lower train.batch_size with train.grad_accum")
    fixes += ["a lower data.resolution", "or raise the budget"]
    return (f"predicted peak {estimate.device_gb:.1f} GiB ({estimate.total_gb:.1f} allocated, "
            f"peak in the {estimate.peak_phase}, + allocator slack and CUDA context) > "
            f"sweep.vram_budget_gb={budget:g}: try {', '.join(fixes)}")
