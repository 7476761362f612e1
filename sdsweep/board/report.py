"""report.html: one self-contained page (images as base64 PNG, charts as inline SVG, no scripts).

Order: the image grid first (one row per trial and the base model, one column per prompt and
seed: people would rather look than read), then the leaderboard, then the score-vs-memory chart
with the Pareto front and the loss curves of every trial.
"""

from __future__ import annotations

import base64
import html
import io
import math
from datetime import datetime
from pathlib import Path

import pandas as pd
from PIL import Image

from sdsweep.board.record import Leaderboard, RowSource
from sdsweep.io import file_state

THUMB = 256  # longest side of an embedded image; keeps a 1024-px sweep's report a few MB
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]


def _png(path: Path) -> str:
    """The image as an embedded thumbnail. Remembered by file (path, size, modification time): the report
    is rewritten after every trial of a sweep, and encoding every earlier trial's samples again made that
    quadratic in the number of trials."""
    key = file_state(path)
    if (cached := _THUMBNAILS.get(key)) is None:
        cached = _THUMBNAILS[key] = _encode_png(path)
        while len(_THUMBNAILS) > MAX_THUMBNAILS:  # oldest first: a long-lived process stays bounded
            del _THUMBNAILS[next(iter(_THUMBNAILS))]
    return cached


MAX_THUMBNAILS = 4096
_THUMBNAILS: dict[tuple, str] = {}


def _encode_png(path: Path) -> str:
    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((THUMB, THUMB))
        buf = io.BytesIO()
        im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _e(v) -> str:
    return html.escape(str(v))


def _num(v, spec: str = ".3g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)) or v is pd.NA:
        return ""
    try:
        return format(v, spec)
    except (TypeError, ValueError):
        return _e(v)


def _seed_text(v) -> str:
    return "" if v is None or pd.isna(v) else str(int(v))


TIPS = [("clip_score", "CLIP"), ("content_cos", "content"), ("style_centroid_cos", "style")]


# --- the grid --------------------------------------------------------------------------------------


def _image_cell(path: Path, alt: str, tip: str) -> str:
    try:
        src = _png(path)
    except (OSError, ValueError, Image.DecompressionBombError) as e:  # a damaged sample: say so in its cell
        return f"<td class=missing>unreadable image<br><small>{_e(path.name)}: {_e(type(e).__name__)}</small></td>"
    return f'<td><img src="{src}" alt="{_e(alt)}" title="{_e(tip)}"><div class=tip>{_e(tip)}</div></td>'


def _grid(per_trial: pd.DataFrame, sources: dict[str, RowSource]) -> str:
    rows, columns = [], []
    for _, t in per_trial.iterrows():
        source = sources.get(t["trial"])
        record, images = (source.record, source.samples) if source else ({}, None)
        cells = {(r["prompt"], r["seed"]): r for r in record.get("eval_images") or []}
        for key in cells:
            if key not in columns:
                columns.append(key)
        rows.append((t, cells, images))
    if not columns:
        return "<p>No images: evaluation was off (eval.enabled=false) or failed in every trial.</p>"
    head = "".join(f"<th>{_e(p)}<br><small>seed {s}</small></th>" for p, s in columns)
    body = []
    for t, cells, images in rows:
        label = f"<b>{_e(t['config'])}</b>"
        if t["status"] == "reference":
            label += "<br><small>reference</small>"
        else:
            rank = t.get("config_rank")
            label += f"<br><small>seed {_seed_text(t['seed'])}" + (f" · rank {rank}" if not pd.isna(rank) else "") + "</small>"
        if t["status"] not in ("finished", "reference") or not cells:
            why = t["reason"] or "no images"
            body.append(f"<tr><th class=row>{label}</th><td class=failed colspan={len(columns)}>"
                        f"{_e(t['status'])}: {_e(why)}</td></tr>")
            continue
        tds = []
        for key in columns:
            r = cells.get(key)
            path = images / r["file"] if r and images else None
            if path is None or not path.exists():
                tds.append("<td class=missing>missing</td>")
                continue
            tip = " · ".join(f"{name} {_num(r[k])}" for k, name in TIPS if k in r)
            tds.append(_image_cell(path, f"{key[0]} seed {key[1]}", tip))
        body.append(f"<tr><th class=row>{label}</th>{''.join(tds)}</tr>")
    return f"<table class=grid><tr><th></th>{head}</tr>{''.join(body)}</table>"


# --- the table ------------------------------------------------------------------------------------

TABLE = [("rank", "rank", "d"), ("config", "configuration", ""), ("composite", "composite %", "+.1f"),
         ("eval/clip_score", "CLIP score", ".2f"), ("eval/content_cos", "content", ".3f"),
         ("eval/style_centroid_cos", "style (centroid)", ".3f"), ("eval/style_nn_cos", "style (nearest)", ".3f"),
         ("eval/kid", "KID", ".4f"), ("eval/gram_distance", "Gram dist.", ".3f"),
         ("eval/color_distance", "colour dist.", ".3f"), ("eval/clip_i", "CLIP-I", ".3f"), ("eval/dino_cos", "DINO", ".3f"), ("eval/aesthetic", "aesthetic", ".2f"),
         ("eval/vendi", "Vendi", ".2f"), ("trainable_params", "trainable params", ",.0f"),
         ("adapter_mb", "adapter MB", ".2f"), ("peak_vram_mb", "peak VRAM MB", ".0f"),
         ("peak_memory_mb", "peak memory MB", ".0f"), ("it_per_s", "it/s", ".2f"), ("train_s", "train s", ".1f"),
         ("wall_s", "wall s", ".1f"), ("final_loss", "final loss", ".4f"), ("pareto", "Pareto", ""),
         ("fits_t4", "fits T4", ""), ("n_seeds", "seeds", "")]


def _table(board: pd.DataFrame) -> str:
    head = "".join(f"<th>{_e(title)}</th>" for _, title, _ in TABLE[:2]) + "<th>status</th><th>vs base model</th>"
    head += "".join(f"<th>{_e(title)}</th>" for _, title, _ in TABLE[2:])
    body = []
    for _, r in board.iterrows():
        cells = []
        for key, _, spec in TABLE:
            value = r[key]
            text = _num(value, spec) if spec else ("" if value is None or pd.isna(value) else _e(value))
            std = r.get(f"{key}_std")
            if (key == "composite" or key.startswith("eval/")) and std is not None and not pd.isna(std):
                text += f"<small> ±{_num(std, spec.replace('+', ''))}</small>"
            low, high = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
            if low is not None and high is not None and not pd.isna(low) and not pd.isna(high):
                text += f"<br><small>[{_num(low, spec)}, {_num(high, spec)}]</small>"
            if key == "composite" and not pd.isna(r.get("composite_vs_best_low", pd.NA)):
                text += (f"<br><small>vs #1 {_num(r['composite_vs_best'], '+.1f')} "
                         f"[{_num(r['composite_vs_best_low'], '+.1f')}, {_num(r['composite_vs_best_high'], '+.1f')}]"
                         "</small>")
            if key in ("pareto", "fits_t4") and text:
                text = {"True": "yes", "False": "no"}.get(text, text)
            cells.append(f"<td>{text}</td>")
        status = _e(r["status"]) + "".join(f"<br><small>{_e(r[k])}</small>" for k in ("reason", "note") if r[k])
        cells.insert(2, f"<td class=status>{status}</td>")
        versus = r.get("versus_base")
        cells.insert(3, f"<td><small>{_e(versus) if isinstance(versus, str) else ''}</small></td>")
        cls = "ref" if r["status"] == "reference" else "failed" if r["status"] != "finished" else (
            "pareto" if r["pareto"] is True else "")
        body.append(f"<tr class='{cls}'>{''.join(cells)}</tr>")
    return f"<div class=scroll><table class=board><tr>{head}</tr>{''.join(body)}</table></div>"


# --- charts -----------------------------------------------------------------------------------------


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


class _Chart:
    """A plain SVG plot area with linear axes, ticks and labels."""

    def __init__(self, xs: list[float], ys: list[float], xlabel: str, ylabel: str, w: int = 560, h: int = 340):
        self.w, self.h, self.m = w, h, (56, 16, 20, 44)  # left, right, top, bottom
        pad = lambda lo, hi: (lo - 0.05 * (hi - lo or abs(lo) or 1), hi + 0.05 * (hi - lo or abs(hi) or 1))  # noqa: E731
        self.x0, self.x1 = pad(min(xs), max(xs))
        self.y0, self.y1 = pad(min(ys), max(ys))
        self.parts = [f'<rect x="{self.m[0]}" y="{self.m[2]}" width="{w - self.m[0] - self.m[1]}" '
                      f'height="{h - self.m[2] - self.m[3]}" fill="#fff" stroke="#999"/>']
        for t in _ticks(self.x0, self.x1):
            x = self.x(t)
            self.parts.append(f'<line x1="{x:.1f}" y1="{h - self.m[3]}" x2="{x:.1f}" y2="{h - self.m[3] + 4}" stroke="#666"/>'
                              f'<text x="{x:.1f}" y="{h - self.m[3] + 16}" text-anchor="middle">{t:.4g}</text>')
        for t in _ticks(self.y0, self.y1):
            y = self.y(t)
            self.parts.append(f'<line x1="{self.m[0] - 4}" y1="{y:.1f}" x2="{w - self.m[1]}" y2="{y:.1f}" stroke="#eee"/>'
                              f'<text x="{self.m[0] - 6}" y="{y + 4:.1f}" text-anchor="end">{t:.4g}</text>')
        self.parts.append(f'<text x="{(w + self.m[0]) / 2:.0f}" y="{h - 6}" text-anchor="middle">{_e(xlabel)}</text>'
                          f'<text transform="translate(14 {(h - self.m[3]) / 2:.0f}) rotate(-90)" '
                          f'text-anchor="middle">{_e(ylabel)}</text>')

    def x(self, v: float) -> float:
        return self.m[0] + (v - self.x0) / (self.x1 - self.x0) * (self.w - self.m[0] - self.m[1])

    def y(self, v: float) -> float:
        return self.h - self.m[3] - (v - self.y0) / (self.y1 - self.y0) * (self.h - self.m[2] - self.m[3])

    def svg(self) -> str:
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{self.w}" height="{self.h}" '
                f'font-family="sans-serif" font-size="11">{"".join(self.parts)}</svg>')


def _pareto_chart(board: pd.DataFrame) -> str:
    pts = []
    for _, r in board.iterrows():
        memory = r["peak_vram_mb"] if not pd.isna(r["peak_vram_mb"]) else r["peak_memory_mb"]
        if r["status"] == "finished" and not pd.isna(r["composite"]) and not pd.isna(memory):
            pts.append((float(memory), float(r["composite"]), r["pareto"] is True, str(r["config"]), r["rank"]))
    if not pts:
        return "<p>No scored trial to chart.</p>"
    what = "peak VRAM (MB)" if board["peak_vram_mb"].notna().any() else "peak memory (MB; CPU run: process RSS)"
    c = _Chart([p[0] for p in pts], [p[1] for p in pts], what, "composite score")
    front = sorted((p for p in pts if p[2]), key=lambda p: p[0])
    if len(front) > 1:
        c.parts.append('<polyline fill="none" stroke="#d62728" stroke-dasharray="4 3" points="'
                       + " ".join(f"{c.x(p[0]):.1f},{c.y(p[1]):.1f}" for p in front) + '"/>')
    placed: list[tuple[float, float, float]] = []
    for mem, score, on_front, label, rank in sorted(pts, key=lambda p: (-p[1], p[0])):
        colour = "#d62728" if on_front else "#888"
        c.parts.append(f'<circle cx="{c.x(mem):.1f}" cy="{c.y(score):.1f}" r="5" fill="{colour}">'
                       f"<title>{_e(label)}: {score:.3f} at {mem:.0f} MB</title></circle>"
                       + _point_label(c, c.x(mem), c.y(score), f"#{rank} {label[:28]}", placed))
    return c.svg()


LABEL_HEIGHT, CHAR_WIDTH = 13, 6.2  # px of a label line and of one character at font-size 11


def _point_label(c: _Chart, x: float, y: float, text: str,
                 placed: list[tuple[float, float, float]] | None = None) -> str:
    """Right of the point, or left of it near the right edge, so that it stays inside the chart; moved down a
    line while it would cover a label already `placed` (their (left, right, baseline), appended to): tied
    configurations' points sit on top of each other."""
    right = x > c.w * 0.6
    tx, ty = x - 7 if right else x + 7, y - 6 if y > c.m[2] + 14 else y + 16
    width = len(text) * CHAR_WIDTH
    left_edge, right_edge = (tx - width, tx) if right else (tx, tx + width)
    if placed is not None:
        while any(abs(ty - py) < LABEL_HEIGHT and left_edge < p1 and p0 < right_edge for p0, p1, py in placed):
            ty += LABEL_HEIGHT
        placed.append((left_edge, right_edge, ty))
    return f'<text x="{tx:.1f}" y="{ty:.1f}" text-anchor="{"end" if right else "start"}">{_e(text)}</text>'


def _loss_chart(per_trial: pd.DataFrame, sources: dict[str, RowSource]) -> str:
    curves = []
    for _, t in per_trial.iterrows():
        source = sources.get(t["trial"])
        if t["status"] == "reference" or source is None:
            continue
        losses = [v for v in source.record.get("losses") or [] if v is not None and math.isfinite(v)]
        if losses:
            curves.append((f"{t['config']} (seed {_seed_text(t['seed'])})", losses))
    if not curves:
        return "<p>No loss curves recorded.</p>"
    xs = [1, max(len(v) for _, v in curves)]
    c = _Chart(xs if xs[1] > 1 else [1, 2], [v for _, ls in curves for v in ls], "step", "train/loss")
    legend = []
    for i, (label, losses) in enumerate(curves):
        colour = PALETTE[i % len(PALETTE)]
        points = " ".join(f"{c.x(step):.1f},{c.y(v):.1f}" for step, v in enumerate(losses, 1))
        c.parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}">'
                       f"<title>{_e(label)}</title></polyline>")
        legend.append(f'<span style="color:{colour}">&#9632;</span> {_e(label)}')
    return c.svg() + "<div class=legend>" + "<br>".join(legend) + "</div>"


# --- the page ----------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,sans-serif;margin:20px;color:#222}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:28px 0 8px} .sub{color:#666;font-size:13px}
table{border-collapse:collapse;font-size:12px}
.grid td,.grid th{padding:4px;vertical-align:top;text-align:center}
.grid th.row{text-align:right;max-width:220px;font-weight:normal}
.grid img{width:160px;height:160px;object-fit:contain;image-rendering:auto;display:block}
.grid .tip{font-size:10px;color:#666;max-width:160px}
.grid td.failed{color:#b00;text-align:left}
.board th,.board td{border-bottom:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
.board td:nth-child(2),.board td:nth-child(3),.board th:nth-child(3){text-align:left}.board td.status{text-align:left;white-space:normal;min-width:160px;max-width:300px}
tr.ref{background:#f3f6fb} tr.failed{color:#999} tr.pareto td:nth-child(2){font-weight:bold}
.problems{color:#b00;font-size:13px}
.scroll{overflow-x:auto} .charts{display:flex;flex-wrap:wrap;gap:24px} .legend{font-size:11px;margin-top:4px}
"""


def _problems(problems: list[str]) -> str:
    if not problems:
        return ""
    items = "".join(f"<li>{_e(p)}</li>" for p in problems)
    return f"<div class=problems><b>Skipped while reading the folder:</b><ul>{items}</ul></div>"


SPLIT_TABLE = [("clip_score", "CLIP score", ".2f"), ("style_centroid_cos", "style", ".3f"),
               ("content_cos", "content", ".3f"), ("clip_i", "CLIP-I", ".3f"), ("dino_cos", "DINO", ".3f")]


def _splits(board: pd.DataFrame) -> str:
    """The per-image metrics over each prompt set: training captions (in distribution) beside every other
    prompt (out of distribution): the style where it was taught, and where it has to carry over."""
    shown = [(m, title, spec) for m, title, spec in SPLIT_TABLE
             if any(f"eval/{split}/{m}" in board and board[f"eval/{split}/{m}"].notna().any() for split in ("in", "out"))]
    if not shown:
        return ""
    head = "<th>configuration</th>" + "".join(f"<th>{_e(t)}<br><small>in / out</small></th>" for _, t, _ in shown)
    body = []
    for _, r in board.iterrows():
        if r["status"] not in ("finished", "reference"):
            continue
        cells = "".join(f"<td>{_num(r.get(f'eval/in/{m}'), spec) or '-'} / {_num(r.get(f'eval/out/{m}'), spec) or '-'}</td>"
                        for m, _, spec in shown)
        body.append(f"<tr><td>{_e(r['config'])}</td>{cells}</tr>")
    return ("<h2>In and out of distribution</h2><div class=sub>in: prompts that are training captions "
            "(eval.prompts among them, and eval.caption_prompts of them); out: every other prompt. "
            "Set-level metrics (KID, Gram, colour, Vendi) stay over all images.</div>"
            f"<table class=board><tr>{head}</tr>{''.join(body)}</table>")


def _scorers(board: pd.DataFrame) -> str:
    """Which CLIP model scored the rows, named where everyone looks first, with what a stand-in's numbers mean."""
    names = sorted({s for s in board["scored_by"] if isinstance(s, str) and s})
    if not names:
        return ""
    caveats = []
    if any(n.startswith("tiny") for n in names):
        caveats.append("<b>tiny</b> has random weights: its CLIP numbers mean nothing")
    if any(n.startswith("toy") for n in names):
        caveats.append("<b>toy</b> knows only the toy world: its numbers mean something for model=toy-sdxl alone")
    return f"<div class=sub>Scored by: {_e(', '.join(names))}. {'; '.join(caveats)}</div>"


# --- axis effects ------------------------------------------------------------------------------------


def _effects(effects: list) -> str:
    """What each axis does: a table of every option's effect on each measure, and a forest plot per metric."""
    if not effects:
        return ""
    measures = list(dict.fromkeys(e.measure for e in effects))
    rows: dict[tuple, dict] = {}
    for e in effects:
        rows.setdefault((e.axis, e.option, e.reference), {})[e.measure] = e
    head = "".join(f"<th>{_e(m.removeprefix('eval/'))}</th>" for m in measures)
    body = []
    for (axis, option, reference), by_measure in rows.items():
        cells = [f"<td>{_effect_text(by_measure.get(m))}</td>" for m in measures]
        pairs = next(iter(by_measure.values()))
        note = "" if pairs.pairs == pairs.possible else f"<br><small>{pairs.pairs} of {pairs.possible} pairs</small>"
        body.append(f"<tr><th class=row>{_e(axis)}={_e(option)} vs {_e(reference)}{note}</th>{''.join(cells)}</tr>")
    plots = "".join(f"<div><b>{_e(m.removeprefix('eval/'))}</b><br>{_forest([e for e in effects if e.measure == m])}</div>"
                    for m in measures if any(e.low is not None for e in effects if e.measure == m))
    return (f"<h2>What each axis does</h2><div class=sub>Main effects: per option, its difference from the axis's "
            f"first option, averaged over the cells of the other axes (pairs of configurations that differ in this "
            f"axis only); metrics with a 95 % interval over the prompt x seed cells, resources as a mean difference "
            f"(and relative). Green: separated and better, red: separated and worse, grey: not separated.</div>"
            f"<div class=scroll><table class=board><tr><th></th>{head}</tr>{''.join(body)}</table></div>"
            f"<div class=charts>{plots}</div>")


def _effect_colour(e) -> str:
    if not e.separated:
        return "#888"
    return "#2ca02c" if (e.effect > 0) == bool(e.higher_is_better) else "#d62728"


def _effect_text(e) -> str:
    if e is None:
        return ""
    if e.low is None:
        relative = f" ({e.relative:+.0%})" if e.relative is not None else ""
        return f"{_num(e.effect, '+.3g')}{relative}"
    return (f'<span style="color:{_effect_colour(e)}">{_num(e.effect, "+.3g")}</span>'
            f"<br><small>[{_num(e.low, '+.3g')}, {_num(e.high, '+.3g')}]</small>")


def _forest(effects: list) -> str:
    """One line per option: its interval as a bar and its mean as a dot, around a zero line."""
    shown = [e for e in effects if e.low is not None]
    span = max(max(abs(e.low), abs(e.high)) for e in shown) or 1.0
    width, left, line = 420, 170, 22
    height = line * len(shown) + 24

    def x(v: float) -> float:
        return left + (v / span + 1) / 2 * (width - left - 10)

    parts = [f'<line x1="{x(0):.1f}" y1="4" x2="{x(0):.1f}" y2="{height - 18}" stroke="#bbb"/>',
             f'<text x="{x(-span):.1f}" y="{height - 4}" font-size="10">{-span:+.3g}</text>',
             f'<text x="{x(span):.1f}" y="{height - 4}" font-size="10" text-anchor="end">{span:+.3g}</text>']
    for i, e in enumerate(shown):
        y, colour = 14 + i * line, _effect_colour(e)
        parts.append(f'<text x="4" y="{y + 4}" font-size="11">{_e(e.axis)}={_e(e.option)} vs {_e(e.reference)}</text>'
                     f'<line x1="{x(e.low):.1f}" y1="{y}" x2="{x(e.high):.1f}" y2="{y}" stroke="{colour}" stroke-width="3"/>'
                     f'<circle cx="{x(e.effect):.1f}" cy="{y}" r="4" fill="{colour}"><title>{e.effect:+.4g} '
                     f"[{e.low:+.4g}, {e.high:+.4g}]</title></circle>")
    return f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(parts)}</svg>'


def render(sweep_dir: Path, result: Leaderboard) -> str:
    """The page, from what the leaderboard was built of (its records are not read a second time)."""
    board, per_trial, sources = result.board, result.per_trial, result.sources
    finished = int((board["status"] == "finished").sum())
    failed = int((~board["status"].isin(["finished", "reference"])).sum())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>sdsweep report: {_e(sweep_dir.name)}</title><style>{CSS}</style></head>
<body>
<h1>sdsweep: {_e(sweep_dir)}</h1>
<div class=sub>{len(per_trial)} rows · {finished} configurations finished · {failed} failed ·
written {datetime.now():%Y-%m-%d %H:%M} · rebuild with <code>python -m sdsweep.board {_e(sweep_dir)}</code></div>
{_problems(result.problems)}
{_scorers(board)}
<h2>Images: one row per trial, the base model first; one column per prompt and seed</h2>
{_grid(per_trial, sources)}
<h2>Leaderboard</h2>
<div class=sub>composite: % better than the base model, the weighted mean of each metric's change from the base
model's value (100 &times; (value &minus; base) / |base|, distances turned so that + is better, each clipped to &plusmn;100);
the base model is 0. Rank 1 is shared by every configuration whose composite is not separated from the best one's
(paired bootstrap, 95 %, and at least 0.5 points); ± is the standard deviation over seeds;
Pareto: not beaten on score, peak memory and training time at once.</div>
{_table(board)}
<div class=sub>[a, b]: 95 % bootstrap interval over the prompt x seed cells (and training seeds). vs base model: the
metrics whose difference from the base model's images of the same prompts and seeds is separated (its interval
clears the metric's resolution), + above the base model, - below; tie: none is.</div>
{_splits(board)}
{_effects(result.effects)}
<h2>Charts</h2>
<div class=charts><div><b>Composite score against peak memory</b> (red: Pareto-optimal over score, memory and
training time)<br>{_pareto_chart(board)}</div>
<div><b>Training loss of every trial</b><br>{_loss_chart(per_trial, sources)}</div></div>
</body></html>
"""

