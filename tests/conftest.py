"""Shared fixtures: offline everything, one tiny-model cache for the whole session, config composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from hydra import compose, initialize_config_module  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from sdsweep.config.schema import register_configs  # noqa: E402

# one thread per test process: xdist runs one worker per core, and tiny models are dominated by
# per-op overhead that more threads only add to
torch.set_num_threads(1)
register_configs()


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """Tiny models and the built-in data set are built once per test session, here."""
    path = tmp_path_factory.mktemp("sdsweep-cache")
    os.environ["SDSWEEP_TEST_CACHE"] = str(path)
    return path


@pytest.fixture
def make_cfg(cache_dir):
    """compose(overrides) -> the config `python -m sdsweep OVERRIDES` would run, on the test cache.

    Evaluation (sampling + scoring, seconds per trial) is off unless a test asks for it with
    `evaluate=True`: only the tests of evaluation itself need it."""

    def _make(*overrides: str, steps: int = 3, evaluate: bool = False):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
            return compose(
                config_name="config",
                overrides=[
                    f"model.cache_dir={cache_dir}",
                    f"train.max_steps={steps}",
                    "tracking.mode=disabled",
                    "device=cpu",
                    *([] if evaluate else ["eval.enabled=false"]),
                    *overrides,
                ],
                return_hydra_config=False,
            )

    return _make


def cli_env(cache_dir: Path) -> dict:
    """Environment for running `python -m sdsweep` in a subprocess, offline, on the test cache."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", CUDA_VISIBLE_DEVICES="",
               OMP_NUM_THREADS="1")
    return env
