"""Exported adapters load in readers sdsweep did not write, and build the weights peft built.

Adapters are attached in-process to the tiny random models of every family and given random non-zero
weights (peft starts LoRA's up and LoHa/LoKr's first factor at zero, which would make every export
trivially right), then saved by `save_adapter` exactly as a trial saves them. The reference is peft's own
merge of the same layers.
  - LyCORIS (lycoris-lora, an independent implementation of every format) loads `kohya.safetensors` onto
    fresh copies of the same models; LoRA/DoRA through its merge (merge_to), LoHa/LoKr through its forward,
    because LyCORIS 4.1.3's merge multiplies LoHa/LoKr updates by alpha/rank twice (get_weight already
    applies the scale that get_diff_weight applies again); its forward applies it once, as ComfyUI does.
  - diffusers' `load_lora_weights` reads the kohya LoRA file (its own kohya and SGM name conversion).
  - diffusers' single-file reader reads the merged checkpoint, whose names are the same mapping.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from sdsweep.config.schema import AdapterConfig
from sdsweep.export import card, names
from sdsweep.export.__main__ import export, main
from sdsweep.layout import KOHYA_ADAPTER, TrialDir
from sdsweep.model import adapters
from sdsweep.model.tiny import ensure_tiny_model

CONF = Path(__file__).resolve().parents[1] / "conf"
MANY = OmegaConf.load(CONF / "targets" / "many.yaml")
TEXT = list(OmegaConf.load(CONF / "text_encoder" / "lora.yaml").patterns)
TOLERANCE = 1e-5  # fp32
logging.getLogger("lycoris").setLevel(logging.ERROR)


# --- the models, adapted and randomised --------------------------------------------------------------------


def _load(root: str, family: str) -> dict[str, torch.nn.Module]:
    from diffusers import SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if family == "sd3":
        return {"unet": SD3Transformer2DModel.from_pretrained(root, subfolder="transformer"),
                "text_encoder": CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder"),
                "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2")}
    out = {"unet": UNet2DConditionModel.from_pretrained(root, subfolder="unet"),
           "text_encoder": CLIPTextModel.from_pretrained(root, subfolder="text_encoder")}
    if family == "sdxl":
        out["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2")
    return out


@pytest.fixture(scope="module")
def base(cache_dir):
    """base(family) -> a fresh copy of the tiny model's UNet/transformer and CLIP text encoders (loaded once)."""
    loaded: dict[str, dict[str, torch.nn.Module]] = {}

    def original(family: str) -> dict[str, torch.nn.Module]:
        """The loaded modules themselves: to read, never to change."""
        if family not in loaded:
            loaded[family] = _load(str(ensure_tiny_model(cache_dir, family)), family)
        return loaded[family]

    def get(family: str) -> dict[str, torch.nn.Module]:
        return {k: copy.deepcopy(v) for k, v in original(family).items()}

    get.original = original
    return get


def adapted(base, family: str, kind: str, rank: int, alpha: float, text: bool = True, seed: int = 0,
            patterns: list[str] | None = None):
    """The family's modules with a `kind` adapter on `patterns` (default targets=many) and, with `text`, on
    the text encoders (text_encoder=lora); random weights."""
    modules = base(family)
    cfg = AdapterConfig(kind=kind, rank=rank, alpha=alpha)
    patterns = patterns or list(MANY.transformer_patterns if family == "sd3" else MANY.patterns)
    adapters.attach(modules["unet"], cfg, patterns, "unet")
    for name in [n for n in modules if n != "unet"]:
        if text:
            adapters.attach(modules[name], cfg, TEXT, name)
        else:
            del modules[name]
    generator = torch.Generator().manual_seed(seed)
    std = 0.3 if kind == "loha" else 0.1  # LoHa's update is a product of four factors
    with torch.no_grad():
        for module in modules.values():
            for name, p in module.named_parameters():
                if not p.requires_grad:
                    continue
                if "magnitude" in name:  # DoRA's magnitude starts at the weight's norm: move it off
                    p.mul_(1 + 0.2 * torch.randn(p.shape, generator=generator))
                else:
                    p.copy_(std * torch.randn(p.shape, generator=generator))
    return modules


def peft_merged(modules: dict[str, torch.nn.Module]) -> dict[tuple[str, str], torch.Tensor]:
    """{(component, layer): the weight peft's merge makes} for every adapted layer (merged in place)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for component, module in modules.items():
        for name, layer in module.named_modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
                out[(component, name)] = layer.get_base_layer().weight.detach().clone()
    return out


def pipeline_name(family: str, component: str) -> str:
    return "transformer" if family == "sd3" and component == "unet" else component


# --- LyCORIS reads every kind, every family ------------------------------------------------------------------


def sgm_view(unet) -> torch.nn.Module:
    """The UNet's Linear/Conv layers under their SGM names, as LyCORIS sees kohya's SDXL UNet. Which layer
    each name is comes from diffusers' single-file reader (convert_ldm_unet_checkpoint), not from names.py."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = unet.state_dict()
    ldm = {"model.diffusion_model." + names.ldm_unet_name(k, unet.config): v for k, v in state.items()}
    diffusers_name = {id(v): k for k, v in convert_ldm_unet_checkpoint(ldm, dict(unet.config)).items()}
    view = torch.nn.Module()
    for key, tensor in ldm.items():
        if key.endswith(".weight"):
            layer = unet.get_submodule(diffusers_name[id(tensor)].removesuffix(".weight"))
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                view.add_module(key.removeprefix("model.diffusion_model.").removesuffix(".weight").replace(".", "_"),
                                layer)
    return view


def lycoris_target(family: str, component: str, module: torch.nn.Module) -> torch.nn.Module:
    if component == "unet" and family == "sdxl":
        return sgm_view(module)
    if component.startswith("text_encoder") and not hasattr(module, "text_model"):
        holder = torch.nn.Module()  # transformers >= 5.6 CLIPTextModel has no text_model level: the
        holder.text_model = module  # checkpoints' (and every UI's) names still do
        return holder
    return module


def effective_weight(layer: torch.nn.Module, like: torch.nn.Module) -> torch.Tensor:
    """The weight a layer's forward applies, read off its outputs on one-hot inputs (stride 1 only)."""
    with torch.no_grad():
        if isinstance(like, torch.nn.Linear):
            out = layer(torch.eye(like.in_features)) - (like.bias if like.bias is not None else 0)
            return out.T
        c, (kh, kw), (ph, pw) = like.in_channels, like.kernel_size, like.padding
        assert like.stride == (1, 1)
        out = layer(torch.eye(c * kh * kw).reshape(c * kh * kw, c, kh, kw))[:, :, ph, pw]
        out = out - (like.bias if like.bias is not None else 0)
        return out.T.reshape(like.out_channels, c, kh, kw)


CASES = [("sd15", "lora", 4, 2.0), ("sd15", "dora", 4, 8.0), ("sd15", "loha", 4, 2.0), ("sd15", "lokr", 4, 2.0),
         ("sdxl", "lora", 2, 3.0), ("sdxl", "dora", 4, 2.0), ("sdxl", "loha", 2, 5.0), ("sdxl", "lokr", 4, 3.0),
         ("sd3", "lora", 4, 2.0), ("sd3", "dora", 2, 3.0), ("sd3", "loha", 2, 3.0), ("sd3", "lokr", 4, 2.0)]


@pytest.mark.parametrize("family,kind,rank,alpha", CASES, ids=[f"{f}-{k}-r{r}-a{a:g}" for f, k, r, a in CASES])
def test_lycoris_builds_the_weights_peft_built_from_the_kohya_file(base, tmp_path, family, kind, rank, alpha):
    from lycoris import create_lycoris_from_weights
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = adapted(base, family, kind, rank, alpha)
    folder = adapters.save_adapter(tmp_path / "adapter", family, kind, modules)
    file = folder / KOHYA_ADAPTER
    state = load_file(file)
    with safe_open(file, "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == str(rank) and meta["ss_network_alpha"] == str(alpha)
    assert meta["ss_network_module"] == ("networks.lora" if kind == "lora" else "lycoris.kohya")
    if kind == "lokr":  # both cases of LoKr's scale: a factor rank-decomposed, and both factors full
        assert any(k.endswith(".lokr_w2_a") for k in state) and any(k.endswith(".lokr_w2") for k in state)
    if kind == "dora":  # LyCORIS 3.2+'s layout: the magnitude on the output axis
        scales = [v for k, v in state.items() if k.endswith(".dora_scale")]
        assert scales and all(s.shape[1:] == (1,) * (s.dim() - 1) and s.dim() in (2, 4) for s in scales)

    fresh, originals = base(family), base.original(family)
    reference = peft_merged(modules)
    for component, module in fresh.items():
        prefix = names.kohya_prefix(family, pipeline_name(family, component)) + "_"
        part = {"lycoris_" + k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        network, _ = create_lycoris_from_weights(1.0, None, lycoris_target(family, component, module), weights_sd=part)
        expected = sum(isinstance(m, BaseTunerLayer) for m in modules[component].modules())
        assert len(network.loras) == expected > 0, f"{component}: LyCORIS found {len(network.loras)} of {expected} layers"
        if kind in ("lora", "dora"):
            network.merge_to(1.0)
        else:
            network.apply_to()
    worst = moved = 0.0
    for (component, name), want in reference.items():
        original = originals[component].get_submodule(name)
        layer = fresh[component].get_submodule(name)
        got = layer.weight if kind in ("lora", "dora") else effective_weight(layer, original)
        worst = max(worst, (got - want).abs().max().item())
        moved = max(moved, (want - original.weight).abs().max().item())
    print(f"{family} {kind} r{rank} alpha{alpha:g}: {len(reference)} layers, max |lycoris - peft| = {worst:.2e}, "
          f"largest update {moved:.3f}")
    assert moved > 1e-2  # the adapter changes the weights, so a dropped layer or scale would show
    assert worst <= TOLERANCE


@pytest.mark.parametrize("family", ["tiny-sd15", "tiny-sdxl", "sd15", "sdxl"])
def test_unet_names_are_the_ones_diffusers_single_file_reader_maps_back(cache_dir, family):
    """names.py's LDM/SGM name of every UNet weight (the real SD1.5/SDXL layouts, on the meta device, and the
    tiny ones) is read back by diffusers' convert_ldm_unet_checkpoint as the same diffusers weight."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from sdsweep.model.architectures import SD15_UNET, SDXL_UNET

    if family.startswith("tiny-"):
        config = UNet2DConditionModel.load_config(ensure_tiny_model(cache_dir, family[5:]), subfolder="unet")
    else:
        config = {"sd15": SD15_UNET, "sdxl": SDXL_UNET}[family]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    ldm = {"model.diffusion_model." + names.ldm_unet_name(k, unet.config): v for k, v in state.items()}
    assert len(ldm) == len(state)
    back = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)


# --- diffusers reads the kohya LoRA ------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_diffusers_load_lora_weights_reads_the_kohya_file_as_peft_built_it(base, cache_dir, tmp_path, family):
    """alpha != rank, attention + convolution + time-embedding layers, both text encoders."""
    from diffusers import DiffusionPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer

    modules = adapted(base, family, "lora", 2, 3.0)
    adapters.save_adapter(tmp_path / "adapter", family, "lora", modules)
    reference = peft_merged(modules)
    pipe = DiffusionPipeline.from_pretrained(ensure_tiny_model(cache_dir, family))
    pipe.load_lora_weights(tmp_path / "adapter", weight_name=KOHYA_ADAPTER)
    loaded = {c: sum(isinstance(m, BaseTunerLayer) for m in getattr(pipe, c).modules()) for c in modules}
    assert loaded == {c: sum(isinstance(m, BaseTunerLayer) for m in modules[c].modules()) for c in modules}
    pipe.fuse_lora(components=list(modules))
    worst = 0.0
    for (component, name), want in reference.items():
        layer = getattr(pipe, component).get_submodule(name)
        worst = max(worst, (layer.get_base_layer().weight - want).abs().max().item())
    print(f"{family}: diffusers' fused kohya LoRA vs peft: max abs diff {worst:.2e} over {len(reference)} layers")
    assert worst <= TOLERANCE


# --- a trial folder, exported by the CLI ---------------------------------------------------------------------


def make_trial(make_cfg, base, folder: Path, model: str, kind: str, rank: int, alpha: float,
               targets: str = "many", text: bool = True) -> tuple[Path, dict]:
    """A finished trial's folder as a run leaves it (.hydra/config.yaml, metrics.json, adapter/), built
    in-process; returns it and the adapted modules it saved."""
    family = model.removeprefix("tiny-")
    cfg = make_cfg(f"model={model}", f"adapter={kind}", f"adapter.rank={rank}", f"adapter.alpha={alpha}",
                   f"targets={targets}", f"text_encoder={'lora' if text else 'frozen'}")
    (folder / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, folder / ".hydra" / "config.yaml")
    (folder / "metrics.json").write_text(json.dumps({"status": "finished"}))
    modules = adapted(base, family, kind, rank, alpha, text=text,
                      patterns=adapters.denoiser_patterns(cfg.targets, family))
    adapters.save_adapter(folder / "adapter", family, kind, modules)
    return folder, modules


def clean_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A peft-adapted module's weights without its adapter: what the base model's state dict would be."""
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items()
            if not any(part.startswith(("lora_", "hada_", "lokr_")) for part in k.split("."))}


def _image(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle, sdsweep style", num_inference_steps=2, height=64, width=64, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.mark.parametrize("model,kind", [("tiny-sdxl", "dora"), ("tiny-sd15", "lokr")])
def test_merged_checkpoint_loads_with_from_single_file_and_draws_the_adapters_image(
        make_cfg, base, cache_dir, tmp_path, model, kind):
    from sdsweep.model.load import pipeline_class

    family = model.removeprefix("tiny-")
    trial, modules = make_trial(make_cfg, base, tmp_path / "trial", model, kind, 2, 3.0)
    reference = peft_merged(modules)  # in place: `modules` now compute with peft's merged weights
    out = export(trial, "merged", tmp_path / "merged.safetensors", "fp32")
    root = ensure_tiny_model(cache_dir, family)
    extra = {}
    if family == "sdxl":
        # diffusers' reader tells SDXL's two text encoders apart by width (768 / 1280); the tiny model's are
        # both 32 wide, so it would read CLIP-L's weights into both: the OpenCLIP one goes through its
        # own converter (convert_open_clip_checkpoint) instead
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        from transformers import CLIPTextModelWithProjection

        te2 = CLIPTextModelWithProjection.from_pretrained(root, subfolder="text_encoder_2")
        te2.load_state_dict(convert_open_clip_checkpoint(te2, load_file(out), prefix=names.OPEN_CLIP_PREFIX))
        extra["text_encoder_2"] = te2
    merged = pipeline_class(family).from_single_file(str(out), config=str(root), **extra)
    worst = max((getattr(merged, c).get_submodule(n).weight - w).abs().max().item() for (c, n), w in reference.items())
    # every other weight (biases, norms, the VAE's attention, OpenCLIP's fused q/k/v) comes back as it was
    from diffusers import AutoencoderKL

    expected = {c: clean_state(m) for c, m in modules.items()}
    expected["vae"] = AutoencoderKL.from_pretrained(root, subfolder="vae").state_dict()
    for component, state in expected.items():
        got = getattr(merged, component).state_dict()
        assert got.keys() == state.keys(), component
        assert all(torch.allclose(got[k], v, atol=TOLERANCE, rtol=0) for k, v in state.items()), component
    # the same image as the adapter's own model (peft's, merged in place above), from the merged file alone
    parts = {k: v for k, v in merged.components.items() if k not in modules}
    with_adapter = pipeline_class(family)(**parts, **modules)
    image_diff = (_image(merged) - _image(with_adapter)).abs().max().item()
    originals = base.original(family)
    moved = max((w - originals[c].get_submodule(n).weight).abs().max().item() for (c, n), w in reference.items())
    print(f"{model} {kind} merged: weights max abs diff {worst:.2e}, image max abs diff {image_diff:.2e}, "
          f"largest update {moved:.3f}")
    assert worst <= TOLERANCE and image_diff <= 1e-4 and moved > 1e-2


@pytest.fixture(scope="module")
def module_cfg(cache_dir):
    """make_cfg (conftest.py) for module-scoped fixtures: the same composition, evaluation off."""
    from conftest import TEST_EVAL
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    def make(*overrides: str):
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
            return compose(config_name="config", overrides=[
                f"model.cache_dir={cache_dir}", "train.max_steps=3", "tracking.mode=disabled", "device=cpu",
                *TEST_EVAL, "eval.enabled=false", *overrides])

    return make


@pytest.fixture(scope="module")
def lora_trial(module_cfg, base, tmp_path_factory):
    """A LoRA trial (tiny SDXL, UNet and text encoders) in a sweep folder with a leaderboard and samples,
    shared by the tests below (which leave it as they found it); with its unmerged modules and peft's merge."""
    sweep = tmp_path_factory.mktemp("export") / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("{}\n")
    trial, modules = make_trial(module_cfg, base, sweep / "adapter=lora,targets=many", "tiny-sdxl", "lora", 2, 3.0)
    (sweep / "leaderboard.csv").write_text(
        "rank,config,composite,eval/clip_score,eval/clip_score_ci_low,eval/clip_score_ci_high,trials\n"
        f'1,adapter=lora,0.9,0.31,0.29,0.33,"{trial.name}"\n')
    from PIL import Image

    (trial / "samples").mkdir()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(trial / "samples" / "00_a-red-square-sdsweep-style_seed0.png")
    unmerged = {k: copy.deepcopy(v) for k, v in modules.items()}
    return trial, unmerged, peft_merged(modules)


def test_export_cli_writes_every_format_from_the_folder_alone(lora_trial, base, tmp_path, capsys):
    trial, _, reference = lora_trial
    written = load_file(trial / "adapter" / KOHYA_ADAPTER)
    # a trial saved before the kohya file existed: export makes it from the saved diffusers file alone
    (trial / "adapter" / KOHYA_ADAPTER).unlink()
    (trial / "adapter" / card.CARD).unlink()
    assert main([str(trial), "--format", "kohya"]) == 0
    assert Path(capsys.readouterr().out.strip()) == TrialDir(trial).kohya_adapter
    again = load_file(trial / "adapter" / KOHYA_ADAPTER)
    assert again.keys() == written.keys() and all(torch.equal(again[k], written[k]) for k in written)
    with safe_open(trial / "adapter" / KOHYA_ADAPTER, "pt") as f:
        meta = f.metadata()
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_resolution"] == "(64, 64)"
    assert json.loads(meta["sdsweep_config"])["adapter"]["kind"] == "lora"

    text = (trial / "adapter" / card.CARD).read_text()
    front = OmegaConf.create(text.split("---")[1])
    assert {"lora", "diffusers", "stable-diffusion-xl"} <= set(front.tags)
    assert front.instance_prompt == "sdsweep style"
    assert "| eval/clip_score | 0.31 | [0.29, 0.33] |" in text
    assert (trial / "adapter" / "images" / "00_a-red-square-sdsweep-style_seed0.png").is_file()
    assert "images/00_a-red-square-sdsweep-style_seed0.png" in text

    assert main([str(trial), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "pytorch_lora_weights.safetensors").is_file()

    # peft's format loads onto fresh modules with peft itself and merges to the same weights
    assert main([str(trial), "--format", "peft", "--out", str(tmp_path / "p")]) == 0
    fresh = base("sdxl")
    adapters.load_adapter(tmp_path / "p", fresh)
    merged = peft_merged(fresh)
    assert merged.keys() == reference.keys()
    worst = max((merged[k] - reference[k]).abs().max().item() for k in reference)
    assert worst <= TOLERANCE


def test_export_errors_name_the_fix(make_cfg, base, lora_trial, tmp_path, capsys):
    trial, _, _ = lora_trial

    def error(*args: str) -> str:
        assert main([*args]) == 2
        return capsys.readouterr().err

    assert "no such folder" in error(str(tmp_path / "nowhere"), "--format", "kohya")
    assert "is a sweep folder, not a trial" in error(str(trial.parent), "--format", "kohya")
    assert f"give the trial folder itself, {trial}" in error(str(trial / "adapter"), "--format", "kohya")
    assert "is not a trial folder (it has no .hydra/config.yaml)" in error(str(tmp_path), "--format", "kohya")
    empty = tmp_path / "empty"
    (empty / ".hydra").mkdir(parents=True)
    shutil.copyfile(trial / ".hydra" / "config.yaml", empty / ".hydra" / "config.yaml")
    (empty / "metrics.json").write_text(json.dumps({"status": "failed", "reason": "out of memory"}))
    assert "has no adapter yet (status: failed (out of memory))" in error(str(empty), "--format", "kohya")
    with pytest.raises(SystemExit) as exit_:
        main([str(trial), "--format", "onnx"])
    assert exit_.value.code == 2 and "invalid choice: 'onnx'" in capsys.readouterr().err
    loha, _ = make_trial(make_cfg, base, tmp_path / "loha", "tiny-sd15", "loha", 2, 2.0, targets="attn", text=False)
    assert "diffusers' load_lora_weights has no LoHa/LoKr reader" in error(str(loha), "--format", "diffusers")


def test_export_help_runs_as_a_module():
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "sdsweep.export", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "--format {kohya,diffusers,peft,merged}" in result.stdout


# --- sampling a trial ------------------------------------------------------------------------------------


def test_sample_draws_with_the_adapter_at_its_strength(lora_trial, tmp_path, capsys):
    """`--scale 0.5` draws what the trial's own (in-process) adapter draws at half strength."""
    import numpy as np
    from PIL import Image

    from sdsweep.eval.sampling import build_pipeline, generate
    from sdsweep.export.trial import open_trial
    from sdsweep.model import load as models
    from sdsweep.sample import main as sample_main
    from sdsweep.sample import set_strength

    trial, modules, _ = lora_trial
    prompt, out = "a red circle, sdsweep style", tmp_path / "s.png"
    assert sample_main([str(trial), prompt, "--seed", "3", "--scale", "0.5", "--out", str(out), "--steps", "2"]) == 0
    assert Path(capsys.readouterr().out.strip()) == out
    drawn = np.asarray(Image.open(out), dtype=np.int16)

    cfg = open_trial(trial).cfg
    components = models.load_components(cfg.model)  # its VAE, tokenizers and scheduler; the adapted modules below
    components.denoiser, components.text_encoders = modules["unet"], [modules["text_encoder"], modules["text_encoder_2"]]
    e = OmegaConf.merge(cfg.eval, {"steps": 2})

    def draw(strength: float):
        set_strength(modules, strength)
        return np.asarray(generate(build_pipeline(components), [prompt], [3], e, None)[0].image, dtype=np.int16)

    half, base_image = draw(0.5), draw(0.0)  # scale_layer multiplies: 0.5, then 0
    assert np.abs(drawn - half).max() <= 1  # uint8 rounding
    assert np.abs(drawn - base_image).max() > 10


def _tuner_layers(module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def test_strength_scales_every_kind_of_adapter_layer(base):
    """set_strength(s) makes each layer's update s times as large (LoRA, LoHa, LoKr alike)."""
    from sdsweep.sample import set_strength

    for kind in ("lora", "loha", "lokr"):
        modules = adapted(base, "sd15", kind, 2, 3.0, text=False)
        layer = _tuner_layers(modules["unet"])[0]
        x = torch.randn(2, layer.get_base_layer().in_features)
        with torch.no_grad():
            base_out, full = layer.get_base_layer()(x), layer(x)
            set_strength(modules, 0.25)
            assert torch.allclose(layer(x), base_out + 0.25 * (full - base_out), atol=1e-6), kind
