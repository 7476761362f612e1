"""Hydra callbacks: what happens around a whole sweep (summary, exit status)."""

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
        for line in lines:
            (log.error if failed else log.info)(line)
