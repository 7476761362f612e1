"""Hydra callbacks: what happens around a whole sweep (summary, exit status, leaderboard)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from sdsweep.io import atomic_write_json, describe_write_error, remove_leftovers, write_failure
from sdsweep.layout import SweepDir

log = logging.getLogger("sdsweep")
SUMMARIES: list[Path] = []
"""summary.json of each sweep this process ran (when it could be written), for __main__'s exit status:
Hydra builds callbacks from the config and hands no result of the sweep back to the code that called hydra.main."""


class SweepSummary(Callback):
    """Around a multirun: the sweep folder's leftover temporary files removed at its start and end;
    at its end, finished and failed trials counted from their folders, and the leaderboard."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        clean_sweep_folder(SweepDir(config.hydra.sweep.dir))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        """A report that can be watched: the board is rewritten after every trial of a sweep, quietly (the
        table, W&B and the summary come at the end). With parallel trials the writes may overtake each other;
        each is atomic and the sweep's end writes the complete board."""
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
        if sweep_dir and SweepDir(sweep_dir).is_sweep():
            write_leaderboard(Path(sweep_dir), config, final=False)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = SweepDir(config.hydra.sweep.dir)
        clean_sweep_folder(sweep)
        summary = summarize(sweep)
        try:
            atomic_write_json(sweep.summary, summary)
            SUMMARIES.append(sweep.summary)
        except Exception as e:  # noqa: BLE001 - the lines below and the leaderboard still matter
            log.error("%s not written (%s)", sweep.summary, describe_write_error(e, sweep.summary))
        for line in summary["lines"]:
            (log.error if summary["failed"] else log.info)(line)
        write_leaderboard(sweep.path, config)


def clean_sweep_folder(sweep: SweepDir) -> None:
    """What killed writes left at the top of the sweep folder (`.leaderboard.csv.*.tmp`, ...) and in its
    base/; only called while no trial of the sweep runs. The trials clean their own folders as they start."""
    for folder in (sweep.path, sweep.base_root):
        try:
            for line in remove_leftovers(folder):
                log.info("left by an interrupted write: %s", line)
        except OSError as e:
            log.warning("could not clean the temporary files in %s (%s)", folder, e)


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
        planned = sum(_steps(m, "steps") for _, m in trials if m.get("status") == "finished") + sum(
            _steps(m, "steps") for m in stopped)
        saved = sum(_steps(m, "steps_saved") for m in stopped)
        lines.append(f"  early stopping (sweep.early_stop) stopped {len(stopped)} trial{'s' * (len(stopped) > 1)}: "
                     f"{saved} of {planned} training steps saved ({saved / max(planned, 1):.0%})")
    return {"finished": finished, "failed": len(failed), "pruned": len(pruned), "stopped": len(stopped),
            "trials": {d.name: m.get("status") for d, m in trials}, "lines": lines}


def write_leaderboard(sweep_dir: Path, config: DictConfig, final: bool = True) -> None:
    """leaderboard.csv + effects.csv + report.html, and when `final` the table on the terminal (+ W&B); a
    bug here must not hide the trials' results, which stay in their folders: say how to rebuild instead."""
    from sdsweep.board.leaderboard import write_all

    try:
        weights = OmegaConf.select(config, "eval.score_weights")
        write_all(sweep_dir, OmegaConf.to_container(weights) if weights is not None else None,
                  tracking=OmegaConf.select(config, "tracking") if final else None, echo=final)
    except Exception as e:  # noqa: BLE001
        rebuild = f"rebuild it with `python -m sdsweep.board {sweep_dir}`"
        if (failure := write_failure(e, sweep_dir)) is not None or isinstance(e, OSError):
            # a full disk, a read-only folder: one line says it all
            log.error("leaderboard not written (%s); %s", failure or f"{type(e).__name__}: {e}", rebuild)
        else:  # a bug: its traceback is what fixes it
            log.exception("leaderboard not written (%s: %s); %s", type(e).__name__, e, rebuild)


def _steps(metrics: dict, key: str) -> int:
    """A step count of a trial's record, 0 where a damaged or hand-edited record has none."""
    value = metrics.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
