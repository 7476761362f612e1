"""Trial folders -> a ranked leaderboard: CSV, terminal table, W&B table, and report.html.

`python -m sdsweep.board SWEEP_DIR` rebuilds everything from the folders alone (each
trial's metrics.json, the base model's `base/<key>/base.json`); the Hydra callback runs the
same code at the end of every multirun. Rows:

* the base model (no adapter), first: the reference every trial is measured against, unranked;
* one row per configuration (the overrides minus `seed=`); with several seeds per configuration
  each figure is the mean over the seeds that finished, with its standard deviation in `<key>_std`;
* ranked by the composite score; a configuration whose composite is not separated from the best one's
  (paired-bootstrap interval of the difference, see add_ties) shares rank 1, and a note where two
  configurations are not separated by more than their seed spread (std_a + std_b);
* finished trials whose evaluation failed next, unranked, with `eval_error`; failed trials last,
  among them each trial whose metrics.json is damaged (not JSON, not an object, a field of the wrong
  type), named by its folder with what is wrong. A damaged base.json is skipped and said so.

Intervals (board/effects.py): for every per-image metric, a configuration's mean and its difference from
the base model come with 95 % paired-bootstrap intervals over the (prompt, seed) cells (and training
seeds); `versus_base` names the metrics whose difference is separated. effects.csv holds every axis's
main effects.

Composite score: % better than the base model. Each weighted metric's gain is 100 (value - base) / |base|
(the sign flipped for distances, clipped to +-100), and the composite is their weighted mean, weights
`eval.score_weights` (board/effects.py: composite). The base model scores 0, a trial that changes nothing
about 0, one that is 20 % better on average +20. It does not depend on the other rows, so it can be compared
across sweeps that share the base model, prompts and encoders.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from sdsweep.board import report
from sdsweep.board.effects import (
    COMPOSITE_RESOLUTION,
    EFFECT_COLUMNS,
    PER_IMAGE,
    Configuration,
    Interval,
    axis_effects,
    composite,
    composite_difference,
    effects_rows,
    findings,
    finite,
    parse_overrides,
    versus_base,
)
from sdsweep.board.effects import RESOLUTION as METRIC_RESOLUTION
from sdsweep.board.effects import RESOURCES as EFFECT_RESOURCES
from sdsweep.board.record import Leaderboard, RowSource
from sdsweep.config.schema import GROUPS, SCORE_KEYS, EvalConfig
from sdsweep.io import atomic_write_bytes, file_state
from sdsweep.layout import METRICS as METRICS_FILE
from sdsweep.layout import BaseDir, SweepDir, TrialDir, UnreadableRecord

log = logging.getLogger(__name__)

# metric column -> higher is better
METRICS: dict[str, bool] = {
    "eval/clip_score": True,
    "eval/content_cos": True,
    "eval/style_centroid_cos": True,
    "eval/style_nn_cos": True,
    "eval/kid": False,
    "eval/gram_distance": False,
    "eval/color_distance": False,
    "eval/clip_i": True,
    "eval/clip_centroid_distance": False,
    "eval/dino_cos": True,
    "eval/dino_centroid_distance": False,
    "eval/vendi": True,  # more diverse; weight 0 by default: diversity is reported, not judged
    "eval/aesthetic": True,  # eval.aesthetic=true: LAION's head on ViT-L/14 features; weight 0 by default
}
# a per-image metric's mean over one prompt set (eval/scorer.py split_means): in distribution (training captions)
# and out of it (every other prompt), reported apart
SPLIT_METRICS = [f"eval/{split}/{m}" for split in ("in", "out") for m in ("clip_score", "style_centroid_cos",
                                                                          "content_cos", "clip_i", "dino_cos")]
RESOURCES = ["trainable_params", "adapter_mb", "predicted_vram_gb", "peak_vram_mb", "peak_memory_mb", "it_per_s",
             "train_s", "wall_s", "eval_s", "final_loss"]
# set-level metrics' intervals, a bootstrap over each trial's images at scoring time (eval/scorer.py _interval);
# with several seeds, the means of the seeds' bounds
SET_INTERVALS = [f"eval/{m}{suffix}" for m in ("gram_distance", "color_distance", "clip_centroid_distance",
                                               "dino_centroid_distance") for suffix in ("_ci_low", "_ci_high")]
NUMERIC = ["composite", *METRICS, *SPLIT_METRICS, *SET_INTERVALS, "eval/kid_subset_std", *RESOURCES]
WITH_STD = [k for k in NUMERIC if k != "eval/kid_subset_std" and k not in SET_INTERVALS]  # over seeds
T4_VRAM_MB = 15360  # a T4's 16 GB as CUDA reports it (15 GiB usable)
BASE_LABEL = "base model (no adapter)"
NO_BASE = ("unranked: no base model record to measure the composite against (python -m sdsweep.eval TRIAL_DIR "
           "draws the base model's images again)")
UNREADABLE = "(unreadable)"  # the label of a trial whose metrics.json could not be read, after its folder's name


def default_weights() -> dict[str, float]:
    return dict(EvalConfig().score_weights)


# --- the records' fields -------------------------------------------------------------------------
# A record (metrics.json, base.json) is checked before any of it is used: a field of the wrong type
# (a hand edit, another tool's file) makes the record unreadable with the field named, instead of a
# TypeError somewhere in the ranking or the report after some outputs were written.


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _image_row(v: Any) -> bool:
    return (isinstance(v, dict) and isinstance(v.get("prompt"), str) and isinstance(v.get("file"), str)
            and isinstance(v.get("seed"), int) and not isinstance(v.get("seed"), bool))


# field -> (test of a value other than null, what it must be)
Check = tuple[Callable[[Any], bool], str]
TEXT: Check = (lambda v: isinstance(v, str), "a string")
NUMBER: Check = (_number, "a number")
IMAGES: Check = (lambda v: isinstance(v, list) and all(_image_row(r) for r in v),
                 'a list of {"prompt": string, "seed": integer, "file": string}')
SHARED_FIELDS: dict[str, Check] = {**{k: NUMBER for k in (*METRICS, *SPLIT_METRICS, *SET_INTERVALS, "eval/kid_std",
                                                          "eval_s")},
                                   "eval_images": IMAGES}
TRIAL_FIELDS: dict[str, Check] = {
    **SHARED_FIELDS,
    **{k: TEXT for k in ("status", "reason", "eval_error", "eval/base_key")},
    **{k: NUMBER for k in ("trainable_params", "adapter_mb", "peak_vram_mb", "peak_memory_mb", "steps_per_s",
                           "train_s", "wall_s", "final_loss", "predicted_peak_vram_gb", "peak_vram_reserved_mb")},
    "overrides": (lambda v: isinstance(v, list) and all(isinstance(o, str) for o in v), "a list of strings"),
    "choices": (lambda v: isinstance(v, dict) and all(c is None or isinstance(c, str) for c in v.values()),
                "an object of strings"),
    "losses": (lambda v: isinstance(v, list) and all(x is None or _number(x) for x in v), "a list of numbers"),
}
BASE_FIELDS: dict[str, Check] = {
    **SHARED_FIELDS,
    "settings": (lambda v: isinstance(v, dict) and isinstance(v.get("precision"), dict)
                 and {"base_dtype", "quantize"} <= set(v["precision"]), 'an object with "precision": '
                 '{"base_dtype": ..., "quantize": ...}'),
}
BASE_REQUIRED = ("key", "settings")


def check_fields(record: dict, fields: dict[str, Check], name: Path | str, required: tuple[str, ...] = ()) -> None:
    """UnreadableRecord naming the file and every field that is missing or of the wrong type."""
    wrong = [f'"{k}" is missing' for k in required if record.get(k) is None]
    for key, (test, kind) in fields.items():
        value = record.get(key)
        if value is not None and not test(value):
            wrong.append(f'"{key}" is {_short(value)}, not {kind}')
    if wrong:
        raise UnreadableRecord(f"{name}: {'; '.join(wrong)}")


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def read_base(base: BaseDir) -> dict:
    """base.json, checked; UnreadableRecord naming the file and what is wrong."""
    record = base.read_record()
    check_fields(record, {**BASE_FIELDS, "key": TEXT}, base.record, BASE_REQUIRED)
    return record


def checked_trials(sweep: SweepDir) -> list[tuple[TrialDir, dict]]:
    """The sweep's trials, each record checked: a damaged one reads as failed and unreadable (see
    SweepDir.trials), with the reason naming the file and the fields that are wrong."""
    out = []
    for trial, m in sweep.trials():
        if not m.get("unreadable"):
            try:
                check_fields(m, TRIAL_FIELDS, f"{trial.name}/{METRICS_FILE}")
            except UnreadableRecord as e:
                m = {"status": "failed", "unreadable": True, "reason": str(e)}
        out.append((trial, m))
    return out


# --- rows ------------------------------------------------------------------------------------------


def trial_seed(trial: TrialDir, overrides: list[str]) -> int | None:
    """The training seed of a trial: from its overrides, else its saved config; None when neither says."""
    for o in overrides:
        if o.startswith("seed="):
            value = o.split("=", 1)[1]
            return int(value) if value.lstrip("-").isdigit() else None
    try:
        return _config_seed(*file_state(trial.config))
    except OSError:
        return None


@functools.lru_cache(maxsize=4096)
def _config_seed(path: str, size: int, mtime_ns: int) -> int | None:
    """The seed of a trial's .hydra/config.yaml, remembered by the file's state (io.file_state): the board
    is rewritten after every trial of a sweep, and parsing each earlier trial's config again cost ~30 ms
    a trial each time."""
    from omegaconf import OmegaConf

    try:
        seed = OmegaConf.load(path).get("seed")
    except Exception:  # noqa: BLE001 - a damaged config.yaml: the seed is unknown, nothing more
        return None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def unreadable_row(trial: TrialDir, reason: str) -> dict[str, Any]:
    """A trial whose metrics.json cannot be used: a failed row of its own, named by its folder."""
    row: dict[str, Any] = {"trial": trial.name, "config_key": f"{trial.name} {UNREADABLE}", "seed": None,
                           **{g: None for g in GROUPS}, "overrides": ""}
    row.update({k: None for k in (*RESOURCES, "peak_vram_reserved_mb", *METRICS, "eval/kid_subset_std",
                                  "eval_base_key", "scored_by")})
    row.update(status="failed", reason=reason, scored=False)
    return row


def scored_by(record: dict) -> str | None:
    """The encoders that scored a record: "ViT-L-14/openai, DINO facebook/dinov2-base"."""
    names = [record.get("eval/clip_model"), record.get("eval/dino_model") and f"DINO {record['eval/dino_model']}"]
    return ", ".join(n for n in names if n) or None


def trial_row(trial: TrialDir, m: dict) -> dict[str, Any]:
    if m.get("unreadable"):
        return unreadable_row(trial, m["reason"])
    overrides = list(m.get("overrides") or [])
    config_key = ",".join(sorted(o for o in overrides if not o.startswith("seed="))) or "default"
    choices = m.get("choices") or {}
    row: dict[str, Any] = {"trial": trial.name, "config_key": config_key, "seed": trial_seed(trial, overrides)}
    row.update({g: choices.get(g) for g in GROUPS})
    row["overrides"] = " ".join(overrides)
    row.update({k: m.get(k) for k in RESOURCES if k != "it_per_s"})
    row["it_per_s"] = m.get("steps_per_s")
    row["predicted_vram_gb"] = m.get("predicted_peak_vram_gb")  # sdsweep/estimate.py, before the trial ran
    row["peak_vram_reserved_mb"] = m.get("peak_vram_reserved_mb")
    row.update({k: m.get(k) for k in (*METRICS, *SPLIT_METRICS, *SET_INTERVALS)})
    row["eval/kid_subset_std"] = m.get("eval/kid_std")  # spread over KID's subsets (not over seeds)
    row["eval_base_key"] = m.get("eval/base_key")
    row["scored_by"] = scored_by(m)
    row["status"] = m.get("status", "failed")
    row["reason"] = m.get("reason") or m.get("eval_error") or ""
    row["scored"] = row["status"] == "finished" and any(m.get(k) is not None for k in METRICS)
    return row


def base_rows(sweep_dir: Path, trials: list[dict], problems: list[str] | None = None,
              sources: dict[str, RowSource] | None = None) -> list[dict[str, Any]]:
    """One row per base-model set sampled in this sweep (usually one; one per precision in a precision sweep).

    A damaged base.json is skipped, with a line in `problems`; `sources` gets each row's record."""
    problems = [] if problems is None else problems
    rows: dict[str, dict[str, Any]] = {}
    scored = any(t.get("eval_base_key") for t in trials)
    for base in SweepDir(sweep_dir).bases():
        try:
            b = read_base(base)
        except UnreadableRecord as e:
            problems.append(f"skipped the base model's record: {e}")
            continue
        users = [t for t in trials if t.get("eval_base_key") == b["key"]]
        if b["key"] in rows or (scored and not users):
            continue  # a base set no trial is compared with any more (its trials were re-scored)
        p = b["settings"]["precision"]
        row: dict[str, Any] = {"trial": f"base/{b['key']}", "seed": None,
                               "config_key": f"{BASE_LABEL} [{p['base_dtype']}, quantize={p['quantize']}]"}
        row.update({g: (users[0][g] if users and g in ("model", "data", "eval", "precision") else None) for g in GROUPS})
        row.update(adapter="none", overrides="", trainable_params=0, adapter_mb=0.0, eval_base_key=b["key"],
                   status="reference", reason="", scored=True, eval_s=b.get("eval_s"))
        row.update({k: b.get(k) for k in (*METRICS, *SPLIT_METRICS, *SET_INTERVALS)})
        row["scored_by"] = scored_by(b)
        row["eval/kid_subset_std"] = b.get("eval/kid_std")
        rows[b["key"]] = row
        if sources is not None:
            sources[row["trial"]] = RowSource(b, base.samples)
    if len(rows) == 1:  # the usual case: no need to say which precision
        next(iter(rows.values()))["config_key"] = BASE_LABEL
    return list(rows.values())


# --- scores --------------------------------------------------------------------------------------


HIGHER = {k.removeprefix("eval/"): up for k, up in METRICS.items()}  # bare metric name -> higher is better


def _bare(row: dict) -> dict[str, Any]:
    return {k.removeprefix("eval/"): row.get(k) for k in METRICS}


def add_composite(rows: list[dict], weights: dict[str, float]) -> None:
    """composite = how much better than the base model, in % (board/effects.py: composite, gain):
    sum_k w_k gain_k / sum_k w_k with gain_k = 100 (value_k - base_k) / |base_k|, the sign flipped for a
    distance, clipped to +-100, over the weighted metrics a row and its base model (the one it was scored
    against: eval/base_key) both have. The base model scores 0; a trial without a base record has none.
    Unlike a min-max over the rows, it does not move when a row is added: +20 means 20 % better on average."""
    bases = {r["eval_base_key"]: r for r in rows if r["status"] == "reference" and r.get("eval_base_key")}
    for r in rows:
        base = bases.get(r.get("eval_base_key")) if r["scored"] else None
        r["composite"] = composite(_bare(r), _bare(base), weights, HIGHER) if base else None


def aggregate(rows: list[dict]) -> pd.DataFrame:
    """One row per configuration: means over the seeds that finished, `<key>_std`, seeds, failures."""
    out = []
    by_config: dict[str, list[dict]] = {}
    for r in rows:
        by_config.setdefault(r["config_key"], []).append(r)
    for group in by_config.values():
        ok = [r for r in group if r["status"] in ("finished", "reference")]
        use = ok or group
        agg: dict[str, Any] = {k: use[0].get(k) for k in ("config_key", *GROUPS, "overrides", "eval_base_key",
                                                           "scored_by")}
        agg["overrides"] = " ".join(o for o in str(use[0]["overrides"]).split() if not o.startswith("seed="))
        for k in NUMERIC:
            values = [r[k] for r in use if finite(r.get(k))]
            agg[k] = sum(values) / len(values) if values and ok else None
            if k in WITH_STD:
                agg[f"{k}_std"] = pd.Series(values).std() if len(values) > 1 and ok else None
        agg["peak_vram_reserved_mb"] = max((r["peak_vram_reserved_mb"] for r in use
                                            if finite(r.get("peak_vram_reserved_mb"))), default=None)
        agg["n_seeds"] = len(ok) if group[0]["status"] != "reference" else None
        agg["seeds"] = " ".join(str(r["seed"]) for r in sorted(group, key=lambda r: str(r["seed"])) if r["seed"] is not None)
        agg["trials"] = " ".join(sorted(r["trial"] for r in group))
        failed = [r for r in group if r["status"] not in ("finished", "reference")]
        if ok:
            agg["status"] = ok[0]["status"]  # finished, or reference for the base model
        else:  # failed, or whatever else stopped every seed (interrupted, ...): listed last with the reason
            statuses = [r["status"] for r in group]
            agg["status"] = max(set(statuses), key=statuses.count)
        agg["scored"] = any(r["scored"] for r in ok)
        reasons = sorted({r["reason"] for r in (failed or [r for r in ok if r["reason"]]) if r["reason"]})
        agg["reason"] = "; ".join(reasons)
        agg["note"] = f"{len(failed)} of {len(group)} seeds failed" if ok and failed else ""
        out.append(agg)
    return pd.DataFrame(out)


def rank(board: pd.DataFrame) -> pd.DataFrame:
    """Rank scored configurations by mean composite (ties share the better rank), flag the Pareto
    front over (composite up, peak memory down, training time down) and T4 fit; order the rows."""
    board = board.copy()
    rankable = (board["status"] == "finished") & board["scored"] & board["composite"].notna()
    board["rank"] = pd.Series(pd.NA, index=board.index, dtype="Int64")
    board.loc[rankable, "rank"] = board.loc[rankable, "composite"].rank(ascending=False, method="min").astype("Int64")
    memory = board["peak_vram_mb"].where(board["peak_vram_mb"].notna(), board["peak_memory_mb"])
    board["pareto"] = pd.Series(pd.NA, index=board.index, dtype="boolean")
    idx = list(board.index[rankable])
    for i in idx:
        a = (board.at[i, "composite"], memory[i], board.at[i, "train_s"])
        board.at[i, "pareto"] = not any(_dominates((board.at[j, "composite"], memory[j], board.at[j, "train_s"]), a)
                                        for j in idx if j != i)
    vram = board["peak_vram_reserved_mb"].where(board["peak_vram_reserved_mb"].notna(), board["peak_vram_mb"])
    board["fits_t4"] = pd.Series([pd.NA if pd.isna(v) else bool(v <= T4_VRAM_MB) for v in vram],
                                 index=board.index, dtype="boolean")
    _spread_notes(board, idx)
    unmeasured = (board["status"] == "finished") & board["scored"] & board["composite"].isna()
    board.loc[unmeasured, "note"] = [("; ".join(n for n in (note, NO_BASE) if n)) for note in board.loc[unmeasured, "note"]]
    return _ordered(board)


def _ordered(board: pd.DataFrame) -> pd.DataFrame:
    """The base model first, then ranked configurations (by rank, then composite), unscored ones, failures."""
    rankable = board["rank"].notna()
    order = {"reference": 0, "finished": 1, "failed": 3}
    board = board.copy()
    board["_group"] = [order.get(s, 3) + (1 if s == "finished" and not r else 0)
                       for s, r in zip(board["status"], rankable)]
    board["_rank"] = board["rank"].astype("Float64").fillna(float("inf"))
    board["_composite"] = -board["composite"].astype("Float64").fillna(float("-inf"))
    board = board.sort_values(["_group", "_rank", "_composite", "config"], kind="stable").drop(
        columns=["_group", "_rank", "_composite"])
    return board.reset_index(drop=True)


def _dominates(a: tuple, b: tuple) -> bool:
    """a is at least as good as b everywhere (score up, memory down, time down) and better somewhere."""
    def val(x, flip):
        return (-x if flip else x) if finite(x) else math.inf

    av = [val(a[0], True), val(a[1], False), val(a[2], False)]
    bv = [val(b[0], True), val(b[1], False), val(b[2], False)]
    return all(x <= y for x, y in zip(av, bv)) and any(x < y for x, y in zip(av, bv))


def _spread_notes(board: pd.DataFrame, idx: list) -> None:
    ranked = sorted(idx, key=lambda i: (-board.at[i, "composite"], board.at[i, "config"]))
    for pos, j in enumerate(ranked):
        close = []
        for i in ranked[:pos]:
            spread = sum(s for s in (board.at[i, "composite_std"], board.at[j, "composite_std"]) if finite(s))
            if spread > 0 and board.at[i, "composite"] - board.at[j, "composite"] <= spread:
                close.append(f"#{board.at[i, 'rank']} {board.at[i, 'config']}")
        if close:
            note = "not separated from " + ", ".join(close) + " by more than their seed spread"
            board.at[j, "note"] = "; ".join(n for n in (board.at[j, "note"], note) if n)


def short_labels(keys: list[str]) -> dict[str, str]:
    """Each configuration named by the overrides that differ across the sweep (`adapter=dora`), not
    by those every trial shares (`train.max_steps=3`); the base model and unreadable trials as they are."""
    split = {k: k.split(",") for k in keys
             if k != "default" and not k.startswith(BASE_LABEL) and not k.endswith(UNREADABLE)}
    shared = set.intersection(*(set(v) for v in split.values())) if len(split) > 1 else set()
    return {k: (",".join(o for o in split[k] if o not in shared) or k) if k in split else k for k in keys}


COLUMNS = ["rank", "config", "status", "composite", "composite_std", "pareto", "fits_t4", "n_seeds", "seeds",
           *GROUPS]


class NoTrials(ValueError):
    """The folder holds no trial of a sweep: there is nothing to rank."""


def build(sweep_dir: Path, weights: dict[str, float] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(leaderboard by configuration, one row per trial), both ranked and ordered, from the folders alone.

    `weights`: the composite's; None reads those the sweep ran with (see `sweep_weights`)."""
    result = collect(sweep_dir, weights)
    return result.board, result.per_trial


def collect(sweep_dir: Path, weights: dict[str, float] | None = None) -> Leaderboard:
    """The leaderboard of `sweep_dir` with the records it was built from and the files it skipped."""
    problems: list[str] = []
    weights = {**default_weights(), **(sweep_weights(sweep_dir, problems) if weights is None else weights)}
    sweep = SweepDir(sweep_dir)
    sources: dict[str, RowSource] = {}
    trials = []
    for trial, m in checked_trials(sweep):
        trials.append(trial_row(trial, m))
        sources[trial.name] = RowSource({} if m.get("unreadable") else m, trial.samples)
    if not trials:
        raise NoTrials(f"{sweep_dir} holds no trial folders (no */metrics.json): give the folder a sweep "
                       "wrote, e.g. multirun/<date>/<time>, the one `python -m sdsweep -m ...` printed at the end")
    rows = base_rows(sweep_dir, trials, problems, sources) + trials
    add_composite(rows, weights)
    labels = short_labels(list(dict.fromkeys(r["config_key"] for r in rows)))
    board = aggregate(rows)
    board.insert(1, "config", board["config_key"].map(labels))
    board = rank(board)
    ordered = COLUMNS + [c for k in NUMERIC[1:] for c in ((k, f"{k}_std") if k in WITH_STD else (k,))] + [
        "peak_vram_reserved_mb", "overrides", "note", "reason", "trials", "config_key", "eval_base_key", "scored_by"]
    board = board[ordered]
    configurations = finished_configurations(rows, sources)
    board = add_intervals(board, configurations, sources)
    board = add_ties(board, configurations, sources, weights)

    per_trial = pd.DataFrame(rows).drop(columns=["scored"])
    per_trial.insert(1, "config", per_trial["config_key"].map(labels))
    position = {key: i for i, key in enumerate(board["config_key"])}  # the leaderboard's order, then seed
    per_trial["config_rank"] = per_trial["config_key"].map(dict(zip(board["config_key"], board["rank"]))).astype("Int64")
    per_trial["_pos"] = per_trial["config_key"].map(position)
    per_trial["_failed"] = ~per_trial["status"].isin(["finished", "reference"])
    per_trial = per_trial.sort_values(["_failed", "_pos", "seed", "trial"], kind="stable", na_position="last")
    columns = ["trial", "config", "seed", "config_rank", "status", "composite", *METRICS, *SPLIT_METRICS,
               "eval/kid_subset_std",
               *RESOURCES, "peak_vram_reserved_mb", *GROUPS, "overrides", "reason", "config_key", "eval_base_key",
               "scored_by"]
    for problem in problems:
        log.warning("leaderboard: %s", problem)
    effects = axis_effects(list(configurations.values()))
    return Leaderboard(board, per_trial[columns].reset_index(drop=True), sources, problems, effects)


# --- intervals ------------------------------------------------------------------------------------


def finished_configurations(rows: list[dict], sources: dict[str, RowSource]) -> dict[str, Configuration]:
    """config_key -> the finished, scored trials of that configuration (its seeds) as board/effects.py reads them."""
    grouped: dict[str, list[dict]] = {}
    for r in rows:
        if r["status"] == "finished" and r["scored"] and r["trial"] in sources:
            grouped.setdefault(r["config_key"], []).append(r)
    out = {}
    for key, group in grouped.items():
        resources = {}
        for name in EFFECT_RESOURCES:
            values = [_memory(r) if name == "peak_memory_mb" else r.get(name) for r in group]
            values = [v for v in values if finite(v)]
            if values:
                resources[name] = sum(values) / len(values)
        out[key] = Configuration(parse_overrides(key), [sources[r["trial"]].record for r in group], resources)
    return out


def _memory(row: dict) -> Any:
    """Peak VRAM where the trial ran on a GPU, else the process's peak memory."""
    return row.get("peak_vram_mb") if finite(row.get("peak_vram_mb")) else row.get("peak_memory_mb")


def interval_columns() -> list[str]:
    return [f"eval/{m}{suffix}" for m in PER_IMAGE
            for suffix in ("_ci_low", "_ci_high", "_vs_base", "_vs_base_low", "_vs_base_high")]


def _versus_base_words(differences: dict[str, Interval]) -> str:
    """"style_centroid_cos+ clip_score+ content_cos-": the metrics separated from the base model, with the
    sign of the difference (+ higher than the base model); "tie" when none is."""
    said = [f"{m}{'+' if d.mean > 0 else '-'}" for m, d in differences.items() if d.separated(METRIC_RESOLUTION[m])]
    return " ".join(said) if said else ("tie" if differences else "")


def add_intervals(board: pd.DataFrame, configurations: dict[str, Configuration],
                  sources: dict[str, RowSource]) -> pd.DataFrame:
    """Per configuration and per-image metric: the interval of its mean, and its difference from the base
    model it was compared with (same eval.prompts x eval.seeds cells) with that interval."""
    bases = {src.record.get("key"): src.record for name, src in sources.items() if name.startswith("base/")}
    values: dict[str, list] = {c: [] for c in interval_columns()}
    words = []
    for _, row in board.iterrows():
        config = configurations.get(row["config_key"])
        base = bases.get(row["eval_base_key"])
        differences = {}
        for metric in PER_IMAGE:
            found = versus_base(config.records, base, f"{metric}") if config and base else None
            own, diff = found if found else (None, None)
            if diff is not None:
                differences[metric] = diff
            for suffix, value in (("_ci_low", own and own.low), ("_ci_high", own and own.high),
                                  ("_vs_base", diff and diff.mean), ("_vs_base_low", diff and diff.low),
                                  ("_vs_base_high", diff and diff.high)):
                values[f"eval/{metric}{suffix}"].append(value)
        words.append(_versus_base_words(differences))
    board = board.copy()
    board["versus_base"] = words
    for column, column_values in values.items():
        board[column] = pd.Series(column_values, index=board.index, dtype="Float64")
    return board


SET_LEVEL = [k.removeprefix("eval/") for k in METRICS if k.removeprefix("eval/") not in PER_IMAGE]


def add_ties(board: pd.DataFrame, configurations: dict[str, Configuration], sources: dict[str, RowSource],
             weights: dict[str, float]) -> pd.DataFrame:
    """Configurations not separable from the one ranked above them share its rank. Down the composite order,
    each configuration is compared with the first of the current tie group (the best, for the first group):
    that one's composite minus its own, with a paired-bootstrap interval (effects.composite_difference); where
    the interval reaches below COMPOSITE_RESOLUTION composite points (or, without an interval, the difference
    itself is below it), it joins the group and the note says so; otherwise it starts the next group at its
    own position. `composite_vs_best[_low|_high]`: every configuration against #1."""
    board = board.copy()
    for column in ("composite_vs_best", "composite_vs_best_low", "composite_vs_best_high"):
        board[column] = pd.Series(pd.NA, index=board.index, dtype="Float64")
    ranked = board[board["rank"].notna()]
    if ranked.empty:
        return board
    bases = {src.record.get("key"): src.record for name, src in sources.items() if name.startswith("base/")}

    def side(row):
        config, base = configurations.get(row["config_key"]), bases.get(row["eval_base_key"])
        return (config, base, {m: row[f"eval/{m}"] for m in SET_LEVEL}) if config and base else None

    def versus(a, b) -> tuple[float, Interval | None]:
        """a's composite minus b's, and its interval (None where there are no shared per-image cells)."""
        sa, sb = side(a), side(b)
        return a["composite"] - b["composite"], (composite_difference(sa, sb, weights, HIGHER) if sa and sb else None)

    best, leader, position = ranked.iloc[0], ranked.iloc[0], 1
    leader_rank = 1
    for i, row in ranked.iloc[1:].iterrows():
        position += 1
        difference, to_best = versus(best, row)
        board.at[i, "composite_vs_best"] = -(to_best.mean if to_best else difference)
        if to_best is not None:
            board.at[i, "composite_vs_best_low"], board.at[i, "composite_vs_best_high"] = -to_best.high, -to_best.low
        difference, interval = (difference, to_best) if leader is best else versus(leader, row)
        tied = (interval.low if interval is not None else difference) <= COMPOSITE_RESOLUTION
        if tied:
            board.at[i, "rank"] = leader_rank
            if row["composite"] != leader["composite"]:  # an equal composite shares the rank without words
                words = (f"composite {-interval.mean:+.1f} [{-interval.high:+.1f}, {-interval.low:+.1f}]"
                         if interval is not None else f"composite {-difference:+.2f}")
                note = f"tied with #{leader_rank} {leader['config']}: {words}"
                board.at[i, "note"] = "; ".join(n for n in (board.at[i, "note"], note) if n)
        else:
            leader, leader_rank = row, position
            board.at[i, "rank"] = position
    return _ordered(board)


# --- outputs -----------------------------------------------------------------------------------------


def csv_bytes(df: pd.DataFrame) -> bytes:
    return df.to_csv(index=False, float_format="%.6g").encode()


def table(board: pd.DataFrame) -> str:
    """A compact text table of the leaderboard for the terminal."""
    def fmt(v, spec):
        return "" if v is None or pd.isna(v) else format(v, spec)

    lines = []
    for _, r in board.iterrows():
        comp = fmt(r["composite"], "+.1f") + (f"±{r['composite_std']:.1f}" if finite(r["composite_std"]) else "")
        memory = r["peak_vram_mb"] if finite(r["peak_vram_mb"]) else r["peak_memory_mb"]
        lines.append({
            "rank": fmt(r["rank"], "d") if not pd.isna(r["rank"]) else "-", "config": str(r["config"])[:48],
            "composite": comp, "clip": fmt(r["eval/clip_score"], ".2f"), "style": fmt(r["eval/style_centroid_cos"], ".3f"),
            "content": fmt(r["eval/content_cos"], ".3f"), "kid": fmt(r["eval/kid"], ".4f"),
            "gram": fmt(r["eval/gram_distance"], ".3f"), "pred_gb": fmt(r["predicted_vram_gb"], ".1f"),
            "mem_mb": fmt(memory, ".0f"), "train_s": fmt(r["train_s"], ".1f"),
            "pareto": "*" if r["pareto"] is True else "", "t4": {True: "yes", False: "no"}.get(r["fits_t4"], ""),
            "status": r["status"] + (f": {r['reason'][:60]}" if r["reason"] else "") + (f" ({r['note']})" if r["note"] else ""),
        })
    return pd.DataFrame(lines).to_string(index=False) if lines else "(no trials)"


def log_wandb_table(board: pd.DataFrame, sweep_dir: Path, tracking: Any, report: Path | None = None) -> None:
    """The leaderboard (and report) as one W&B run of the sweep's group; any W&B error is a warning."""
    if tracking is None or tracking.get("mode", "disabled") == "disabled":
        return
    try:
        import wandb

        run = wandb.init(project=tracking.get("project", "sdsweep"), entity=tracking.get("entity"),
                         group=tracking.get("group") or "_".join(Path(sweep_dir).parts[-2:]), name="leaderboard",
                         job_type="leaderboard", mode=tracking["mode"], dir=str(sweep_dir), reinit="finish_previous",
                         settings=wandb.Settings(init_timeout=tracking.get("init_timeout", 20), silent=True, console="off"))
        data = {"leaderboard": wandb.Table(dataframe=board.astype(object).where(board.notna(), None))}
        if report is not None and report.exists():
            data["report"] = wandb.Html(report.read_text(encoding="utf-8"))
        run.log(data)
        run.finish()
    except Exception as e:  # noqa: BLE001 - W&B is a mirror: never fail the sweep for it
        log.warning("W&B leaderboard table not logged (%s: %s); leaderboard.csv is unaffected", type(e).__name__, e)


def write_all(sweep_dir: Path, weights: dict[str, float] | None = None, tracking: Any = None,
              echo: bool = True) -> pd.DataFrame:
    """leaderboard.csv, leaderboard_trials.csv, effects.csv, report.html; the table on stdout; W&B when tracking is on.

    The four files are made in memory first and only then written, each atomically: an error while
    making any of them leaves the old ones as they were, never a new CSV beside an old report."""
    sweep = SweepDir(sweep_dir)
    result = collect(sweep.path, weights)
    outputs = {sweep.leaderboard: csv_bytes(result.board), sweep.leaderboard_trials: csv_bytes(result.per_trial),
               sweep.effects: csv_bytes(pd.DataFrame(effects_rows(result.effects), columns=EFFECT_COLUMNS)),
               sweep.report: report.render(sweep.path, result).encode("utf-8")}
    if echo:  # the table too, before anything is written: it formats every row
        said = findings(result.effects)
        effects_text = ("\naxis effects (mean difference, 95 % interval over the prompt x seed cells):\n  "
                        + "\n  ".join(said) + f"\n-> {sweep.effects}") if said else ""
        text = (f"\nleaderboard of {sweep.path} (composite: % better than the base model; * Pareto-optimal)\n"
                f"{table(result.board)}\n-> {sweep.leaderboard}{effects_text}\n-> {sweep.report}")
    for path, data in outputs.items():
        atomic_write_bytes(path, data)
    if echo:
        print(text, flush=True)
    log_wandb_table(result.board, sweep.path, tracking, sweep.report)
    return result.board


def sweep_weights(sweep_dir: Path, problems: list[str] | None = None) -> dict[str, float]:
    """The score weights the sweep ran with: multirun.yaml, else a trial's .hydra/config.yaml, else the defaults.

    A file that cannot be read, or whose weights are not numbers >= 0 by metric, is skipped with a
    line in `problems` (the next one is asked)."""
    problems = [] if problems is None else problems
    sweep = SweepDir(sweep_dir)
    for path in [sweep.multirun, *sweep.trial_configs()]:
        if not path.exists():
            continue
        try:
            weights = _weights_in(path)
        except ValueError as e:
            problems.append(f"skipped the score weights in {path}: {e}")
            continue
        if weights is not None:
            return {**default_weights(), **weights}
    return default_weights()


def _weights_in(path: Path) -> dict[str, float] | None:
    """eval.score_weights of a saved config, None when it sets none; ValueError saying what is wrong."""
    from omegaconf import OmegaConf

    try:
        node = OmegaConf.select(OmegaConf.load(path), "eval.score_weights")
        weights = None if node is None else OmegaConf.to_container(node, resolve=True)
    except Exception as e:  # noqa: BLE001 - YAML and OmegaConf raise many types for a damaged file
        raise ValueError(f"not a readable config ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from e
    if weights is None:
        return None
    if not isinstance(weights, dict) or not all(k in SCORE_KEYS and _weight_ok(w) for k, w in weights.items()):
        raise ValueError(f"eval.score_weights={_short(weights)} is not METRIC: number >= 0 "
                         f"(METRIC one of {', '.join(SCORE_KEYS)})")
    return {k: float(w) for k, w in weights.items()}


def _weight_ok(w: Any) -> bool:
    return finite(w) and w >= 0


def parse_weight(text: str) -> tuple[str, float]:
    """--weight METRIC=W -> (METRIC, W); argparse turns the error into a usage error naming the flag."""
    key, _, value = text.partition("=")
    try:
        weight = float(value)
    except ValueError:
        weight = math.nan
    if key not in SCORE_KEYS or not _weight_ok(weight):
        why = f"unknown metric {key!r}" if key not in SCORE_KEYS else f"{value!r} is not a number >= 0"
        raise argparse.ArgumentTypeError(f"{text!r}: {why}; expected METRIC=WEIGHT, METRIC one of "
                                         f"{', '.join(SCORE_KEYS)}, WEIGHT a number >= 0, e.g. clip_score=2")
    return key, weight


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdsweep.board",
                                     description="Rebuild leaderboard.csv and report.html from a sweep folder.")
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--weight", action="append", default=[], metavar="METRIC=W", type=parse_weight,
                        help="override one composite weight, e.g. --weight clip_score=2 (repeatable)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a folder")
    problems: list[str] = []
    weights = {**sweep_weights(args.sweep_dir, problems), **dict(args.weight)}
    if not any(weights.values()):
        parser.error(f"--weight: every composite weight is 0 ({weights}): give at least one metric a positive weight")
    for problem in problems:  # collect() is given the weights, so it does not read (or report) them again
        log.warning("leaderboard: %s", problem)
    try:
        write_all(args.sweep_dir, weights)
    except NoTrials as e:
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
