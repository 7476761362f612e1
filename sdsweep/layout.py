"""The folder contract: every path and file name inside a sweep folder and a trial folder.

Everyone else asks here (`TrialDir(path).metrics`, `SweepDir(path).trials()`) instead of joining
strings, so the layout is written down once and the board can be rebuilt from the folders alone:

    <sweep>/                      SweepDir (Hydra's hydra.sweep.dir)
      multirun.yaml               what Hydra launched (its presence makes the folder a sweep)
      leaderboard.csv, leaderboard_trials.csv, report.html, summary.json
      base/<key>/                 BaseDir: the base model's samples and scores, once per sweep
        base.json, samples/
      <overrides>/                TrialDir, one per cell of the matrix
        .hydra/config.yaml        the resolved config of the trial
        metrics.json              status, figures, scores: the trial's source of truth
        train_log.jsonl           one line per logged step
        checkpoints/step-NNNNNN/  resumable checkpoints
        adapter/                  the trained adapter (diffusers' / peft's files, kohya.safetensors)
        samples/                  evaluation images, named by prompt and seed
        validation/step-NNNNNN/   images sampled while training (tracking.validation_every)
        debug/rank-N.json, profile/
A single run (no -m) is a TrialDir on its own: its base model samples go to `<trial>/base/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METRICS = "metrics.json"
MULTIRUN = "multirun.yaml"
BASE_RECORD = "base.json"
KOHYA_ADAPTER = "kohya.safetensors"  # the adapter as one kohya/LyCORIS file, beside diffusers'/peft's


class UnreadableRecord(ValueError):
    """A metrics.json or base.json that is not a readable JSON object; the message names the file and the fault."""


def _json_kind(value: Any) -> str:
    kinds = {list: "list", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def read_record(path: Path, name: str | None = None) -> dict:
    """The JSON object in `path`, or UnreadableRecord saying what is wrong with the file (a trial
    killed while writing it, a disk that filled up, a hand edit); `name`: the file's name in the message."""
    name = name or str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UnreadableRecord(f"{name} cannot be read ({e.strerror or e})") from e
    try:
        value = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UnreadableRecord(f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from e
    except json.JSONDecodeError as e:
        raise UnreadableRecord(f"{name} is {_json_fault(e)} ({e.msg}: line {e.lineno} column {e.colno})") from e
    if not isinstance(value, dict):
        raise UnreadableRecord(f"{name} holds a JSON {_json_kind(value)}, not an object")
    return value


def _json_fault(e: json.JSONDecodeError) -> str:
    if not e.doc.strip():
        return "empty"
    # the text stops inside a string or before a value: a write cut short
    cut = e.pos >= len(e.doc.rstrip()) or e.msg.startswith("Unterminated string")
    return "truncated" if cut else "not valid JSON"


@dataclass(frozen=True)
class BaseDir:
    """`base/<key>/`: the base model's images for one set of evaluation settings, and their scores."""

    path: Path

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def record(self) -> Path:
        return self.path / BASE_RECORD

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def exists(self) -> bool:
        return self.record.exists()

    def read_record(self) -> dict:
        """base.json as a dict; UnreadableRecord (naming the file) when it is damaged."""
        return read_record(self.record)


@dataclass(frozen=True)
class TrialDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config(self) -> Path:
        return self.path / ".hydra" / "config.yaml"

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def train_log(self) -> Path:
        return self.path / "train_log.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step-{step:06d}"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def kohya_adapter(self) -> Path:
        """The adapter in kohya/LyCORIS format, the one file ComfyUI, A1111 and Forge load (sdsweep/export)."""
        return self.adapter / KOHYA_ADAPTER

    @property
    def samples(self) -> Path:
        return self.path / "samples"

    def validation(self, step: int) -> Path:
        return self.path / "validation" / f"step-{step:06d}"

    def debug_trace(self, rank: int) -> Path:
        return self.path / "debug" / f"rank-{rank}.json"

    @property
    def profile(self) -> Path:
        return self.path / "profile"

    @property
    def sweep(self) -> SweepDir | None:
        """The sweep this trial is a cell of; None for a single run (its siblings are unrelated runs)."""
        parent = SweepDir(self.path.parent)
        return parent if parent.is_sweep() else None

    @property
    def base_root(self) -> Path:
        """Where the base model's samples for this trial live: shared by the sweep, or the run's own."""
        sweep = self.sweep
        return sweep.base_root if sweep else self.path / "base"

    def base(self, key: str) -> BaseDir:
        return BaseDir(self.base_root / key)

    def read_metrics(self) -> dict | None:
        """metrics.json, or None when it is missing or is not a readable JSON object (a trial killed
        before writing it, a damaged file)."""
        try:
            return read_record(self.metrics)
        except UnreadableRecord:
            return None


@dataclass(frozen=True)
class SweepDir:
    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def multirun(self) -> Path:
        return self.path / MULTIRUN

    def is_sweep(self) -> bool:
        return self.multirun.exists()

    @property
    def leaderboard(self) -> Path:
        return self.path / "leaderboard.csv"

    @property
    def leaderboard_trials(self) -> Path:
        return self.path / "leaderboard_trials.csv"

    @property
    def effects(self) -> Path:
        return self.path / "effects.csv"

    @property
    def report(self) -> Path:
        return self.path / "report.html"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def base_root(self) -> Path:
        return self.path / "base"

    def trial(self, name: str) -> TrialDir:
        return TrialDir(self.path / name)

    def trial_dirs(self) -> list[TrialDir]:
        """Every folder of the sweep that holds a trial's metrics.json, by name."""
        return [TrialDir(p.parent) for p in sorted(self.path.glob(f"*/{METRICS}"))]

    def trials(self) -> list[tuple[TrialDir, dict]]:
        """Every trial with its metrics.json (the only source of truth); one that is not a readable JSON
        object reads as failed, with `unreadable` set and the reason naming the file and the fault."""
        out = []
        for trial in self.trial_dirs():
            try:
                metrics = read_record(trial.metrics, f"{trial.name}/{METRICS}")
            except UnreadableRecord as e:
                metrics = {"status": "failed", "unreadable": True, "reason": str(e)}
            out.append((trial, metrics))
        return out

    def bases(self) -> list[BaseDir]:
        """The base model's records: the sweep's own, then those of single runs kept in this folder."""
        found = sorted(self.path.glob(f"base/*/{BASE_RECORD}")) + sorted(self.path.glob(f"*/base/*/{BASE_RECORD}"))
        return [BaseDir(f.parent) for f in found]

    def base(self, key: str) -> BaseDir | None:
        return next((b for b in self.bases() if b.key == key), None)

    def trial_configs(self) -> list[Path]:
        return sorted(self.path.glob("*/.hydra/config.yaml"))
