"""One trial, start to end: check, train, save the adapter, evaluate, and always leave a metrics.json.

`run_trial` never raises for a trial's own failure (bad config, NaN, out of memory, any
exception, even `sys.exit`): it records `status: failed` with the reason and frees what the
trial held, because Hydra's basic launcher runs every cell of a sweep in one process and
the next cell must start clean. Only Ctrl-C (KeyboardInterrupt) is passed on. A cell that
finished before with the same config is kept, one that cannot run here is pruned, and the
base model of a trial that ended cleanly is kept loaded for the next one (kept_base.py).
"""

from __future__ import annotations

import gc
import logging
import time
import traceback
from pathlib import Path

import torch
from omegaconf import DictConfig

from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate
from sdsweep.config.validate import warnings as config_warnings
from sdsweep.eval.evaluate import evaluate_trial, with_scores
from sdsweep.eval.sampling import sample_validation
from sdsweep.io import atomic_dir, atomic_write_json, describe_write_error, remove_leftovers, write_failure
from sdsweep.layout import TrialDir
from sdsweep.model import adapters, kept_base, textual_inversion
from sdsweep.model import load as models
from sdsweep.sweep.early_stop import Stopper
from sdsweep.sweep.preflight import missing_encoder_weights, repeated_cell_reason
from sdsweep.sweep.prune import planned_estimate, prune_reason
from sdsweep.sweep.resume import fingerprints, kept_trial
from sdsweep.train.loop import NonFiniteLoss, finish_ema, train
from sdsweep.train.meters import MemoryMeter
from sdsweep.train.setup import Setup, denoiser, restore_offloaded, setup
from sdsweep.train.tracking import Tracker, make_tracker

log = logging.getLogger(__name__)

def run_trial(
    cfg: DictConfig,
    trial_dir: Path,
    choices: dict | None = None,
    overrides: list[str] | None = None,
    group: str | None = None,
    trial_number: int = 0,
) -> dict:
    """Train one cell of the matrix in `trial_dir`; return (and write) its metrics.json.

    A cell that already finished with the same config (a resumed sweep) is kept as it is; a
    cell that cannot run on this machine is recorded as pruned without loading anything.
    """
    trial_dir = Path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {"choices": choices or {}, "overrides": list(overrides or []), "status": "running"}
    try:
        validate(cfg)
    except ConfigError as e:
        metrics.update(status="failed", reason=str(e))
        log.error("trial failed: %s", e)
        _write_metrics(trial_dir, metrics)
        return metrics
    if ignored := config_warnings(cfg):
        metrics["config_warnings"] = ignored
        if TrialDir(trial_dir).sweep is None:  # a sweep's preflight said it once for all its trials
            for warning in ignored:
                log.warning("config: %s", warning)
    metrics.update(fingerprints(cfg))
    if process_rank() == 0:  # the other processes of a multi-process trial write nothing, and remove nothing
        _clean_leftovers(trial_dir)
    if kept := kept_trial(trial_dir, cfg):
        return _rescored(cfg, trial_dir, kept.metrics) if kept.rescore else _kept_as_is(trial_dir, kept.metrics)
    # the prediction is recorded before anything is loaded (on a CPU run only with sweep.estimate=always)
    clock = time.perf_counter()
    metrics.update(planned_estimate(cfg).metrics())  # computed once per config and process (preflight's too)
    metrics["estimate_s"] = time.perf_counter() - clock
    if reason := prune_reason(cfg) or repeated_cell_reason(cfg, trial_dir, list(overrides or [])):
        metrics.update(status="pruned", reason=reason)
        log.warning("trial pruned: %s", reason)
        _write_metrics(trial_dir, metrics)
        return metrics
    if missing := missing_encoder_weights([cfg]):  # a sweep's preflight said so already; a single run says it here
        metrics.update(status="failed", reason="the encoders that would score it are missing: " + "; ".join(missing))
        log.error("trial not started: %s", metrics["reason"])
        _write_metrics(trial_dir, metrics)
        return metrics
    return _train_and_record(cfg, trial_dir, metrics, group, trial_number)


def _kept_as_is(trial_dir: Path, metrics: dict) -> dict:
    log.info("%s already %s with this config: kept as it is", trial_dir, metrics["status"])
    return metrics


def _rescored(cfg: DictConfig, trial_dir: Path, metrics: dict) -> dict:
    """A trial trained with this config but scored with other evaluation settings: its saved adapter
    is sampled and scored again (the base model loaded afresh), nothing is trained."""
    log.info("%s already finished with this training config; the eval settings changed: re-scoring it", trial_dir)
    metrics = with_scores(metrics, evaluate_trial(cfg, trial_dir), cfg)
    _write_metrics(trial_dir, metrics)
    return metrics


def process_rank() -> int:
    """This process's rank in a multi-process launch of one trial (torchrun, `accelerate launch`,
    mpirun), read as accelerate reads it; 0 when launched plainly. Only rank 0 writes files."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK"], 0)


def _write_metrics(trial_dir: Path, metrics: dict) -> None:
    """Write metrics.json; never raises (a full disk must not end the sweep): a failure is logged."""
    if process_rank() != 0:
        return
    path = TrialDir(trial_dir).metrics
    try:
        atomic_write_json(path, metrics)
    except Exception as e:  # noqa: BLE001 - the next trial of the sweep must still run
        log.error("%s not written (%s): this trial's status (%s) is not recorded; a resumed sweep trains it "
                  "again", path, describe_write_error(e, path), metrics.get("status"))


def _clean_leftovers(trial_dir: Path) -> None:
    """Remove what a killed write left in this trial's own folders (temporary files and folders, such as a
    half-written checkpoint with its optimizer state), and recover a folder a kill left renamed away.
    Only its own: the trials of a parallel launcher run side by side, and the sweep's shared base/ is
    written by all of them (the sweep callback cleans it before and after they run)."""
    trial = TrialDir(trial_dir)
    folders = [trial.path, trial.checkpoints, trial.samples, trial.debug_trace(0).parent]
    if trial.sweep is None:  # a single run's base model images are its own
        folders.append(trial.base_root)
    for folder in folders:
        try:
            for line in remove_leftovers(folder):
                log.info("left by an interrupted write: %s", line)
        except OSError as e:  # a folder we may not clean costs disk space, not the trial
            log.warning("could not clean the temporary files in %s (%s)", folder, e)


def _train_and_record(cfg: DictConfig, trial_dir: Path, metrics: dict, group: str | None, trial_number: int) -> dict:
    started = time.perf_counter()
    s: Setup | None = None
    memory: MemoryMeter | None = None
    tracker: Tracker = Tracker()
    clean = False
    main = process_rank() == 0  # the other processes of a multi-process trial train, and write nothing
    try:
        memory = MemoryMeter(models.resolve_device(cfg.device, trial_number))
        if main:
            tracker = make_tracker(cfg, trial_dir, metrics["choices"],
                                   group or cfg.tracking.group or trial_dir.parent.name, trial_dir.name)
        s = setup(cfg, trial_number, memory)
        metrics.update(_setup_figures(cfg, s))
        hook = _validation_hook(cfg, s, trial_dir, tracker)
        metrics.update(train(cfg, s, trial_dir, tracker, Stopper(cfg, trial_dir), hook))
        stopped = "early_stopped_at_step" in metrics  # kept (its adapter too), but not worth evaluating
        if main:
            finish_ema(s)  # train.ema_decay: the averaged weights are what is saved and evaluated
            metrics.update(_save_adapter(cfg, s, trial_dir))
        # the peak of training alone; evaluation (sampling, CLIP) is measured on its own below
        metrics.update(memory.summary_mb())
        _free_training_state(s)
        if main and not stopped:
            metrics.update(_evaluate(cfg, s, trial_dir))
        metrics["status"] = "stopped" if stopped else "finished"
        clean = "eval_error" not in metrics
    except KeyboardInterrupt:
        metrics.update(status="interrupted", reason="KeyboardInterrupt")
        raise
    except torch.cuda.OutOfMemoryError as e:
        metrics.update(status="failed", reason="out of memory", detail=str(e).splitlines()[0])
        if memory is not None:
            metrics["memory_at_failure"] = memory.read()
    except BaseException as e:  # noqa: BLE001 - SystemExit too: a sys.exit in a trial must not end the sweep
        if isinstance(e, NonFiniteLoss):  # the curve up to the failing step (its loss null) and its figures
            metrics.update(e.figures, steps_trained=len(e.figures.get("losses", [])))
        metrics.update(status="failed", reason=_failure_reason(e, trial_dir))
        metrics["traceback"] = traceback.format_exc(limit=8)
        log.error("trial failed: %s", metrics["reason"])
    finally:
        if memory is not None and "peak_memory_mb" not in metrics:
            metrics.update(memory.summary_mb())
        metrics["wall_s"] = time.perf_counter() - started
        # the other processes of a multi-process trial leave without waiting for rank 0's adapter,
        # evaluation and metrics.json (no collective follows; the launcher waits for every process)
        _write_metrics(trial_dir, metrics)
        try:
            _close_tracker(tracker, metrics)
        finally:
            _release(cfg, s, clean)
    return metrics


def _failure_reason(e: BaseException, trial_dir: Path) -> str:
    """The trial's reason: "disk full at <path>: N MiB free" when a write ran out of space (whatever
    the library raised: torch's "unexpected pos", safetensors' error, an OSError), else the exception."""
    if isinstance(e, Exception) and (failure := write_failure(e, trial_dir)) is not None:
        return str(failure)
    return f"{type(e).__name__}: {e}"


def _close_tracker(tracker: Tracker, metrics: dict) -> None:
    """The trial's summary to the tracker, and its end; an error here (a full disk too) is only a warning."""
    try:
        tracker.summary({k: v for k, v in metrics.items() if k not in ("losses", "traceback")})
        tracker.finish(failed=metrics["status"] not in ("finished", "pruned", "stopped"))
    except Exception as e:  # noqa: BLE001 - the trial's outcome is decided: the tracker only mirrors it
        log.warning("the tracker could not be closed (%s: %s)", type(e).__name__, e)


def _setup_figures(cfg: DictConfig, s: Setup) -> dict:
    trainable = sum(p.numel() for p in s.trainable.values())
    if cfg.adapter.kind == textual_inversion.KIND:  # its rows, not the embedding matrices that hold them
        trainable = textual_inversion.trained_count(s.components.trainable_text_encoders, cfg.adapter)
    return dict(
        device=str(s.device), data=s.data_report, trainable_params=trainable,
        total_params=sum(adapters.count_parameters(m, trainable=False) for m in s.components.modules().values()),
        **s.timings, offloaded_during_training=s.offloaded,
    )


def _save_adapter(cfg: DictConfig, s: Setup, trial_dir: Path) -> dict:
    clock = time.perf_counter()
    trial = TrialDir(trial_dir)
    if cfg.adapter.kind == textual_inversion.KIND:
        c = s.components
        n = len(c.trainable_text_encoders)
        with atomic_dir(trial.adapter) as tmp:
            textual_inversion.save(tmp, c.family, c.tokenizers[:n], c.trainable_text_encoders, cfg.adapter)
        folder = trial.adapter
    else:
        folder = adapters.save_adapter(trial.adapter, s.components.family, cfg.adapter.kind, _unwrapped_modules(s),
                                       trial_config=cfg)
    # the adapter's own weights: not the kohya copy of them, the model card or its images (sdsweep/export)
    extras = {trial.kohya_adapter, folder / "README.md"}
    weights = [f for f in folder.rglob("*") if f.is_file() and f not in extras and "images" not in f.relative_to(folder).parts]
    return {"adapter_mb": sum(f.stat().st_size for f in weights) / 2**20, "save_s": time.perf_counter() - clock}


def _evaluate(cfg: DictConfig, s: Setup, trial_dir: Path) -> dict:
    """Sample and score from the saved adapter; an evaluation error is recorded, never fails the trial."""
    memory = MemoryMeter(s.device)
    result = evaluate_trial(cfg, trial_dir, s.components)
    if cfg.eval.enabled:
        result["eval_peak_memory_mb"] = memory.summary_mb()["peak_memory_mb"]
    return result


def _validation_hook(cfg: DictConfig, s: Setup, trial_dir: Path, tracker: Tracker):
    """Sample the eval prompts and seeds at a training step (tracking.validation_every), with fixed
    seeds, so a grid cell compares across trials and time; None when validation is off."""
    if not cfg.tracking.validation_every:
        return None

    def validate_at(step: int) -> None:
        samples = sample_validation(cfg, s.components, s.autocast_dtype, TrialDir(trial_dir).validation(step))
        tracker.log_images("validation", [(f"{x.prompt} (seed {x.seed})", x.image) for x in samples], step)

    return validate_at


def _unwrapped_modules(s: Setup) -> dict[str, torch.nn.Module]:
    modules = s.components.modules()
    modules["unet"] = denoiser(s)
    return modules


def _free_training_state(s: Setup) -> None:
    """Optimizer state and gradients leave the GPU before evaluation samples with the same models."""
    s.optimizer.zero_grad(set_to_none=True)
    s.optimizer.state.clear()
    s.accelerator.free_memory()
    s.components.denoiser = denoiser(s)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    restore_offloaded(s)


def _release(cfg: DictConfig, s: Setup | None, clean: bool) -> None:
    """Free the trial's optimizer state (and its models, unless kept for the next trial)."""
    from accelerate.state import AcceleratorState

    if s is not None:
        s.accelerator.free_memory()
        components = s.components
        if components is not None:
            components.denoiser = denoiser(s)
        s.components = s.optimizer = s.trainable = None  # type: ignore[assignment]
        try:
            kept_base.give_back(cfg, components, s.device, clean)
        except Exception as e:  # noqa: BLE001 - never fail a finished trial for this: reload next time
            log.warning("the base model could not be kept for the next trial (%s); it will be reloaded", e)
            kept_base.drop()
        del components
    AcceleratorState._reset_state(reset_partial_state=True)
    if cfg.train.compile:
        # dynamo's caches hold this trial's graphs and count its recompilations: the next trial's
        # adapter would recompile the same code, and past torch's recompile limit run uncompiled
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
