"""A sweep against running the reference training script once per cell, side by side, as a user would.

    python benchmarks/vs_reference.py --reference PATH/train_text_to_image_lora_sdxl.py
    python benchmarks/vs_reference.py --reference PATH --like-for-like    # cells the script can express

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
alpha = rank as the script sets it), each reference run with that cell's --rank.

Prints both wall times, both mean training speeds (sdsweep: each trial's steps_per_s in metrics.json;
the script: the rate its progress bar ends on) and the ratio. Run by hand, never in CI.
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


def run_sweep(cells: list[str], steps: int, cache_dir: Path, out: Path) -> tuple[float, list[dict]]:
    command = [sys.executable, "-m", "sdsweep", "-m", *cells, f"train.max_steps={steps}", "eval.enabled=false",
               "train.lr=1e-3", "train.batch_size=2", "data.resolution=64", "optimizer.scheduler=constant",
               f"model.cache_dir={cache_dir}", f"cache.dir={out / 'features'}", f"hydra.sweep.dir={out / 'sweep'}"]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run(command, env=environment(), cwd=out, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"sdsweep failed ({result.returncode}):\n{result.stderr[-3000:]}")
    trials = [json.loads(p.read_text()) for p in sorted((out / "sweep").glob("*/metrics.json"))]
    return wall, trials


def run_reference(script: Path, model: Path, data: Path, rank: int, steps: int, out: Path) -> tuple[float, float]:
    command = [sys.executable, str(script), "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
               "--resolution", "64", "--random_flip", "--train_batch_size", "2", "--max_train_steps", str(steps),
               "--learning_rate", "1e-3", "--lr_scheduler", "constant", "--rank", str(rank), "--seed", "0",
               "--mixed_precision", "no", "--dataloader_num_workers", "0", "--report_to", "wandb",
               "--output_dir", str(out)]
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = subprocess.run(command, env=environment(), cwd=out.parent, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"the reference script failed ({result.returncode}):\n{result.stderr[-3000:]}")
    rates = re.findall(r"([\d.]+)it/s", result.stderr)  # tqdm's progress bar: the last rate it shows
    return wall, float(rates[-1]) if rates else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, required=True, help="diffusers' train_text_to_image_lora_sdxl.py")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--cells", nargs="*", default=["adapter=lora,dora", "targets=attn,many"])
    parser.add_argument("--like-for-like", action="store_true",
                        help=f"LoRA on attention at ranks {LIKE_FOR_LIKE_RANKS}, in both")
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
    print(f"{len(ranks)} cells x {args.steps} steps ({' '.join(cells)}); model {model}; data {data}; "
          f"folders in {out}", flush=True)

    sweep_wall, trials = run_sweep(cells, args.steps, cache_dir, out / "sdsweep")
    print(f"\nsdsweep: one sweep of {len(trials)} trials in {sweep_wall:.1f} s")
    for t in trials:
        print(f"  {' '.join(t['overrides'][:3]):45s} {t['steps_per_s']:6.1f} it/s  train {t['train_s']:5.1f} s  "
              f"trial {t['wall_s']:5.1f} s")
    reference = []
    for i, rank in enumerate(ranks):
        wall, rate = run_reference(args.reference, model, data, rank, args.steps, out / "reference" / f"run{i}")
        reference.append((wall, rate))
        print(f"reference run {i} (--rank {rank}): {wall:.1f} s, {rate:.1f} it/s", flush=True)
    reference_wall = sum(w for w, _ in reference)

    ours_rate = sum(t["steps_per_s"] for t in trials) / len(trials)
    ref_rate = sum(r for _, r in reference) / len(reference)
    print(f"\n{'':28s} {'wall s':>8s} {'mean it/s':>10s}")
    print(f"{'sdsweep (one sweep)':28s} {sweep_wall:8.1f} {ours_rate:10.1f}")
    print(f"{f'reference ({len(ranks)} runs)':28s} {reference_wall:8.1f} {ref_rate:10.1f}")
    print(f"ratio sdsweep / reference: {sweep_wall / reference_wall:.2f} (goal: at most 0.40)")


if __name__ == "__main__":
    main()
