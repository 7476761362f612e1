"""What the disk can do to a sweep: fill up mid-write, keep what a kill left, and the modes of what is written.

A full disk is simulated without a tmpfs, on the writes' own code paths: the file object's write,
torch.save and safetensors' save_file raise what they raise on a real full disk (ENOSPC; torch's
C++ writer says only "unexpected pos", safetensors folds "(os error 28)" into its message), and
shutil.disk_usage reports the disk's free space as it would then be.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from conftest import CHEAP_EVAL
from omegaconf import OmegaConf

from sdsweep.io import atomic_dir, atomic_dir_if_absent, atomic_write_json, process_umask, remove_leftovers
from sdsweep.sweep import trial as trial_mod
from sdsweep.sweep.callbacks import SweepSummary
from sdsweep.sweep.resume import kept_trial
from sdsweep.sweep.trial import run_trial
from sdsweep.train.tracking import Tracker

FREE = 3 * 2**20  # what the full disk has left, as shutil.disk_usage reports it
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def sweep(tmp_path) -> Path:
    folder = tmp_path / "sweep"
    folder.mkdir()
    (folder / "multirun.yaml").write_text("{}\n")  # what Hydra writes into every multirun folder
    return folder


@pytest.fixture
def full_disk(monkeypatch):
    """3 MiB free on every disk; `fail(name)`: each write of a file named `name` through the atomic
    writers fails as on a full disk (the file object's write raises ENOSPC)."""
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - FREE, FREE))
    names: set[str] = set()
    real_fdopen = os.fdopen

    class FullFile:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        written = Path(os.readlink(f"/proc/self/fd/{fd}")).name  # the atomic writer's `.<name>.<random>.tmp`
        return FullFile(f) if any(written.startswith(f".{name}.") for name in names) else f

    monkeypatch.setattr(os, "fdopen", fdopen)
    return names.add


def _callback_config(sweep: Path):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "tracking": {"mode": "disabled"}})


# --- a full disk ------------------------------------------------------------------------------------


def test_a_full_disk_at_a_checkpoint_fails_the_trial_naming_the_path_and_the_next_trial_runs(
        make_cfg, sweep, full_disk, monkeypatch):
    real_save = torch.save

    def save(obj, f, *args, **kwargs):  # torch's own words for a short write: no errno
        if isinstance(f, (str, os.PathLike)) and Path(f).name == "optimizer.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    failed = run_trial(make_cfg("train.checkpoint_every=2", steps=2), sweep / "a")
    checkpoint = sweep / "a" / "checkpoints" / "step-000002"
    assert failed["status"] == "failed" and failed["reason"] == f"disk full at {checkpoint}: 3 MiB free"
    assert json.loads((sweep / "a" / "metrics.json").read_text())["reason"] == failed["reason"]
    assert list((sweep / "a" / "checkpoints").iterdir()) == []  # the partial checkpoint removed
    monkeypatch.setattr(torch, "save", real_save)
    assert run_trial(make_cfg(steps=1), sweep / "b")["status"] == "finished"


@pytest.mark.parametrize("error", [
    pytest.param(lambda: __import__("safetensors").SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"), id="safetensors"),
    pytest.param(lambda: ENOSPC, id="oserror"),
])
def test_a_full_disk_while_saving_the_adapter_reads_disk_full_at_the_adapter(make_cfg, sweep, full_disk,
                                                                              monkeypatch, error):
    import safetensors.torch

    def save_file(*args, **kwargs):  # what diffusers' save_lora_weights calls
        raise error()

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    metrics = run_trial(make_cfg(steps=1), sweep / "a")
    assert metrics["status"] == "failed"
    assert metrics["reason"] == f"disk full at {sweep / 'a' / 'adapter'}: 3 MiB free"
    assert sorted(p.name for p in (sweep / "a").iterdir()) == ["metrics.json", "train_log.jsonl"]


def test_when_metrics_json_cannot_be_written_the_trial_cleans_up_says_so_and_the_sweep_goes_on(
        make_cfg, sweep, full_disk, monkeypatch, caplog):
    closed, released = [], []

    class Recording(Tracker):
        def finish(self, failed: bool) -> None:
            closed.append(failed)

    real_release = trial_mod._release
    monkeypatch.setattr(trial_mod, "make_tracker", lambda *args: Recording())
    monkeypatch.setattr(trial_mod, "_release", lambda *args: released.append(1) or real_release(*args))
    full_disk("metrics.json")
    with caplog.at_level(logging.ERROR):
        metrics = run_trial(make_cfg(steps=2), sweep / "a")  # returns: nothing escapes to Hydra
    assert metrics["status"] == "finished" and closed == [False] and released == [1]
    path = sweep / "a" / "metrics.json"
    assert not path.exists() and not list((sweep / "a").glob(".metrics.json.*"))
    assert (f"{path} not written (disk full at {path}: 3 MiB free): this trial's status (finished) is not "
            "recorded; a resumed sweep trains it again") in caplog.messages
    monkeypatch.undo()  # the disk has room again: the next trial of the sweep, then its end
    assert run_trial(make_cfg(steps=1), sweep / "b")["status"] == "finished"
    SweepSummary().on_multirun_end(_callback_config(sweep))
    assert json.loads((sweep / "summary.json").read_text())["trials"] == {"b": "finished"}
    assert (sweep / "leaderboard.csv").exists()
    assert kept_trial(sweep / "a", make_cfg(steps=2)) is None  # a resume trains it again: no metrics.json


def test_the_end_of_a_sweep_on_a_full_disk_says_so_in_one_line_each(make_cfg, sweep, full_disk, caplog):
    atomic_write_json(sweep / "a" / "metrics.json", {"status": "finished", "final_loss": 0.5})
    full_disk("summary.json")
    full_disk("leaderboard.csv")
    with caplog.at_level(logging.INFO):
        SweepSummary().on_multirun_end(_callback_config(sweep))  # returns: no traceback from Hydra
    summary, board = sweep / "summary.json", sweep / "leaderboard.csv"
    assert f"{summary} not written (disk full at {summary}: 3 MiB free)" in caplog.messages
    assert (f"leaderboard not written (disk full at {board}: 3 MiB free); rebuild it with "
            f"`python -m sdsweep.board {sweep}`") in caplog.messages
    assert f"sweep {sweep}: 1 finished, 0 failed, 0 pruned, 0 stopped early" in caplog.messages
    assert not any(r.exc_info for r in caplog.records)
    assert sorted(p.name for p in sweep.iterdir()) == ["a", "multirun.yaml"]


# --- what a kill leaves behind -----------------------------------------------------------------------


def _leftovers(trial: Path) -> list[Path]:
    """A trial killed at every kind of write: a checkpoint half-written (optimizer state), step 2's
    checkpoint renamed away by a kill between atomic_dir's two renames, samples, metrics.json, a trace."""
    ckpt = trial / "checkpoints"
    half = ckpt / ".step-000004.x1y2z3_w.tmp"  # tempfile's names (an older sdsweep) as well as ours
    shutil.copytree(ckpt / "step-000002", half)
    os.replace(ckpt / "step-000002", ckpt / ".step-000002.old")  # step-000002 itself is gone
    (trial / ".samples.0a1b2c3d.tmp").mkdir()
    (trial / ".samples.0a1b2c3d.tmp" / "00_house_seed0.png").write_bytes(b"\x89PNG half")
    (trial / ".metrics.json.9f8e7d6c.tmp").write_text('{"status": "fini')
    (trial / "debug").mkdir()
    (trial / "debug" / ".rank-0.json.00ff00ff.tmp").write_text("{")
    return [half, ckpt / ".step-000002.old", trial / ".samples.0a1b2c3d.tmp", trial / ".metrics.json.9f8e7d6c.tmp",
            trial / "debug" / ".rank-0.json.00ff00ff.tmp"]


def test_a_resumed_trial_removes_what_a_kill_left_and_recovers_a_renamed_checkpoint(make_cfg, sweep, cache_dir):
    steps = ["train.checkpoint_every=2", "train.checkpoints_keep=3"]
    whole = run_trial(make_cfg(*steps, steps=4), sweep / "whole")
    trial = sweep / "killed"
    shutil.copytree(sweep / "whole", trial)
    for done in ("metrics.json", "adapter", "checkpoints/step-000004"):
        shutil.rmtree(trial / done) if (trial / done).is_dir() else (trial / done).unlink()
    left = _leftovers(trial)
    # not this trial's: a parallel trial's write in progress, the shared caches, a name like ours but the user's
    others = [sweep / "whole" / ".metrics.json.0a1b2c3d.tmp", cache_dir / ".entry.0a1b2c3d.tmp",
              sweep / ".leaderboard.csv.0a1b2c3d.tmp", trial / ".notes.tmp", trial / "notes.old"]
    for path in others:
        path.write_text("in progress")
    resumed = run_trial(make_cfg(*steps, steps=4), trial)
    assert resumed["status"] == "finished" and resumed["resumed_from_step"] == 2  # from the recovered checkpoint
    assert resumed["losses"] == whole["losses"]  # exactly the uninterrupted curve
    assert [p for p in left if p.exists()] == []
    assert all(p.read_text() == "in progress" for p in others)
    assert sorted(p.name for p in (trial / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    for path in others[2:]:
        path.unlink()
    finished = (sweep / "whole" / "metrics.json").read_bytes()
    assert run_trial(make_cfg(*steps, steps=4), sweep / "whole") == json.loads(finished)  # kept as it is
    assert (sweep / "whole" / "metrics.json").read_bytes() == finished and not others[0].exists()
    others[1].unlink()


def test_the_sweep_callback_cleans_the_sweep_folder_at_its_start_and_end(sweep):
    with atomic_dir(sweep / "base" / "0123456789ab") as tmp:
        (tmp / "base.json").write_text("{}")
    os.replace(sweep / "base" / "0123456789ab", sweep / "base" / ".0123456789ab.old")  # killed between renames
    left = [sweep / ".leaderboard.csv.3c4d5e6f.tmp", sweep / ".summary.json.abcdefgh.tmp",
            sweep / "base" / ".fedcba987654.1a2b3c4d.tmp"]
    for path in left:
        path.write_text("half")
    trial_own = sweep / "a" / ".metrics.json.1a2b3c4d.tmp"  # the trial's to clean, as it starts
    trial_own.parent.mkdir()
    trial_own.write_text("half")
    SweepSummary().on_multirun_start(_callback_config(sweep))
    assert [p for p in left if p.exists()] == [] and trial_own.exists()
    assert json.loads((sweep / "base" / "0123456789ab" / "base.json").read_text()) == {}  # recovered
    assert sorted(p.name for p in (sweep / "base").iterdir()) == ["0123456789ab"]
    (sweep / ".report.html.5e6f7a8b.tmp").write_text("half")  # a write of the leaderboard killed
    SweepSummary().on_multirun_end(_callback_config(sweep))
    assert not (sweep / ".report.html.5e6f7a8b.tmp").exists() and trial_own.exists()


def test_an_old_folder_beside_its_replacement_is_removed_and_only_temporary_names_are_touched(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / ".adapter.old").mkdir()  # killed after the second rename: the new one is in place
    for name in ("data.tmp", ".data.tmp", ".data.toolong12.tmp", ".data.old", "images"):
        (tmp_path / name).write_text("the user's")
    assert remove_leftovers(tmp_path) == [f"removed {tmp_path / '.adapter.old'}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".data.old", ".data.tmp", ".data.toolong12.tmp",
                                                           "adapter", "data.tmp", "images"]
    assert remove_leftovers(tmp_path / "missing") == []


# --- modes: the umask, not tempfile's 0600/0700 --------------------------------------------------------


@pytest.fixture(params=[0o022, 0o002], ids=["umask022", "umask002"])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_the_umask_is_read_without_changing_it_with_or_without_proc(umask, monkeypatch):
    assert process_umask() == umask and os.umask(umask) == umask
    real = Path.read_text

    def read_text(self, *args, **kwargs):  # a system without /proc/self/status
        if str(self) == "/proc/self/status":
            raise FileNotFoundError(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert process_umask() == umask and os.umask(umask) == umask  # set, and put back at once


def test_every_file_and_folder_of_a_trial_follows_the_umask(make_cfg, sweep, umask):
    metrics = run_trial(make_cfg("train.checkpoint_every=1", *CHEAP_EVAL, steps=2, evaluate=True), sweep / "a")
    assert metrics["status"] == "finished" and "eval_error" not in metrics
    SweepSummary().on_multirun_end(_callback_config(sweep))
    written = [p for p in sweep.rglob("*") if p.name != "multirun.yaml"]
    for name in ("a/adapter/pytorch_lora_weights.safetensors", "a/samples", "a/checkpoints/step-000002",
                 "a/metrics.json", "leaderboard.csv", "summary.json", "report.html"):
        assert sweep / name in written, name
    assert next(sweep.glob("base/*/samples/*.png"))
    modes = {str(p.relative_to(sweep)): oct(stat.S_IMODE(p.lstat().st_mode)) for p in written}
    expected = {name: oct((0o777 if (sweep / name).is_dir() else 0o666) & ~umask) for name in modes}
    assert modes == expected


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_a_folder_built_once_follows_the_umask_and_the_first_one_built_is_kept(tmp_path, umask):
    import safetensors.torch

    model = tmp_path / "model"
    with atomic_dir_if_absent(model) as tmp:
        safetensors.torch.save_file({"w": torch.zeros(2)}, tmp / "w.safetensors")  # safetensors writes 0600
    assert (_mode(model), _mode(model / "w.safetensors")) == (0o777 & ~umask, 0o666 & ~umask)
    with atomic_dir_if_absent(model) as tmp:  # another process built it meanwhile: theirs stays
        (tmp / "other").write_text("second")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and [p.name for p in model.iterdir()] == ["w.safetensors"]


def test_a_folder_whose_replacement_cannot_be_renamed_in_is_put_back(tmp_path, monkeypatch):
    with atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "weights").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.endswith(".tmp"):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError), atomic_dir(tmp_path / "adapter") as tmp:
        (tmp / "weights").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"] and (tmp_path / "adapter" / "weights").read_text() == "old"
