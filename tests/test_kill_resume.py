"""A sweep killed (SIGKILL) at a random step of a random trial, then resumed, ends as the uninterrupted sweep.

The reference is the session's README sweep (conftest.readme_sweep), run once without interruption. The
trial and step are drawn from a seeded generator (SDSWEEP_KILL_SEED picks another draw; the failure
message names the draw), so a failure reproduces.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import README_SWEEP, cli_env
from helpers import run_in_process

from sdsweep.layout import SweepDir, TrialDir

CELLS = [f"adapter={a},targets={t},train.checkpoint_every=2,train.max_steps=4"
         for a in ("lora", "dora") for t in ("attn", "many")]
"""The README sweep's trial folders, in the order the basic launcher runs them."""
TEMPORARY = re.compile(r"^\..+\.(tmp|old)$")
"""io.py's temporary names (a write cut short) and a folder set aside mid-replacement."""


def _train_rows(trial: TrialDir) -> list[dict]:
    return [json.loads(line) for line in trial.train_log.read_text().splitlines()] if trial.train_log.exists() else []


WRITE_TIME = ("modelspec.date",)
"""The kohya file's metadata says when it was written: a resumed trial's adapter is written later."""


def _adapter(path: Path) -> tuple[dict, dict]:
    """An adapter file's tensors (as bytes) and metadata but its write time: what two equal files hold. Not
    the file's own bytes: safetensors writes its metadata map in the order of a Rust HashMap, which differs
    from process to process."""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if k not in WRITE_TIME}
        return {k: f.get_tensor(k).numpy().tobytes() for k in f.keys()}, metadata


def _kill_at(sweep: Path, trial: TrialDir, step: int, proc: subprocess.Popen) -> None:
    """SIGKILL the whole sweep once `trial` has logged `step` (or the sweep ended first)."""
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if any(row.get("step", 0) >= step for row in _train_rows(trial)):
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()


@pytest.mark.slow
@pytest.mark.xdist_group("readme_sweep")
def test_a_sweep_killed_at_a_random_step_resumes_to_the_uninterrupted_sweep(readme_sweep, cache_dir, tmp_path):
    draw = random.Random(int(os.environ.get("SDSWEEP_KILL_SEED", "0")))
    victim, step = draw.randrange(len(CELLS)), draw.randint(1, 4)
    where = f"killed in trial {CELLS[victim]} at step {step} (SDSWEEP_KILL_SEED={os.environ.get('SDSWEEP_KILL_SEED', 0)})"
    sweep, env = SweepDir(tmp_path / "sweep"), cli_env(cache_dir)
    args = [*README_SWEEP, f"model.cache_dir={cache_dir}", "tracking.mode=disabled", f"hydra.sweep.dir={sweep.path}"]
    proc = subprocess.Popen([sys.executable, "-m", "sdsweep", *args], env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _kill_at(sweep.path, sweep.trial(CELLS[victim]), step, proc)
    assert proc.returncode == -signal.SIGKILL, f"the sweep ended before it could be {where}"
    finished_before = {t.name: t.metrics.read_bytes() for t, m in sweep.trials() if m.get("status") == "finished"}
    assert CELLS[victim] not in finished_before, where

    # the kill needs a process of its own; the resume, which the test is about, runs in this one
    result = run_in_process([f"sweep.resume={sweep.path}", f"model.cache_dir={cache_dir}"], tmp_path)
    assert result.returncode == 0, f"{where}: {result.stderr[-2000:]}"

    reference = SweepDir(readme_sweep.dir)
    for name in CELLS:
        mine, theirs = sweep.trial(name), reference.trial(name)
        got, want = mine.read_metrics(), theirs.read_metrics()
        if name in finished_before:  # a trial that had finished is kept byte for byte
            before = json.loads(finished_before[name])
            changed = {k: (before.get(k), got.get(k)) for k in {*before, *got} if before.get(k) != got.get(k)}
            assert mine.metrics.read_bytes() == finished_before[name], f"{where}: {name} changed: {changed}"
        assert got["status"] == "finished" and got["losses"] == want["losses"], f"{where}: {name}"
        assert {k: v for k, v in got.items() if k.startswith("eval/") and isinstance(v, float)} == \
            {k: v for k, v in want.items() if k.startswith("eval/") and isinstance(v, float)}, f"{where}: {name}"
        rows = _train_rows(mine)
        assert [r["step"] for r in rows] == [1, 2, 3, 4], f"{where}: {name} logs {[r['step'] for r in rows]}"
        assert [r["train/loss"] for r in rows] == [r["train/loss"] for r in _train_rows(theirs)], where
        for weights in sorted(theirs.adapter.rglob("*.safetensors")):
            assert _adapter(mine.adapter / weights.relative_to(theirs.adapter)) == _adapter(weights), \
                f"{where}: {name}: adapter differs from the uninterrupted trial's"
    leftovers = [str(p.relative_to(sweep.path)) for p in sweep.path.rglob("*") if TEMPORARY.match(p.name)]
    assert leftovers == [], f"{where}: temporary files left {leftovers}"
    assert "4 finished, 0 failed, 0 pruned" in result.stdout + result.stderr, where
