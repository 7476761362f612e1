"""Before launch: expand the matrix, validate every cell, prune what cannot work; resume sweeps.

Hydra composes each cell only when its job starts, so a typo in the fourth cell would
surface after three trials have trained. `preflight` composes every cell first (with
Hydra's own override parser and the basic sweeper's expansion) and reports every problem
at once. Cells that are valid but cannot run here (a quantized base without CUDA, bf16 on
a GPU that only emulates it, an adapter peft cannot put on quantized layers, text-encoder
adapters that the installed transformers refuses with the installed peft) are not errors:
they are pruned, with their reason in the trial's metrics.json and the sweep summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sdsweep.config.schema import ConfigError, validate

log = logging.getLogger(__name__)


def runs_on_cuda(cfg: DictConfig) -> bool:
    return torch.cuda.is_available() and cfg.device != "cpu"


def prune_reason(cfg: DictConfig) -> str | None:
    """Why this cell cannot run on this machine, or None."""
    pr, cuda = cfg.precision, runs_on_cuda(cfg)
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
    from sdsweep.sweep.estimate import estimate_peak

    budget = cfg.sweep.vram_budget_gb
    if not budget:
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


def config_fingerprint(cfg: DictConfig) -> str:
    """What a finished trial is compared with before it is skipped on resume."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("tracking", None)  # where a trial is logged does not change what it trained
    data.pop("cache", None)  # nor whether its latents/text came from the feature cache (see cache.py)
    data.pop("sweep", None)  # nor how the sweep scheduled it (kept base, budget, early stopping)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_result(trial_dir: Path, fingerprint: str) -> dict | None:
    """The kept metrics of a trial that already finished with this very config, or None."""
    path = trial_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if metrics.get("status") == "finished" and metrics.get("config_fingerprint") == fingerprint:
        return metrics
    return None


def expand_cells(overrides: list[str]) -> list[list[str]]:
    """The overrides of every cell of the sweep, as Hydra's basic sweeper will launch them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    return [cell for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]


def preflight(overrides: list[str]) -> list[str]:
    """Compose and validate every cell; return the problems (empty: all cells can launch)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    problems: list[str] = []
    predictions: list[tuple[list[str], DictConfig]] = []
    cells = expand_cells(overrides)
    for cell in cells:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
                cfg = compose(config_name="config", overrides=cell)
            validate(cfg)
            predictions.append((cell, cfg))
        except ConfigError as e:
            problems.extend(f"[{' '.join(cell)}] {p}" for p in e.problems)
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors have many types
            problems.append(f"[{' '.join(cell)}] {str(e).splitlines()[0]}")
        finally:
            GlobalHydra.instance().clear()
    if not problems and predictions:
        print(prediction_table(predictions), flush=True)
    return problems


def prediction_table(cells: list[tuple[list[str], DictConfig]]) -> str:
    """Each cell's predicted peak VRAM and whether it fits sweep.vram_budget_gb, as a text table."""
    from sdsweep.sweep.estimate import estimate_peak

    rows = []
    for cell, cfg in cells:
        e, budget, cuda = estimate_peak(cfg), cfg.sweep.vram_budget_gb, runs_on_cuda(cfg)
        if e.total_gb is None:
            fits = f"unknown: {e.reason}"
        elif not budget:
            fits = "no budget"
        else:
            fits = ("yes" if e.fits(budget) else "NO: pruned") if cuda else (
                "yes" if e.fits(budget) else "no (CPU run: not pruned)")
        rows.append((" ".join(cell) or "(defaults)", "-" if e.total_gb is None else f"{e.total_gb:.2f}",
                     "-" if e.device_gb is None else f"{e.device_gb:.2f}", fits))
    head = ("cell", "peak GiB", "need GiB", "fits sweep.vram_budget_gb")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(4)]
    lines = ["predicted peak VRAM per cell (sdsweep/estimate.py: peak = torch.cuda.max_memory_allocated; "
             "need = peak + allocator slack + CUDA context)"]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in [head, *rows]]
    return "\n".join(lines)


def resume_overrides(sweep_dir: Path, extra: list[str]) -> list[str]:
    """The overrides that launched `sweep_dir` (from its multirun.yaml), plus `extra`, pointed at it."""
    saved = sweep_dir / "multirun.yaml"
    if not saved.exists():
        raise FileNotFoundError(
            f"sweep.resume={sweep_dir}: no multirun.yaml there; give the folder of a sweep started with -m"
        )
    task = list(OmegaConf.load(saved).hydra.overrides.task)
    given = {o.split("=", 1)[0] for o in extra}
    kept = [o for o in task if o.split("=", 1)[0] not in given]
    return [*kept, *extra, f"hydra.sweep.dir={sweep_dir}"]
