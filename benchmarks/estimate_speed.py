"""Seconds the peak-VRAM estimate takes for one cell when not remembered, and proof its figures hold.

    python benchmarks/estimate_speed.py                       # seconds per cell (issue 18: SDXL <= 2 s)
    python benchmarks/estimate_speed.py --figures out.json    # every Estimate field of a wide matrix
    python benchmarks/estimate_speed.py --compare a.json b.json

Speed: each cell runs in a fresh process with a fresh model.cache_dir (no on-disk memo, no in-process
_CACHE), so what is timed is the whole computation: configs, meta modules, adapter, both traces.
It prints wall seconds and the process's CPU seconds (on a shared machine the wall time also holds
other people's work; CPU seconds do not). Process start-up and imports are not counted.

Figures: every field of `Estimate` (but `seconds` and `remembered`) for SDXL, SD1.5 and SD3, their
real architectures (sdsweep/model/architectures.py, no download) and the tiny ones, across adapters,
precisions, checkpointing, cached latents, trained text encoders and prior preservation. A change to
the estimator that is meant to be faster only must leave `--compare` reporting no difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COMMON = ["train.batch_size=1", "adapter.rank=16"]

SPEED_CELLS = {
    "sdxl 1024 px fp16 checkpointing": ["model=sdxl", "precision=fp16", "data.resolution=1024",
                                        "train.gradient_checkpointing=true"],
    "sdxl 1024 px fp16 no checkpointing": ["model=sdxl", "precision=fp16", "data.resolution=1024",
                                           "train.gradient_checkpointing=false"],
    "sd3-medium 512 px fp16 checkpointing": ["model=sd3", "precision=fp16", "data.resolution=512",
                                             "train.gradient_checkpointing=true"],
    "sd1.5 512 px fp16 checkpointing": ["model=sd15", "precision=fp16", "data.resolution=512",
                                        "train.gradient_checkpointing=true"],
}

PRIOR = ["data.num_class_images=4", "data.class_prompt=x"]
REAL_VARIANTS = [
    [],
    ["precision=bf16", "adapter=dora", "train.gradient_checkpointing=true"],
    ["precision=int8", "adapter=lokr", "train.gradient_checkpointing=true"],
    ["adapter=full", "train.gradient_checkpointing=true"],
    ["adapter=textual_inversion"],
    ["text_encoder=lora", "train.gradient_checkpointing=true"],
    ["data.crop=center"],
    ["data.crop=center", "train.gradient_checkpointing=true", "precision=bf16"],
    [*PRIOR, "train.gradient_checkpointing=true"],
]
TINY_VARIANTS = [
    *REAL_VARIANTS,
    ["train.batch_size=2", "targets=many", "adapter=loha"],
    ["text_encoder=lora", "adapter=dora", "precision=bf16", *PRIOR],
    ["train.ema_decay=0.999", "optimizer=adamw8bit", "precision=fp16"],
]
FIGURE_CELLS = {
    **{f"{name} {' '.join(cell)}": cell for name, cell in SPEED_CELLS.items()},
    **{f"{model} 512 px fp16 {' '.join(v)}": [f"model={model}", "precision=fp16", "data.resolution=512", *v]
       for model in ("sdxl", "sd15", "sd3") for v in REAL_VARIANTS[1:]},
    **{f"{model} 64 px fp16 {' '.join(v)}": [f"model={model}", "precision=fp16", "data.resolution=64", *v]
       for model in ("tiny-sdxl", "tiny-sd15", "tiny-sd3", "toy-sdxl") for v in TINY_VARIANTS},
}


def estimate(overrides: list[str]):
    """One estimate with a fresh cache dir: (the Estimate, wall seconds, CPU seconds)."""
    from hydra import compose, initialize_config_module

    from sdsweep.config.store import register_configs
    from sdsweep.sweep.estimate import estimate_peak

    register_configs()
    with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*COMMON, *overrides,
                                                       f"model.cache_dir={tempfile.mkdtemp()}"])
    wall, cpu = time.perf_counter(), time.process_time()
    result = estimate_peak(cfg)
    return result, time.perf_counter() - wall, time.process_time() - cpu


def fields(result) -> dict:
    from dataclasses import asdict

    return {k: v for k, v in asdict(result).items() if k not in ("seconds", "remembered")}


def one_cell(name: str) -> None:
    """Child process: time one speed cell, print one JSON line."""
    result, wall, cpu = estimate(SPEED_CELLS[name])
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "total_gb": result.total_gb, "phases": result.phases,
                      "reason": result.reason}))


def speed(repeat: int) -> None:
    for name in SPEED_CELLS:
        runs = []
        for _ in range(repeat):
            out = subprocess.run([sys.executable, __file__, "--cell", name], capture_output=True, text=True,
                                 check=True).stdout.strip().splitlines()[-1]
            runs.append(json.loads(out))
        best = min(runs, key=lambda r: r["wall_s"])
        walls = " ".join(f"{r['wall_s']:.2f}" for r in runs)
        print(f"{name:40s} wall {walls} s  cpu {best['cpu_s']:.2f} s  total {best['total_gb']:.3f} GiB"
              + (f"  ({best['reason']})" if best["reason"] else ""))


def figures(path: str) -> None:
    out = {}
    for name, overrides in FIGURE_CELLS.items():
        result, wall, _ = estimate(overrides)
        out[name] = fields(result)
        print(f"{wall:6.2f} s  {result.total_gb!s:>22}  {name}", flush=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)


def _differences(a, b, where: str = "") -> list[str]:
    if isinstance(a, float) and isinstance(b, float):
        return [] if math.isclose(a, b, rel_tol=0, abs_tol=1e-9) else [f"{where}: {a!r} != {b!r}"]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{where}: keys {sorted(set(a) ^ set(b))}"]
        return [d for k in a for d in _differences(a[k], b[k], f"{where}/{k}")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def compare(a: str, b: str) -> int:
    with open(a) as fa, open(b) as fb:
        differences = _differences(json.load(fa), json.load(fb))
    print("\n".join(differences) or "no difference")
    return 1 if differences else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--figures", metavar="OUT.json")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"))
    parser.add_argument("--repeat", type=int, default=1, help="runs per speed cell (the best is shown)")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        one_cell(args.cell)
    elif args.compare:
        sys.exit(compare(*args.compare))
    elif args.figures:
        figures(args.figures)
    else:
        speed(args.repeat)
