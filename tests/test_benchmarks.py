"""The benchmark scripts that only run on a lent GPU (benchmarks/gpu_check.sh) are exercised here on a
CPU with the tiny SDXL, so that a refactor that breaks them is caught before the GPU time is spent."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _import_benchmark(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def _tiny_sdxl(cache_dir):
    """sdxl_random, the config its trainer takes for the tiny SDXL, and the tiny SDXL's components."""
    from sdsweep.model.load import load_components

    sdxl_random = _import_benchmark("sdxl_random")
    cfg = sdxl_random.compose_cfg("model=tiny-sdxl", f"model.cache_dir={cache_dir}", "precision=fp32",
                                  "optimizer=adamw", "data.resolution=64", "train.batch_size=2")
    return sdxl_random, cfg, load_components(cfg.model)


def test_the_sdxl_step_benchmark_trains_the_adapter_of_a_tiny_sdxl(cache_dir):
    """SdxlTrainer is what step_speed.py and estimate_vs_measured.py time on the GPU: here its steps change
    the LoRA weights and nothing else, with the conditioning widths read from the UNet's config."""
    sdxl_random, cfg, c = _tiny_sdxl(cache_dir)
    parts = {"unet": c.denoiser, "vae": c.vae, "text_encoder": c.text_encoders[0], "text_encoder_2": c.text_encoders[1]}
    trainer = sdxl_random.SdxlTrainer(cfg, torch.device("cpu"), parts)
    before = {n: p.detach().clone() for n, p in trainer.unet.named_parameters()}

    trainer.step()
    trainer.step()

    changed = {n for n, p in trainer.unet.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert len(changed) == len(trainer.params)  # every adapter tensor learned, the base none
    assert torch.isfinite(trainer.forward_loss())


def test_the_sweep_benchmark_projects_the_train_share_of_longer_trials():
    """Two trials of 10 steps, each 1 s of steps at a steady 10 steps/s and 1 s of everything else, in a
    sweep of 5 s: at 100 steps each trains 9 s more, so 2 + 18 s of 5 + 18 s are steps."""
    sweep_speed = _import_benchmark("sweep_speed")
    rows = [{"train_s": 1.0, "steps_per_s": 10.0}, {"train_s": 1.0, "steps_per_s": 10.0}]
    assert sweep_speed.projected_share(rows, wall=5.0, steps=10, target=100) == 20 / 23
    assert sweep_speed.projected_share(rows, wall=5.0, steps=10, target=10) == 2 / 5


def test_the_sweep_benchmark_refuses_cells_a_sweep_would_refuse(cache_dir, monkeypatch):
    """gpu_check.sh's sweep on an offline GPU machine: scoring with CLIP weights that are not there is
    refused before anything loads, with the fix, as `python -m sdsweep -m` refuses it."""
    import pytest

    sweep_speed = _import_benchmark("sweep_speed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(cache_dir / "empty-hf-home"))
    base = ["model=tiny-sdxl", f"model.cache_dir={cache_dir}", "adapter=lora,dora"]
    with pytest.raises(SystemExit) as refused:
        sweep_speed.refuse_bad_cells([*base, "eval.clip_model=ViT-B-32", "eval.clip_pretrained=openai",
                                      "eval.allow_stand_in=false"])
    assert "eval.clip_model=ViT-B-32" in str(refused.value) and "Fix:" in str(refused.value)
    sweep_speed.refuse_bad_cells([*base, "eval.enabled=false"])  # what gpu_check.sh sweeps: accepted


def test_the_reference_shim_gives_the_scripts_unet_adapter_the_cells_layers(make_cfg):
    """vs_reference.py --matched: diffusers' script, through the shim, adapts exactly the UNet modules
    sdsweep's cell adapts (DoRA and targets=many here), and leaves its text encoders' config alone."""
    import copy

    from sdsweep.model import adapters, kept_base

    shim = _import_benchmark("reference_shim")
    cfg = make_cfg("adapter=dora", "targets=many")
    config_class = shim.matched_config_class({"use_dora": True, "patterns": list(cfg.targets.patterns)})
    components, _ = kept_base.acquire(make_cfg(), torch.device("cpu"))
    unet = copy.deepcopy(components.denoiser)
    # what the script builds (train_text_to_image_lora_sdxl.py), with the shim's class in place of peft's
    unet.add_adapter(config_class(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                  target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    layers = {name: module for name, module in unet.named_modules() if hasattr(module, "lora_A")}
    expected = set(adapters.resolve_targets(components.denoiser, list(cfg.targets.patterns), "unet"))
    assert set(layers) == expected and len(expected) > 40  # attention, feed-forward, convolutions, embeddings
    assert all("default" in layer.lora_magnitude_vector for layer in layers.values())  # DoRA's magnitudes
    text = config_class(r=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    assert text.target_modules == {"q_proj", "k_proj", "v_proj", "out_proj"} and not text.use_dora


def test_the_sdxl_benchmarks_build_the_random_model_once_and_train_copies(cache_dir, monkeypatch):
    """step_speed.py and estimate_vs_measured.py build a trainer per config: the random modules are built once
    and each trainer gets a copy, so one trainer's adapter and dtype never reach the next (tiny SDXL here)."""
    sdxl_random, cfg, c = _tiny_sdxl(cache_dir)
    tiny = {"unet": ("UNet2DConditionModel", dict(c.denoiser.config)), "vae": ("AutoencoderKL", dict(c.vae.config)),
            "text_encoder": ("CLIPTextModel", c.text_encoders[0].config.to_dict()),
            "text_encoder_2": ("CLIPTextModelWithProjection", c.text_encoders[1].config.to_dict())}
    built = []
    monkeypatch.setattr(sdxl_random, "_BUILT", None)
    monkeypatch.setattr(sdxl_random, "family_components", lambda family: built.append(family) or dict(tiny))

    first = sdxl_random.SdxlTrainer(cfg, torch.device("cpu"))
    first.step()
    second = sdxl_random.SdxlTrainer(cfg, torch.device("cpu"))

    assert built == ["sdxl"]  # built once
    master = sdxl_random._BUILT["unet"]
    assert not any("lora_" in n for n, _ in master.named_parameters())  # the trainers' adapters are their own
    assert first.unet is not second.unet and first.unet is not master
    frozen = {n.replace(".base_layer", ""): p for n, p in second.unet.named_parameters() if "lora_" not in n}
    assert frozen.keys() == dict(master.named_parameters()).keys()
    assert all(torch.equal(p, master.get_parameter(n)) for n, p in frozen.items())  # the same random base


def test_the_benchmarks_use_sdsweep_as_gpu_check_installs_it_on_the_gpu_machine(tmp_path):
    """gpu_check.sh pip-installs this working tree on the GPU machine, where no editable install exists; the
    benchmark scripts must import that installed package (conf/ becomes sdsweep.conf only by installing),
    never the repository's own sdsweep folder, which has no configs (they once put it first on sys.path)."""
    import os
    import shutil
    import subprocess

    import pytest

    pytest.importorskip("setuptools")
    pytest.importorskip("wheel")
    root = BENCHMARKS.parent
    source = tmp_path / "tree"  # a copy: pip builds in the tree it installs
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, source / name)
    for name in ("sdsweep", "conf"):
        shutil.copytree(root / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
                    "--no-compile", "--target", str(site), str(source)], check=True, capture_output=True)
    script = tmp_path / "compose.py"  # run as a script, as gpu_check.sh runs them: its folder is sys.path[0]
    script.write_text(f"import sys\nsys.path.insert(1, {str(BENCHMARKS)!r})\nimport sdxl_random\nimport sdsweep\n"
                      "print(sdsweep.__file__, sdxl_random.compose_cfg().model.family)\n")
    libraries = [p for p in sys.path if p.endswith("site-packages")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *libraries]), "HF_HUB_OFFLINE": "1"}
    # -S: no site-packages .pth files, so no editable install of sdsweep, as on the GPU machine
    result = subprocess.run([sys.executable, "-S", str(script)], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    where, family = result.stdout.split()[-2:]
    assert where.startswith(str(site)) and family == "sdxl"
