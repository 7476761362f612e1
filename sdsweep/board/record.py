"""What the board's outputs are made of: the leaderboard as read from a sweep folder, and where each
row came from. Its own module so that leaderboard.py (which reads the folders) and report.py (which
renders them) both import it, and neither imports the other's caller."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class RowSource:
    """What a row of the per-trial table was read from: its checked record and its images' folder."""

    record: dict
    samples: Path


@dataclass
class Leaderboard:
    """Everything the outputs are made of, read from the folders once."""

    board: pd.DataFrame
    """by configuration, ranked and ordered"""
    per_trial: pd.DataFrame
    sources: dict[str, RowSource] = field(default_factory=dict)
    """per_trial's "trial" -> its record, for the report's images and loss curves (not read a second time)"""
    problems: list[str] = field(default_factory=list)
    """files skipped while reading the folder, each named with what is wrong with it"""
    effects: list = field(default_factory=list)
    """board/effects.py's Effect of every option of every axis (effects.csv)"""
