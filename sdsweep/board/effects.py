"""How sure, and what each axis does: paired bootstrap intervals from the per-image scores.

Every trial and the base model score the same grid of (prompt, seed) cells (eval.prompts x eval.seeds;
`metrics.json` -> `eval_images`), so a configuration and the base model, or two options of an axis, can be
compared cell by cell. The interval of a difference resamples those cells with replacement (the same
draw for both sides: a paired bootstrap), and, where a configuration was trained with several seeds,
its training seeds too (a two-level bootstrap: seeds, then cells). Percentile intervals, LEVEL
coverage, DRAWS resamples from a fixed seed: the same folders always give the same intervals. Percentile
intervals run a little short with few cells (measured on normal samples: 90 % coverage at 12 cells,
93 % at 30; the embedded default has 24): more prompts or seeds make them honest.

Axis effects are the main effects of the factorial design: for an axis (an override key with two or more
values among the finished configurations, e.g. `targets`) and an option against the reference option
(the first value, numerically where the values are numbers), every pair of configurations that differ in
that axis only gives a per-cell difference; the effect is its mean over the pairs and the cells. Pairs
missing because a cell failed or was pruned are left out and counted. Resources (peak memory, speed,
adapter size) have one value per trial: their effect is the mean difference over the pairs, with no
interval.

Written by hand: neither torchmetrics nor scipy has a paired, clustered bootstrap over a prompt x seed
grid (scipy.stats.bootstrap resamples one level of independent observations).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

DRAWS = 2000
LEVEL = 0.95
SEED = 0
# the per-image metrics of eval_images (eval/scorer.py), and whether higher is better
PER_IMAGE: dict[str, bool] = {"clip_score": True, "content_cos": True, "style_centroid_cos": True,
                              "style_nn_cos": True, "clip_i": True, "dino_cos": True, "aesthetic": True}
# The smallest difference that counts: below it two configurations tie whatever the interval says. A
# learning rate of 1e-12 changes a few pixels by 1/255, which moves a cosine by ~1e-7 on every image
# alike: a "significant" difference no person could see. Cosines by 0.001, the CLIP score (0-100) by 0.1.
RESOLUTION: dict[str, float] = {"clip_score": 0.1, "content_cos": 1e-3, "style_centroid_cos": 1e-3,
                                "style_nn_cos": 1e-3, "clip_i": 1e-3, "dino_cos": 1e-3, "aesthetic": 0.01}
# resource -> (column of the leaderboard row, how to say it)
RESOURCES = {"peak_memory_mb": "peak memory MB", "it_per_s": "it/s", "adapter_mb": "adapter MB",
             "train_s": "train s"}

Cell = tuple[str, int]


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def separated(self, resolution: float = 0.0) -> bool:
        """The interval lies wholly above `resolution` or below -`resolution`: the difference is more than
        resampling noise, and more than the metric's resolution."""
        return self.low > resolution or self.high < -resolution


def cell_scores(record: dict, metric: str) -> dict[Cell, float]:
    """{(prompt, seed): value} of one metric from a metrics.json or base.json record's eval_images."""
    out = {}
    for row in record.get("eval_images") or []:
        value = row.get(metric)
        if finite(value):
            out[(row["prompt"], row["seed"])] = float(value)
    return out


def bootstrap(values: np.ndarray, draws: int = DRAWS, seed: int = SEED) -> Interval:
    """Mean of `values` (training seeds x cells; NaN where a seed lacks a cell) with its percentile
    interval: each draw resamples the seeds, then the cells, with replacement."""
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    n_seeds, n_cells = values.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(draws, n_seeds)) if n_seeds > 1 else np.zeros((draws, 1), dtype=int)
    cells = rng.integers(0, n_cells, size=(draws, n_cells))
    resampled = values[seeds[:, :, None], cells[:, None, :]]  # (draws, seeds, cells)
    means = np.nanmean(resampled.reshape(draws, -1), axis=1)
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.nanpercentile(means, [tail, 100 - tail])
    return Interval(float(np.nanmean(values)), float(low), float(high))


def _matrix(per_seed: list[dict[Cell, float]], cells: list[Cell], minus: dict[Cell, float] | None = None) -> np.ndarray:
    return np.array([[s.get(c, np.nan) - (minus[c] if minus else 0.0) for c in cells] for s in per_seed])


def versus_base(trials: list[dict], base: dict, metric: str) -> tuple[Interval, Interval] | None:
    """(the configuration's mean with its interval, its difference from the base model with its interval)
    over the cells the base model and every seed of the configuration share; None without shared cells."""
    per_seed = [cell_scores(t, metric) for t in trials]
    reference = cell_scores(base, metric)
    cells = sorted(set(reference).intersection(*per_seed)) if per_seed else []
    if not cells:
        return None
    return bootstrap(_matrix(per_seed, cells)), bootstrap(_matrix(per_seed, cells, reference))


# --- the composite: % better than the base model ------------------------------------------------------

GAIN_LIMIT = 100.0
"""A metric's gain is clipped to +-100 %: a metric whose base value is near zero cannot decide a ranking alone."""
COMPOSITE_RESOLUTION = 0.5
"""Composite points (% of the base model's values) below which two configurations tie whatever the interval."""


def gain(value: object, base: object, higher: bool) -> float | None:
    """How much better than the base model, in % of the base model's value: 100 (value - base) / |base|, the
    sign flipped for a distance (lower is better), clipped to +-GAIN_LIMIT; None without both numbers."""
    if not finite(value) or not finite(base):
        return None
    if base == 0:
        return 0.0 if value == base else (GAIN_LIMIT if (value > base) == higher else -GAIN_LIMIT)
    change = 100.0 * (float(value) - float(base)) / abs(float(base))
    return float(np.clip(change if higher else -change, -GAIN_LIMIT, GAIN_LIMIT))


def composite(values: dict[str, object], base: dict[str, object], weights: dict[str, float],
              higher: dict[str, bool]) -> float | None:
    """sum_k w_k gain_k / sum_k w_k over the weighted metrics both rows have; 0 for the base model itself."""
    total = weight_sum = 0.0
    for key, up in higher.items():
        w, g = float(weights.get(key, 0.0)), gain(values.get(key), base.get(key), up)
        if w and g is not None:
            total, weight_sum = total + w * g, weight_sum + w
    return total / weight_sum if weight_sum else None


def composite_draws(values: dict[str, object], base: dict[str, object], weights: dict[str, float],
                    higher: dict[str, bool], draws: int) -> np.ndarray:
    """composite() of every bootstrap draw at once: `values` holds an array of `draws` values per per-image
    metric (a set-level metric's one value stands for every draw); NaN where a draw has no composite. The
    same arithmetic, in the same order, as composite() per draw, so each element equals it exactly (a test
    pins that); a Python call per draw was a quarter of a small sweep's leaderboard."""
    total, weight_sum = np.zeros(draws), np.zeros(draws)
    for key, up in higher.items():
        w = float(weights.get(key, 0.0))
        if not w:
            continue
        g = _gain_draws(values.get(key), base.get(key), up, draws)
        counted = ~np.isnan(g)
        total = np.where(counted, total + w * np.where(counted, g, 0.0), total)
        weight_sum = np.where(counted, weight_sum + w, weight_sum)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(weight_sum != 0, total / np.where(weight_sum != 0, weight_sum, 1.0), np.nan)


def _gain_draws(value: object, base: object, higher: bool, draws: int) -> np.ndarray:
    """gain() of each draw's value (an array, or one number for all draws); NaN where gain() is None."""
    if isinstance(value, np.ndarray):
        v = value.astype(np.float64)
    elif finite(value):
        v = np.full(draws, float(value))
    else:
        return np.full(draws, np.nan)
    if not finite(base):
        return np.full(draws, np.nan)
    if base == 0:
        g = np.where(v == base, 0.0, np.where((v > base) == higher, GAIN_LIMIT, -GAIN_LIMIT))
    else:
        change = 100.0 * (v - float(base)) / abs(float(base))
        g = np.clip(change if higher else -change, -GAIN_LIMIT, GAIN_LIMIT)
    return np.where(np.isfinite(v), g, np.nan)


def composite_difference(a: tuple[Configuration, dict, dict], b: tuple[Configuration, dict, dict],
                         weights: dict[str, float], higher: dict[str, bool], draws: int = DRAWS,
                         seed: int = SEED) -> Interval | None:
    """composite(a) - composite(b) with its paired-bootstrap interval. Each side is (configuration, its base
    model's record, its set-level metric values {metric: value}); the per-image metrics are resampled over the
    (prompt, seed) cells both sides and their base models share (the same draw for both: paired) and over each
    side's training seeds; set-level metrics (KID, Gram, colour: one value per set) enter as they are.
    None when no weighted per-image metric has shared cells."""
    rng = np.random.default_rng(seed)
    scores = {m: [[cell_scores(r, m) for r in side[0].records] for side in (a, b)]
              for m in PER_IMAGE if float(weights.get(m, 0.0))}
    shared = {m: set.intersection(*(set(s) for s in scores[m][0] + scores[m][1]),
                                  set(cell_scores(a[1], m)), set(cell_scores(b[1], m))) for m in scores}
    per_image = [m for m in scores if shared[m]]  # a metric no record has per image (DINO off) drops out
    cells = sorted(set.intersection(*(shared[m] for m in per_image))) if per_image else []
    if not cells:
        return None
    picks = rng.integers(0, len(cells), size=(draws, len(cells)))
    sides = []
    for i, (config, base, set_level) in enumerate((a, b)):
        n = len(config.records)
        seeds = rng.integers(0, n, size=(draws, n)) if n > 1 else np.zeros((draws, 1), dtype=int)
        drawn = {m: np.nanmean(_matrix(scores[m][i], cells)[seeds[:, :, None], picks[:, None, :]].reshape(draws, -1),
                               axis=1) for m in per_image}
        full = {m: float(np.nanmean(_matrix(scores[m][i], cells))) for m in per_image}
        base_values = {m: base.get(f"eval/{m}") for m in higher}
        point = composite({**set_level, **full}, base_values, weights, higher)
        sides.append((point, composite_draws({**set_level, **drawn}, base_values, weights, higher, draws)))
    (pa, da), (pb, db) = sides
    if pa is None or pb is None:
        return None
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(da - db, [tail, 100 - tail])
    return Interval(pa - pb, float(low), float(high))


# --- axis effects ----------------------------------------------------------------------------------


@dataclass
class Configuration:
    """One configuration of the sweep: its overrides as {key: value}, the records of its finished seeds,
    and its resource figures (means over the seeds)."""

    overrides: dict[str, str]
    records: list[dict]
    resources: dict[str, float] = field(default_factory=dict)


@dataclass
class Effect:
    axis: str
    option: str
    reference: str
    measure: str
    effect: float
    low: float | None
    high: float | None
    pairs: int
    possible: int
    higher_is_better: bool | None
    relative: float | None = None
    """resources: the mean of option / reference - 1 over the pairs"""

    @property
    def separated(self) -> bool | None:
        if self.low is None or self.high is None:
            return None
        resolution = RESOLUTION.get(self.measure.removeprefix("eval/"), 0.0)
        return Interval(self.effect, self.low, self.high).separated(resolution)


def parse_overrides(config_key: str) -> dict[str, str]:
    """"adapter=lora,targets=many" -> {"adapter": "lora", "targets": "many"} (values may hold commas only
    inside brackets, as Hydra writes lists)."""
    out, depth, current = {}, 0, ""
    for ch in config_key + ",":
        if ch in "[({":
            depth += 1
        elif ch in "])}":
            depth -= 1
        if ch == "," and depth == 0:
            if "=" in current:
                key, value = current.split("=", 1)
                out[key] = value
            current = ""
        else:
            current += ch
    return out


def _order(values: Iterable[str]) -> list[str]:
    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    return sorted(set(values), key=key)


def axes(configurations: list[Configuration]) -> dict[str, list[str]]:
    """Every override key with two or more values among the configurations, its values in order."""
    keys = {k for c in configurations for k in c.overrides}
    found = {k: _order(c.overrides[k] for c in configurations if k in c.overrides) for k in sorted(keys)}
    return {k: v for k, v in found.items() if len(v) > 1}


def _pairs(configurations: list[Configuration], axis: str, option: str, reference: str):
    """(with option, with reference) for every pair that agrees on every other override; and how many
    cells of the other axes would have given a pair in a complete matrix."""
    def rest(c):
        return tuple(sorted((k, v) for k, v in c.overrides.items() if k != axis))

    by_rest: dict[tuple, dict[str, Configuration]] = {}
    for c in configurations:
        if axis in c.overrides:
            by_rest.setdefault(rest(c), {})[c.overrides[axis]] = c
    pairs = [(g[option], g[reference]) for g in by_rest.values() if option in g and reference in g]
    return pairs, len(by_rest)


def axis_effects(configurations: list[Configuration]) -> list[Effect]:
    """The main effect of every option of every axis against the axis's reference option."""
    out = []
    for axis, values in axes(configurations).items():
        reference = values[0]
        for option in values[1:]:
            pairs, possible = _pairs(configurations, axis, option, reference)
            if not pairs:
                continue
            for metric, higher in PER_IMAGE.items():
                interval = _paired_effect(pairs, metric)
                if interval is not None:
                    out.append(Effect(axis, option, reference, f"eval/{metric}", interval.mean, interval.low,
                                      interval.high, len(pairs), possible, higher))
            for resource in RESOURCES:
                both = [(a.resources[resource], b.resources[resource]) for a, b in pairs
                        if finite(a.resources.get(resource)) and finite(b.resources.get(resource))]
                if both:
                    relative = [x / y - 1 for x, y in both if y]
                    out.append(Effect(axis, option, reference, resource, float(np.mean([x - y for x, y in both])),
                                      None, None, len(both), possible, resource == "it_per_s",
                                      float(np.mean(relative)) if relative else None))
    return out


def _paired_effect(pairs: list[tuple[Configuration, Configuration]], metric: str) -> Interval | None:
    """Per cell, the option's mean over its seeds minus the reference's, averaged over the pairs; the
    bootstrap resamples the cells (the pairs share them)."""
    per_pair = []
    for with_option, with_reference in pairs:
        a = [cell_scores(r, metric) for r in with_option.records]
        b = [cell_scores(r, metric) for r in with_reference.records]
        cells = set.intersection(*(set(s) for s in a + b)) if a and b else set()
        if cells:
            per_pair.append({c: np.mean([s[c] for s in a]) - np.mean([s[c] for s in b]) for c in cells})
    if not per_pair:
        return None
    cells = sorted(set.intersection(*(set(p) for p in per_pair)))
    if not cells:
        return None
    diffs = np.array([[p[c] for c in cells] for p in per_pair]).mean(axis=0)
    return bootstrap(diffs[None, :])


def finite(v: object) -> bool:
    """A real number (not a bool, not NaN or infinite): a figure that can be averaged."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- in words ----------------------------------------------------------------------------------------


def findings(effects: list[Effect]) -> list[str]:
    """One line per option of an axis: its metric effects with intervals, then its resource effects, e.g.
    `targets=many vs attn: clip_score +9.6 [8.1, 11.2], ... peak memory MB +3, it/s -12 % (2 of 2 pairs)`."""
    lines = []
    groups: dict[tuple[str, str, str], list[Effect]] = {}
    for e in effects:
        groups.setdefault((e.axis, e.option, e.reference), []).append(e)
    for (axis, option, reference), group in groups.items():
        parts = []
        for e in group:
            name = e.measure.removeprefix("eval/")
            if e.low is not None:
                mark = "" if e.separated else " (not separated)"
                parts.append(f"{name} {e.effect:+.3g} [{e.low:+.3g}, {e.high:+.3g}]{mark}")
            else:
                relative = f" ({e.relative:+.0%})" if e.relative is not None else ""
                parts.append(f"{RESOURCES.get(e.measure, e.measure)} {e.effect:+.3g}{relative}")
        pairs = group[0]
        incomplete = f" ({pairs.pairs} of {pairs.possible} pairs: the others failed or were pruned)" \
            if pairs.pairs < pairs.possible else ""
        lines.append(f"{axis}={option} vs {reference}: " + ", ".join(parts) + incomplete)
    return lines


EFFECT_COLUMNS = ["axis", "option", "reference", "measure", "effect", "ci_low", "ci_high", "separated",
                  "relative", "higher_is_better", "pairs", "possible_pairs", "level"]


def effects_rows(effects: list[Effect]) -> list[dict]:
    """effects.csv: one row per axis, option and measure."""
    return [{"axis": e.axis, "option": e.option, "reference": e.reference, "measure": e.measure,
             "effect": e.effect, "ci_low": e.low, "ci_high": e.high, "separated": e.separated,
             "relative": e.relative, "higher_is_better": e.higher_is_better, "pairs": e.pairs,
             "possible_pairs": e.possible, "level": LEVEL if e.low is not None else None} for e in effects]
