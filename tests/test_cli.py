"""`python -m sdsweep` as a user runs it: a subprocess, from another working directory. The README sweep, a
single run and a typo start real interpreters (what the shell sees); the failed-trial sweep and the bad data
folder run main() in this process (helpers.run_in_process), since what they check, the trials' statuses
and the exit status main() sets, does not depend on a new interpreter."""

from __future__ import annotations

import json

import pytest
from conftest import cli_env
from helpers import run_cli, run_in_process, write_folder

pytestmark = pytest.mark.slow


def _common(cache_dir, sweep_dir) -> list[str]:
    """Evaluation off: these tests check statuses and exit codes; the README sweep's test checks the samples
    a CLI sweep saves."""
    return [f"model.cache_dir={cache_dir}", "train.max_steps=2", "tracking.mode=disabled", "eval.enabled=false",
            f"hydra.sweep.dir={sweep_dir}", f"hydra.run.dir={sweep_dir}"]


@pytest.mark.xdist_group("readme_sweep")
def test_the_readme_2x2_sweep_gives_four_trial_folders(readme_sweep):
    sweep, result = readme_sweep.dir, readme_sweep.result
    trials = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    # folder names come from the overrides; model.cache_dir, tracking.mode and eval.* (which change
    # nothing trained) are left out
    assert trials == [f"adapter={a},targets={t},train.checkpoint_every=2,train.max_steps=4"
                      for a in ("dora", "lora") for t in ("attn", "many")]
    for name in trials:
        metrics = json.loads((sweep / name / "metrics.json").read_text())
        assert metrics["status"] == "finished" and len(metrics["losses"]) == 4
        assert metrics["choices"]["adapter"] == name.split(",")[0].split("=")[1]
        assert (sweep / name / ".hydra" / "config.yaml").exists()
        assert sorted(p.name for p in (sweep / name / "samples").iterdir()) == ["00_house_seed0.png"]
    out = result.stdout + result.stderr
    assert "4 finished, 0 failed, 0 pruned, 0 stopped early" in out
    assert json.loads((sweep / "summary.json").read_text())["finished"] == 4
    assert (sweep / "leaderboard.csv").exists() and (sweep / "report.html").exists()


def test_a_failed_trial_does_not_stop_the_sweep_and_sets_the_exit_status(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    result = run_in_process(["-m", "debug.nan_at_step=1,-1", *_common(cache_dir, sweep)], cwd=tmp_path)
    assert result.returncode == 1
    failed = json.loads((sweep / "debug.nan_at_step=1,train.max_steps=2" / "metrics.json").read_text())
    finished = json.loads((sweep / "debug.nan_at_step=-1,train.max_steps=2" / "metrics.json").read_text())
    assert failed["status"] == "failed" and "step 1" in failed["reason"]
    assert finished["status"] == "finished"
    assert "1 finished, 1 failed, 0 pruned" in result.stdout + result.stderr


def test_single_run_writes_its_folder_and_exits_zero(cache_dir, tmp_path):
    out = tmp_path / "run"
    result = run_cli(_common(cache_dir, out), cli_env(cache_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["status"] == "finished"


def test_unknown_option_is_refused_before_anything_runs(cache_dir, tmp_path):
    result = run_cli(["adapter=lorra", *_common(cache_dir, tmp_path / "x")], cli_env(cache_dir), cwd=tmp_path)
    assert result.returncode != 0
    assert "lorra" in result.stderr and "Available options" in result.stderr
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_data_folder_without_captions_fails_with_the_fix(cache_dir, tmp_path):
    folder = write_folder(tmp_path / "imgs", captions="none")
    out = tmp_path / "run"
    result = run_in_process([f"data.path={folder}", *_common(cache_dir, out)], cwd=tmp_path)
    assert result.returncode == 1
    reason = json.loads((out / "metrics.json").read_text())["reason"]
    assert "no captions" in reason and "metadata.jsonl" in reason
