"""`python -m sdsweep` runs one trial; `python -m sdsweep -m key=a,b ...` sweeps the matrix."""

from __future__ import annotations

import logging
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from sdsweep.config.schema import GROUPS
from sdsweep.config.store import register_configs

register_configs()
log = logging.getLogger("sdsweep")
_single_run_status: list[str] = []


@hydra.main(version_base="1.3", config_path="pkg://sdsweep.conf", config_name="config")
def trial(cfg: DictConfig) -> float | None:
    from pathlib import Path

    from sdsweep.sweep.trial import process_rank, run_trial

    _quiet_libraries()  # again here: joblib and submitit run trials in fresh processes
    if process_rank() > 0:  # one trial on several processes: rank 0 speaks for all of them
        logging.getLogger().setLevel(logging.WARNING)
    hc = HydraConfig.get()
    choices = {g: hc.runtime.choices.get(g) for g in GROUPS}
    # one W&B group per sweep (or per single run), named after its folder
    root = Path(hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else Path(hc.runtime.output_dir)
    group = "_".join(root.parts[-2:])
    metrics = run_trial(cfg, Path(hc.runtime.output_dir), choices, list(hc.overrides.task), group=group,
                        trial_number=hc.job.num if hc.mode == RunMode.MULTIRUN else 0)
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
    sys.exit(1 if _any_failed(callbacks.SUMMARIES) else 0)


def _any_failed(summaries: list) -> bool:
    """A sweep's outcome is its summary.json (written from the trial folders at its end); a single
    run's, the status run_trial returned."""
    import json

    if summaries:
        return json.loads(summaries[-1].read_text())["failed"] > 0
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

    Finished trials are kept, trials with checkpoints continue from them, the rest run.
    """
    resume = [a for a in args if a.startswith("sweep.resume=")]
    if not resume:
        return args
    from pathlib import Path

    from sdsweep.sweep.resume import resume_overrides

    sweep_dir = Path(resume[-1].split("=", 1)[1]).expanduser()
    rest = [a for a in args if not a.startswith("sweep.resume=") and a not in ("-m", "--multirun")]
    try:
        return ["-m", *resume_overrides(sweep_dir, rest)]
    except FileNotFoundError as e:
        print(f"sdsweep: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
