"""Where a sweep's time goes, and what the shared cache and the kept-loaded base save.

Runs the same matrix twice, in this one process, the way Hydra's basic launcher runs it:

  sdsweep    the feature cache on (VAE and text encoders run once per image, shared by
             the trials) and the base model kept loaded from one trial to the next;
  reference  what running a reference training script once per cell does: the VAE and
             text encoders run on every step, and every trial loads the model.

Prints each trial's wall time split into the memory estimate, data, load, cache, train, save,
base sampling, sampling, scoring and the rest (set-up of the adapter and optimizer, tracking,
freeing), with steps/s, images/s and peak memory; then per sweep the total, the share spent in
training steps, and the ratio between the two modes.

    python benchmarks/sweep_speed.py                                   # tiny SDXL on the CPU
    python benchmarks/sweep_speed.py --cells adapter=lora,dora targets=attn,many --steps 50
    python benchmarks/sweep_speed.py --set model=sdxl precision=fp16 data.path=./style \\
        train.gradient_checkpointing=true --steps 200                  # the real thing, on a GPU

Run by hand, not in CI. Each mode gets a fresh feature cache, so the sdsweep figures include
filling it once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODES = {
    "sdsweep": ["cache.enabled=true", "sweep.keep_base_loaded=true"],
    "reference": ["cache.enabled=false", "sweep.keep_base_loaded=false"],
}
TIMED = ["estimate_s", "data_s", "load_s", "cache_s", "train_s", "save_s", "eval_base_s", "sample_s", "score_s"]
PHASES = [*TIMED, "other_s"]  # other: what no phase of metrics.json covers (adapter and optimizer set-up, freeing)


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from sdsweep.config.store import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def run_mode(mode: str, cells: list[list[str]], common: list[str], root: Path) -> list[dict]:
    from omegaconf import OmegaConf

    from sdsweep.model import kept_base
    from sdsweep.sweep.collector import freeze_libraries
    from sdsweep.sweep.trial import run_trial

    kept_base.drop()
    rows = []
    for i, cell in enumerate(cells):
        overrides = [*MODES[mode], *common, f"cache.dir={root / mode / 'features'}", *cell]
        cfg = compose(overrides)
        if i == 0:  # a multirun's folder, as Hydra writes it: the trials share the base model's samples
            (root / mode).mkdir(parents=True, exist_ok=True)
            OmegaConf.save(cfg, root / mode / "multirun.yaml")
        freeze_libraries(cfg)  # as `python -m sdsweep` does before its first trial (the warm-up's, here)
        started = time.perf_counter()
        metrics = run_trial(cfg, root / mode / f"trial{i}", trial_number=i)
        if metrics["status"] != "finished":
            sys.exit(f"{mode} trial {cell} {metrics['status']}: {metrics.get('reason')}")
        whole = time.perf_counter() - started
        other = whole - sum(metrics.get(p) or 0.0 for p in TIMED)
        rows.append({"cell": " ".join(cell) or "(default)", **metrics, "other_s": other, "trial_s": whole})
    kept_base.drop()
    return rows


def print_trials(mode: str, rows: list[dict]) -> None:
    memory = "peak_vram_mb" if rows[0].get("peak_vram_mb") is not None else "peak_memory_mb"
    header = f"{'cell':34s} " + " ".join(f"{p[:-2]:>7s}" for p in PHASES) + f" {'wall':>7s} {'it/s':>6s} {'img/s':>6s} {memory:>14s}"
    print(f"\n== {mode}: seconds per phase ==\n{header}")
    for r in rows:
        phases = " ".join(f"{r.get(p) or 0.0:7.2f}" for p in PHASES)
        print(f"{r['cell'][:34]:34s} {phases} {r['trial_s']:7.2f} {r.get('steps_per_s') or 0:6.2f} "
              f"{r.get('images_per_s') or 0:6.2f} {r.get(memory) or 0:14.0f}")


def summarize(rows: list[dict], wall: float) -> dict:
    train = sum(r["train_s"] for r in rows)
    return {"wall_s": wall, "train_s": train, "train_share": train / wall,
            **{p: sum(r.get(p) or 0.0 for r in rows) for p in PHASES}}


def projected_share(rows: list[dict], wall: float, steps: int, target: int) -> float:
    """The share of the sweep's wall time in training steps had each cell trained `target` steps: the
    same per-trial and per-sweep costs, the extra steps at each trial's measured steady rate
    (steps_per_s leaves out the warm-up steps, which a longer trial pays only once too)."""
    extra = sum((target - steps) / r["steps_per_s"] for r in rows)
    return (sum(r["train_s"] for r in rows) + extra) / (wall + extra)


def refuse_bad_cells(overrides: list[str]) -> None:
    """What `python -m sdsweep -m` checks before its first trial (a missing scorer's weights, a bad
    value), checked here too: a benchmark on a lent GPU must not find out after loading SDXL."""
    from sdsweep.sweep.preflight import preflight

    problems = preflight(overrides)
    if problems:
        sys.exit("sweep_speed.py: fix these first:\n" + "\n".join(f"  - {p}" for p in problems))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", nargs="*", default=["adapter=lora,dora", "targets=attn,many"],
                        help="sweep axes as for `python -m sdsweep -m` (default: the 2x2 matrix)")
    parser.add_argument("--set", nargs="*", default=[], help="overrides shared by every cell")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    parser.add_argument("--out", type=Path, default=None, help="keep the trial folders here (default: a temp dir)")
    parser.add_argument("--cap-gb", type=float, default=None,
                        help="on CUDA: cap this process's GPU memory (torch.cuda.set_per_process_memory_fraction), "
                             "e.g. 16 for a T4's budget on a larger GPU")
    parser.add_argument("--project-steps", type=int, default=None,
                        help="also print each sweep's train share had every cell trained this many steps")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from sdsweep.__main__ import _quiet_libraries
    from sdsweep.sweep.preflight import expand_cells

    _quiet_libraries()
    cells = expand_cells(args.cells)
    common = [f"train.max_steps={args.steps}", "tracking.mode=disabled", *args.set]
    refuse_bad_cells([*MODES[args.modes[0]], *common, *args.cells])
    if args.cap_gb is not None:
        from sdxl_random import cap_memory  # beside this script

        print(cap_memory(args.cap_gb))
    root = args.out or Path(tempfile.mkdtemp(prefix="sdsweep-bench-"))
    print(f"{len(cells)} cells x {args.steps} steps, modes {args.modes}; trial folders in {root}")
    # one throw-away step first: imports, lazy initialisation and the tiny model's build are paid here
    run_mode("reference", [[]], [*common, "train.max_steps=1", "eval.enabled=false"], root / "warmup")
    summaries = {}
    for mode in args.modes:
        started = time.perf_counter()
        rows = run_mode(mode, cells, common, root)
        wall = time.perf_counter() - started
        summaries[mode] = summarize(rows, wall)
        if args.project_steps:
            summaries[mode]["projected"] = projected_share(rows, wall, args.steps, args.project_steps)
        print_trials(mode, rows)

    print("\n== per sweep ==")
    print(f"{'mode':10s} {'wall s':>8s} {'train s':>8s} {'train share':>11s} " + " ".join(f"{p[:-2]:>7s}" for p in PHASES))
    for mode, s in summaries.items():
        print(f"{mode:10s} {s['wall_s']:8.1f} {s['train_s']:8.1f} {s['train_share']:11.0%} "
              + " ".join(f"{s[p]:7.1f}" for p in PHASES))
    for mode, s in summaries.items():
        if "projected" in s:
            print(f"{mode}: train share at {args.project_steps} steps per cell, projected from these trials' "
                  f"costs and steady step rates: {s['projected']:.0%}")
    if len(summaries) == 2:
        ours, ref = summaries["sdsweep"], summaries["reference"]
        print(f"\nreference / sdsweep: whole sweep {ref['wall_s'] / ours['wall_s']:.2f}x, "
              f"training steps {ref['train_s'] / ours['train_s']:.2f}x")
        print(f"saved by the kept base: {ref['load_s'] - ours['load_s']:.1f} s of loading; "
              f"by the shared cache: {ref['train_s'] - ours['train_s'] - ours['cache_s']:.1f} s of training "
              f"net of {ours['cache_s']:.1f} s filling it")


if __name__ == "__main__":
    main()
