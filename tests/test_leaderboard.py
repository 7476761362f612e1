"""The leaderboard ranks, ties, aggregates over seeds and lists failures from trial folders alone."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli_env
from omegaconf import OmegaConf
from PIL import Image

from sdsweep.board import leaderboard
from sdsweep.board.leaderboard import build, write_all
from sdsweep.sweep.callbacks import SweepSummary

PROMPTS = [("a cat", 0), ("a dog", 0)]
BASE_KEY = "abc123"


def _metrics(clip=30.0, content=0.9, style=0.8, kid=0.01, **extra) -> dict:
    return {"eval/clip_score": clip, "eval/content_cos": content, "eval/style_centroid_cos": style,
            "eval/style_nn_cos": style + 0.05, "eval/kid": kid, "eval/kid_std": 0.001, "eval/gram_distance": 0.5,
            "eval/color_distance": 0.1, "eval/base_key": BASE_KEY, **extra}


def _trial(sweep: Path, overrides: list[str], status="finished", memory=1000.0, train_s=10.0, images=True, **m) -> Path:
    folder = sweep / ",".join(overrides)
    metrics = {"status": status, "overrides": overrides,
               "choices": {"adapter": next((o.split("=")[1] for o in overrides if o.startswith("adapter=")), "lora"),
                           "model": "tiny-sdxl"},
               "trainable_params": 1000, "adapter_mb": 0.5, "peak_vram_mb": memory, "peak_memory_mb": memory,
               "steps_per_s": 2.0, "train_s": train_s, "wall_s": train_s + 5, "final_loss": 0.1,
               "losses": [0.3, 0.2, 0.1]}
    if status == "finished":
        metrics.update(m or _metrics())
        if images:
            (folder / "samples").mkdir(parents=True)
            rows = []
            for i, (prompt, seed) in enumerate(PROMPTS):
                name = f"{i:02d}_{prompt.replace(' ', '-')}_seed{seed}.png"
                Image.new("RGB", (16, 16), (40 * i, 100, 200)).save(folder / "samples" / name)
                rows.append({"prompt": prompt, "seed": seed, "file": name, "clip_score": 30.0})
            metrics["eval_images"] = rows
    else:
        metrics["reason"] = m.get("reason", "out of memory")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def _base(sweep: Path, **m) -> None:
    folder = sweep / "base" / BASE_KEY
    (folder / "samples").mkdir(parents=True)
    rows = []
    for i, (prompt, seed) in enumerate(PROMPTS):
        name = f"{i:02d}_{prompt.replace(' ', '-')}_seed{seed}.png"
        Image.new("RGB", (16, 16), (0, 0, 0)).save(folder / "samples" / name)
        rows.append({"prompt": prompt, "seed": seed, "file": name})
    settings = {"precision": {"base_dtype": "fp32", "quantize": "none"}}
    record = {"key": BASE_KEY, "settings": settings, "status": "reference", "eval_images": rows,
              **_metrics(**{"clip": 25.0, "content": 1.0, "style": 0.5, "kid": 0.05, **m})}
    (folder / "base.json").write_text(json.dumps(record))


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Three configurations x three seeds (one seed failed), one config whose evaluation failed, one failed config."""
    s = tmp_path / "sweep"
    _base(s)
    for seed, (clip_a, clip_b) in enumerate([(31.0, 29.0), (32.0, 30.0), (33.0, 31.0)]):
        _trial(s, ["adapter=lora", f"seed={seed}"], **_metrics(clip=clip_a))
        _trial(s, ["adapter=dora", f"seed={seed}"], memory=1200.0, **_metrics(clip=clip_b))
    _trial(s, ["adapter=loha", "seed=0"], memory=900.0, train_s=20.0, **_metrics(clip=20.0))
    _trial(s, ["adapter=loha", "seed=1"], status="failed", reason="NonFiniteLoss: loss became nan at step 3")
    _trial(s, ["adapter=lokr", "seed=0"], eval_error="ClipLoadError: could not load CLIP weights", images=False)
    _trial(s, ["adapter=lokr,targets=many", "seed=0"], status="failed", reason="out of memory")
    return s


def test_rows_are_configurations_ranked_by_mean_with_base_first_and_failures_last(sweep):
    board, _ = build(sweep)
    assert list(board["config"]) == ["base model (no adapter)", "adapter=lora", "adapter=dora", "adapter=loha",
                                     "adapter=lokr", "adapter=lokr,targets=many"]
    assert list(board["status"]) == ["reference", "finished", "finished", "finished", "finished", "failed"]
    assert board["rank"].tolist()[1:4] == [1, 2, 3]
    assert board["rank"].iloc[[0, 4, 5]].isna().all()  # reference, evaluation failed, training failed
    assert board["reason"].iloc[4].startswith("ClipLoadError") and board["reason"].iloc[5] == "out of memory"


def test_seeds_are_aggregated_into_mean_and_spread(sweep):
    board, per_trial = build(sweep)
    lora = board.set_index("config").loc["adapter=lora"]
    assert lora["n_seeds"] == 3 and lora["seeds"] == "0 1 2"
    assert lora["eval/clip_score"] == pytest.approx(32.0)
    assert lora["eval/clip_score_std"] == pytest.approx(1.0)  # sample standard deviation of 31, 32, 33
    loha = board.set_index("config").loc["adapter=loha"]
    assert loha["n_seeds"] == 1 and math.isnan(loha["eval/clip_score_std"])
    assert "1 of 2 seeds failed" in loha["note"] and "NonFiniteLoss" in loha["reason"]
    assert len(per_trial) == 1 + 3 + 3 + 2 + 1 + 1
    assert per_trial["status"].iloc[0] == "reference" and (per_trial["status"].iloc[-2:] == "failed").all()


def test_configurations_within_their_seed_spread_get_a_note(sweep):
    board, _ = build(sweep)
    notes = board.set_index("config")["note"]
    # lora (clip 32 +- 1) and dora (30 +- 1) differ by less than their summed composite spread
    assert "not separated from #1 adapter=lora" in notes["adapter=dora"]
    assert notes["adapter=lora"] == ""


def test_ties_share_a_rank(tmp_path):
    s = tmp_path / "sweep"
    _base(s)
    _trial(s, ["adapter=lora"])
    _trial(s, ["adapter=dora"])
    _trial(s, ["adapter=loha"], **_metrics(clip=10.0))
    board, _ = build(s)
    ranks = dict(zip(board["config"], board["rank"]))
    assert ranks["adapter=lora"] == ranks["adapter=dora"] == 1 and ranks["adapter=loha"] == 3


def test_composite_weights_change_the_order(tmp_path):
    s = tmp_path / "sweep"
    _base(s)
    _trial(s, ["adapter=lora"], **_metrics(clip=35.0, content=0.5))
    _trial(s, ["adapter=dora"], **_metrics(clip=25.0, content=0.99))
    by_clip, _ = build(s, {"clip_score": 1.0, "content_cos": 0.0})
    by_content, _ = build(s, {"clip_score": 0.0, "content_cos": 1.0})
    assert by_clip["config"].iloc[1] == "adapter=lora" and by_content["config"].iloc[1] == "adapter=dora"
    # by hand (% better than the base model: clip 25, content 1.0, style 0.5, nn 0.55, kid 0.05): each metric's
    # gain 100 (value - base) / |base|, distances turned; the other weights stay at their defaults (style 0.5,
    # nn 0.5, kid 0.5, gram 0.25, colour 0.25) where both trials gain style +60, nn +54.5, kid +80 (gram, colour 0)
    shared = 0.5 * 60 + 0.5 * 100 * 0.3 / 0.55 + 0.5 * 80
    assert by_clip["composite"].tolist() == pytest.approx([0.0, (1 * 40 + shared) / 3, (1 * 0 + shared) / 3])
    assert by_content["composite"].tolist() == pytest.approx([0.0, (1 * -1 + shared) / 3, (1 * -50 + shared) / 3])


def test_noise_level_differences_do_not_make_a_ranking(tmp_path):
    s = tmp_path / "sweep"
    _base(s)
    _trial(s, ["adapter=lora"], **_metrics(clip=30.0, content=0.999999))
    _trial(s, ["adapter=dora"], **_metrics(clip=30.000001, content=0.999998))
    board, _ = build(s)
    lora, dora = board.set_index("config").loc[["adapter=lora", "adapter=dora"], "composite"]
    assert abs(lora - dora) < 1e-4


def test_pareto_front_and_t4_flag(tmp_path):
    s = tmp_path / "sweep"
    _base(s)
    _trial(s, ["adapter=lora"], memory=8000.0, **_metrics(clip=30.0))   # best score
    _trial(s, ["adapter=dora"], memory=4000.0, **_metrics(clip=28.0))   # less memory
    _trial(s, ["adapter=loha"], memory=9000.0, **_metrics(clip=27.0))   # beaten on everything
    _trial(s, ["adapter=lokr"], memory=20000.0, train_s=1.0, **_metrics(clip=26.0))  # fastest, too big for a T4
    board = build(s)[0].set_index("config")
    assert board.loc["base model (no adapter)", "pareto"] is pd.NA  # the reference is not a candidate
    assert [bool(board.loc[c, "pareto"]) for c in ("adapter=lora", "adapter=dora", "adapter=loha", "adapter=lokr")] == \
        [True, True, False, True]
    assert bool(board.loc["adapter=lora", "fits_t4"]) and not bool(board.loc["adapter=lokr", "fits_t4"])


# The fixture sweep's leaderboard, worked out by hand from its numbers and add_composite's formula:
# composite = sum_k w_k gain_k / sum_k w_k, gain_k = 100 (value - base) / |base| (turned for distances) against
# the base model (clip 25, content 1.0, style 0.5, nn 0.55, kid 0.05, gram 0.5, colour 0.1). Every trial has
# content 0.9 (-10), style 0.8 (+60), nn 0.85 (+54.5), kid 0.01 (+80), the base's gram and colour (0), and its
# own clip score (4 (clip - 25)). Weights (multirun.yaml sets clip_score=2): clip 2, content 1, style 0.5,
# nn 0.5, kid 0.5, gram 0.25, colour 0.25. The base model scores 0.
SHARED_GAIN = -10 + 0.5 * 60 + 0.5 * 100 * 0.3 / 0.55 + 0.5 * 80


def _trial_composite(clip: float, clip_weight: float = 2.0) -> float:
    return (clip_weight * 4 * (clip - 25) + SHARED_GAIN) / (clip_weight + 3.0)


BOARD_COLUMNS = ["rank", "config", "status", "composite", "composite_std", "pareto", "fits_t4", "n_seeds", "seeds",
                 "eval/clip_score", "note", "reason"]


def _g(x: float) -> str:
    return format(x, ".6g")  # write_csv's float_format


def _expected_board(clip_weight: float) -> list[list[str]]:
    """BOARD_COLUMNS of the fixture's leaderboard.csv, as written. lora: seeds at clip 31, 32, 33 (composites
    1.6 apart with clip weight 2: sample std 1.6); dora: 29, 30, 31 (3.2 lower, the same std);
    loha: 20, one seed. Pareto: lora beats dora on composite at less memory and the same time; loha needs the
    least memory. With clip weight 0 the three tie (rank 1 each, listed by name); lora still dominates dora."""
    lora, dora, loha = (sum(_trial_composite(c, clip_weight) for c in clips) / len(clips)
                        for clips in ((31, 32, 33), (29, 30, 31), (20,)))
    std = _g(clip_weight * 4 / (clip_weight + 3.0))  # seeds 1 clip point apart: composites this far apart
    spread_note = "not separated from #1 adapter=lora by more than their seed spread"
    rows = {
        "lora": [_g(lora), std, "True", "True", "3", "0 1 2", "32", ""],
        "dora": [_g(dora), std, "False", "True", "3", "0 1 2", "30", spread_note if clip_weight else ""],
        "loha": [_g(loha), "", "True", "True", "1", "0 1", "20", "1 of 2 seeds failed"],
    }
    ranked = [["1", "lora"], ["2", "dora"], ["3", "loha"]] if clip_weight else [["1", "dora"], ["1", "loha"],
                                                                                 ["1", "lora"]]
    return [["", "base model (no adapter)", "reference", "0", "", "", "", "", "", "25",
             "", ""],
            *[[rank, f"adapter={name}", "finished", *rows[name],
               "NonFiniteLoss: loss became nan at step 3" if name == "loha" else ""] for rank, name in ranked],
            ["", "adapter=lokr", "finished", "", "", "", "True", "1", "0", "", "", "ClipLoadError: could not load CLIP weights"],
            ["", "adapter=lokr,targets=many", "failed", "", "", "", "", "0", "0", "", "", "out of memory"]]


def _board_csv(sweep: Path) -> list[list[str]]:
    csv = pd.read_csv(sweep / "leaderboard.csv", dtype=str, keep_default_na=False)
    return csv[BOARD_COLUMNS].values.tolist()


def test_the_leaderboard_csv_holds_the_ranks_and_composites_worked_out_by_hand(sweep, capsys):
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml({"eval": {"score_weights": {"clip_score": 2.0}}}))
    write_all(sweep)
    assert "adapter=lora" in capsys.readouterr().out  # the table is printed
    assert _board_csv(sweep) == _expected_board(clip_weight=2.0)
    csv = pd.read_csv(sweep / "leaderboard.csv")
    for column in ("rank", "config", "adapter", "overrides", "trainable_params", "adapter_mb", "peak_vram_mb",
                   "it_per_s", "wall_s", "final_loss", "eval/clip_score", "eval/kid", "composite", "pareto",
                   "fits_t4", "status", "reason", "note"):
        assert column in csv.columns, column
    assert leaderboard.main([str(sweep), "--weight", "clip_score=0"]) == 0
    assert _board_csv(sweep) == _expected_board(clip_weight=0.0)


def test_rebuilding_from_the_folders_gives_the_same_csv(sweep, cache_dir, tmp_path):
    """`python -m sdsweep.board SWEEP_DIR`, as a user runs it (another process, another working directory),
    writes the bytes the end of the sweep wrote."""
    (sweep / "multirun.yaml").write_text(OmegaConf.to_yaml({"eval": {"score_weights": {"clip_score": 2.0}}}))
    write_all(sweep, echo=False)
    written = {name: (sweep / name).read_bytes() for name in ("leaderboard.csv", "leaderboard_trials.csv")}
    for name in written:
        (sweep / name).unlink()
    result = subprocess.run([sys.executable, "-m", "sdsweep.board", str(sweep)], env=cli_env(cache_dir),
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "adapter=lora" in result.stdout and str(sweep / "leaderboard.csv") in result.stdout
    assert {name: (sweep / name).read_bytes() for name in written} == written
    assert _board_csv(sweep) == _expected_board(clip_weight=2.0)


def test_a_folder_without_trials_is_refused_naming_the_folder_to_give(tmp_path, capsys):
    (tmp_path / "not-a-trial").mkdir()
    with pytest.raises(SystemExit) as exit_:
        leaderboard.main([str(tmp_path)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "holds no trial folders" in err and "multirun/<date>/<time>" in err
    assert not (tmp_path / "leaderboard.csv").exists()


def test_the_report_shows_the_grid_first_and_holds_every_trial(sweep):
    write_all(sweep, echo=False)
    page = (sweep / "report.html").read_text()
    assert page.index("<table class=grid>") < page.index("<table class=board>") < page.index("<svg")
    # base + 3 lora + 3 dora + 1 loha rows with two images each (lokr's evaluation failed, the rest failed)
    assert page.count("<img ") == 2 * (1 + 3 + 3 + 1)
    for text in ("adapter=lora", "adapter=dora", "adapter=loha", "adapter=lokr", "adapter=lokr,targets=many",
                 "out of memory", "NonFiniteLoss", "ClipLoadError", "base model (no adapter)", "polyline"):
        assert text in page, text
    assert "http" not in page.replace("http://www.w3.org/2000/svg", "")  # nothing to fetch: opens from disk


def test_the_callback_writes_the_leaderboard_at_the_end_of_a_multirun(sweep, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}, "tracking": {"mode": "disabled"},
                               "eval": {"score_weights": {"clip_score": 1.0}}})
    SweepSummary().on_multirun_end(config)
    assert (sweep / "leaderboard.csv").exists() and (sweep / "report.html").exists()
    assert "adapter=lora" in capsys.readouterr().out


def test_a_wandb_error_is_only_a_warning(sweep, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    write_all(sweep, tracking=OmegaConf.create({"mode": "offline", "project": "p"}), echo=False)
    assert (sweep / "leaderboard.csv").exists()
    assert "W&B leaderboard table not logged" in caplog.text and "no network" in caplog.text


def test_any_status_other_than_finished_is_listed_last_with_its_reason(tmp_path):
    s = tmp_path / "sweep"
    _base(s)
    _trial(s, ["adapter=dora"], status="interrupted", reason="KeyboardInterrupt")
    _trial(s, ["adapter=lora"])
    board, per_trial = build(s)
    assert list(board["status"]) == ["reference", "finished", "interrupted"]
    assert board["reason"].iloc[-1] == "KeyboardInterrupt" and pd.isna(board["rank"].iloc[-1])
    assert per_trial["status"].iloc[-1] == "interrupted"


def _cells_trial(sweep: Path, overrides: list[str], clip: list[float], base_clip: list[float] | None = None) -> None:
    """A trial (or with base_clip, also the base) whose per-image CLIP scores over 12 prompt cells are `clip`."""
    prompts = [(f"prompt {i}", 0) for i in range(len(clip))]
    rows = [{"prompt": p, "seed": s, "file": f"{i:02d}.png", "clip_score": c} for i, ((p, s), c) in enumerate(zip(prompts, clip))]
    m = {**_metrics(clip=sum(clip) / len(clip)), "eval_images": rows}
    folder = sweep / ",".join(overrides)
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"status": "finished", "overrides": overrides,
                                                     "choices": {"adapter": "lora"}, "losses": [0.1], **m}))
    if base_clip is not None:
        base = sweep / "base" / BASE_KEY
        base.mkdir(parents=True)
        rows = [{**r, "clip_score": c} for r, c in zip(rows, base_clip)]
        (base / "base.json").write_text(json.dumps({
            "key": BASE_KEY, "settings": {"precision": {"base_dtype": "fp32", "quantize": "none"}},
            "status": "reference", "eval_images": rows, **_metrics(clip=sum(base_clip) / len(base_clip), content=1.0,
                                                                     style=0.5, kid=0.05)}))


def test_the_composite_is_percent_better_than_the_base_and_does_not_move_when_rows_are_added(tmp_path):
    s = tmp_path / "sweep"
    _base(s)
    _trial(s, ["adapter=lora"], **_metrics(clip=30.0))
    alone = build(s, {"clip_score": 1.0, "content_cos": 0, "style_centroid_cos": 0, "style_nn_cos": 0, "kid": 0,
                      "gram_distance": 0, "color_distance": 0})[0].set_index("config")
    assert alone.loc["base model (no adapter)", "composite"] == 0.0
    assert alone.loc["adapter=lora", "composite"] == pytest.approx(20.0)  # clip 30 against the base's 25: 20 % better
    _trial(s, ["adapter=dora"], **_metrics(clip=10.0))  # a far worse row changes nobody else's composite
    both = build(s, {"clip_score": 1.0, "content_cos": 0, "style_centroid_cos": 0, "style_nn_cos": 0, "kid": 0,
                     "gram_distance": 0, "color_distance": 0})[0].set_index("config")
    assert both.loc["adapter=lora", "composite"] == pytest.approx(20.0)
    assert both.loc["adapter=dora", "composite"] == pytest.approx(-60.0)
    _trial(s, ["adapter=loha"], **_metrics(clip=0.0, kid=5.0))  # gains are clipped at -100 %
    clipped = build(s, {"clip_score": 1.0, "kid": 1.0, "content_cos": 0, "style_centroid_cos": 0, "style_nn_cos": 0,
                        "gram_distance": 0, "color_distance": 0})[0].set_index("config")
    assert clipped.loc["adapter=loha", "composite"] == pytest.approx(-100.0)


def test_a_configuration_within_the_interval_of_the_best_shares_rank_1_and_one_beyond_it_does_not(tmp_path):
    """Per-cell CLIP scores: `close` is 0.3 points below the best on average with cells that scatter by +-3
    (its paired difference interval reaches 0); `worse` is 3 points below on every cell (separated)."""
    s = tmp_path / "sweep"
    weights = {"clip_score": 1.0, "content_cos": 0, "style_centroid_cos": 0, "style_nn_cos": 0, "kid": 0,
               "gram_distance": 0, "color_distance": 0}
    best = [30.0] * 12
    scatter = [3.0, -3.0] * 6
    _cells_trial(s, ["adapter=lora"], best, base_clip=[25.0] * 12)
    _cells_trial(s, ["adapter=dora"], [b - 0.3 + d for b, d in zip(best, scatter)])
    _cells_trial(s, ["adapter=loha"], [b - 3.0 for b in best])
    board = build(s, weights)[0].set_index("config")
    assert board.loc["adapter=lora", "rank"] == 1
    assert board.loc["adapter=dora", "rank"] == 1 and "tied with #1 adapter=lora" in board.loc["adapter=dora", "note"]
    low, high = board.loc["adapter=dora", ["composite_vs_best_low", "composite_vs_best_high"]]
    assert low < 0 < high + 0.5  # reaches the tie band
    assert board.loc["adapter=loha", "rank"] == 3
    assert board.loc["adapter=loha", "composite_vs_best"] == pytest.approx(-12.0)  # 3 of 25 points: 12 %
    assert board.loc["adapter=loha", "composite_vs_best_high"] == pytest.approx(-12.0)  # the same on every cell
    assert list(board.index[1:]) == ["adapter=lora", "adapter=dora", "adapter=loha"]
    assert build(s, weights)[0]["composite_vs_best_low"].equals(board.reset_index()["composite_vs_best_low"])


def test_a_trials_seed_is_read_from_its_config_again_when_the_file_changes(tmp_path):
    """The board remembers each config.yaml's seed (it is rewritten after every trial), by the file's state."""
    from sdsweep.layout import TrialDir

    trial = TrialDir(tmp_path / "adapter=lora")
    trial.config.parent.mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"seed": 1}), trial.config)
    assert leaderboard.trial_seed(trial, []) == 1
    OmegaConf.save(OmegaConf.create({"seed": 2024, "note": "rewritten"}), trial.config)
    assert leaderboard.trial_seed(trial, []) == 2024
    assert leaderboard.trial_seed(trial, ["seed=7"]) == 7  # an override says it first
    trial.config.write_text("seed: [unclosed")
    assert leaderboard.trial_seed(trial, []) is None
