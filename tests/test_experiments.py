"""Named studies (conf/experiment/): every cell composes and validates at full scale and in tiny
form, they set what the original studies did, and the tiny form runs as a user runs it."""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import pytest
from conftest import CHEAP_EVAL
from helpers import run_in_process
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from sdsweep.config.validate import validate

CONF = Path(__file__).resolve().parents[1] / "conf"
STUDIES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@functools.cache
def _cells(study: str, *extra: str) -> list[tuple[list[str], object]]:
    """(overrides, config) of every cell `python -m sdsweep -m +experiment=STUDY EXTRA` launches. Composed
    once per study and scale (the tests only read the configs): 13 compositions take about 4 s."""
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
        base = [f"+experiment={study}", "tracking.mode=disabled", *extra]
        params = compose(config_name="config", overrides=base, return_hydra_config=True).hydra.sweeper.params
        axes = [[f"{key}={value}" for value in str(values).split(",")] for key, values in params.items()]
        cells = []
        for combo in itertools.product(*axes):
            cells.append((list(combo), compose(config_name="config", overrides=[*base, *combo])))
        return cells


def test_the_studies_are_there():
    assert STUDIES == ["sd3_medium", "sdxl_t4"]


@pytest.mark.parametrize("scale", ["full", "tiny"])
@pytest.mark.parametrize("study", STUDIES)
def test_every_cell_composes_and_validates(study, scale):
    cells = _cells(study, *(["scale=tiny"] if scale == "tiny" else []))
    # sd3_medium: LoRA rank 1/16/64 x bf16/int8, and the same 6 cells with adapter=full (5 of them pruned when run)
    assert len(cells) == {"sdxl_t4": 12, "sd3_medium": 12}[study]
    for _, cfg in cells:
        validate(cfg)
        if scale == "tiny":
            assert cfg.model.build_tiny and cfg.model.pretrained is None and cfg.model.name == f"tiny-{cfg.model.family}"
            assert cfg.data.dataset is None and cfg.data.path is None and cfg.data.resolution == 64
            assert cfg.eval.clip_model == "tiny"
        else:
            assert cfg.data.dataset == "lambdalabs/naruto-blip-captions" and cfg.eval.clip_model == "ViT-L-14"


def test_sdxl_t4_sets_what_the_study_did():
    cells = {tuple(sorted(o)): cfg for o, cfg in _cells("sdxl_t4")}
    for overrides, cfg in cells.items():
        assert cfg.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
        assert (cfg.precision.mixed_precision, cfg.precision.base_dtype, cfg.precision.vae_dtype) == ("fp16", "fp16", "fp32")
        assert cfg.data.resolution == 512 and cfg.data.crop == "center"  # centre crops: latents cached for the sweep
        assert cfg.train.gradient_checkpointing and cfg.train.grad_accum == 4 and cfg.train.batch_size == 1
        recipe = next(o.split("=")[1] for o in overrides if o.startswith("recipe="))
        kind, optimizer, dropout = cfg.adapter.kind, cfg.optimizer.name, cfg.adapter.dropout
        assert (kind, optimizer, dropout) == {"lora": ("lora", "adamw", 0.0), "dora_prodigy": ("dora", "prodigy", 0.0),
                                              "lora_dropout": ("lora", "adamw", 0.5)}[recipe]
        assert cfg.train.lr == (1.0 if optimizer == "prodigy" else 1e-4)
    axes = {(cfg.text_encoder.name, cfg.targets.name) for cfg in cells.values()}
    assert axes == {("frozen", "attn"), ("frozen", "many"), ("lora", "attn"), ("lora", "many")}


def test_sd3_medium_sets_what_the_study_did():
    cells = [cfg for _, cfg in _cells("sd3_medium")]
    assert {(c.adapter.rank, c.precision.name) for c in cells} == {(r, p) for r in (1, 16, 64) for p in ("bf16", "int8")}
    for cfg in cells:
        assert cfg.model.family == "sd3" and cfg.model.pretrained == "stabilityai/stable-diffusion-3-medium-diffusers"
        assert OmegaConf.select(cfg, "adapter.alpha") == cfg.adapter.rank  # the update scale stays 1
        assert cfg.tracking.profile
        assert cfg.precision.quantize == ("int8" if cfg.precision.name == "int8" else "none")


def _trials(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/metrics.json")}


@pytest.mark.slow
def test_sdxl_t4_in_tiny_form_runs_every_recipe(cache_dir, tmp_path):
    """The user's one override (scale=tiny); the test narrows the sweep to one text-encoder x targets
    cell (text encoders trained, many layers) to stay fast: its three recipes all train."""
    sweep = tmp_path / "sweep"
    result = run_in_process(["-m", "+experiment=sdxl_t4", "scale=tiny", "text_encoder=lora", "targets=many", *CHEAP_EVAL,
                             f"model.cache_dir={cache_dir}", "tracking.mode=disabled",
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(sweep)
    assert len(trials) == 3 and all(m["status"] == "finished" for m in trials.values())
    by_recipe = {name.split("recipe=")[1].split(",")[0]: m for name, m in trials.items()}
    assert by_recipe["dora_prodigy"]["choices"]["optimizer"] == "prodigy"
    assert by_recipe["dora_prodigy"]["choices"]["adapter"] == "dora"
    assert all(m["data"]["cache"]["text"].startswith("live") for m in trials.values())  # text encoders train
    assert (sweep / "leaderboard.csv").exists()


@pytest.mark.slow
def test_sd3_medium_in_tiny_form_profiles_bf16_and_prunes_int8_without_cuda(cache_dir, tmp_path):
    import torch

    sweep = tmp_path / "sweep"
    result = run_in_process(["-m", "+experiment=sd3_medium", "scale=tiny", "adapter.rank=1,64", *CHEAP_EVAL,
                             f"model.cache_dir={cache_dir}", "tracking.mode=disabled",
                             f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = _trials(sweep)
    assert len(trials) == 8  # rank 1/64 x bf16/int8 x lora/full
    for name, metrics in trials.items():
        if "adapter=full" in name and "precision=int8" in name:
            assert metrics["status"] == "pruned" and "cannot be fine-tuned in full" in metrics["reason"]
        elif "adapter=full" in name and "adapter.rank=64" in name:  # the rank=1 full cell trains it once
            assert metrics["status"] == "pruned" and metrics["reason"].startswith("adapter=full ignores adapter.rank")
        elif "precision=int8" in name and not torch.cuda.is_available():
            assert metrics["status"] == "pruned" and "needs a CUDA GPU" in metrics["reason"]
        else:
            assert metrics["status"] == "finished", metrics.get("reason")
            assert (sweep / name / "profile" / "trace.json").exists()
    finished = {name: m for name, m in trials.items() if m["status"] == "finished"}
    assert sum("adapter=full" in name for name in finished) == 1
    ranks = {m["trainable_params"] for m in finished.values()}
    # rank 1 and rank 64 train different numbers of parameters, the full fine-tune every transformer weight
    assert len(ranks) == len(finished)
