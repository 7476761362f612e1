"""Resumable checkpoints: safetensors for weights, no pickle beyond `weights_only=True`.

A checkpoint is a folder `checkpoints/step-000120/` written atomically (built under a
temporary name, then renamed); old ones are removed only after the new one exists (unlike
accelerate's save_state, which deletes first). Its last file is `complete.json`, the sha256 of
every other file: a checkpoint damaged after it was written (a disk error, a copy cut short, a
hand edit) no longer matches its record. On resume the newest checkpoint that matches and loads
is used; one that does not is set aside as `.step-000120.damaged` (never deleted: it is
evidence), with a warning naming it and why, and the next older one is tried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from sdsweep.io import atomic_dir

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step-(\d+)")
ADAPTER, OPTIMIZER, STATE = "adapter.safetensors", "optimizer.pt", "state.json"
EMA = "ema.safetensors"
"""The moving average of the adapter's weights (train.ema_decay), by the same names; only when it is on."""
RECORD = "complete.json"
"""Written last inside the atomic folder: {"files": {name: sha256}} of the files above."""


class DamagedCheckpoint(Exception):
    """A checkpoint that cannot be resumed from; the message names the file and the fault."""


@dataclass
class TrainState:
    """Everything besides the weights that a resumed trial needs to continue exactly."""

    step: int
    losses: list[float]
    elapsed_s: float
    scheduler: dict
    scaler: dict
    skipped_steps: list[int] = field(default_factory=list)
    ema_updates: int = 0
    """Updates the moving average has had (its decay warms up with them)."""


@dataclass
class Checkpoint:
    """A checkpoint read from disk in full, not yet loaded into the trial: reading is what damage
    makes fail, so nothing of the trial changes until every file of it has been read."""

    folder: Path
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: TrainState
    ema: dict[str, torch.Tensor] | None = None


def save_checkpoint(
    root: Path,
    state: TrainState,
    trainable: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    keep: int,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    folder = root / f"step-{state.step:06d}"
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in trainable.items()}, tmp / ADAPTER)
        if ema is not None:
            save_file({k: v.detach().float().contiguous().cpu() for k, v in ema.items()}, tmp / EMA)
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        (tmp / STATE).write_text(json.dumps(state.__dict__, default=_jsonable))
        _write_record(tmp)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint's state.json")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_record(folder: Path) -> None:
    files = {name: _sha256(folder / name) for name in (ADAPTER, OPTIMIZER, STATE, EMA) if (folder / name).exists()}
    (folder / RECORD).write_text(json.dumps({"files": files}, indent=2) + "\n")


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, oldest first (temporary and set-aside folders start with '.' and are ignored)."""
    if not root.exists():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def verify_record(folder: Path) -> bool:
    """Whether `folder` has a completion record (False: a checkpoint written before records existed);
    DamagedCheckpoint when the record is unreadable or a file is missing or differs from it."""
    record = folder / RECORD
    if not record.exists():
        return False
    try:
        files = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{RECORD} is unreadable ({type(e).__name__}: {e})") from e
    if not isinstance(files, dict) or not {ADAPTER, OPTIMIZER, STATE} <= files.keys():
        raise DamagedCheckpoint(f"{RECORD} does not list {ADAPTER}, {OPTIMIZER} and {STATE}")
    for name, expected in files.items():
        if not (folder / name).is_file():
            raise DamagedCheckpoint(f"{name} is missing")
        if _sha256(folder / name) != expected:
            raise DamagedCheckpoint(f"{name} does not match its checksum in {RECORD}")
    return True


def read_checkpoint(folder: Path) -> Checkpoint:
    """Every file of the checkpoint, checked against its record and read; DamagedCheckpoint otherwise.

    A checkpoint without a record was written before records existed (it was complete when
    written: its folder appeared in one rename): it is trusted as far as its files read, and is
    damaged when one does not."""
    if not verify_record(folder):
        log.info("%s has no %s (written before checksums were recorded): trusted as far as its files read",
                 folder, RECORD)
    weights = _read(folder, ADAPTER, load_file)
    optimizer = _read(folder, OPTIMIZER, lambda p: torch.load(p, map_location="cpu", weights_only=True))
    state = _read(folder, STATE, lambda p: TrainState(**json.loads(p.read_text())))
    ema = _read(folder, EMA, load_file) if (folder / EMA).exists() else None
    return Checkpoint(folder, weights, optimizer, state, ema)


def _read(folder: Path, name: str, reader: Callable[[Path], Any]) -> Any:
    try:
        return reader(folder / name)
    except Exception as e:  # noqa: BLE001 - safetensors', torch's (miniz) and json's errors: all mean damage
        first_line = (str(e).splitlines() or [""])[0]
        raise DamagedCheckpoint(f"{name} cannot be read ({type(e).__name__}: {first_line})") from e


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint to `.step-N.damaged` (`-2`, `-3`, ... when taken): out of
    list_checkpoints' sight, kept for inspection."""
    target, n = folder.with_name(f".{folder.name}.damaged"), 1
    while target.exists():
        n += 1
        target = folder.with_name(f".{folder.name}.damaged-{n}")
    os.replace(folder, target)
    return target


def newest_intact(root: Path, main: bool = True) -> Checkpoint | None:
    """The newest checkpoint under `root` that reads in full, or None. Damaged ones are set aside
    with a warning by the main process; the others of a multi-process trial skip them (the main one
    may be renaming them while they look)."""
    for folder in reversed(list_checkpoints(root)):
        try:
            return read_checkpoint(folder)
        except DamagedCheckpoint as e:
            if main:
                moved = set_aside(folder)
                log.warning("checkpoint %s is damaged: %s; set aside as %s, trying an older one",
                            folder, e, moved.name)
    return None


def load_into(checkpoint: Checkpoint, trainable: dict[str, torch.nn.Parameter],
              optimizer: torch.optim.Optimizer) -> TrainState:
    """Copy a checkpoint's weights and optimizer state into the trial; its TrainState."""
    missing = sorted(set(trainable) - set(checkpoint.weights))
    if missing:
        raise RuntimeError(
            f"checkpoint {checkpoint.folder} does not match this trial's adapter (missing {missing[:3]}...): "
            "it was written by another configuration; delete the trial folder or use a new one"
        )
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(checkpoint.weights[name].to(param.device, param.dtype))
    optimizer.load_state_dict(checkpoint.optimizer)
    return checkpoint.state


def load_checkpoint(
    folder: Path, trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> TrainState:
    return load_into(read_checkpoint(folder), trainable, optimizer)
