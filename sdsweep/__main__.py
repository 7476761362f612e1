"""`python -m sdsweep` runs one trial; `python -m sdsweep -m key=a,b ...` sweeps the matrix."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sdsweep.config.schema import GROUPS
from sdsweep.config.store import register_configs
from sdsweep.layout import SweepDir, TrialDir

register_configs()
log = logging.getLogger("sdsweep")
_single_run_status: list[str] = []
_running: dict[str, Path] = {}
"""Where this process is, for the line Ctrl-C prints: "sweep" (absolute) once a trial of a sweep started,
"trial" while run_trial runs."""


@hydra.main(version_base="1.3", config_path="pkg://sdsweep.conf", config_name="config")
def trial(cfg: DictConfig) -> float | None:
    from sdsweep.sweep.collector import freeze_libraries
    from sdsweep.sweep.trial import process_rank, run_trial

    _quiet_libraries()  # again here: joblib and submitit run trials in fresh processes
    freeze_libraries(cfg)  # before the first trial: its gc.collect() calls then skip the libraries' objects
    if process_rank() > 0:  # one trial on several processes: rank 0 speaks for all of them
        logging.getLogger().setLevel(logging.WARNING)
    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    # one W&B group per sweep (or per single run), named after its folder
    root = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else Path(hc.runtime.output_dir)
    group = "_".join(root.parts[-2:])
    if hc.mode == RunMode.MULTIRUN:
        _running["sweep"] = Path(hc.runtime.cwd, hc.sweep.dir)  # hc.sweep.dir is relative to the launch folder
    _running["trial"] = Path(hc.runtime.output_dir)
    metrics = run_trial(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task), group=group,
                        trial_number=hc.job.num if hc.mode == RunMode.MULTIRUN else 0)
    _running.pop("trial")  # between trials from here on
    _single_run_status.append(metrics["status"])
    if metrics["status"] == "finished":
        log.info("trial finished: final loss %.4f in %.1f s -> %s", metrics["final_loss"], metrics["wall_s"],
                 hc.runtime.output_dir)
    else:  # run_trial logged the reason when it happened
        log.error("trial %s (reason above) -> %s", metrics["status"], Path(hc.runtime.output_dir) / "metrics.json")
    return metrics.get("final_loss")


def _quiet_libraries() -> None:
    """Progress bars and cast notices of diffusers/transformers drown the trial's own log lines."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    # W&B and the hub must never block the embedded default; users opt in with tracking.mode=online
    os.environ.setdefault("WANDB_SILENT", "true")
    # the same as _quiet_libraries() for the libraries not imported yet, without importing them: a
    # typo or a bad cell is reported in seconds, not after diffusers' ~10 s import
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    _running.clear()  # a second main() in one process (the tests) starts afresh
    try:
        _launch()
    except KeyboardInterrupt:  # trial.py recorded `interrupted` in the trial's metrics.json and re-raised
        print(f"sdsweep: {_interrupted(sys.argv[1:])}", file=sys.stderr)
        sys.exit(130)  # 128 + SIGINT, as a shell reports a program Ctrl-C stopped


def _launch() -> None:
    from sdsweep.sweep import callbacks

    sys.argv[1:] = _expand_resume(sys.argv[1:])
    if problem := _multiprocess_problem(sys.argv[1:]):
        print(f"sdsweep: {problem}", file=sys.stderr)
        sys.exit(2)
    if _is_multirun(sys.argv[1:]):
        from sdsweep.sweep.preflight import preflight

        problems = preflight([a for a in sys.argv[1:] if not a.startswith("-")])
        if problems:
            print("sdsweep: the sweep was not launched; fix these first:", file=sys.stderr)
            for problem in problems:
                print(f"  - {problem}", file=sys.stderr)
            sys.exit(2)

    trial()  # hydra.main parses sys.argv
    sys.exit(1 if _any_failed(callbacks.SUMMARIES, _is_multirun(sys.argv[1:])) else 0)


def _interrupted(args: list[str]) -> str:
    """The one line Ctrl-C prints instead of a traceback: what stopped, and the command that continues it."""
    trial_dir = _running.get("trial")
    if _is_multirun(args):
        return _interrupted_sweep(args, trial_dir)
    if trial_dir is None:
        return "interrupted (Ctrl-C) before the run started: nothing was trained; run the same command again"
    # train/loop.py: the same config run again in the same folder continues from its newest checkpoint
    from sdsweep.train.checkpoints import list_checkpoints

    command = shlex.join(["python", "-m", "sdsweep", *(a for a in args if not a.startswith("hydra.run.dir=")),
                          f"hydra.run.dir={trial_dir}"])
    saved = list_checkpoints(TrialDir(trial_dir).checkpoints)
    then = (f"from its newest checkpoint, {saved[-1].name}" if saved else
            "from step 0: it wrote no checkpoint yet (train.checkpoint_every)")
    return f"interrupted (Ctrl-C): run {trial_dir} stopped; continue it ({then}) with: {command}"


def _interrupted_sweep(args: list[str], trial_dir: Path | None) -> str:
    # a launcher that runs the trials in other processes (joblib, submitit) leaves only hydra.sweep.dir here
    given = [Path(a.split("=", 1)[1]) for a in args if a.startswith("hydra.sweep.dir=")]
    sweep_dir = _running.get("sweep") or (given[-1].absolute() if given else None)
    if sweep_dir is None and any(a.startswith("hydra/launcher=") for a in args):
        return ("interrupted (Ctrl-C); if the sweep's folder (hydra.sweep.dir, multirun/DATE/TIME by default) "
                "holds a multirun.yaml, continue it with: python -m sdsweep sweep.resume=THAT_FOLDER")
    if sweep_dir is None or not SweepDir(sweep_dir).is_sweep():
        return ("interrupted (Ctrl-C) before the sweep's first trial started: nothing was trained; "
                "run the same command again")
    where = f"in trial {trial_dir} of sweep {sweep_dir}" if trial_dir else f"in sweep {sweep_dir}"
    command = shlex.join(["python", "-m", "sdsweep", f"sweep.resume={sweep_dir}"])
    return f"interrupted (Ctrl-C) {where}; continue the sweep with: {command}"


def _any_failed(summaries: list, sweep: bool) -> bool:
    """A sweep's outcome is its summary.json (written from the trial folders at its end; a sweep whose
    summary could not be written, a full disk, failed); a single run's, the status run_trial returned."""
    import json

    if sweep:
        return not summaries or json.loads(summaries[-1].read_text())["failed"] > 0
    return "failed" in _single_run_status


def _multiprocess_problem(args: list[str]) -> str | None:
    """One trial on several processes (`accelerate launch --multi_gpu`, torchrun) needs every process
    to run hydra.main into the same folder: the default one is named after the second it starts in."""
    from accelerate.utils import get_int_from_env

    world = get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)
    if world < 2:
        return None
    if _is_multirun(args):
        return (f"launched as {world} processes, which train one trial together: run a sweep (-m) with "
                "plain `python -m sdsweep -m ...` (hydra/launcher=parallel puts trials on several GPUs)")
    if not any(a.startswith("hydra.run.dir=") for a in args):
        return (f"launched as {world} processes: give them one folder with hydra.run.dir=DIR, e.g. "
                "accelerate launch --multi_gpu --num_processes 2 -m sdsweep hydra.run.dir=runs/my-style ...")
    return None


def _is_multirun(args: list[str]) -> bool:
    return "-m" in args or "--multirun" in args


def _expand_resume(args: list[str]) -> list[str]:
    """`sweep.resume=DIR`: rerun the sweep in DIR with the overrides it was launched with.

    Finished trials are kept, trials with checkpoints continue from them, the rest run. Only the saved
    overrides of what sdsweep defines are replayed (sweep/resume.py refusal); each other one is named.
    """
    resume = [a for a in args if a.startswith("sweep.resume=")]
    if not resume:
        return args
    from sdsweep.sweep.resume import NotASweep, resume_overrides

    sweep_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    rest = [a for a in args if not a.startswith("sweep.resume=") and a not in ("-m", "--multirun")]
    try:
        resumed = resume_overrides(sweep_dir, rest)
    except (FileNotFoundError, NotASweep) as e:
        print(f"sdsweep: {e}", file=sys.stderr)
        sys.exit(2)
    for refused in resumed.refused:
        print(f"sdsweep: warning: sweep.resume: not replaying {refused.override!r} from "
              f"{SweepDir(sweep_dir).multirun}: {refused.reason}; if you trust it, give it on the command line",
              file=sys.stderr)
    return ["-m", *resumed.overrides]


if __name__ == "__main__":
    main()
