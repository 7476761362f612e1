"""Hydra callbacks: what happens around a whole sweep (summary, exit status, leaderboard)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sdsweep.io import atomic_write_json
from sdsweep.layout import SweepDir

log = logging.getLogger("sdsweep")
SUMMARIES: list[Path] = []
"""summary.json of each sweep this process ran, for __main__'s exit status: Hydra builds callbacks
from the config and hands no result of the sweep back to the code that called hydra.main."""


class SweepSummary(Callback):
    """At the end of a multirun: count finished and failed trials from their folders."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = SweepDir(config.hydra.sweep.dir)
        summary = summarize(sweep)
        atomic_write_json(sweep.summary, summary)
        SUMMARIES.append(sweep.summary)
        for line in summary["lines"]:
            (log.error if summary["failed"] else log.info)(line)
        write_leaderboard(sweep.path, config)


def summarize(sweep: SweepDir) -> dict:
    """Counts by status, each failed and pruned trial with its reason, and what early stopping saved."""
    trials = sweep.trials()
    failed = [(d, m) for d, m in trials if m.get("status") not in ("finished", "pruned", "stopped")]
    pruned = [(d, m) for d, m in trials if m.get("status") == "pruned"]
    stopped = [m for _, m in trials if m.get("status") == "stopped"]
    finished = len(trials) - len(failed) - len(pruned) - len(stopped)
    lines = [f"sweep {sweep.path}: {finished} finished, {len(failed)} failed, {len(pruned)} pruned, "
             f"{len(stopped)} stopped early"]
    lines += [f"  FAILED {d.name}: {m.get('reason')}" for d, m in failed]
    lines += [f"  PRUNED {d.name}: {m.get('reason')}" for d, m in pruned]
    if stopped:
        planned = sum(m.get("steps") or 0 for _, m in trials if m.get("status") == "finished") + sum(
            m["steps"] for m in stopped)
        saved = sum(m["steps_saved"] for m in stopped)
        lines.append(f"  early stopping (sweep.early_stop) stopped {len(stopped)} trial{'s' * (len(stopped) > 1)}: "
                     f"{saved} of {planned} training steps saved ({saved / max(planned, 1):.0%})")
    return {"finished": finished, "failed": len(failed), "pruned": len(pruned), "stopped": len(stopped),
            "trials": {d.name: m.get("status") for d, m in trials}, "lines": lines}


def write_leaderboard(sweep_dir: Path, config: DictConfig) -> None:
    """leaderboard.csv + report.html + the table on the terminal (+ W&B); a bug here must not hide
    the trials' results, which stay in their folders: say how to rebuild instead."""
    from sdsweep.board.leaderboard import write_all

    try:
        weights = OmegaConf.select(config, "eval.score_weights")
        write_all(sweep_dir, OmegaConf.to_container(weights) if weights is not None else None,
                  tracking=OmegaConf.select(config, "tracking"))
    except Exception as e:  # noqa: BLE001
        log.exception("leaderboard not written (%s: %s); rebuild it with `python -m sdsweep.board %s`",
                      type(e).__name__, e, sweep_dir)
