"""Resuming a sweep: which finished trials are kept, and the overrides a sweep folder was launched with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sdsweep.config.identity import evaluation_fingerprint, fingerprint_without, training_fingerprint
from sdsweep.layout import SweepDir, TrialDir


def fingerprints(cfg: DictConfig) -> dict[str, str]:
    """What a trial's metrics.json records of its config, to be compared on resume (config/identity.py)."""
    return {"config_fingerprint": training_fingerprint(cfg), "eval_fingerprint": evaluation_fingerprint(cfg)}


def _legacy_fingerprint(cfg: DictConfig) -> str:
    """The fingerprint metrics.json held before identity.py (everything but tracking, cache and sweep,
    evaluation included), so that sweeps run before it resume without training again."""
    return fingerprint_without(cfg, ("tracking", "cache", "sweep"))


@dataclass
class Kept:
    """A trial that already ended with this training config: kept as it is, or re-scored first."""

    metrics: dict
    rescore: bool
    """True when its evaluation settings changed (and evaluation is on): score the saved adapter again."""


def kept_trial(trial_dir: Path, cfg: DictConfig) -> Kept | None:
    """The trial in `trial_dir` if it ended with this very training config, or None (train it).

    Finished, or stopped early (a verdict of the sweep, kept like a result: rerunning it would make
    the outcome depend on whether the sweep was interrupted)."""
    metrics = TrialDir(trial_dir).read_metrics()
    if metrics is None or metrics.get("status") not in ("finished", "stopped"):
        return None
    mine, stored = fingerprints(cfg), metrics.get("config_fingerprint")
    if stored == _legacy_fingerprint(cfg):
        return Kept(metrics, rescore=False)
    if stored != mine["config_fingerprint"]:
        return None
    changed = metrics.get("eval_fingerprint") != mine["eval_fingerprint"]
    return Kept(metrics, rescore=changed and metrics["status"] == "finished" and bool(cfg.eval.enabled))


def resume_overrides(sweep_dir: Path, extra: list[str]) -> list[str]:
    """The overrides that launched `sweep_dir` (from its multirun.yaml), plus `extra`, pointed at it."""
    saved = SweepDir(sweep_dir).multirun
    if not saved.exists():
        raise FileNotFoundError(
            f"sweep.resume={sweep_dir}: no multirun.yaml there; give the folder of a sweep started with -m"
        )
    task = list(OmegaConf.load(saved).hydra.overrides.task)
    given = {o.split("=", 1)[0] for o in extra}
    kept = [o for o in task if o.split("=", 1)[0] not in given]
    return [*kept, *extra, f"hydra.sweep.dir={sweep_dir}"]
