"""A sweep against running the reference training script once per cell, side by side, as a user would.

    python benchmarks/vs_reference.py --reference PATH/train_text_to_image_lora_sdxl.py
    python benchmarks/vs_reference.py --reference PATH --like-for-like    # cells the script can express
    python benchmarks/vs_reference.py --reference PATH --matched          # the script made to train each cell

PATH is diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py (not part of this
repository: a diffusers checkout has it). Both train the same model folder (the toy SDXL, built and
saved by sdsweep, loaded by both through from_pretrained) on the same images (the built-in set, an
imagefolder with metadata.jsonl) at 64 px, batch 2, lr 1e-3, constant schedule, fp32, the given steps
per cell, W&B offline, no validation and no evaluation, each a fresh process from a cold start:

  sdsweep    `python -m sdsweep -m CELLS` once: the matrix in one process, the base model kept loaded,
             the VAE latents and text embeddings cached once for all cells (a fresh cache: filling it
             is timed);
  reference  the script once per cell, which encodes every batch with the VAE and text encoders.

The default cells are the README's 2x2 (adapter=lora,dora targets=attn,many); the script trains plain
LoRA on the UNet's attention (to_q/k/v/out) only, so each of its runs is the cheapest of the four cells.
`--like-for-like` sweeps what the script can express instead (LoRA on attention at ranks 4, 8, 16, 32,
alpha = rank as the script sets it), each reference run with that cell's --rank. `--matched` keeps the
cells and makes each script run train that cell's adapter: the script run unchanged through
benchmarks/reference_shim.py, which gives its UNet LoraConfig the cell's DoRA and target patterns.

Prints both wall times, both mean training speeds (sdsweep: each trial's steps_per_s in metrics.json;
the script: the rate its progress bar ends on) and the ratio; with --repeat N, N rounds of both and
the medians (one machine's noise moves single runs by 20 %). Run by hand, never in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

STEPS = 100
LIKE_FOR_LIKE_RANKS = [4, 8, 16, 32]


def environment() -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true",
               CUDA_VISIBLE_DEVICES="")
    return env


def prepare(cache_dir: Path) -> tuple[Path, Path]:
    """The toy SDXL folder and the built-in images as an imagefolder, built before anything is timed."""
    from sdsweep.data.toy_world import ensure_toy_dataset
    from sdsweep.model.toy import ensure_toy_model

    return ensure_toy_model(cache_dir), ensure_toy_dataset(str(cache_dir))


def run_sweep(cells: list[str], steps: int, cache_dir: Path, out: Path, evaluate: bool = False) -> tuple[float, list[dict]]:
    command = [sys.executable, "-m", "sdsweep", "-m", *cells, f"train.max_steps={steps}", f"eval.enabled={evaluate}",
               "train.lr=1e-3", "train.batch_size=2", "data.resolution=64", "optimizer.scheduler=constant",
               f"model.cache_dir={cache_dir}", f"cache.dir={out / 'features'}", f"hydra.sweep.dir={out / 'sweep'}"]
    out.mkdir(parents=True, exist_ok=True)
    wall, _ = timed(command, environment(), out, "sdsweep")
    trials = [json.loads(p.read_text()) for p in sorted((out / "sweep").glob("*/metrics.json"))]
    return wall, trials


def timed(command: list[str], env: dict, cwd: Path, what: str) -> tuple[float, str]:
    """Wall seconds of one run of `command` and its standard error; a failed run ends the benchmark."""
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"{what} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, result.stderr


SHIM = Path(__file__).resolve().parent / "reference_shim.py"


def run_reference(script: Path, model: Path, data: Path, rank: int, steps: int, out: Path,
                  match: dict | None = None) -> tuple[float, float]:
    """One run of the script; with `match` ({"use_dora", "patterns"}) through the shim that makes its UNet
    adapter that cell's."""
    shim = [str(SHIM)] if match else []
    command = [sys.executable, *shim, str(script), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
               "--resolution", "64", "--random_flip", "--train_batch_size", "2", "--max_train_steps", str(steps),
               "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--rank", str(rank), "--seed", "0",
               "--mixed_precision", "no", "--dataloader_num_workers", "0", "--report_to", "wandb",
               "--output_dir", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    env = environment() | ({"SDSWEEP_MATCH": json.dumps(match)} if match else {})
    wall, stderr = timed(command, env, out.parent, "the reference script")
    rates = re.findall(r"([\d.]+)it/s", stderr)  # tqdm's progress bar: the last rate it shows
    return wall, float(rates[-1]) if rates else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="diffusers' train_text_to_image_lora_sdxl.py")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cells", nargs="*", default=["adapter=lora,dora", "targets=attn,many"])
    parser.add_argument("--like-for-like", action="store_true",
                        help=f"LoRA on attention at ranks {LIKE_FOR_LIKE_RANKS}, in both")
    parser.add_argument("--matched", action="store_true",
                        help="each script run trains its cell's adapter (DoRA, target patterns) through the shim")
    parser.add_argument("--with-eval", action="store_true", help="then the sweep once more with evaluation on")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of both; medians are printed")
    parser.add_argument("--out", type=Path, default=None, help="keep the folders here (default: a temp dir)")
    args = parser.parse_args()
    if not args.reference.is_file():
        sys.exit(f"--reference {args.reference}: no such file (diffusers' "
                 "examples/text_to_image/train_text_to_image_lora_sdxl.py)")

    from sdsweep.sweep.preflight import expand_cells

    out = args.out or Path(tempfile.mkdtemp(prefix="sdsweep-vs-reference-"))
    cache_dir = out / "models"
    model, data = prepare(cache_dir)
    if args.like_for_like:
        cells = ["adapter=lora", "targets=attn", "adapter.rank=" + ",".join(map(str, LIKE_FOR_LIKE_RANKS)),
                 "adapter.alpha=${adapter.rank}"]
        ranks = LIKE_FOR_LIKE_RANKS
    else:
        cells = args.cells
        ranks = [8] * len(expand_cells(cells))  # the script's LoRA at sdsweep's default rank, once per cell
    matches = [cell_adapter(cell) for cell in expand_cells(cells)] if args.matched else [None] * len(ranks)
    print(f"{len(ranks)} cells x {args.steps} steps ({' '.join(cells)}); model {model}; data {data}; "
          f"folders in {out}", flush=True)

    rounds = [one_round(args, cells, ranks, matches, model, data, cache_dir, out / f"round{r}")
              for r in range(args.repeat)]
    print(f"\n{'':28s} {'wall s':>8s} {'mean it/s':>10s}   (median of {args.repeat} round(s))")
    print(f"{'sdsweep (one sweep)':28s} {median(r['sweep_s'] for r in rounds):8.1f} "
          f"{median(r['sweep_it_s'] for r in rounds):10.1f}")
    print(f"{f'reference ({len(ranks)} runs)':28s} {median(r['reference_s'] for r in rounds):8.1f} "
          f"{median(r['reference_it_s'] for r in rounds):10.1f}")
    ratios = [r["sweep_s"] / r["reference_s"] for r in rounds]
    print(f"ratio sdsweep / reference: {median(ratios):.2f} (each round: {', '.join(f'{x:.2f}' for x in ratios)}; "
          "goal: at most 0.40)")
    if args.with_eval:
        wall, trials = run_sweep(cells, args.steps, cache_dir, out / "with-eval", evaluate=True)
        phases = {p: sum(t.get(p) or 0.0 for t in trials) for p in ("eval_base_s", "sample_s", "score_s")}
        print(f"\nthe same sweep with evaluation on (the embedded default's eval settings): {wall:.1f} s, "
              f"{wall - median(r['sweep_s'] for r in rounds):+.1f} s against the median without: "
              + ", ".join(f"{p[:-2]} {v:.1f} s" for p, v in phases.items()))


def cell_adapter(cell: list[str]) -> dict:
    """What the shim gives the script's UNet adapter for this cell: DoRA or not, the targets' patterns."""
    from sweep_speed import compose  # beside this script

    cfg = compose(cell)
    if cfg.adapter.kind not in ("lora", "dora") or cfg.adapter.rank != 8:
        sys.exit(f"--matched: the cell {cell} trains {cfg.adapter.kind} at rank {cfg.adapter.rank}; the script "
                 "trains LoRA or (through the shim) DoRA, at rank 8 here")
    return {"use_dora": cfg.adapter.kind == "dora", "patterns": list(cfg.targets.patterns)}


def one_round(args, cells: list[str], ranks: list[int], matches: list[dict | None], model: Path, data: Path,
              cache_dir: Path, out: Path) -> dict:
    """The sweep, then the script once per cell: a round's figures (rounds repeat both, a machine's noise
    falls on both alike)."""
    sweep_wall, trials = run_sweep(cells, args.steps, cache_dir, out / "sdsweep")
    print(f"\nsdsweep: one sweep of {len(trials)} trials in {sweep_wall:.1f} s")
    for t in trials:
        print(f"  {' '.join(t['overrides'][:3]):45s} {t['steps_per_s']:6.1f} it/s  train {t['train_s']:5.1f} s  "
              f"trial {t['wall_s']:5.1f} s")
    reference = []
    for i, (rank, match) in enumerate(zip(ranks, matches)):
        wall, rate = run_reference(args.reference, model, data, rank, args.steps, out / "reference" / f"run{i}", match)
        reference.append((wall, rate))
        what = f", {'DoRA' if match['use_dora'] else 'LoRA'} on {len(match['patterns'])} pattern(s)" if match else ""
        print(f"reference run {i} (--rank {rank}{what}): {wall:.1f} s, {rate:.1f} it/s", flush=True)
    return {"sweep_s": sweep_wall, "sweep_it_s": sum(t["steps_per_s"] for t in trials) / len(trials),
            "reference_s": sum(w for w, _ in reference), "reference_it_s": sum(r for _, r in reference) / len(reference)}


if __name__ == "__main__":
    main()
