"""Resuming a sweep: which finished trials are kept, and the overrides a sweep folder was launched with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sdsweep.layout import SweepDir, TrialDir


def config_fingerprint(cfg: DictConfig) -> str:
    """What a finished trial is compared with before it is skipped on resume."""
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    data.pop("tracking", None)  # where a trial is logged does not change what it trained
    data.pop("cache", None)  # nor whether its latents/text came from the feature cache (see cache.py)
    data.pop("sweep", None)  # nor how the sweep scheduled it (kept base, budget, early stopping)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def finished_result(trial_dir: Path, fingerprint: str) -> dict | None:
    """The kept metrics of a trial that ended with this very config, or None: finished, or stopped early
    (a verdict of the sweep, kept like a result: rerunning it would make the outcome depend on
    whether the sweep was interrupted)."""
    metrics = TrialDir(trial_dir).read_metrics()
    if metrics is not None and metrics.get("status") in ("finished", "stopped") and metrics.get("config_fingerprint") == fingerprint:
        return metrics
    return None


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
