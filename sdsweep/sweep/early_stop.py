"""Early stopping of hopeless trials: the median stopping rule, on the training loss.

Hydra's sweepers launch each trial as one call and cannot stop it half-way (Optuna's pruners
need the objective to report intermediate values from inside the study), so a trial checks
itself: at each check step (`sweep.early_stop.at`, fractions of `train.max_steps`), it compares
its smoothed training loss with the smoothed losses the trials of the same sweep that already
finished had at that very step, and stops when it is worse than their median (Golovin et al.
2017, Google Vizier's median stopping rule; Optuna's MedianPruner).

Peers are the sibling trial folders of the sweep (their metrics.json, status `finished`, same
`train.max_steps`, same `model` and `data` in their .hydra/config.yaml): trials that ran earlier
with the basic launcher, or earlier batches of the joblib/submitit launchers. Trials running at
the same time do not see each other.

Comparing training losses across configurations is only meaningful within one sweep: every trial
of a seed sees the same images, noise and timesteps at each step, so the loss differences are the
configurations' and not the sampling's; a window mean (`sweep.early_stop.window`) smooths what noise
is left. A low training loss does not guarantee the best images: stopping is for trials that are
clearly behind (raise `margin` to stop only those).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from sdsweep.config.identity import trained_on
from sdsweep.layout import TrialDir

COMPARABLE = ("model", "data")
"""Config nodes a peer must share: another model or data set has another loss scale altogether."""


@dataclass
class Stop:
    """Why a trial was stopped: its figures at the check step, and its peers'."""

    step: int
    max_steps: int
    loss: float
    median: float
    peers: int

    @property
    def steps_saved(self) -> int:
        return self.max_steps - self.step

    def reason(self) -> str:
        return (f"stopped early at step {self.step} of {self.max_steps} (sweep.early_stop): smoothed loss "
                f"{self.loss:.4g} > median {self.median:.4g} of {self.peers} finished trials at that step; "
                f"{self.steps_saved} steps saved")


def check_steps(cfg: DictConfig) -> list[int]:
    """The steps at which this trial is checked, ascending (none when early stopping is off)."""
    es, n = cfg.sweep.early_stop, cfg.train.max_steps
    if not es.enabled or n < 2:
        return []
    return sorted({min(max(1, round(f * n)), n - 1) for f in es.at})


def window_mean(losses: list, step: int, window: int) -> float | None:
    """The mean loss of the `window` steps up to `step` (1-based); None if not all there and finite."""
    part = losses[max(0, step - window):step]
    if len(losses) < step or not part or any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in part):
        return None
    return sum(part) / len(part)


def _trained_on(cfg: DictConfig) -> dict:
    return trained_on(cfg, COMPARABLE)  # without the keys that change nothing trained (model.cache_dir, ...)


def _peer_trained_on(trial: TrialDir) -> dict | None:
    try:
        return _trained_on(OmegaConf.load(trial.config))
    except Exception:  # noqa: BLE001 - no or unreadable config: not a peer
        return None


def peer_losses(trial_dir: Path, step: int, max_steps: int, window: int, trained_on: dict) -> list[float]:
    """The smoothed losses at `step` of the finished trials of the same sweep that trained the same
    model on the same data (`trained_on`); none outside a sweep."""
    trial = TrialDir(trial_dir)
    sweep = trial.sweep
    if sweep is None:  # a single run: its siblings are unrelated runs
        return []
    values = []
    for peer in sweep.trial_dirs():
        m = peer.read_metrics()
        if peer.path == trial.path or m is None:
            continue
        if (m.get("status") == "finished" and m.get("steps") == max_steps
                and _peer_trained_on(peer) == trained_on):
            value = window_mean(m.get("losses") or [], step, window)
            if value is not None:
                values.append(value)
    return values


def verdict(cfg: DictConfig, trial_dir: Path, losses: list[float], step: int) -> Stop | None:
    """A Stop when this trial's smoothed loss at `step` is worse than its peers' median (times 1 + margin)."""
    es = cfg.sweep.early_stop
    mine = window_mean(losses, step, es.window)
    peers = peer_losses(trial_dir, step, cfg.train.max_steps, es.window, _trained_on(cfg))
    if mine is None or len(peers) < es.min_trials:
        return None
    median = statistics.median(peers)
    if mine > median * (1 + es.margin):
        return Stop(step, cfg.train.max_steps, mine, median, len(peers))
    return None


class Stopper:
    """Early stopping as the training loop asks for it: at each check step the losses have reached,
    the verdict against the sweep's finished peers (train/loop.py's Stopper protocol)."""

    def __init__(self, cfg: DictConfig, trial_dir: Path):
        self.cfg, self.trial_dir, self.checks = cfg, trial_dir, check_steps(cfg)

    def due(self, steps_logged: int) -> bool:
        """Whether a check step has been reached (the same answer on every process of a trial)."""
        return bool(self.checks) and self.checks[0] <= steps_logged

    def check(self, losses: list[float]) -> Stop | None:
        stop = None
        while stop is None and self.due(len(losses)):
            stop = verdict(self.cfg, self.trial_dir, losses, self.checks.pop(0))
        return stop
