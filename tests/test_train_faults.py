"""Checkpoints and train_log.jsonl survive damage and kills; the fault-injection steps count as the log does.

One uninterrupted trial and one killed at step 5 (checkpoints at steps 2 and 4) are trained once per
test process; each test damages its own copy of the killed one and resumes it, and the resumed curve
must be the uninterrupted one exactly.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest

from sdsweep.layout import TrialDir
from sdsweep.sweep import trial as trial_mod
from sdsweep.sweep.trial import run_trial
from sdsweep.train.checkpoints import ADAPTER, OPTIMIZER, RECORD, STATE, set_aside
from sdsweep.train.loop import NonFiniteLoss, train
from sdsweep.train.setup import setup
from sdsweep.train.tracking import JsonlTracker, rows_up_to

STEPS = 5
CHECKPOINTS = ["train.checkpoint_every=2", "train.checkpoints_keep=2"]
_trained: dict[str, Path | dict] = {}


@pytest.fixture
def trained(make_cfg, tmp_path_factory) -> dict:
    """{"whole": metrics, "whole_dir", "killed_dir"}: trained on the first use in this process."""
    if not _trained:
        root = tmp_path_factory.mktemp("faults")
        _trained["whole"] = run_trial(make_cfg(*CHECKPOINTS, steps=STEPS), root / "whole")
        killed = run_trial(make_cfg(*CHECKPOINTS, "debug.raise_at_step=5", steps=STEPS), root / "killed")
        assert killed["status"] == "failed" and "simulated crash" in killed["reason"]
        _trained.update(whole_dir=root / "whole", killed_dir=root / "killed")
    return _trained


@pytest.fixture
def killed(trained, tmp_path) -> TrialDir:
    """A copy of the killed trial: step-000002 and step-000004 on disk, steps 1-5 logged."""
    trial = TrialDir(shutil.copytree(trained["killed_dir"], tmp_path / "killed"))
    assert [p.name for p in sorted(trial.checkpoints.iterdir())] == ["step-000002", "step-000004"]
    return trial


def _resume(make_cfg, trial: TrialDir) -> dict:
    metrics = run_trial(make_cfg(*CHECKPOINTS, steps=STEPS), trial.path)
    assert metrics["status"] == "finished", metrics.get("reason")
    return metrics


def _rows(trial: TrialDir) -> list[dict]:
    return [json.loads(line) for line in trial.train_log.read_text().splitlines()]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_last_byte(path: Path) -> None:
    """Still a readable file of its kind (the last byte of the last tensor's data), other content."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


# --- a damaged checkpoint is set aside, the trial resumes from the older one ----------------------


@pytest.mark.parametrize("name,damage", [(ADAPTER, _truncate), (OPTIMIZER, _truncate), (STATE, _truncate),
                                         (ADAPTER, _flip_last_byte)],
                         ids=["adapter-truncated", "optimizer-truncated", "state-truncated", "adapter-bit-flip"])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_resumes(make_cfg, trained, killed, caplog,
                                                                            name, damage):
    damage(killed.checkpoint(4) / name)
    damaged_bytes = (killed.checkpoint(4) / name).read_bytes()
    with caplog.at_level(logging.WARNING):
        resumed = _resume(make_cfg, killed)
    assert resumed["resumed_from_step"] == 2
    assert resumed["losses"] == trained["whole"]["losses"]  # exactly the uninterrupted curve
    # set aside, not deleted, and out of the way of the step-000004 the resumed trial wrote again
    assert (killed.checkpoints / ".step-000004.damaged" / name).read_bytes() == damaged_bytes
    assert sorted(p.name for p in killed.checkpoints.iterdir()) == [".step-000004.damaged", "step-000002",
                                                                    "step-000004"]
    warning = next(r.message for r in caplog.records if "is damaged" in r.message)
    assert str(killed.checkpoint(4)) in warning and name in warning and ".step-000004.damaged" in warning


def test_a_checkpoint_without_completion_record_still_resumes(make_cfg, trained, killed):
    """Checkpoints written before completion records existed: trusted as far as their files read."""
    for step in (2, 4):
        (killed.checkpoint(step) / RECORD).unlink()
    resumed = _resume(make_cfg, killed)
    assert resumed["resumed_from_step"] == 4 and resumed["losses"] == trained["whole"]["losses"]
    assert not list(killed.checkpoints.glob(".*"))


def test_when_no_checkpoint_reads_the_trial_starts_over_untouched_by_them(make_cfg, trained, killed):
    """Record-less checkpoints whose adapter reads but whose optimizer state does not: nothing of them
    may reach the trial (the weights were read, not yet copied in), so the curve is the fresh one."""
    for step in (2, 4):
        (killed.checkpoint(step) / RECORD).unlink()
        _truncate(killed.checkpoint(step) / OPTIMIZER)
    resumed = _resume(make_cfg, killed)
    assert resumed["resumed_from_step"] is None and resumed["losses"] == trained["whole"]["losses"]
    assert sorted(p.name for p in killed.checkpoints.glob(".*")) == [".step-000002.damaged", ".step-000004.damaged"]


def test_a_new_checkpoint_records_the_checksums_of_its_files(killed):
    import hashlib

    record = json.loads((killed.checkpoint(4) / RECORD).read_text())
    assert record["files"] == {n: hashlib.sha256((killed.checkpoint(4) / n).read_bytes()).hexdigest()
                               for n in (ADAPTER, OPTIMIZER, STATE)}


def test_set_aside_never_overwrites_earlier_evidence(tmp_path):
    for content in ("first", "second"):
        (tmp_path / "step-000004").mkdir()
        (tmp_path / "step-000004" / "x").write_text(content)
        set_aside(tmp_path / "step-000004")
    assert (tmp_path / ".step-000004.damaged" / "x").read_text() == "first"
    assert (tmp_path / ".step-000004.damaged-2" / "x").read_text() == "second"


# --- train_log.jsonl holds each step once ------------------------------------------------------------


def test_a_resumed_trial_logs_each_step_once_keeping_the_rows_before_its_checkpoint(make_cfg, trained, killed):
    before = killed.train_log.read_bytes().splitlines(keepends=True)
    assert [row["step"] for row in _rows(killed)] == [1, 2, 3, 4, 5]  # step 5 logged, then killed
    with open(killed.train_log, "ab") as f:
        f.write(b'{"step": 1, "train/loss": 0.4')  # and a kill mid-write: no closing brace, no newline
    _resume(make_cfg, killed)
    rows = _rows(killed)  # every line parses: the cut line was dropped, not glued to the next row
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert killed.train_log.read_bytes().splitlines(keepends=True)[:4] == before[:4]  # byte for byte
    whole = _rows(TrialDir(trained["whole_dir"]))
    for key in ("train/loss", "train/loss_smoothed", "train/grad_norm"):
        assert [row[key] for row in rows] == [row[key] for row in whole], key


def test_a_failed_trial_run_again_from_scratch_keeps_no_row_of_the_failed_attempt(make_cfg, trained, killed):
    shutil.rmtree(killed.checkpoints)
    _resume(make_cfg, killed)
    rows = _rows(killed)
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    assert [row["train/loss"] for row in rows] == trained["whole"]["losses"]


def test_rows_up_to_keeps_earlier_rows_as_they_are_and_counts_what_it_drops():
    log = (b'{"step": 1, "x": 1.5}\n'
           b'{"step": 2, "x": NaN}\n'     # a skipped NaN step: Python's json writes and reads NaN
           b'{"step": 3}{"step": 4}\n'    # two rows glued by an earlier kill: unparseable
           b'[1, 2]\n'
           b'{"step": 5}\n'
           b'{"step": 2}')                # complete JSON, but its newline was never written
    kept, dropped, broken = rows_up_to(log, 4)
    assert kept == b'{"step": 1, "x": 1.5}\n{"step": 2, "x": NaN}\n'
    assert (dropped, broken) == (1, 3)
    assert rows_up_to(kept, 4) == (kept, 0, 0)
    assert rows_up_to(b"", 0) == (b"", 0, 0)


def test_rewind_rewrites_the_log_only_when_it_drops_something(tmp_path):
    tracker = JsonlTracker(tmp_path / "train_log.jsonl")
    tracker.rewind(3)  # no log yet: nothing to do
    assert not tracker.path.exists()
    for step in (1, 2):
        tracker.log({"train/loss": 0.5}, step)
    mtime = tracker.path.stat().st_mtime_ns
    tracker.rewind(2)
    assert tracker.path.stat().st_mtime_ns == mtime
    tracker.rewind(1)
    assert tracker.path.read_text() == '{"step": 1, "train/loss": 0.5}\n'


# --- debug.nan_at_step and debug.raise_at_step count steps as train_log.jsonl does -----------------


def _train_failing(make_cfg, trial_dir: Path, *faults: str) -> BaseException:
    """`train` with faults injected, logging to trial_dir's train_log.jsonl; the exception it raised."""
    cfg = make_cfg(*CHECKPOINTS, *faults, steps=STEPS)
    trial_dir.mkdir(parents=True)
    s = setup(cfg)
    try:
        with pytest.raises((NonFiniteLoss, RuntimeError)) as err:
            train(cfg, s, trial_dir, JsonlTracker(TrialDir(trial_dir).train_log))
    finally:
        trial_mod._release(cfg, s, clean=True)
    return err.value


def test_nan_at_step_and_raise_at_step_name_the_same_step(make_cfg, trained, tmp_path):
    nan = _train_failing(make_cfg, tmp_path / "nan", "debug.nan_at_step=2")
    assert isinstance(nan, NonFiniteLoss) and str(nan) == "loss became nan at step 2"
    crash = _train_failing(make_cfg, tmp_path / "crash", "debug.raise_at_step=2")
    assert str(crash) == "debug.raise_at_step=2: simulated crash"
    # both trained steps 1 and 2; the crash logged step 2, the NaN step is not logged (its loss is NaN)
    assert [row["step"] for row in _rows(TrialDir(tmp_path / "crash"))] == [1, 2]
    assert [row["step"] for row in _rows(TrialDir(tmp_path / "nan"))] == [1]
    assert _rows(TrialDir(tmp_path / "nan"))[0]["train/loss"] == trained["whole"]["losses"][0]


def test_a_nan_failure_keeps_the_losses_it_trained(make_cfg, trained, tmp_path):
    nan = _train_failing(make_cfg, tmp_path / "t", "debug.nan_at_step=3")
    losses = nan.figures["losses"]
    assert losses[:2] == trained["whole"]["losses"][:2] and len(losses) == 3 and math.isnan(losses[2])
    assert nan.figures["final_loss"] == losses[1] and nan.figures["nan_skipped_steps"] == []


def test_exceeding_max_nan_skips_keeps_the_skipped_steps_in_the_losses(make_cfg, trained, tmp_path):
    nan = _train_failing(make_cfg, tmp_path / "t", "train.nan_policy=skip", "train.max_nan_skips=0",
                         "debug.nan_at_step=2")
    assert isinstance(nan, NonFiniteLoss) and str(nan).endswith("max_nan_skips=0): steps [2]")
    losses = nan.figures["losses"]
    assert losses[0] == trained["whole"]["losses"][0] and len(losses) == 2 and math.isnan(losses[1])
    assert nan.figures["nan_skipped_steps"] == [2]
    assert [row["step"] for row in _rows(TrialDir(tmp_path / "t"))] == [1, 2]


def test_a_nan_trial_records_the_steps_it_trained_in_metrics_json(make_cfg, trained, tmp_path):
    """metrics.json of a NaN trial holds its curve up to the failing step (that step's loss null), not null."""
    metrics = run_trial(make_cfg(*CHECKPOINTS, "debug.nan_at_step=3", steps=STEPS), tmp_path / "t")
    stored = json.loads(TrialDir(tmp_path / "t").metrics.read_text())
    assert metrics["status"] == stored["status"] == "failed"
    assert stored["reason"] == "NonFiniteLoss: loss became nan at step 3"
    assert stored["losses"] == [*trained["whole"]["losses"][:2], None] and stored["steps_trained"] == 3
    assert stored["final_loss"] == trained["whole"]["losses"][1]
