"""Small helpers shared by the tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from PIL import Image


def write_folder(folder: Path, n: int = 4, captions: str = "jsonl", size=(40, 48)) -> Path:
    """A small image folder with captions as metadata.jsonl ("jsonl"), .txt sidecars ("txt") or none."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        Image.new("RGB", size, (40 * i % 255, 100, 200)).save(folder / f"img{i}.png")
        if captions == "txt":
            (folder / f"img{i}.txt").write_text(f"picture {i}, test style")
        rows.append(json.dumps({"file_name": f"img{i}.png", "text": f"picture {i}, test style"}))
    if captions == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def run_cli(args: list[str], env: dict, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdsweep", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
