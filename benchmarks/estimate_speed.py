"""Seconds the peak-VRAM estimate takes for one cell when not remembered, and proof its figures hold.

    python benchmarks/estimate_speed.py                       # seconds per cell (issue 18: SDXL <= 2 s)
    python benchmarks/estimate_speed.py --figures out.json    # every Estimate field of a wide matrix
    python benchmarks/estimate_speed.py --compare a.json b.json

Speed: each cell runs in a fresh process with a fresh model.cache_dir (no on-disk memo, no in-process
_CACHE), so what is timed is the whole computation: configs, meta modules, adapter, both traces;
once as the first estimate of the process, once after another cell's (every cell of a sweep but
the first). It prints wall seconds and the process's CPU seconds (on a shared machine the wall time
also holds other people's work; CPU seconds less so), the best of --repeat runs. Process start-up
and importing diffusers, transformers and peft (which a trial imports anyway) are not counted.

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


def import_libraries() -> None:
    """What a trial imports anyway to load its model: not the estimate's cost."""
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel  # noqa: F401


def one_cell(name: str, warm: bool) -> None:
    """Child process: time one speed cell, print one JSON line. warm: after another (tiny) cell's estimate,
    as every cell of a sweep but the first (torch loads its meta kernels and decompositions on first use)."""
    import_libraries()
    if warm:
        estimate(["model=tiny-sdxl", "data.resolution=64"])
    result, wall, cpu = estimate(SPEED_CELLS[name])
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "total_gb": result.total_gb, "phases": result.phases,
                      "reason": result.reason}))


def speed(repeat: int) -> None:
    print(f"{'cell':38s} {'first in a process':>26s} {'after another cell':>26s}   total GiB")
    for name in SPEED_CELLS:
        line = f"{name:38s}"
        for warm in (False, True):
            runs = [_child(name, warm) for _ in range(repeat)]
            best = min(runs, key=lambda r: r["wall_s"])
            line += f"   wall {best['wall_s']:5.2f} s cpu {best['cpu_s']:5.2f} s"
        print(line + f"   {best['total_gb']:.6f}" + (f"  ({best['reason']})" if best["reason"] else ""), flush=True)


def _child(name: str, warm: bool) -> dict:
    command = [sys.executable, __file__, "--cell", name, *(["--warm"] if warm else [])]
    return json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout.splitlines()[-1])


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
    parser.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        one_cell(args.cell, args.warm)
    elif args.compare:
        sys.exit(compare(*args.compare))
    elif args.figures:
        figures(args.figures)
    else:
        speed(args.repeat)
