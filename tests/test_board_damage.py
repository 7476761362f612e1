"""`python -m sdsweep.board` on a damaged sweep folder: every damage is a row or a named line, never a
traceback, and the three outputs are written all together or not at all."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf
from PIL import Image
from test_leaderboard import BASE_KEY, _base, _metrics, _trial

from sdsweep.board import leaderboard, report
from sdsweep.board.leaderboard import build, write_all
from sdsweep.layout import SweepDir
from sdsweep.sweep.callbacks import summarize

OUTPUTS = ("leaderboard.csv", "leaderboard_trials.csv", "effects.csv", "report.html")


@pytest.fixture
def sweep(tmp_path) -> Path:
    """The base model and two finished configurations: lora (clip 32) ranks above dora (clip 30)."""
    s = tmp_path / "sweep"
    _base(s)
    _trial(s, ["adapter=lora"], **_metrics(clip=32.0))
    _trial(s, ["adapter=dora"], **_metrics(clip=30.0))
    return s


def _damage_lora(sweep: Path, text: str) -> None:
    (sweep / "adapter=lora" / "metrics.json").write_text(text)


def _edit_lora(sweep: Path, **fields) -> None:
    path = sweep / "adapter=lora" / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def _rows(sweep: Path) -> list[list[str]]:
    """(config, status, rank, reason) of leaderboard.csv as written."""
    csv = pd.read_csv(sweep / "leaderboard.csv", dtype=str, keep_default_na=False)
    return csv[["config", "status", "rank", "reason"]].values.tolist()


def _unreadable_lora_board(reason: str) -> list[list[str]]:
    return [["base model (no adapter)", "reference", "", ""], ["adapter=dora", "finished", "1", ""],
            ["adapter=lora (unreadable)", "failed", "", reason]]


def test_a_truncated_metrics_json_is_a_failed_row_naming_the_file(sweep, capsys):
    _damage_lora(sweep, '{"status": "finished", "train_s": 1')  # a write cut short
    assert leaderboard.main([str(sweep)]) == 0
    reason = "adapter=lora/metrics.json is truncated (Expecting ',' delimiter: line 1 column 36)"
    assert _rows(sweep) == _unreadable_lora_board(reason)
    per_trial = pd.read_csv(sweep / "leaderboard_trials.csv", keep_default_na=False).set_index("trial")
    assert per_trial.loc["adapter=lora", "reason"] == reason and per_trial.loc["adapter=lora", "status"] == "failed"
    assert reason in (sweep / "report.html").read_text().replace("&#x27;", "'").replace("&quot;", '"')
    assert "adapter=lora (unreadable)" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "why"), [
    ("", "is empty (Expecting value: line 1 column 1)"),
    ('{"status": "fini', "is truncated (Unterminated string starting at: line 1 column 12)"),
    ('{"status": "finished",, }', "is not valid JSON (Expecting property name enclosed in double quotes: line 1 "
                                  "column 23)"),
    (b'{"reason": "caf\xe9"}', "is not UTF-8 text (byte 0xe9 at offset 15)"),
])
def test_each_kind_of_unreadable_metrics_json_is_named(sweep, text, why):
    path = sweep / "adapter=lora" / "metrics.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    board, _ = build(sweep)
    assert board["reason"].iloc[-1] == f"adapter=lora/metrics.json {why}"


def test_a_metrics_json_holding_a_list_is_a_failed_row(sweep):
    _damage_lora(sweep, "[1, 2]")
    assert leaderboard.main([str(sweep)]) == 0
    assert _rows(sweep) == _unreadable_lora_board("adapter=lora/metrics.json holds a JSON list, not an object")
    # the end-of-sweep summary reads the same folders: the damaged trial counts as failed, with the reason
    summary = summarize(SweepDir(sweep))
    assert summary["failed"] == 1 and summary["trials"]["adapter=lora"] == "failed"
    assert "  FAILED adapter=lora: adapter=lora/metrics.json holds a JSON list, not an object" in summary["lines"]


@pytest.mark.parametrize(("field", "value", "why"), [
    ("status", 5, '"status" is 5, not a string'),
    ("overrides", "adapter=lora", '"overrides" is "adapter=lora", not a list of strings'),
    ("eval/clip_score", "32", '"eval/clip_score" is "32", not a number'),
    ("losses", [0.3, "x"], '"losses" is [0.3, "x"], not a list of numbers'),
    ("eval_images", [{"prompt": "a cat", "seed": [0], "file": "x.png"}],
     '"eval_images" is [{"prompt": "a cat", "seed": [0], "fi..., not a list of '
     '{"prompt": string, "seed": integer, "file": string}'),
])
def test_a_field_of_the_wrong_type_is_a_failed_row_naming_the_field(sweep, field, value, why):
    _edit_lora(sweep, **{field: value})
    assert leaderboard.main([str(sweep)]) == 0
    assert _rows(sweep) == _unreadable_lora_board(f"adapter=lora/metrics.json: {why}")
    assert all((sweep / name).exists() for name in OUTPUTS)


def test_a_truncated_base_json_is_skipped_and_named(sweep, caplog):
    record = sweep / "base" / BASE_KEY / "base.json"
    record.write_text(record.read_text()[:10])
    with caplog.at_level(logging.WARNING):
        assert leaderboard.main([str(sweep)]) == 0
    problem = f"skipped the base model's record: {record} is truncated (Unterminated string starting at: line 1 column 9)"
    assert problem in caplog.text
    # no reference row: the composite (% better than the base model) has nothing to measure against, so the
    # trials are listed unranked, each saying why, and nothing of theirs is lost
    assert _rows(sweep) == [["adapter=dora", "finished", "", ""], ["adapter=lora", "finished", "", ""]]
    notes = pd.read_csv(sweep / "leaderboard.csv", dtype=str, keep_default_na=False)["note"].tolist()
    assert notes == [leaderboard.NO_BASE] * 2
    assert "Skipped while reading the folder" in (sweep / "report.html").read_text()


def test_a_base_json_without_its_settings_is_skipped_and_named(sweep, caplog):
    record = sweep / "base" / BASE_KEY / "base.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "settings": None}))
    board, _ = build(sweep)
    assert list(board["config"]) == ["adapter=dora", "adapter=lora"] and board["rank"].isna().all()
    assert f'skipped the base model\'s record: {record}: "settings" is missing' in caplog.text


def test_damaged_score_weights_in_multirun_yaml_are_skipped_and_named(sweep, caplog):
    (sweep / "multirun.yaml").write_text("eval:\n  score_weights: {clip_score: [")  # truncated YAML
    board, _ = build(sweep)
    assert board["rank"].tolist()[1:] == [1, 2]  # the default weights
    assert f"skipped the score weights in {sweep / 'multirun.yaml'}: not a readable config" in caplog.text
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml({"eval": {"score_weights": {"clip_score": "abc"}}}))
    build(sweep)
    assert "eval.score_weights={\"clip_score\": \"abc\"} is not METRIC: number >= 0" in caplog.text


@pytest.mark.parametrize(("item", "why"), [
    ("clip_score=abc", "'clip_score=abc': 'abc' is not a number >= 0"),
    ("clip_score", "'clip_score': '' is not a number >= 0"),
    ("clip_score=-1", "'clip_score=-1': '-1' is not a number >= 0"),
    ("clip_score=nan", "'clip_score=nan': 'nan' is not a number >= 0"),
    ("clipscore=2", "'clipscore=2': unknown metric 'clipscore'"),
])
def test_a_bad_weight_is_a_usage_error_naming_the_flag_and_the_form(sweep, capsys, item, why):
    with pytest.raises(SystemExit) as exit_:
        leaderboard.main([str(sweep), "--weight", item])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument --weight: {why}; expected METRIC=WEIGHT, METRIC one of clip_score, " in err
    assert "WEIGHT a number >= 0, e.g. clip_score=2" in err
    assert not any((sweep / name).exists() for name in OUTPUTS)


def test_all_weights_zero_is_a_usage_error(sweep, capsys):
    from sdsweep.config.schema import SCORE_KEYS

    zero = [a for k in SCORE_KEYS for a in ("--weight", f"{k}=0")]
    with pytest.raises(SystemExit) as exit_:
        leaderboard.main([str(sweep), *zero])
    assert exit_.value.code == 2 and "--weight: every composite weight is 0" in capsys.readouterr().err


def test_a_failure_while_making_the_report_leaves_all_old_outputs_untouched(sweep, monkeypatch):
    write_all(sweep, echo=False)
    before = {name: (sweep / name).read_bytes() for name in OUTPUTS}
    _trial(sweep, ["adapter=loha"], **_metrics(clip=40.0))  # the next board would differ in every file

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(report, "render", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_all(sweep, echo=False)
    assert {name: (sweep / name).read_bytes() for name in OUTPUTS} == before
    assert sorted(p.name for p in sweep.iterdir() if p.is_file()) == sorted(OUTPUTS)  # no temporary left


def test_a_failure_while_making_the_table_leaves_all_old_outputs_untouched(sweep, monkeypatch):
    write_all(sweep, echo=False)
    before = {name: (sweep / name).read_bytes() for name in OUTPUTS}
    _trial(sweep, ["adapter=loha"], **_metrics(clip=40.0))

    def broken(board):
        raise TypeError("cannot format")

    monkeypatch.setattr(leaderboard, "table", broken)
    with pytest.raises(TypeError, match="cannot format"):
        write_all(sweep, echo=True)
    assert {name: (sweep / name).read_bytes() for name in OUTPUTS} == before


def test_a_damaged_sample_image_is_a_cell_saying_so(sweep):
    sample = next((sweep / "adapter=lora" / "samples").glob("*.png"))
    sample.write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    write_all(sweep, echo=False)
    page = (sweep / "report.html").read_text()
    assert f"unreadable image<br><small>{sample.name}: UnidentifiedImageError</small>" in page
    assert page.count("<img ") == 2 * 3 - 1  # base, lora, dora: two images each, less the damaged one
    Image.open(next((sweep / "adapter=dora" / "samples").glob("*.png"))).verify()


def test_a_stopped_record_without_step_counts_is_summarised(tmp_path):
    (tmp_path / "multirun.yaml").write_text("{}\n")
    _trial(tmp_path, ["adapter=lora"], status="stopped", reason="behind the median")  # no steps, no steps_saved
    outcome = summarize(SweepDir(tmp_path))
    assert outcome["stopped"] == 1 and "0 of 0 training steps saved" in outcome["lines"][-1]


def test_a_damaged_base_record_is_drawn_again_not_a_failure_of_every_trial(tmp_path, monkeypatch, caplog):
    """eval/base.ensure_base: a truncated base.json (a kill, a full disk) means the base samples are drawn
    again in its place, once, with a warning naming the folder."""
    from sdsweep.eval import base as base_mod
    from sdsweep.eval.sampling import Sample
    from sdsweep.layout import BaseDir

    folder = BaseDir(tmp_path / "base" / "k")
    folder.samples.mkdir(parents=True)
    folder.record.write_text('{"key": "k", "eval_images": [{"prompt"')
    drawn = [Sample("a cat", 0, "00_a-cat_seed0.png", Image.new("RGB", (8, 8), (10, 20, 30)))]
    monkeypatch.setattr(base_mod, "generate", lambda *a, **k: drawn)
    monkeypatch.setattr(base_mod, "read_prompts", lambda e: ["a cat"])
    monkeypatch.setattr(base_mod, "sampling_batch", lambda cfg: 1)

    class Scorer:
        def score(self, samples, base):
            return {"clip_score": 1.0}, [{"prompt": "a cat", "seed": 0, "file": "00_a-cat_seed0.png"}]

    cfg = OmegaConf.create({"eval": {"seeds": [0]}})
    with caplog.at_level(logging.WARNING):
        samples = base_mod.ensure_base(cfg, None, folder, {}, Scorer(), None)
    assert samples == drawn and f"{folder.path} cannot be read" in caplog.text
    assert json.loads(folder.record.read_text())["eval_images"][0]["file"] == "00_a-cat_seed0.png"
    again = base_mod.ensure_base(cfg, None, folder, {}, Scorer(), None)  # now read back, not drawn
    assert [s.file for s in again] == ["00_a-cat_seed0.png"] and again[0].image.getpixel((0, 0)) == (10, 20, 30)


def test_rewriting_the_report_encodes_only_new_or_changed_samples(sweep, monkeypatch):
    """The report is rewritten after every trial: earlier samples' thumbnails are remembered by file, and a
    sample written anew (another image) is encoded again and shown as it is now."""
    encoded = []
    real = report._encode_png
    monkeypatch.setattr(report, "_encode_png", lambda path: encoded.append(path.name) or real(path))
    monkeypatch.setattr(report, "_THUMBNAILS", {})
    write_all(sweep, echo=False)
    first = len(encoded)
    assert first == 2 * 3  # base, lora, dora: two images each
    write_all(sweep, echo=False)
    assert len(encoded) == first  # nothing encoded again
    sample = next((sweep / "adapter=lora" / "samples").glob("*.png"))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(sample)
    write_all(sweep, echo=False)
    assert encoded[first:] == [sample.name]
    assert real(sample) in (sweep / "report.html").read_text()
