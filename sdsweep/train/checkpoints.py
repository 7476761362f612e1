"""Resumable checkpoints: safetensors for weights, no pickle beyond `weights_only=True`.

A checkpoint is a folder `checkpoints/step-000120/` written atomically (built under a
temporary name, then renamed), so every folder named `step-*` is complete; old ones are
removed only after the new one exists (unlike accelerate's save_state, which deletes first).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sdsweep.io import atomic_dir

STEP_DIR = re.compile(r"step-(\d+)")


@dataclass
class TrainState:
    """Everything besides the weights that a resumed trial needs to continue exactly."""

    step: int
    losses: list[float]
    elapsed_s: float
    scheduler: dict
    scaler: dict
    skipped_steps: list[int] = field(default_factory=list)


def save_checkpoint(
    root: Path,
    state: TrainState,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    keep: int,
) -> Path:
    folder = root / f"step-{state.step:06d}"
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in trainable.items()}, tmp / "adapter.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state.__dict__, default=_jsonable))
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with '.' and are ignored)."""
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(
    folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> TrainState:
    weights = load_file(folder / "adapter.safetensors")
    missing = sorted(set(trainable) - set(weights))
    if missing:
        raise RuntimeError(
            f"checkpoint {folder} does not match this trial's adapter (missing {missing[:3]}...): "
            "it was written by another configuration; delete the trial folder or use a new one"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    raw = json.loads((folder / "state.json").read_text())
    return TrainState(**raw)
