"""Intervals and axis effects (board/effects.py): known answers on made-up per-image scores, then on folders."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sdsweep.board import effects as fx
from sdsweep.board.leaderboard import write_all

PROMPTS = [f"prompt {i}" for i in range(6)]
SEEDS = [0, 1]


def record(values, metric="style_centroid_cos", **extra) -> dict:
    """An eval_images record with one value per (prompt, seed) cell, in PROMPTS x SEEDS order."""
    values = iter(values)
    return {"eval_images": [{"prompt": p, "seed": s, "file": f"{i:02d}_{s}.png", metric: float(next(values)), **extra}
                            for i, p in enumerate(PROMPTS) for s in SEEDS]}


def noise(seed: int, scale: float = 0.01) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, len(PROMPTS) * len(SEEDS))


def test_a_shift_on_every_cell_is_the_effect_exactly_and_its_interval_is_that_point():
    base = record(0.3 + noise(0))
    trial = record(0.3 + noise(0) + 0.25)
    own, diff = fx.versus_base([trial], base, "style_centroid_cos")
    assert diff.mean == pytest.approx(0.25) and diff.low == pytest.approx(0.25) and diff.high == pytest.approx(0.25)
    assert own.low < own.mean < own.high  # the trial's own mean varies over the cells


def test_the_same_images_tie_with_the_base_model_and_tiny_differences_are_not_separated():
    values = 0.3 + noise(1)
    same = fx.versus_base([record(values)], record(values), "style_centroid_cos")[1]
    assert (same.mean, same.low, same.high) == (0.0, 0.0, 0.0) and not same.separated(fx.RESOLUTION["style_centroid_cos"])
    # a learning rate of 1e-12: every image moves by ~1e-7, all alike. Its interval excludes zero, but the
    # difference is below the metric's resolution: a tie
    tiny = fx.versus_base([record(values + 1e-7)], record(values), "style_centroid_cos")[1]
    assert tiny.separated(0.0) and not tiny.separated(fx.RESOLUTION["style_centroid_cos"])


def test_noise_around_no_difference_gives_an_interval_around_zero_and_a_real_one_excludes_it():
    base = record(0.3 + noise(2))
    null = fx.versus_base([record(0.3 + noise(3))], base, "style_centroid_cos")[1]
    assert null.low < 0 < null.high
    real = fx.versus_base([record(0.3 + noise(3) + 0.05)], base, "style_centroid_cos")[1]
    assert real.low > fx.RESOLUTION["style_centroid_cos"]


def test_the_bootstrap_is_reproducible_and_its_coverage_is_about_95_percent():
    values = np.random.default_rng(5).normal(0, 1, (1, 40))
    assert fx.bootstrap(values) == fx.bootstrap(values)  # a fixed seed: the same folders, the same intervals
    # samples of a mean-zero distribution: the interval holds zero in about 95 % of them (percentile intervals
    # run a little short with few cells: 90 % at 12 cells, 93 % at 30, as the module's docstring says)
    rng = np.random.default_rng(11)
    hits = sum(fx.bootstrap(rng.normal(0, 1, (1, 30)), draws=1000, seed=i).separated() is False for i in range(400))
    assert 0.90 <= hits / 400 <= 0.98, hits


def test_training_seeds_widen_the_interval_when_they_disagree():
    base = record(np.zeros(12))
    agreeing = [record(0.1 + noise(9, 0.001)), record(0.1 + noise(10, 0.001))]
    disagreeing = [record(0.0 + noise(9, 0.001)), record(0.2 + noise(10, 0.001))]
    narrow = fx.versus_base(agreeing, base, "style_centroid_cos")[1]
    wide = fx.versus_base(disagreeing, base, "style_centroid_cos")[1]
    assert narrow.mean == pytest.approx(wide.mean, abs=1e-3)
    assert (wide.high - wide.low) > 10 * (narrow.high - narrow.low)


def _configuration(overrides: str, shift: float, **resources) -> fx.Configuration:
    return fx.Configuration(fx.parse_overrides(overrides), [record(0.3 + noise(0) + shift)], resources)


def test_main_effects_of_a_2x2_have_the_right_sign_and_size():
    """style = 0.3 + 0.1 [adapter=dora] + 0.0 [targets=many]; memory +50 MB for targets=many."""
    grid = [_configuration("adapter=lora,targets=attn", 0.0, peak_memory_mb=1000, it_per_s=10),
            _configuration("adapter=lora,targets=many", 0.0, peak_memory_mb=1050, it_per_s=8),
            _configuration("adapter=dora,targets=attn", 0.1, peak_memory_mb=1000, it_per_s=10),
            _configuration("adapter=dora,targets=many", 0.1, peak_memory_mb=1050, it_per_s=8)]
    found = {(e.axis, e.option, e.measure): e for e in fx.axis_effects(grid)}
    adapter = found[("adapter", "lora", "eval/style_centroid_cos")]  # against dora, the first in order
    assert adapter.reference == "dora" and adapter.effect == pytest.approx(-0.1) and adapter.separated
    targets = found[("targets", "many", "eval/style_centroid_cos")]
    assert targets.effect == pytest.approx(0.0, abs=1e-12) and not targets.separated
    memory = found[("targets", "many", "peak_memory_mb")]
    assert memory.effect == pytest.approx(50) and memory.low is None and (memory.pairs, memory.possible) == (2, 2)
    assert found[("targets", "many", "it_per_s")].relative == pytest.approx(-0.2)
    lines = fx.findings(fx.axis_effects(grid))
    assert any(line.startswith("targets=many vs attn: ") and "style_centroid_cos +0 [+0, +0] (not separated)" in line
               and "peak memory MB +50 (+5%)" in line and "it/s -2 (-20%)" in line for line in lines), lines


def test_an_incomplete_matrix_uses_the_pairs_it_has_and_says_so():
    grid = [_configuration("adapter=lora,targets=attn", 0.0), _configuration("adapter=lora,targets=many", 0.05),
            _configuration("adapter=dora,targets=attn", 0.1)]  # dora,many failed
    targets = next(e for e in fx.axis_effects(grid) if e.axis == "targets" and e.measure == "eval/style_centroid_cos")
    assert targets.effect == pytest.approx(0.05) and (targets.pairs, targets.possible) == (1, 2)
    assert "(1 of 2 pairs: the others failed or were pruned)" in fx.findings([targets])[0]


def test_numeric_options_are_ordered_as_numbers_and_bracketed_values_keep_their_commas():
    assert fx.parse_overrides("eval.seeds=[0,1],train.lr=1e-3") == {"eval.seeds": "[0,1]", "train.lr": "1e-3"}
    grid = [_configuration("train.lr=1e-2", 0.1), _configuration("train.lr=1e-12", 0.0),
            _configuration("train.lr=2e-3", 0.05)]
    assert fx.axes(grid) == {"train.lr": ["1e-12", "2e-3", "1e-2"]}


def _write_sweep(folder, cells: dict[str, float]) -> None:
    """A sweep folder as trials write it: base/<key>/base.json and one metrics.json per configuration."""
    (folder / "base" / "k").mkdir(parents=True)
    base = {"key": "k", "settings": {"precision": {"base_dtype": "fp32", "quantize": None}},
            "eval/style_centroid_cos": 0.3, **record(0.3 + noise(0))}
    (folder / "base" / "k" / "base.json").write_text(json.dumps(base))
    for name, shift in cells.items():
        overrides = name.split(",")
        m = {"status": "finished", "overrides": overrides, "eval/base_key": "k", "eval/style_centroid_cos": 0.3 + shift,
             "choices": {o.split("=")[0]: o.split("=")[1] for o in overrides}, "peak_memory_mb": 1000.0,
             "steps_per_s": 5.0, **record(0.3 + noise(0) + shift)}
        (folder / name).mkdir()
        (folder / name / "metrics.json").write_text(json.dumps(m))


def test_the_board_writes_intervals_versus_base_and_effects_csv(tmp_path, capsys):
    _write_sweep(tmp_path, {"adapter=lora,targets=attn": 0.2, "adapter=lora,targets=many": 0.3,
                            "adapter=dora,targets=attn": 0.2, "adapter=dora,targets=many": 0.0004})
    board = write_all(tmp_path)
    row = board.set_index("config_key").loc["adapter=lora,targets=many"]
    assert row["eval/style_centroid_cos_vs_base"] == pytest.approx(0.3)
    assert row["eval/style_centroid_cos_vs_base_low"] == pytest.approx(0.3)
    assert row["versus_base"] == "style_centroid_cos+"
    assert board.set_index("config_key").loc["adapter=dora,targets=many", "versus_base"] == "tie"  # 0.0004 < 0.001
    effects = pd.read_csv(tmp_path / "effects.csv")
    targets = effects[(effects.axis == "targets") & (effects.measure == "eval/style_centroid_cos")].iloc[0]
    assert targets.option == "many" and targets.reference == "attn"
    assert targets.effect == pytest.approx((0.1 - 0.1996) / 2) and targets.pairs == 2
    out = capsys.readouterr().out
    assert "axis effects" in out and "targets=many vs attn: style_centroid_cos" in out
    html = (tmp_path / "report.html").read_text()
    assert "What each axis does" in html and "targets=many vs attn" in html


def test_the_board_is_rewritten_quietly_after_every_trial_of_a_sweep(tmp_path, capsys):
    """A report that can be watched: the Hydra callback's on_job_end rewrites the board of the sweep folder."""
    from omegaconf import OmegaConf

    from sdsweep.sweep.callbacks import SweepSummary

    _write_sweep(tmp_path, {"adapter=lora": 0.2})
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}, "tracking": {"mode": "online"}})
    SweepSummary().on_job_end(config, job_return=None)
    assert not (tmp_path / "leaderboard.csv").exists()  # not a sweep folder: no multirun.yaml
    (tmp_path / "multirun.yaml").write_text("{}\n")
    SweepSummary().on_job_end(config, job_return=None)
    assert "adapter=lora" in (tmp_path / "leaderboard.csv").read_text()
    assert (tmp_path / "report.html").exists() and (tmp_path / "effects.csv").exists()
    assert "leaderboard of" not in capsys.readouterr().out  # quiet: the table is printed at the sweep's end
    _write_sweep_trial(tmp_path, "adapter=dora", 0.1)
    SweepSummary().on_job_end(config, job_return=None)
    assert "adapter=dora" in (tmp_path / "leaderboard.csv").read_text()


def _write_sweep_trial(folder, name: str, shift: float) -> None:
    overrides = [name]
    m = {"status": "finished", "overrides": overrides, "eval/base_key": "k", "eval/style_centroid_cos": 0.3 + shift,
         "choices": {"adapter": name.split("=")[1]}, **record(0.3 + noise(0) + shift)}
    (folder / name).mkdir()
    (folder / name / "metrics.json").write_text(json.dumps(m))


def test_the_composite_of_every_draw_at_once_equals_the_composite_of_each_draw_exactly():
    """composite_draws is composite() per draw, vectorized: the same numbers to the last bit, through NaN draws,
    a base value of 0, gains past the clip, a set-level metric standing for every draw and one that is missing."""
    rng = np.random.default_rng(3)
    draws = 500
    clip = rng.normal(25, 8, draws)
    clip[rng.integers(0, draws, 40)] = np.nan  # draws where the metric has no value
    content = rng.normal(0.0, 0.3, draws)  # against a base of exactly 0: the +-100 % rule
    content[:5] = 0.0
    style = rng.normal(0.5, 0.9, draws)  # gains far past +-100 %
    values = {"clip_score": clip, "content_cos": content, "style_centroid_cos": style, "kid": 0.04,
              "gram_distance": None}
    base = {"clip_score": 24.0, "content_cos": 0.0, "style_centroid_cos": 0.2, "kid": 0.05, "gram_distance": 1.0,
            "color_distance": 2.0}
    higher = {"clip_score": True, "content_cos": True, "style_centroid_cos": True, "kid": False,
              "gram_distance": False, "color_distance": False}
    weights = {"clip_score": 1.0, "content_cos": 0.5, "style_centroid_cos": 2.0, "kid": 1.0, "gram_distance": 1.0,
               "color_distance": 0.0}
    each = np.array([fx.composite({k: (v[d] if isinstance(v, np.ndarray) else v) for k, v in values.items()},
                                  base, weights, higher) for d in range(draws)], dtype=np.float64)
    np.testing.assert_array_equal(fx.composite_draws(values, base, weights, higher, draws), each)
    nothing = fx.composite_draws({"clip_score": np.full(3, np.nan)}, base, {"clip_score": 1.0}, higher, 3)
    assert np.isnan(nothing).all()  # no metric counted in any draw: no composite, as composite() says None
