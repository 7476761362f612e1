"""Evaluation: metric functions against known cases and torchmetrics, and a trial's sampling end to end."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TEST_EVAL
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from PIL import Image

from sdsweep.config.schema import ConfigError
from sdsweep.config.validate import validate
from sdsweep.eval import base as eval_base
from sdsweep.eval import evaluate, sampling
from sdsweep.eval import metrics as M
from sdsweep.sweep.trial import run_trial


def _images(n: int, seed: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def _stripes(n: int, colour: tuple[int, int, int]) -> list[Image.Image]:
    out = []
    for i in range(n):
        a = np.zeros((48, 48, 3), dtype=np.uint8)
        a[:, (i % 3)::4] = colour
        out.append(Image.fromarray(a))
    return out


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return M.load_clip("tiny", None, tmp_path_factory.mktemp("clip"))


# --- metrics ------------------------------------------------------------------------------------


def test_the_tiny_clip_is_built_in_code_from_a_fixed_seed(clip, tmp_path):
    M._CLIP_CACHE.clear()
    again = M.load_clip("tiny", None, tmp_path)
    assert again is not clip
    for (name, a), (_, b) in zip(clip.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert clip.tokenizer(["a cat"]).shape == (1, 77)  # open_clip's real tokenizer and context


def test_clip_score_is_torchmetrics_clipscore_on_the_same_model_and_inputs(clip):
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    from torchmetrics.multimodal.clip_score import CLIPScore
    from torchvision.transforms.functional import pil_to_tensor

    class Model(torch.nn.Module):  # the interface torchmetrics asks of a custom CLIP
        def __init__(self):
            super().__init__()
            self.clip = clip.model
            self.config = SimpleNamespace()  # torchmetrics looks for a text_config here

        def get_image_features(self, pixel_values):
            return self.clip.encode_image(pixel_values)

        def get_text_features(self, input_ids, attention_mask=None):
            return self.clip.encode_text(input_ids)

    def processor(images=None, text=None, return_tensors="pt", padding=True):
        if images is not None:
            from torchvision.transforms.functional import to_pil_image

            return {"pixel_values": torch.stack([clip.preprocess(to_pil_image(i)) for i in images])}
        ids = clip.tokenizer(text)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    images = _images(6, seed=1)
    prompts = [f"a photo number {i} of something" for i in range(6)]
    tensors = [pil_to_tensor(im) for im in images]
    ours = M.clip_scores(clip.encode_images(images, torch.device("cpu")), clip.encode_texts(prompts, torch.device("cpu")))
    theirs, n = _clip_score_update(tensors, prompts, Model(), processor)
    assert n == 6 and torch.allclose(ours, theirs.float(), atol=1e-3)
    metric = CLIPScore(model_name_or_path=lambda: (Model(), processor))
    metric.update(tensors, prompts)
    ours_set = M.clip_score(clip.encode_images(images, torch.device("cpu")), clip.encode_texts(prompts, torch.device("cpu")))
    assert ours_set == pytest.approx(float(metric.compute()), abs=1e-3)
    assert 0.0 <= ours_set <= 100.0


def test_a_set_compared_with_itself_is_as_similar_as_it_gets(clip):
    cpu = torch.device("cpu")
    images = _images(6, seed=2)
    other = _stripes(6, (250, 30, 30))
    emb, other_emb = clip.encode_images(images, cpu), clip.encode_images(other, cpu)
    assert M.style_similarity(emb, emb)["style_nn_cos"] == pytest.approx(1.0, abs=1e-5)
    assert M.style_similarity(emb[:1], emb[:1])["style_centroid_cos"] == pytest.approx(1.0, abs=1e-5)
    assert M.style_similarity(emb, emb)["style_nn_cos"] >= M.style_similarity(other_emb, emb)["style_nn_cos"]
    assert torch.allclose(M.content_similarity(emb, emb), torch.ones(6), atol=1e-5)
    self_kid, _ = M.kid(emb, emb, subsets=20)
    apart_kid, _ = M.kid(other_emb, emb, subsets=20)
    assert abs(self_kid) < 0.2 * apart_kid and apart_kid > 0
    assert M.gram_distance(images, images) == pytest.approx(0.0, abs=1e-6)
    assert M.color_distance(images, images) == pytest.approx(0.0, abs=1e-9)


def test_weight_free_style_metrics_order_styles_sensibly():
    red, blue, noise = _stripes(4, (250, 30, 30)), _stripes(4, (30, 30, 250)), _images(4, seed=3)
    more_red = _stripes(4, (230, 40, 40))
    assert M.color_distance(more_red, red) < M.color_distance(blue, red) <= 1.0
    assert M.gram_distance(more_red, red) < M.gram_distance(noise, red) <= 2.0


def test_kid_is_torchmetrics_kid_with_the_clip_image_encoder_as_feature_extractor(clip):
    from torchmetrics.image.kid import KernelInceptionDistance
    from torchvision.transforms.functional import pil_to_tensor

    cpu = torch.device("cpu")
    gen, ref = _images(5, seed=4), _stripes(6, (40, 200, 40))
    metric = KernelInceptionDistance(feature=M.ClipImageFeatures(clip, cpu), subsets=10, subset_size=5)
    metric.update(torch.stack([pil_to_tensor(i) for i in ref]), real=True)
    metric.update(torch.stack([pil_to_tensor(i) for i in gen]), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        expected = float(metric.compute()[0])
    ours, _ = M.kid(clip.encode_images(gen, cpu), clip.encode_images(ref, cpu), subsets=10, seed=0)
    assert ours == pytest.approx(expected, rel=1e-4, abs=1e-7)
    with pytest.raises(ValueError, match="at least 2"):
        M.kid(clip.encode_images(gen[:1], cpu), clip.encode_images(ref, cpu))


def test_clip_weights_that_cannot_load_say_so_and_how_to_choose_another(tmp_path):
    with pytest.raises(M.ClipLoadError) as err:
        M.load_clip("ViT-B-32", str(tmp_path / "missing.safetensors"), tmp_path)
    message = str(err.value)
    assert "eval.clip_model=ViT-B-32" in message and "eval.clip_pretrained=" in message
    assert "eval.metrics=[random_style]" in message and "eval.clip_model=tiny" in message


def test_validate_catches_clip_and_eval_mistakes_before_training(make_cfg, tmp_path):
    def cfg(*overrides):  # evaluation on: validate() checks eval.* only when it will run
        return make_cfg(*overrides, evaluate=True)

    with pytest.raises(ConfigError) as err:
        validate(cfg("eval.clip_model=ViT-Nope-1", "eval.clip_pretrained=openai", "eval.seeds=[]",
                     "eval.metrics=[clip_score,fid]", f"eval.prompts_file={tmp_path / 'none.txt'}"))
    problems = "\n".join(err.value.problems)
    for expected in ("eval.clip_model=ViT-Nope-1", "eval.seeds is empty", "'fid'", "eval.prompts_file="):
        assert expected in problems
    with pytest.raises(ConfigError, match="clip_pretrained=bogus is neither a file nor a tag"):
        validate(cfg("eval.clip_model=ViT-B-32", "eval.clip_pretrained=bogus"))
    validate(cfg("eval.clip_model=ViT-B-32", "eval.clip_pretrained=openai"))  # names only: no download
    validate(cfg("eval=clip"))


def test_prompts_come_from_a_file_when_one_is_given(make_cfg, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("# the study's prompts\nBill Gates in Naruto style\n\n  a cat, Naruto style  \n")
    cfg = make_cfg(f"eval.prompts_file={f}", evaluate=True)
    validate(cfg)  # the file is there: no problem
    assert sampling.read_prompts(cfg.eval) == ["Bill Gates in Naruto style", "a cat, Naruto style"]
    assert sampling.image_name(3, "Bill Gates in Naruto style", 1) == "03_bill-gates-in-naruto-style_seed1.png"


# --- a trial's evaluation end to end -------------------------------------------------------------------


def _compose(cache_dir, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="sdsweep.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[
            f"model.cache_dir={cache_dir}", "train.max_steps=2", "train.lr=1e-2", "tracking.mode=disabled",
            "device=cpu", *TEST_EVAL, "eval.seeds=[0,1]", *overrides])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models' ops are too small to split: a second thread buys nothing and, on a busy 2-core
    machine, spin-waiting threads made sampling ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mini_sweep(cache_dir, tmp_path_factory):
    """Three trials of one sweep, counting every sampling call: lora (diffusers' loader), loha (peft's),
    and dora with an evaluation that breaks."""
    sweep = tmp_path_factory.mktemp("sweep")
    (sweep / "multirun.yaml").write_text("{}\n")  # what Hydra writes into every multirun folder
    calls = []
    real = evaluate.generate

    def trial(kind):
        cfg = _compose(cache_dir, f"adapter={kind}")
        (sweep / f"adapter={kind}" / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, sweep / f"adapter={kind}" / ".hydra" / "config.yaml")  # as Hydra does
        return run_trial(cfg, sweep / f"adapter={kind}", {"adapter": kind}, [f"adapter={kind}"])

    with pytest.MonkeyPatch.context() as mp:
        counting = lambda *a, **k: calls.append(1) or real(*a, **k)  # noqa: E731
        mp.setattr(evaluate, "generate", counting)  # the trial's images
        mp.setattr(eval_base, "generate", counting)  # the base model's
        lora, loha = trial("lora"), trial("loha")
        mp.setattr(evaluate, "_evaluate", lambda *a, **k: 1 / 0)
        broken = trial("dora")
    return sweep, lora, loha, calls, broken


def test_the_base_model_is_sampled_once_per_sweep_and_reused(mini_sweep):
    sweep, lora, loha, calls, _ = mini_sweep
    assert lora["status"] == loha["status"] == "finished", (lora.get("reason"), loha.get("eval_error"))
    assert len(calls) == 3  # base + lora + loha: the second trial reused the base images
    assert [p.name for p in (sweep / "base").iterdir()] == [lora["eval/base_key"]] == [loha["eval/base_key"]]
    base = json.loads((sweep / "base" / lora["eval/base_key"] / "base.json").read_text())
    assert base["status"] == "reference" and base["eval/content_cos"] == 1.0
    assert len(base["eval_images"]) == 4 and base["settings"]["seeds"] == [0, 1]


def test_a_trial_saves_its_images_by_prompt_and_seed_and_scores_them(mini_sweep):
    sweep, lora, _, _, _ = mini_sweep
    names = sorted(p.name for p in (sweep / "adapter=lora" / "samples").iterdir())
    assert names == ["00_a-portrait-of-a-person-sdsweep-style_seed0.png", "00_a-portrait-of-a-person-sdsweep-style_seed1.png",
                     "01_a-house-by-a-lake-sdsweep-style_seed0.png", "01_a-house-by-a-lake-sdsweep-style_seed1.png"]
    on_disk = json.loads((sweep / "adapter=lora" / "metrics.json").read_text())
    for key in ("eval/clip_score", "eval/style_centroid_cos", "eval/style_nn_cos", "eval/kid", "eval/gram_distance",
                "eval/color_distance", "eval/content_cos", "eval_s"):
        assert isinstance(on_disk[key], float), key
    assert 0 <= on_disk["eval/clip_score"] <= 100 and 0 <= on_disk["eval/color_distance"] <= 1
    assert [r["file"] for r in on_disk["eval_images"]] == names  # prompt by prompt, seed by seed


@pytest.mark.parametrize("trial", ["adapter=lora", "adapter=loha"])
def test_the_images_come_from_the_saved_adapter_not_the_base_model(mini_sweep, trial):
    sweep, lora, loha, _, _ = mini_sweep
    metrics = {"adapter=lora": lora, "adapter=loha": loha}[trial]
    base = sweep / "base" / metrics["eval/base_key"] / "samples"
    name = "00_a-portrait-of-a-person-sdsweep-style_seed0.png"
    adapted = np.asarray(Image.open(sweep / trial / "samples" / name), dtype=np.int16)
    assert np.abs(adapted - np.asarray(Image.open(base / name), dtype=np.int16)).max() > 0
    assert metrics["eval/content_cos"] < 1.0


def test_an_evaluation_failure_keeps_the_trial_finished_with_the_reason(mini_sweep, cache_dir):
    sweep, _, _, _, broken = mini_sweep
    assert broken["status"] == "finished" and broken["adapter_mb"] > 0
    assert broken["eval_error"].startswith("ZeroDivisionError")
    assert json.loads((sweep / "adapter=dora" / "metrics.json").read_text())["eval_error"] == broken["eval_error"]
    cfg = _compose(cache_dir, "adapter=lora", "eval.clip_model=ViT-B-32", f"eval.clip_pretrained={sweep}/missing.bin")
    result = evaluate.evaluate_trial(cfg, sweep / "adapter=lora")
    assert set(result) == {"eval_error", "eval_s"}
    assert "ClipLoadError" in result["eval_error"] and "eval.clip_model=tiny" in result["eval_error"]
    assert evaluate.evaluate_trial(_compose(cache_dir, "eval.enabled=false"), sweep / "adapter=lora") == {}


def test_a_finished_trial_is_rescored_from_its_folder_alone(mini_sweep, monkeypatch):
    sweep, _, loha, _, _ = mini_sweep
    trial, base = sweep / "adapter=loha", sweep / "base" / loha["eval/base_key"]
    before = {name: np.asarray(Image.open(trial / "samples" / name)) for name in os.listdir(trial / "samples")}
    base_files = {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()}
    seen: dict[str, list] = {"trial": [], "base": [], "base_used": []}

    def counting(kind, real):
        def generate(pipe, prompts, seeds, *args, **kwargs):
            seen[kind].append((list(prompts), list(seeds)))
            return real(pipe, prompts, seeds, *args, **kwargs)
        return generate

    def recording_ensure_base(cfg, pipe, base_dir, *args, **kwargs):
        samples = real_ensure_base(cfg, pipe, base_dir, *args, **kwargs)
        seen["base_used"].append((base_dir.path, samples))
        return samples

    real_ensure_base = evaluate.ensure_base
    monkeypatch.setattr(evaluate, "generate", counting("trial", evaluate.generate))  # the trial's images
    monkeypatch.setattr(eval_base, "generate", counting("base", eval_base.generate))  # the base model's
    monkeypatch.setattr(evaluate, "ensure_base", recording_ensure_base)
    assert evaluate.main([str(trial)]) == 0  # fresh base model + the saved adapter + .hydra/config.yaml
    prompts = ["a portrait of a person, sdsweep style", "a house by a lake, sdsweep style"]
    assert seen["trial"] == [(prompts, [0, 1])]  # the trial's images, sampled once
    assert seen["base"] == []  # the base model's, not sampled again: read back from base/<key>/
    [(base_path, base_samples)] = seen["base_used"]
    assert base_path == base and [s.file for s in base_samples] == sorted(os.listdir(base / "samples"))
    for s in base_samples:
        assert np.array_equal(np.asarray(s.image), np.asarray(Image.open(base / "samples" / s.file))), s.file
    assert [p.name for p in (sweep / "base").iterdir()] == [loha["eval/base_key"]]
    assert {p.relative_to(base): p.read_bytes() for p in base.rglob("*") if p.is_file()} == base_files  # untouched
    after = json.loads((trial / "metrics.json").read_text())
    assert after["eval/base_key"] == loha["eval/base_key"]
    for key in ("eval/clip_score", "eval/content_cos", "eval/kid", "eval/gram_distance"):
        assert after[key] == pytest.approx(loha[key], abs=1e-4), key
    for name, pixels in before.items():
        assert np.abs(np.asarray(Image.open(trial / "samples" / name), dtype=int) - pixels).max() <= 1, name
    assert after["status"] == "finished" and after["final_loss"] == loha["final_loss"]
    cfg = evaluate.load_trial_config(trial, ["eval.clip_model=ViT-B-32", "eval.clip_pretrained=openai"])
    assert (cfg.eval.clip_model, cfg.adapter.kind) == ("ViT-B-32", "loha")


def test_the_leaderboard_and_report_of_a_real_sweep(mini_sweep):
    from sdsweep.board.leaderboard import write_all

    sweep = mini_sweep[0]
    board = write_all(sweep, echo=False)
    configs = list(board["config"])
    assert configs[0] == "base model (no adapter)" and board["rank"].iloc[0] is pd.NA  # the reference, first
    assert set(configs[1:3]) == {"adapter=lora", "adapter=loha"} and set(board["rank"].iloc[1:3]) <= {1, 2}
    assert configs[3] == "adapter=dora" and board["rank"].iloc[3] is pd.NA  # finished, evaluation failed: unranked
    assert board["status"].iloc[3] == "finished" and "ZeroDivisionError" in board["reason"].iloc[3]
    html = (sweep / "report.html").read_text()
    assert html.count("<img ") == 3 * 4  # base, lora, loha: 2 prompts x 2 seeds each
    for name in ("adapter=lora", "adapter=loha", "adapter=dora", "ZeroDivisionError", "base model (no adapter)"):
        assert name in html


def test_every_family_is_sampled_and_scored_through_its_own_pipeline(make_cfg, tmp_path):
    """SD3 samples through StableDiffusion3Pipeline (transformer, flow matching, shifted VAE latents)."""
    from sdsweep.sweep.trial import run_trial

    metrics = run_trial(make_cfg("model=tiny-sd3", "tracking.validation_every=2", steps=2, evaluate=True), tmp_path / "trial")
    assert metrics["status"] == "finished" and "eval_error" not in metrics, metrics.get("eval_error")
    assert metrics["eval/clip_score"] >= 0 and len(list((tmp_path / "trial" / "samples").glob("*.png"))) == 2
    assert len(list((tmp_path / "trial" / "validation" / "step-000002").glob("*.png"))) == 2


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd3"])
def test_a_batch_draws_each_cell_from_its_own_seed_as_one_image_at_a_time_does(make_cfg, model):
    """eval.batch_size changes how many images one pipeline call draws, not which: every (prompt, seed)
    cell starts from its own generator, so batched and one-at-a-time images agree to the last bit
    a batched matmul may round differently (measured: 1 level of 255 at most)."""
    from sdsweep.model import kept_base

    cfg = make_cfg(f"model={model}", "eval.prompts=[a red circle,a blue house,a green star]", "eval.seeds=[0,1]",
                   evaluate=True)
    components, _ = kept_base.acquire(cfg, torch.device("cpu"))
    pipe = sampling.build_pipeline(components)
    prompts, seeds = list(cfg.eval.prompts), list(cfg.eval.seeds)
    assert sampling.sampling_batch(cfg) == 6  # built in code: every cell at once
    one = sampling.generate(pipe, prompts, seeds, cfg.eval, None, batch_size=1)
    for batch in (4, 6):
        many = sampling.generate(pipe, prompts, seeds, cfg.eval, None, batch_size=batch)
        assert [(s.prompt, s.seed, s.file) for s in many] == [(s.prompt, s.seed, s.file) for s in one]
        for a, b in zip(one, many):
            assert np.abs(np.asarray(a.image, dtype=int) - np.asarray(b.image, dtype=int)).max() <= 2
    assert len({np.asarray(s.image).tobytes() for s in one}) == 6  # the cells really differ
    # a real model samples one at a time unless told; the base record is keyed by the batch
    real = make_cfg("model=sdxl", evaluate=True)
    assert sampling.sampling_batch(real) == 1
    assert sampling.sampling_batch(make_cfg("model=sdxl", "eval.batch_size=4", evaluate=True)) == 4
    key = lambda c: eval_base.base_samples_key(c, "src", torch.device("cpu"), "data")[0]  # noqa: E731
    assert key(cfg) != key(make_cfg(f"model={model}", "eval.prompts=[a red circle,a blue house,a green star]",
                                    "eval.seeds=[0,1]", "eval.batch_size=1", evaluate=True))
    with pytest.raises(ConfigError, match="eval.batch_size=0: must be >= 1"):
        validate(make_cfg("eval.batch_size=0", evaluate=True))


def test_dora_text_encoder_magnitudes_are_loaded_for_evaluation_as_trained(make_cfg, tmp_path):
    """diffusers' load_lora_weights drops the text encoders' DoRA magnitudes; evaluation sets them again, so the
    images are drawn with the trained text encoders (before the fix: off by up to 0.7 on the tiny SDXL)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    from sdsweep.model import load as models
    from sdsweep.model.adapters import LORA_WEIGHTS

    cfg = make_cfg("model=tiny-sdxl", "adapter=dora", "text_encoder=lora", "train.lr=0.05", steps=2)
    metrics = run_trial(cfg, tmp_path / "trial")
    assert metrics["status"] == "finished", metrics.get("reason")
    saved = load_file(tmp_path / "trial" / "adapter" / LORA_WEIGHTS)
    components = models.load_components(cfg.model, cfg.precision)
    pipe = sampling.build_pipeline(components)
    sampling.load_saved_adapter(pipe, tmp_path / "trial" / "adapter", "dora")
    for name in ("text_encoder", "text_encoder_2"):
        module = getattr(pipe, name)
        loaded = get_peft_model_state_dict(module, adapter_name=next(iter(module.peft_config)))
        magnitudes = [k for k in loaded if "lora_magnitude_vector" in k]
        assert magnitudes, name
        for key in magnitudes:
            assert torch.equal(loaded[key].float(), saved[f"{name}.{key}"].float()), (name, key)
    # adapter_mb is the adapter's own weights, not its kohya copy and model card beside them
    own = (tmp_path / "trial" / "adapter" / LORA_WEIGHTS).stat().st_size / 2**20
    assert metrics["adapter_mb"] == pytest.approx(own)
    assert (tmp_path / "trial" / "adapter" / "kohya.safetensors").exists()
