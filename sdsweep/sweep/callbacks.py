"""Hydra callbacks: what happens around a whole sweep (summary, exit status, leaderboard)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("sdsweep")
SWEEP_DONE = False
FAILED_TRIALS = 0


def read_trials(sweep_dir: Path) -> list[tuple[Path, dict]]:
    """Every trial folder under `sweep_dir` with its metrics.json (the only source of truth)."""
    trials = []
    for metrics_file in sorted(Path(sweep_dir).glob("*/metrics.json")):
        try:
            trials.append((metrics_file.parent, json.loads(metrics_file.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            trials.append((metrics_file.parent, {"status": "failed", "reason": f"unreadable metrics.json: {e}"}))
    return trials


class SweepSummary(Callback):
    """At the end of a multirun: count finished and failed trials from their folders."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        global SWEEP_DONE, FAILED_TRIALS
        sweep_dir = Path(config.hydra.sweep.dir)
        trials = read_trials(sweep_dir)
        failed = [(d, m) for d, m in trials if m.get("status") not in ("finished", "pruned")]
        pruned = [(d, m) for d, m in trials if m.get("status") == "pruned"]
        SWEEP_DONE, FAILED_TRIALS = True, len(failed)
        finished = len(trials) - len(failed) - len(pruned)
        lines = [f"sweep {sweep_dir}: {finished} finished, {len(failed)} failed, {len(pruned)} pruned"]
        for d, m in failed:
            lines.append(f"  FAILED {d.name}: {m.get('reason')}")
        for d, m in pruned:
            lines.append(f"  PRUNED {d.name}: {m.get('reason')}")
        if stopped := [m for _, m in pruned if m.get("steps_saved")]:
            planned = sum(m.get("steps") or 0 for _, m in trials if m.get("status") == "finished") + sum(
                m["steps"] for m in stopped)
            saved = sum(m["steps_saved"] for m in stopped)
            lines.append(f"  early stopping (sweep.early_stop) stopped {len(stopped)} trial{'s' * (len(stopped) > 1)}: {saved} of "
                         f"{planned} training steps saved ({saved / max(planned, 1):.0%})")
        for line in lines:
            (log.error if failed else log.info)(line)
        write_leaderboard(sweep_dir, config)


def write_leaderboard(sweep_dir: Path, config: DictConfig) -> None:
    """leaderboard.csv + report.html + the table on the terminal (+ W&B); a bug here must not hide
    the trials' results, which stay in their folders: say how to rebuild instead."""
    from omegaconf import OmegaConf

    from sdsweep.board.leaderboard import write_all

    try:
        weights = OmegaConf.select(config, "eval.score_weights")
        write_all(sweep_dir, OmegaConf.to_container(weights) if weights is not None else None,
                  tracking=OmegaConf.select(config, "tracking"))
    except Exception as e:  # noqa: BLE001
        log.exception("leaderboard not written (%s: %s); rebuild it with `python -m sdsweep.leaderboard %s`",
                      type(e).__name__, e, sweep_dir)
