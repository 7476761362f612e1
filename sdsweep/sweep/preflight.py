"""Before launch: expand the matrix, validate every cell, show each cell's predicted memory.

Hydra composes each cell only when its job starts, so a typo in the fourth cell would
surface after three trials have trained. `preflight` composes every cell first (with
Hydra's own override parser and the basic sweeper's expansion) and reports every problem
at once. Cells that are valid but cannot run here (a quantized base without CUDA, bf16 on
a GPU that only emulates it, an adapter peft cannot put on quantized layers, text-encoder
adapters that the installed transformers refuses with the installed peft) are not errors:
they are pruned, with their reason in the trial's metrics.json and the sweep summary.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate
from sdsweep.config.validate import warnings as config_warnings
from sdsweep.sweep.estimate import estimate_peak
from sdsweep.sweep.prune import runs_on_cuda

log = logging.getLogger(__name__)


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
    problems += shared_folders(cells)
    if not problems and predictions:
        print(prediction_table(predictions), flush=True)
        for warning in dict.fromkeys(w for _, cfg in predictions for w in config_warnings(cfg)):
            log.warning("config: %s", warning)  # once per sweep, not once per trial
    return problems


def shared_folders(cells: list[list[str]]) -> list[str]:
    """Cells that would train in one trial folder: they differ only in keys that name no folder
    (config/identity.py), which change neither what is trained nor, for eval.*, anything a re-score
    cannot change."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sdsweep.config.identity import folder_excluded_keys

    excluded, parser, seen, problems = folder_excluded_keys(), OverridesParser.create(), {}, []
    for cell in cells:
        # Hydra's own override_dirname, as conf/config.yaml's exclude_keys make it
        name = get_overrides_dirname(parser.parse_overrides(cell), excluded, item_sep=",", kv_sep="=")
        if name in seen:
            problems.append(f"[{' '.join(cell)}] and [{' '.join(seen[name])}] differ only in keys that change "
                            "nothing trained (tracking.*, cache.*, sweep.*, device, model.cache_dir, data.num_workers, "
                            "eval.*), so they would share one trial folder: sweep one value of them; for other eval "
                            "settings re-score the trials (python -m sdsweep.eval TRIAL_DIR eval.steps=30) or "
                            "resume the sweep with them (sweep.resume=DIR eval.steps=30)")
        seen.setdefault(name, cell)
    return problems


def prediction_table(cells: list[tuple[list[str], DictConfig]]) -> str:
    """Each cell's predicted peak VRAM and whether it fits sweep.vram_budget_gb, as a text table."""
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
