"""Shared fixtures: offline everything, one tiny-model cache for the whole session, config composition."""

from __future__ import annotations

import copy
import gc
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from sdsweep.config.store import register_configs  # noqa: E402
from sdsweep.sweep import collector  # noqa: E402

# one thread per test process: xdist runs one worker per core, and tiny models are dominated by
# per-op overhead that more threads only add to
torch.set_num_threads(1)
register_configs()


# --- the garbage collector: frozen after imports ------------------------------------------------------
# A trial calls gc.collect() four times (sweep/trial.py, accelerate's free_memory, kept_base), to hand its
# memory back before the next one. A full collection scans every tracked object, and a test process holds
# about 700,000 of them once torch, diffusers, transformers, peft, wandb, scipy... are imported: 0.6 s a
# collection, half the CPU time of a 3-step trial. gc.freeze() moves the objects alive now into a
# permanent generation that collections skip; they are module-level objects that live as long as the
# process anyway. Nothing a test checks changes: collections still free every object created after the
# freeze. So the libraries a trial, its evaluation and the leaderboard import lazily are imported here
# (each worker imports them for its first trial anyway), and frozen with the test modules once they are
# collected; a test that imports more (export, real encoders...) has them frozen after its teardown.
_frozen_modules = 0


def _freeze_garbage_collector() -> None:
    global _frozen_modules
    gc.collect()
    gc.freeze()
    _frozen_modules = len(sys.modules)


def pytest_collection_finish(session):
    """In each process that runs tests (xdist's controller collects nothing and never gets here)."""
    collector.import_all(collector.libraries(None))  # every library any trial imports lazily
    _freeze_garbage_collector()  # the libraries above, the test modules and what they import


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item, nextitem):
    yield
    if len(sys.modules) - _frozen_modules >= 20:  # the test imported more libraries: freeze them too
        _freeze_garbage_collector()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tiny models and the built-in data set are built once per test session, here."""
    path = tmp_path_factory.mktemp("sdsweep-cache")
    os.environ["SDSWEEP_TEST_CACHE"] = str(path)
    return path


@pytest.fixture
def make_cfg(cache_dir):
    """compose(overrides) -> the config `python -m sdsweep OVERRIDES` would run, on the test cache
    (config_maker's, for tests that take the cache_dir themselves)."""
    return config_maker(cache_dir)


def config_maker(cache_dir):
    """compose(overrides) -> the config `python -m sdsweep OVERRIDES` would run, on the test cache.

    Evaluation (sampling + scoring, seconds per trial) is off unless a test asks for it with
    `evaluate=True`: only the tests of evaluation itself need it."""

    def _make(*overrides: str, steps: int = 3, evaluate: bool = False):
        key = (str(cache_dir), steps, evaluate, overrides)
        if key not in _COMPOSED:
            _COMPOSED[key] = _compose(cache_dir, overrides, steps, evaluate)
        return copy.deepcopy(_COMPOSED[key])  # the caller's to change: the remembered one stays as composed

    return _make


# What config_maker composed, by its arguments: the config files and the schema do not change while the
# tests run, and composing costs about 0.4 s against 10 ms for a copy (the suite composes ~600 times).
_COMPOSED: dict[tuple, object] = {}


def _compose(cache_dir, overrides: tuple[str, ...], steps: int, evaluate: bool):
    # small evaluation settings whatever conf/eval/default.yaml asks (12 prompts x 2 seeds x 8 steps):
    # validation images and the tests that evaluate sample 2 prompts x 1 seed in 4 steps
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
        return compose(
            config_name="config",
            overrides=[
                f"model.cache_dir={cache_dir}",
                f"train.max_steps={steps}",
                "tracking.mode=disabled",
                "device=cpu",
                *TEST_EVAL,
                *([] if evaluate else ["eval.enabled=false"]),
                *overrides,
            ],
            return_hydra_config=False,
        )


TEST_EVAL = ["eval.prompts=['a portrait of a person, sdsweep style','a house by a lake, sdsweep style']",
             "eval.seeds=[0]", "eval.steps=4"]
# evaluation as cheap as it can be and still sample, save and score every trial: one prompt in one
# step without guidance, scored by the weight-free metrics against 2 reference images
CHEAP_EVAL = ["eval.prompts=[house]", "eval.seeds=[0]", "eval.steps=1", "eval.guidance_scale=1", "eval.metrics=[random_style]",
              "eval.max_reference_images=2"]
# the README's 2x2, with checkpoints, as the CLI, resume and launcher tests need it
README_SWEEP = ["-m", "adapter=lora,dora", "targets=attn,many", "train.max_steps=4", "train.checkpoint_every=2",
                *CHEAP_EVAL]


@dataclass
class Sweep:
    dir: Path
    result: subprocess.CompletedProcess

    def copy(self, to: Path) -> Path:
        """A copy to damage: the shared sweep itself stays as it was written."""
        shutil.copytree(self.dir, to, symlinks=True)
        return to


@pytest.fixture(scope="session")
def readme_sweep(cache_dir, tmp_path_factory) -> Sweep:
    """`python -m sdsweep -m adapter=lora,dora targets=attn,many` (README_SWEEP), run once per session by
    the worker of the tests marked xdist_group("readme_sweep"); tests read it or damage a copy."""
    from helpers import run_cli

    root = tmp_path_factory.mktemp("readme-sweep")
    sweep = root / "sweep"
    result = run_cli([*README_SWEEP, f"model.cache_dir={cache_dir}", "tracking.mode=disabled",
                      f"hydra.sweep.dir={sweep}"], cli_env(cache_dir), cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return Sweep(sweep, result)


def cli_env(cache_dir: Path) -> dict:
    """Environment for running `python -m sdsweep` in a subprocess, offline, on the test cache."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    return env
