"""What preflight says before a sweep (-m) launches: Hydra's reason for a bad cell, a data.path that is not
there, and trial folder names that the file system refuses or that two cells would share."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from helpers import write_folder
from hydra.core.global_hydra import GlobalHydra

from sdsweep import __main__ as cli
from sdsweep.config.store import trial_dirname
from sdsweep.sweep.preflight import preflight, shared_folders

FIX_DATA = ("point data.path at a folder of images with captions (metadata.jsonl, metadata.csv or a .txt beside "
            "each image), or leave it out for the built-in set")


def test_a_misspelt_key_gets_the_schemas_reason_not_only_hydras_first_line():
    assert preflight(["adapter.rnak=4,8"]) == [
        f"[adapter.rnak={r}] Could not override 'adapter.rnak': Key 'rnak' not in 'AdapterConfig'; "
        "did you mean adapter.rank?" for r in (4, 8)]
    assert preflight(["sweep.early_stop.enabld=true"]) == [
        "[sweep.early_stop.enabld=True] Could not override 'sweep.early_stop.enabld': Key 'enabld' not in "
        "'EarlyStopConfig'; did you mean sweep.early_stop.enabled?"]


def test_a_value_of_the_wrong_type_gets_the_expected_type():
    assert preflight(["train.max_steps=many,3"]) == [
        "[train.max_steps=many] Error merging override train.max_steps=many: Value 'many' of type 'str' could not "
        "be converted to Integer"]


def test_an_unknown_option_lists_the_options_without_hydras_search_path():
    assert preflight(["adapter=lorra"]) == [
        "[adapter=lorra] In 'config': Could not find 'adapter/lorra': Available options in 'adapter': "
        "dora, full, loha, lokr, lora, textual_inversion"]


def test_a_data_path_that_is_not_there_is_one_problem_for_the_sweep(cache_dir, tmp_path, monkeypatch):
    """The trials read a relative data.path from the launch folder (hydra.job.chdir=false): so does preflight."""
    monkeypatch.chdir(tmp_path)
    sweep = ["data.path=photos", "adapter=lora,dora", f"model.cache_dir={cache_dir}"]
    assert preflight(sweep) == [f"data.path=photos does not exist (relative to the launch folder {tmp_path}): "
                                f"{FIX_DATA}"]
    (tmp_path / "notes.txt").write_text("")
    assert preflight(["data.path=notes.txt"]) == [
        f"data.path=notes.txt is a file, not a folder (relative to the launch folder {tmp_path}): {FIX_DATA}"]
    write_folder(tmp_path / "photos")
    assert preflight(["data.path=photos", f"model.cache_dir={cache_dir}"]) == []


def test_trial_folder_names_stay_within_the_file_systems_limit(tmp_path):
    # names that fit are the overrides, as before: existing sweeps resume into their folders
    fits = "adapter=dora,targets=attn,train.checkpoint_every=2,train.max_steps=4"
    assert trial_dirname(fits) == fits
    assert trial_dirname("data.path=/x y") == "data.path=_x_y"
    assert trial_dirname("") == "default"
    longest = "data.path=" + "x" * 245
    assert trial_dirname(longest) == longest
    # longer: the beginning, then a hash of the whole override_dirname (a known answer: stable across runs)
    lora, dora = (f"adapter={a},data.path=/" + "a" * 300 for a in ("lora", "dora"))
    assert trial_dirname(lora) == "adapter=lora,data.path=_" + "a" * 214 + "-ae272c35492630a8"
    assert trial_dirname(dora) == "adapter=dora,data.path=_" + "a" * 214 + "-f9c8916a09a06d88"
    assert len(trial_dirname(lora)) == 255
    (tmp_path / trial_dirname(lora)).mkdir()


def test_cells_whose_folder_names_coincide_are_refused():
    """Two cells whose overrides differ only in characters the folder name replaces would train in one folder."""
    assert shared_folders([["data.path=/d/a:b"], ["data.path=/d/a_b"]]) == [
        "[data.path=/d/a_b] and [data.path=/d/a:b] would share the trial folder data.path=_d_a_b: a folder "
        "name keeps only A-Z a-z 0-9 _ . , = + - of the overrides (the others become _): make their values "
        "differ in those characters"]
    assert shared_folders([["data.path=/d/a_b", "tracking.mode=disabled"], ["data.path=/d/a_b"]])[0].startswith(
        "[data.path=/d/a_b] and [data.path=/d/a_b tracking.mode=disabled] differ only in keys that change nothing")


def test_a_sweep_over_a_long_data_path_trains(cache_dir, tmp_path, monkeypatch):
    """`-m data.path=<250 characters>`: the trial folder's name would pass 255 bytes; the sweep runs (in this
    process) into the shortened folder instead of dying with an OSError before its first trial."""
    data = write_folder(tmp_path / ("a" * 90) / ("b" * 90) / ("c" * 90))
    sweep = tmp_path / "sweep"
    monkeypatch.setattr(sys, "argv", ["sdsweep", "-m", f"data.path={data}", "train.max_steps=1", "eval.enabled=false",
                                      f"model.cache_dir={cache_dir}", "tracking.mode=disabled", "device=cpu",
                                      f"hydra.sweep.dir={sweep}"])
    GlobalHydra.instance().clear()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    finally:
        GlobalHydra.instance().clear()
    assert exit_.value.code == 0
    folder = sweep / trial_dirname(f"data.path={data},train.max_steps=1")
    assert len(folder.name) == 255
    assert json.loads((folder / "metrics.json").read_text())["status"] == "finished"
    assert [p.name for p in Path(sweep).iterdir() if p.is_dir()] == [folder.name]
