"""What a sweep folder's multirun.yaml can make `sweep.resume` do, and what Ctrl-C leaves on the terminal.

The CLI runs in this process (`sdsweep.__main__.main` with sys.argv set), not in a subprocess."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

from sdsweep import __main__ as cli
from sdsweep.sweep import trial as trial_module
from sdsweep.sweep.resume import Refused, refusal, resume_overrides

HOOK = "sets Hydra itself (hydra.*: its callbacks, launchers and search path can run any code)"


def run_main(monkeypatch, args: list[str]) -> int:
    """`python -m sdsweep ARGS` in this process; its exit status. Ctrl-C escaping main() fails the test
    (pytest would take it for the user's and stop the session)."""
    monkeypatch.setattr(sys, "argv", ["sdsweep", *args])
    GlobalHydra.instance().clear()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main(): the user gets its traceback")
    finally:
        GlobalHydra.instance().clear()
    return exit_.value.code


def write_multirun(sweep: Path, task: list[str]) -> Path:
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": {"hydra": [], "task": task}}}))
    return sweep


def test_a_sweep_folder_cannot_make_resume_call_code(cache_dir, tmp_path, monkeypatch, capsys):
    """A downloaded sweep folder whose multirun.yaml adds a Hydra callback (any callable, here
    shutil.copyfile): the resumed sweep runs without it, says so, and the callable never runs."""
    source, written = tmp_path / "secret.txt", tmp_path / "copied.txt"
    source.write_text("not to be copied")
    hook = f"+hydra.callbacks.x={{_target_:shutil.copyfile,_args_:[{source},{written}]}}"
    sweep = write_multirun(tmp_path / "sweep", [f"model.cache_dir={cache_dir}", "train.max_steps=1",
                                                "eval.enabled=false", "tracking.mode=disabled", "device=cpu", hook])
    assert run_main(monkeypatch, [f"sweep.resume={sweep}"]) == 0
    assert not written.exists()
    err = capsys.readouterr().err
    assert (f"sdsweep: warning: sweep.resume: not replaying {hook!r} from {sweep / 'multirun.yaml'}: {HOOK}; "
            "if you trust it, give it on the command line") in err.splitlines()
    assert json.loads((sweep / "train.max_steps=1" / "metrics.json").read_text())["status"] == "finished"


def test_resume_replays_only_what_sdsweep_defines(tmp_path):
    saved = ["adapter=lora,dora", "+experiment=sdxl_t4", "scale=tiny", "eval.score_weights.kid=0",
             "sweep.early_stop.enabled=true", "train.max_steps=4", "~text_encoder",
             "hydra/launcher=parallel", "+adapter.rnak=4", "+experiment=../../elsewhere", "adapter@x=lora",
             "data.path=${oc.env:HOME}", "eval.prompts=[{_target_:os.getcwd}]", "sweep.resume=/x"]
    sweep = write_multirun(tmp_path / "sweep", saved)
    resumed = resume_overrides(sweep, ["+train.max_steps=8", "+adapter.rnak=2", "--cfg", "job"])
    # the command line's key replaces the saved one, parsed (+train.max_steps is train.max_steps), and is
    # the user's own: replayed as typed
    assert resumed.overrides == ["adapter=lora,dora", "+experiment=sdxl_t4", "scale=tiny", "eval.score_weights.kid=0",
                                 "sweep.early_stop.enabled=true", "~text_encoder", "+train.max_steps=8",
                                 "+adapter.rnak=2", "--cfg", "job", f"hydra.sweep.dir={sweep}"]
    assert resumed.refused == [
        Refused("hydra/launcher=parallel", HOOK),
        Refused("+experiment=../../elsewhere", "experiment=../../elsewhere is no option of the config group "
                "experiment that ships with sdsweep (sd3_medium, sdxl_t4)"),
        Refused("adapter@x=lora", "puts a config group at a package (@x), which no sdsweep option needs"),
        Refused("data.path=${oc.env:HOME}",
                "its value is an interpolation (${...}), resolved by code when the config is composed"),
        Refused("eval.prompts=[{_target_:os.getcwd}]",
                "its value names a callable (_target_), which sdsweep's options never hold"),
        Refused("sweep.resume=/x",
                "sweep.resume is no key of sdsweep's config (sdsweep/config/schema.py) nor one of its config groups"),
    ]


def test_a_saved_override_is_judged_as_hydra_parses_it():
    assert refusal("hydra.callbacks.x={_target_:builtins.print}") == HOOK
    assert refusal("hydra={callbacks:{}}") == HOOK
    assert refusal("adapter=glob(lo*)") is None  # a glob only selects among the shipped options
    assert refusal("model=tiny-sd15,'tiny-sd3'") is None
    assert refusal("model=tiny-sd15,evil") == ("model=evil is no option of the config group model that ships with "
                                               "sdsweep (sd15, sd3, sdxl, tiny-sd15, tiny-sd3, tiny-sdxl, toy-sdxl)")
    assert refusal("data.path='${oc.env:HOME}'").startswith("its value is an interpolation")  # quoted as well
    assert refusal("train=") == refusal("train.lr=range(1,3)") is None
    assert refusal("data.path=a)b(") == "not an override Hydra can parse"
    assert refusal(3) == "not an override but a int"


def test_a_multirun_yaml_without_a_task_list_is_named(tmp_path, monkeypatch, capsys):
    (tmp_path / "multirun.yaml").write_text("hydra:\n  overrides:\n    task: ${oc.env:HOME}\n")
    assert run_main(monkeypatch, [f"sweep.resume={tmp_path}"]) == 2
    assert capsys.readouterr().err == (f"sdsweep: sweep.resume: {tmp_path / 'multirun.yaml'} holds no "
                                       "hydra.overrides.task list: it was not written by a sweep "
                                       "(python -m sdsweep -m ...)\n")


def _interrupt_after(make_checkpoint: bool):
    def run_trial(cfg, trial_dir: Path, *args, **kwargs):
        if make_checkpoint:
            (Path(trial_dir) / "checkpoints" / "step-000002").mkdir(parents=True)
        raise KeyboardInterrupt  # as trial.py does after writing status interrupted

    return run_trial


def test_ctrl_c_in_a_sweep_prints_the_resume_command(cache_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trial_module, "run_trial", _interrupt_after(make_checkpoint=False))
    sweep = tmp_path / "sweep"
    code = run_main(monkeypatch, ["-m", "adapter=lora,dora", f"model.cache_dir={cache_dir}", "tracking.mode=disabled",
                                  "eval.enabled=false", "device=cpu", f"hydra.sweep.dir={sweep}"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (f"sdsweep: interrupted (Ctrl-C) in trial {sweep / 'adapter=lora'} of sweep {sweep}; "
                                    f"continue the sweep with: python -m sdsweep sweep.resume={sweep}")


def test_ctrl_c_in_a_single_run_prints_the_command_that_continues_it(cache_dir, tmp_path, monkeypatch, capsys):
    """train/loop.py continues a run from the newest checkpoint in its folder: the line says so, and how."""
    monkeypatch.setattr(trial_module, "run_trial", _interrupt_after(make_checkpoint=True))
    run = tmp_path / "my run"
    code = run_main(monkeypatch, [f"model.cache_dir={cache_dir}", "train.checkpoint_every=2", f"hydra.run.dir={run}"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"sdsweep: interrupted (Ctrl-C): run {run} stopped; continue it (from its newest checkpoint, step-000002) "
        f"with: python -m sdsweep model.cache_dir={cache_dir} train.checkpoint_every=2 'hydra.run.dir={run}'")
