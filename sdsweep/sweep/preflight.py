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
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from sdsweep.config.schema import CLIP_METRICS, ConfigError
from sdsweep.config.store import schema_hint, trial_dirname
from sdsweep.config.validate import validate
from sdsweep.config.validate import warnings as config_warnings
from sdsweep.sweep.prune import estimate_wanted, planned_estimate, runs_on_cuda

log = logging.getLogger(__name__)


def expand_cells(overrides: list[str]) -> list[list[str]]:
    """The overrides of every cell of the sweep, as Hydra's basic sweeper will launch them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra")])
    return [cell for batch in BasicSweeper.split_arguments(parsed, None) for cell in batch]


def launched_cells(sweep_dir: Path) -> list[list[str]]:
    """Every cell of the sweep in `sweep_dir` as its multirun.yaml launched them: the study's
    hydra.sweeper.params first, then the command line's overrides (the later value of a key wins),
    expanded in the basic sweeper's order."""
    from omegaconf import OmegaConf

    from sdsweep.layout import SweepDir

    launched = OmegaConf.load(SweepDir(sweep_dir).multirun).hydra
    params = [f"{k}={v}" for k, v in (launched.sweeper.get("params") or {}).items()]
    return expand_cells(params + list(launched.overrides.task))


# keys adapter=full does not read (it has no adapter): cells differing only in them train the same thing
FULL_IGNORED_OVERRIDES = ("adapter.rank", "adapter.alpha", "adapter.dropout", "adapter.init", "targets")


def repeated_cell_reason(cfg: DictConfig, trial_dir: Path, overrides: list[str]) -> str | None:
    """Why this cell of a sweep repeats an earlier one, or None.

    adapter=full ignores the adapter's shape and the targets, so in a study that sweeps adapter=lora,full
    against adapter.rank=1,16,64 the three full cells would train the same model three times. The first
    of them in the launch order trains; the others are pruned naming it. Decided from multirun.yaml alone,
    so a resumed sweep and every worker of a parallel launcher decide the same."""
    from sdsweep.layout import TrialDir

    sweep = TrialDir(trial_dir).sweep
    if cfg.adapter.kind != "full" or sweep is None:
        return None
    try:
        cells = launched_cells(sweep.path)
    except Exception:  # noqa: BLE001 - an unreadable multirun.yaml: train, as without this check
        return None

    def trained(cell: list[str]) -> dict[str, str]:
        pairs = dict(o.split("=", 1) for o in cell if "=" in o and not o.startswith("hydra"))
        return {k: v for k, v in pairs.items() if k.lstrip("+~") not in FULL_IGNORED_OVERRIDES
                and not k.lstrip("+~").startswith("targets.")}

    overrides = expand_cells(overrides)[0]  # written as the sweeper writes a cell's values
    mine = trained(overrides)
    for cell in cells:
        if trained(cell) != mine:
            continue
        if sorted(cell) == sorted(overrides):
            return None  # this cell is the first of those that train the same model
        ignored = sorted(set(cell) ^ set(overrides))
        return (f"adapter=full ignores {', '.join(sorted({o.split('=')[0] for o in ignored}))}: the same training "
                f"as the cell [{' '.join(cell)}], which trains it once for the sweep")
    return None


def preflight(overrides: list[str]) -> list[str]:
    """Compose and validate every cell; return the problems (empty: all cells can launch)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    problems: list[str] = []
    composed: list[DictConfig] = []
    predictions: list[tuple[list[str], DictConfig]] = []
    cells = expand_cells(overrides)
    for cell in cells:
        GlobalHydra.instance().clear()
        try:
            with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
                cfg = compose(config_name="config", overrides=cell)
            composed.append(cfg)
            validate(cfg)
            predictions.append((cell, cfg))
        except ConfigError as e:
            problems.extend(f"[{' '.join(cell)}] {p}" for p in e.problems)
        except Exception as e:  # noqa: BLE001 - Hydra's composition errors have many types
            problems.append(f"[{' '.join(cell)}] {composition_reason(e)}")
        finally:
            GlobalHydra.instance().clear()
    problems += missing_data_paths(composed)
    problems += missing_encoder_weights(composed)
    problems += shared_folders(cells)
    if not problems and predictions:
        print(prediction_table(predictions), flush=True)
        for warning in dict.fromkeys(w for _, cfg in predictions for w in config_warnings(cfg)):
            log.warning("config: %s", warning)  # once per sweep, not once per trial
    return problems


# the lines OmegaConf lists under its message, which the cell's override already says
_OMEGACONF_DETAILS = ("full_key:", "reference_type=", "object_type=")
_HYDRA_SEARCH_PATH = "Config search path:"
_APPEND_HINT = "To append to your config use"


def composition_reason(error: Exception) -> str:
    """Why a cell does not compose, on one line, as a single run says it: Hydra's message and the
    OmegaConf error beneath it (hydra/_internal/utils.py run_and_report prints both), without
    OmegaConf's key/type listing, Hydra's config search path or the unfilled template of a chained
    error. A key the schema does not have gets the schema's keys beside it instead of Hydra's advice
    to append it with +, which a typed node would take and then ignore."""
    chain = _error_chain(error)
    parts = list(dict.fromkeys(part for e in chain for part in _message_parts(e)))
    if not isinstance(error, (HydraException, OmegaConfBaseException)):  # a bug: its type says most
        parts[:1] = [f"{type(error).__name__}: {parts[0] if parts else ''}".rstrip(": ")]
    missing = next((e for e in chain if isinstance(e, (ConfigAttributeError, ConfigKeyError))), None)
    if missing is not None and (hint := schema_hint(str(missing.full_key))):
        return ": ".join(p for p in parts if not p.startswith(_APPEND_HINT)) + f"; {hint}"
    return ": ".join(parts)


def _error_chain(error: BaseException) -> list[BaseException]:
    """`error` and the errors it was raised from, down to the first OmegaConf error (what follows it
    repeats it: its message template, the int() that failed)."""
    chain = [error]
    while not isinstance(chain[-1], OmegaConfBaseException):
        last = chain[-1]
        below = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if below is None or below in chain:
            break
        chain.append(below)
    return chain


def _message_parts(error: BaseException) -> list[str]:
    """The informative lines of an error's message; an indented list joined to the line that heads it
    ("Available options in 'adapter': dora, loha, lokr, lora")."""
    sections: list[list[str]] = []
    for line in str(error).splitlines():
        text = line.strip()
        if not text or "$VALUE" in text or text.startswith(_OMEGACONF_DETAILS):
            continue
        if line[:1].isspace() and sections:
            sections[-1].append(text)
        else:
            sections.append([text])
    return [f"{head} {', '.join(items)}".strip().rstrip(".") for head, *items in sections
            if head != _HYDRA_SEARCH_PATH]


def missing_data_paths(configs: list[DictConfig]) -> list[str]:
    """Each data.path of the sweep that is no folder, once for the whole sweep (every trial would fail on it
    in turn). Read as the trials read it (data/dataset.py resolve_source): a local folder, ~ expanded, a
    relative one from the folder the sweep is launched in (conf/config.yaml keeps hydra.job.chdir=false);
    not when data.dataset is set, which the trial trains on instead."""
    paths = dict.fromkeys(cfg.data.path for cfg in configs if cfg.data.path and not cfg.data.dataset)
    problems = []
    for path in paths:
        folder = Path(path).expanduser()
        if folder.is_dir():
            continue
        fault = "is a file, not a folder" if folder.exists() else "does not exist"
        where = "" if folder.is_absolute() else f" (relative to the launch folder {Path.cwd()})"
        problems.append(f"data.path={path} {fault}{where}: point data.path at a folder of images with captions "
                        "(metadata.jsonl, metadata.csv or a .txt beside each image), or leave it out for the "
                        "built-in set")
    return problems


def missing_encoder_weights(configs: list[DictConfig]) -> list[str]:
    """The CLIP and DINO weights scoring would load, where they are known not to be there (offline, not in
    the cache, no such file), once for the whole sweep: every trial would train first and then fail to score.
    The fixes name the download (size, one command) or a stand-in."""
    from sdsweep.config.encoders import clip_choice, dino_choice
    from sdsweep.eval.aesthetic import aesthetic_problem
    from sdsweep.eval.clip_weights import clip_problem
    from sdsweep.eval.dino import dino_problem

    scored = [cfg for cfg in configs if cfg.eval.enabled]
    clips = dict.fromkeys((*clip_choice(cfg), cfg.model.cache_dir) for cfg in scored
                          if set(cfg.eval.metrics) & set(CLIP_METRICS) or cfg.eval.aesthetic)
    dinos = dict.fromkeys((name, cfg.model.cache_dir) for cfg in scored if (name := dino_choice(cfg)))
    heads = dict.fromkeys((cfg.eval.aesthetic_weights, cfg.model.cache_dir, clip_choice(cfg)[0]) for cfg in scored
                          if cfg.eval.aesthetic)
    problems = [p for model, pretrained, cache in clips if (p := clip_problem(model, pretrained, cache))]
    problems += [p for name, cache in dinos if (p := dino_problem(name, cache))]
    return problems + [p for weights, cache, clip in heads if (p := aesthetic_problem(weights, cache, clip))]


def shared_folders(cells: list[list[str]]) -> list[str]:
    """Cells that would train in one trial folder: they differ only in keys that name no folder
    (config/identity.py), which change neither what is trained nor, for eval.*, anything a re-score
    cannot change; or their override_dirnames differ only in characters the folder name replaces.
    The names compared are the final folder names (conf/config.yaml: hydra.sweep.subdir is trial_dirname
    of Hydra's override_dirname)."""
    from hydra._internal.config_loader_impl import get_overrides_dirname
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sdsweep.config.identity import folder_excluded_keys

    excluded, parser = folder_excluded_keys(), OverridesParser.create()
    seen: dict[str, tuple[list[str], str]] = {}
    problems = []
    for cell in cells:
        # Hydra's own override_dirname, as conf/config.yaml's exclude_keys make it
        dirname = get_overrides_dirname(parser.parse_overrides(cell), excluded, item_sep=",", kv_sep="=")
        folder = trial_dirname(dirname)
        if folder in seen:
            other, other_dirname = seen[folder]
            problems.append(f"[{' '.join(cell)}] and [{' '.join(other)}] " + (
                _SAME_TRAINING if dirname == other_dirname else _SAME_NAME.format(folder=folder)))
        seen.setdefault(folder, (cell, dirname))
    return problems


_SAME_TRAINING = ("differ only in keys that change nothing trained (tracking.*, cache.*, sweep.*, device, "
                  "model.cache_dir, data.num_workers, eval.*), so they would share one trial folder: sweep one "
                  "value of them; for other eval settings re-score the trials (python -m sdsweep.eval TRIAL_DIR "
                  "eval.steps=30) or resume the sweep with them (sweep.resume=DIR eval.steps=30)")
_SAME_NAME = ("would share the trial folder {folder}: a folder name keeps only A-Z a-z 0-9 _ . , = + - of the "
              "overrides (the others become _): make their values differ in those characters")


def prediction_table(cells: list[tuple[list[str], DictConfig]]) -> str:
    """Each cell's predicted peak VRAM and whether it fits sweep.vram_budget_gb, as a text table."""
    cells = [(cell, cfg) for cell, cfg in cells if estimate_wanted(cfg)]
    if not cells:
        return "peak VRAM not predicted: a CPU run has no VRAM to budget (sweep.estimate=always predicts it)"
    rows = []
    for cell, cfg in cells:
        e, budget, cuda = planned_estimate(cfg), cfg.sweep.vram_budget_gb, runs_on_cuda(cfg)
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
