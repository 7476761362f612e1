"""Sweeps that survive: validated before launch, pruned with reasons, resumed without losing work."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import cli_env
from helpers import run_cli

from sdsweep.sweep import expand_cells, preflight, prune_reason
from sdsweep.train import run_trial


def test_cells_expand_like_hydras_basic_sweeper():
    cells = expand_cells(["adapter=lora,dora", "targets=attn,many", "seed=0"])
    assert len(cells) == 4 and ["adapter=lora", "targets=attn", "seed=0"] in cells


def test_preflight_reports_every_bad_cell_at_once(cache_dir):
    problems = preflight(["adapter.rank=0,4", "data.resolution=100", "adapter=lorra,lora"])
    text = "\n".join(problems)
    assert "adapter.rank=0: must be >= 1" in text and "data.resolution=100" in text and "lorra" in text
    assert preflight(["adapter=lora,dora"]) == []


@pytest.mark.slow
def test_a_sweep_with_a_bad_cell_is_not_launched(cache_dir, tmp_path):
    result = run_cli(["-m", "adapter.rank=0,4", f"hydra.sweep.dir={tmp_path / 's'}"], cli_env(cache_dir), tmp_path)
    assert result.returncode == 2 and "adapter.rank=0" in result.stderr
    assert not list(tmp_path.glob("s/*/metrics.json"))


def test_cells_that_cannot_run_here_are_pruned_with_a_reason(make_cfg, tmp_path):
    cfg = make_cfg("precision=int8", "adapter=loha")
    reason = prune_reason(cfg)
    assert reason and ("CUDA" in reason or "peft has no loha" in reason)
    metrics = run_trial(cfg, tmp_path)
    assert metrics["status"] == "pruned" and metrics["reason"] == reason
    assert not (tmp_path / "adapter").exists()


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_keeping_finished_trials(cache_dir, tmp_path):
    sweep, env = tmp_path / "sweep", cli_env(cache_dir)
    args = ["-m", "adapter=lora,dora,loha", "train.max_steps=4", "train.checkpoint_every=2",
            f"model.cache_dir={cache_dir}", "tracking.mode=disabled", f"hydra.sweep.dir={sweep}"]
    assert run_cli(args, env, tmp_path).returncode == 0
    lora, dora, loha = (sweep / f"adapter={a},train.checkpoint_every=2,train.max_steps=4" for a in ("lora", "dora", "loha"))
    kept_bytes = (lora / "metrics.json").read_bytes()
    # dora was killed between its checkpoints at step 2 and 4; loha never started
    shutil.rmtree(dora / "checkpoints" / "step-000004")
    (dora / "metrics.json").unlink()
    shutil.rmtree(dora / "adapter")
    shutil.rmtree(loha)
    result = run_cli([f"sweep.resume={sweep}", f"model.cache_dir={cache_dir}"], env, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (lora / "metrics.json").read_bytes() == kept_bytes  # finished trial untouched
    resumed = json.loads((dora / "metrics.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed_from_step"] == 2 and len(resumed["losses"]) == 4
    assert json.loads((loha / "metrics.json").read_text())["status"] == "finished"
    assert "3 finished, 0 failed, 0 pruned" in result.stdout + result.stderr


WRITER = """
import sys
from sdsweep.io import atomic_write_json
i = 0
while True:
    atomic_write_json(sys.argv[1], {"version": i, "payload": [i] * 200_000})
    i += 1
"""


def test_atomic_writes_leave_old_or_new_never_half_under_kill(tmp_path):
    target = tmp_path / "metrics.json"
    for attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)])
        time.sleep(0.8 + 0.15 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(target.read_text())  # never a truncated file
        assert data["payload"] == [data["version"]] * 200_000


@pytest.mark.slow
def test_joblib_and_submitit_local_launchers_give_the_same_trials_as_the_basic_one(cache_dir, tmp_path):
    """The same code path scales out: Hydra's launchers, not a home-made one."""
    results = {}
    for launcher in ("basic", "parallel", "submitit_local"):
        sweep = tmp_path / launcher
        args = ["-m", f"hydra/launcher={launcher}", "adapter=lora,dora", "targets=attn,many", "train.max_steps=2",
                f"model.cache_dir={cache_dir}", "tracking.mode=disabled", f"hydra.sweep.dir={sweep}"]
        result = run_cli(args, cli_env(cache_dir), tmp_path)
        assert result.returncode == 0, (launcher, result.stderr[-2000:])
        results[launcher] = {
            p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")
        }
    assert len(results["basic"]) == 4
    for launcher in ("parallel", "submitit_local"):
        assert results[launcher].keys() == results["basic"].keys()
        for name, basic in results["basic"].items():
            other = results[launcher][name]
            assert other["status"] == basic["status"] == "finished"
            assert other["losses"] == pytest.approx(basic["losses"], rel=1e-4)
            assert other["trainable_params"] == basic["trainable_params"]
