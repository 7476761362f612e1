"""Where a trial's figures go: a local JSONL log always, W&B when tracking is on.

The loop calls one `Tracker` and never asks whether W&B is there (null object, as in
nanochat's dummy W&B run). W&B is a mirror: metrics.json and train_log.jsonl in the trial
folder are the source of truth, so an unreachable server, a missing API key or any W&B error
degrades to offline (or to nothing) with one warning and never fails or stalls a trial.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sdsweep.config.schema import ABLATION_AXES
from sdsweep.io import atomic_write_bytes
from sdsweep.layout import TrialDir

log = logging.getLogger(__name__)


class Tracker:
    """The interface, and the null sink (tracking.mode=disabled)."""

    def log(self, metrics: dict[str, Any], step: int) -> None: ...

    def rewind(self, step: int) -> None:
        """Forget what was logged after `step`: the trial resumes there and logs those steps again."""

    def log_images(self, key: str, images: list[tuple[str, Any]], step: int) -> None: ...

    def save_file(self, path: Path) -> None: ...

    def summary(self, metrics: dict[str, Any]) -> None: ...

    def finish(self, failed: bool) -> None: ...


class JsonlTracker(Tracker):
    """train_log.jsonl in the trial folder: one line per logged step, appended; a resumed trial
    first rewinds it to its checkpoint, so each step is in it once."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, metrics: dict[str, Any], step: int) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")

    def rewind(self, step: int) -> None:
        """Drop the rows of steps after `step` (logged by the attempt that was killed or failed after
        its last checkpoint) and a line cut short (a kill or a full disk mid-write); the rows kept
        stay byte for byte. Rewritten atomically, and only when something is dropped."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        kept, dropped, broken = rows_up_to(data, step)
        if kept == data:
            return
        atomic_write_bytes(self.path, kept)
        if broken:
            log.warning("%s: dropped %d line(s) that are not a complete JSON row (a write cut short)",
                        self.path, broken)
        log.info("%s: dropped the %d row(s) after step %d, which this attempt logs again", self.path, dropped, step)


def rows_up_to(data: bytes, step: int) -> tuple[bytes, int, int]:
    """The lines of a JSONL log whose row has a step <= `step`, unchanged; and how many rows were
    dropped for a later step and how many lines for not being a complete row (unparseable, or the
    last line without its newline: json.dumps never writes one inside a row)."""
    *lines, tail = data.split(b"\n")
    kept, dropped, broken = [], 0, int(bool(tail))
    for line in lines:
        row_step = _row_step(line)
        if row_step is None:
            broken += 1
        elif row_step <= step:
            kept.append(line + b"\n")
        else:
            dropped += 1
    return b"".join(kept), dropped, broken


def _row_step(line: bytes) -> int | None:
    try:
        row = json.loads(line)
    except ValueError:  # JSONDecodeError and UnicodeDecodeError
        return None
    step = row.get("step") if isinstance(row, dict) else None
    return step if type(step) is int else None


class WandbTracker(Tracker):
    """One W&B run per trial, grouped by sweep; every call is guarded so W&B can never fail a trial."""

    def __init__(self, run):
        self.run = run
        self.broken = False

    def _guard(self, what: str, fn, *args, **kwargs) -> None:
        if self.broken:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - any W&B error degrades, never fails the trial
            self.broken = True
            log.warning("W&B %s failed (%s: %s): W&B logging stops for this trial; metrics.json is "
                        "unaffected", what, type(e).__name__, e)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard("log", self.run.log, {**metrics, "step": step}, step=step)

    # rewind: nothing to do, every attempt of a trial is a W&B run of its own (wandb.init per attempt)

    def log_images(self, key: str, images: list[tuple[str, Any]], step: int) -> None:
        import wandb

        self._guard("log_images", lambda: self.run.log(
            {key: [wandb.Image(img, caption=caption) for caption, img in images]}, step=step))

    def save_file(self, path: Path) -> None:
        self._guard("save", self.run.save, str(path), base_path=str(path.parent.parent), policy="now")

    def summary(self, metrics: dict[str, Any]) -> None:
        def update():
            for key, value in metrics.items():
                if isinstance(value, (int, float, str, bool)) or value is None:
                    self.run.summary[key] = value

        self._guard("summary", update)

    def finish(self, failed: bool) -> None:
        self._guard("finish", self.run.finish, exit_code=1 if failed else 0)


class FanOut(Tracker):
    def __init__(self, *sinks: Tracker):
        self.sinks = sinks

    def log(self, metrics, step):
        for s in self.sinks:
            s.log(metrics, step)

    def rewind(self, step):
        for s in self.sinks:
            s.rewind(step)

    def log_images(self, key, images, step):
        for s in self.sinks:
            s.log_images(key, images, step)

    def save_file(self, path):
        for s in self.sinks:
            s.save_file(path)

    def summary(self, metrics):
        for s in self.sinks:
            s.summary(metrics)

    def finish(self, failed):
        for s in self.sinks:
            s.finish(failed)


def run_config(cfg: DictConfig, choices: dict[str, str]) -> dict[str, Any]:
    """The full resolved config, plus each ablation axis's chosen option as a top-level key,
    so a W&B dashboard can group and filter by `adapter`, `targets`, ... with no set-up."""
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    for axis in ABLATION_AXES:
        config[axis] = {**config.get(axis, {}), "option": choices.get(axis)}
        config[f"{axis}_option"] = choices.get(axis)
    return config


def _init_wandb(cfg: DictConfig, trial_dir: Path, choices: dict[str, str], group: str, name: str):
    import wandb

    t = cfg.tracking
    kwargs = dict(
        project=t.project, entity=t.entity, group=group, name=name, dir=str(trial_dir),
        config=run_config(cfg, choices), reinit="finish_previous",
        settings=wandb.Settings(init_timeout=t.init_timeout, silent=True, console="off"),
    )
    try:
        return wandb.init(mode=t.mode, **kwargs)
    except Exception as e:  # noqa: BLE001 - no key, no server, bad entity: degrade, don't fail
        if t.mode != "online":
            raise
        log.warning("W&B online failed (%s: %s); logging offline instead. Upload later with "
                    "`wandb sync %s/wandb/offline-run-*`", type(e).__name__, str(e).splitlines()[0], trial_dir)
        return wandb.init(mode="offline", **kwargs)


def make_tracker(cfg: DictConfig, trial_dir: Path, choices: dict[str, str], group: str, name: str) -> Tracker:
    sinks: list[Tracker] = [JsonlTracker(TrialDir(trial_dir).train_log)]
    if cfg.tracking.mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            sinks.append(WandbTracker(_init_wandb(cfg, trial_dir, choices, group, name)))
        except Exception as e:  # noqa: BLE001
            log.warning("W&B could not start (%s: %s): this trial is tracked in metrics.json and "
                        "train_log.jsonl only", type(e).__name__, e)
    return FanOut(*sinks)


def make_profiler(cfg: DictConfig, trial_dir: Path):
    """torch.profiler over the steps [wait + warmup, + active): where time and memory go."""
    if not cfg.tracking.profile:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t = cfg.tracking
    prof = profile(activities=activities, schedule=schedule(wait=t.profile_wait, warmup=t.profile_warmup,
                                                            active=t.profile_active, repeat=1),
                   record_shapes=True, profile_memory=True, with_stack=False)
    prof.start()
    return prof


def finish_profiler(prof, trial_dir: Path, tracker: Tracker) -> None:
    prof.stop()
    out = TrialDir(trial_dir).profile
    out.mkdir(exist_ok=True)
    try:
        prof.export_chrome_trace(str(out / "trace.json"))
        sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        (out / "summary.txt").write_text(prof.key_averages().table(sort_by=sort, row_limit=30))
    except (RuntimeError, AssertionError) as e:  # the window never completed (max_steps too small)
        log.warning("profiler recorded no complete window (%s): raise train.max_steps above "
                    "tracking.profile_wait + profile_warmup + profile_active", e)
        return
    tracker.save_file(out / "trace.json")
    tracker.save_file(out / "summary.txt")
