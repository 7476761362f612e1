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


def run_in_process(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m sdsweep ARGS` run from `cwd` by this process: `sdsweep.__main__.main()` with sys.argv set,
    what it prints and its exit status returned as run_cli returns them.

    For the tests of what a sweep computes rather than of the interpreter around it: it saves the ~10 s of
    imports and ~5 s of model loading a fresh `python -m sdsweep` spends, and starts, like one, with no base
    model kept loaded. The tests of the command itself (test_cli.py, a killed sweep, Hydra's launchers)
    keep run_cli."""
    import contextlib
    import io
    import logging
    import os

    from hydra.core.global_hydra import GlobalHydra

    from sdsweep import __main__ as cli
    from sdsweep.model import kept_base

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level  # Hydra's job logging replaces them: put them back
    argv, here = sys.argv, os.getcwd()
    kept_base.drop()
    cli._single_run_status.clear()  # a fresh process's: a single run's exit status is read from it
    GlobalHydra.instance().clear()
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = ["sdsweep", *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = argv
        os.chdir(here)
        GlobalHydra.instance().clear()
        kept_base.drop()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    return subprocess.CompletedProcess(["python", "-m", "sdsweep", *args], code, out.getvalue(), err.getvalue())


def write_bad_records(folder: Path) -> dict[str, int]:
    """One image of each bad kind beside two good ones (.txt captions); returns the expected skip counts."""
    import io

    folder.mkdir(parents=True, exist_ok=True)

    def image(name: str, img: Image.Image, caption: str | None = "a fine caption", **save) -> None:
        img.save(folder / name, **save)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)

    image("good0.png", Image.new("RGB", (40, 40), (10, 200, 30)))
    image("good1.png", Image.new("RGB", (40, 40), (200, 10, 30)))
    image("empty_caption.png", Image.new("RGB", (40, 40)), caption="  \n ")
    image("no_caption.png", Image.new("RGB", (40, 40)), caption=None)
    image("tiny.png", Image.new("RGB", (4, 4)))
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buf, format="JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # opens, fails on decode
    (folder / "truncated.txt").write_text("a fine caption")
    (folder / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "garbage.txt").write_text("a fine caption")
    return {"empty caption": 1, "no caption": 1, "too small": 1, "unreadable image": 2}


def export_refusal(cfg, trial) -> str:
    """What `python -m sdsweep.export` says of an in-process trial, once it has the .hydra/config.yaml Hydra
    writes for a trial of the CLI (the export command reads it)."""
    from omegaconf import OmegaConf

    from sdsweep.export.trial import TrialError, open_trial

    trial.config.parent.mkdir(exist_ok=True)
    OmegaConf.save(cfg, trial.config)
    try:
        open_trial(trial.path)
    except TrialError as e:
        return str(e)
    raise AssertionError(f"{trial.path}: the export command accepted it")
