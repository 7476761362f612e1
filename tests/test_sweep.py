"""Sweeps that survive: validated before launch, pruned with reasons, resumed without losing work."""

from __future__ import annotations

import csv
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import README_SWEEP, cli_env
from helpers import run_cli, run_in_process

from sdsweep.board.leaderboard import write_all
from sdsweep.sweep.preflight import expand_cells, preflight
from sdsweep.sweep.prune import prune_reason
from sdsweep.sweep.trial import run_trial


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
    result = run_in_process(["-m", "adapter.rank=0,4", f"hydra.sweep.dir={tmp_path / 's'}"], tmp_path)
    assert result.returncode == 2 and "adapter.rank=0" in result.stderr
    assert not list(tmp_path.glob("s/*/metrics.json"))


def test_cells_that_cannot_run_here_are_pruned_with_a_reason(make_cfg, tmp_path):
    cfg = make_cfg("precision=int8", "adapter=loha")
    reason = prune_reason(cfg)
    assert reason and ("CUDA" in reason or "peft has no loha" in reason)
    metrics = run_trial(cfg, tmp_path)
    assert metrics["status"] == "pruned" and metrics["reason"] == reason
    assert not (tmp_path / "adapter").exists()


def test_text_encoder_adapters_are_pruned_when_transformers_refuses_the_installed_peft(make_cfg, monkeypatch):
    """transformers 5.24 needs peft>=0.22 for adapters on its text encoders; with an older peft every
    text_encoder=lora cell would fail after loading, so it is pruned naming the fix. The UNet's
    adapters do not go through transformers: text_encoder=frozen cells still run."""
    import transformers.integrations.peft as transformers_peft

    assert prune_reason(make_cfg("text_encoder=lora")) is None  # the versions pyproject.toml installs agree
    monkeypatch.setattr(transformers_peft, "MIN_PEFT_VERSION", "99.0.0")
    reason = prune_reason(make_cfg("text_encoder=lora"))
    assert reason.startswith("text_encoder=lora:") and "pip install 'peft>=99.0.0'" in reason
    assert prune_reason(make_cfg("text_encoder=frozen")) is None


@pytest.mark.slow
@pytest.mark.xdist_group("readme_sweep")
def test_an_interrupted_sweep_resumes_keeping_finished_trials(readme_sweep, cache_dir, tmp_path):
    sweep = readme_sweep.copy(tmp_path / "sweep")  # damaged below; resumed by this process (not about the CLI)
    lora, dora, gone = (sweep / f"adapter={a},targets={t},train.checkpoint_every=2,train.max_steps=4"
                        for a, t in (("lora", "attn"), ("dora", "attn"), ("lora", "many")))
    kept_bytes = (lora / "metrics.json").read_bytes()
    uninterrupted = {d: json.loads((d / "metrics.json").read_text()) for d in (dora, gone)}
    # dora was killed between its checkpoints at step 2 and 4; one cell never started
    shutil.rmtree(dora / "checkpoints" / "step-000004")
    (dora / "metrics.json").unlink()
    shutil.rmtree(dora / "adapter")
    shutil.rmtree(gone)
    result = run_in_process([f"sweep.resume={sweep}", f"model.cache_dir={cache_dir}"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (lora / "metrics.json").read_bytes() == kept_bytes  # finished trial untouched
    resumed = json.loads((dora / "metrics.json").read_text())
    assert resumed["status"] == "finished" and resumed["resumed_from_step"] == 2
    assert resumed["losses"] == uninterrupted[dora]["losses"]  # exactly the uninterrupted curve
    rerun = json.loads((gone / "metrics.json").read_text())
    assert rerun["status"] == "finished" and rerun["losses"] == uninterrupted[gone]["losses"]
    assert "4 finished, 0 failed, 0 pruned" in result.stdout + result.stderr


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
        deadline = time.monotonic() + 60
        while not target.exists() and time.monotonic() < deadline:  # the first writer's interpreter is starting
            time.sleep(0.05)  # (seconds on a loaded machine: a kill before any write would test nothing)
        time.sleep(0.8 + 0.15 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        data = json.loads(target.read_text())  # never a truncated file
        assert data["payload"] == [data["version"]] * 200_000


# leaderboard.csv columns that measure the machine, not the trial: timings, memory (process RSS
# on a CPU: one process for the basic launcher, one per trial for the others) and what is
# derived from them. Each figure also has its `_std` column (over seeds). The file holds no paths.
MACHINE_COLUMNS = ["it_per_s", "train_s", "wall_s", "eval_s", "peak_memory_mb", "peak_vram_mb",
                   "peak_vram_reserved_mb", "pareto", "fits_t4"]


def _leaderboard_rows(sweep) -> list[dict]:
    with open(sweep / "leaderboard.csv") as f:
        rows = list(csv.DictReader(f))
    drop = {*MACHINE_COLUMNS, *(f"{c}_std" for c in MACHINE_COLUMNS)}
    assert drop - {"peak_vram_reserved_mb_std", "pareto_std", "fits_t4_std"} <= rows[0].keys()  # names still real
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def _same_row(a: dict, b: dict) -> bool:
    """Equal text, and numbers equal to 1e-4 (other processes may sum floats in another order)."""
    def num(v):
        try:
            return float(v)
        except ValueError:
            return None

    return a.keys() == b.keys() and all(
        a[k] == b[k] or (num(a[k]) is not None and num(b[k]) == pytest.approx(num(a[k]), rel=1e-4, abs=1e-6))
        for k in a)


@pytest.mark.slow
@pytest.mark.xdist_group("readme_sweep")
def test_joblib_and_submitit_local_launchers_give_the_same_leaderboard_as_the_basic_one(readme_sweep, cache_dir,
                                                                                        tmp_path):
    """The same code path scales out: Hydra's launchers, not a home-made one. Two cells of the README
    sweep (which the basic launcher ran), each trained, saved, sampled and scored by the others."""
    cells = ["adapter=lora,dora", "targets=attn"]
    basic = tmp_path / "basic"  # the basic launcher's two cells, ranked among themselves
    basic.mkdir()
    for src in [readme_sweep.dir / "base", readme_sweep.dir / "multirun.yaml",
                *readme_sweep.dir.glob("adapter=*,targets=attn,*")]:
        (shutil.copytree if src.is_dir() else shutil.copy)(src, basic / src.name)
    write_all(basic, echo=False)
    boards = {"basic": _leaderboard_rows(basic)}
    for launcher in ("parallel", "submitit_local"):
        sweep = tmp_path / launcher
        args = [*README_SWEEP[:1], f"hydra/launcher={launcher}", *cells, *README_SWEEP[3:],
                f"model.cache_dir={cache_dir}", "tracking.mode=disabled", f"hydra.sweep.dir={sweep}"]
        result = run_cli(args, cli_env(cache_dir), tmp_path)
        assert result.returncode == 0, (launcher, result.stderr[-2000:])
        boards[launcher] = _leaderboard_rows(sweep)
    basic_rows = boards["basic"]
    # the base model first, then the two cells, both finished and scored
    assert len(basic_rows) == 3 and basic_rows[0]["status"] == "reference"
    assert all(r["status"] == "finished" and r["composite"] and r["eval/gram_distance"] for r in basic_rows[1:])
    for launcher in ("parallel", "submitit_local"):
        assert [r["config"] for r in boards[launcher]] == [r["config"] for r in basic_rows], launcher
        for mine, theirs in zip(boards[launcher], basic_rows):
            assert _same_row(mine, theirs), (launcher, {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]})


def test_resuming_a_folder_that_is_no_sweep_exits_2_naming_the_fix(tmp_path, capsys):
    from sdsweep.__main__ import _expand_resume

    with pytest.raises(SystemExit) as exit_:
        _expand_resume([f"sweep.resume={tmp_path}"])
    assert exit_.value.code == 2
    assert "no multirun.yaml there; give the folder of a sweep started with -m" in capsys.readouterr().err
