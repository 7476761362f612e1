"""The field's evaluation protocol, wired into the scorer and the pre-launch checks (issue 15):
CLIP-I and the squared centroid distance, Vendi diversity, DINO fidelity, CLIP-T with the trigger word
replaced, and encoder weights that are missing refused before anything trains."""

from __future__ import annotations

import pytest
import torch
from test_real_encoders import dino_folder  # noqa: F401 - the tiny DINOv2 folder fixture

from sdsweep.board.leaderboard import scored_by
from sdsweep.data import toy_world as world
from sdsweep.eval import diversity as D
from sdsweep.eval.sampling import Sample
from sdsweep.eval.scorer import Scorer
from sdsweep.sweep.preflight import missing_encoder_weights

CPU = torch.device("cpu")


def _samples() -> list[Sample]:
    items = [("red", "circle"), ("blue", "house"), ("green", "star"), ("yellow", "tree")]
    return [Sample(f"a {c} {s}, sdsweep style", 0, f"{i:02d}.png", world.render(world.Item(c, s, "sdsweep"), seed=i))
            for i, (c, s) in enumerate(items)]


def test_the_protocol_metrics_are_the_formulas_on_the_scorers_embeddings(make_cfg):
    cfg = make_cfg("model=tiny-sdxl", evaluate=True)
    scorer = Scorer(cfg, CPU)
    samples = _samples()
    out, rows = scorer.score(samples, base=None)
    emb = scorer.clip.encode_images([s.image for s in samples], CPU)
    ref = scorer.clip.encode_images(scorer.references, CPU)
    assert out["eval/clip_i"] == pytest.approx(D.mean_cosine(emb, ref), rel=1e-6)
    assert [r["clip_i"] for r in rows] == pytest.approx(D.mean_cosine_per_image(emb, ref).tolist(), rel=1e-6)
    assert out["eval/clip_centroid_distance"] == pytest.approx(D.centroid_distance(emb, ref), rel=1e-6)
    assert out["eval/vendi"] == pytest.approx(D.vendi_score(emb), rel=1e-6) and 1 <= out["eval/vendi"] <= 4
    assert "eval/dino_cos" not in out  # a model built in code has no DINO (dino_model=auto)
    assert scored_by(out) == out["eval/clip_model"] and out["eval/clip_model"].startswith("tiny")


def test_dino_fidelity_scores_with_the_model_eval_dino_model_names(make_cfg, dino_folder):  # noqa: F811
    cfg = make_cfg("model=tiny-sdxl", f"eval.dino_model={dino_folder}", evaluate=True)
    scorer = Scorer(cfg, CPU)
    samples = _samples()
    out, rows = scorer.score(samples, base=None)
    emb = scorer.dino.encode_images([s.image for s in samples], CPU)
    ref = scorer.dino.encode_images(scorer.references, CPU)
    assert out["eval/dino_cos"] == pytest.approx(D.mean_cosine(emb, ref), rel=1e-6)
    assert out["eval/dino_centroid_distance"] == pytest.approx(D.centroid_distance(emb, ref), rel=1e-6)
    assert all("dino_cos" in r for r in rows)
    assert scored_by(out) == f"{out['eval/clip_model']}, DINO {out['eval/dino_model']}"
    # metrics without "dino" switch it off whatever dino_model says
    off = Scorer(make_cfg("model=tiny-sdxl", f"eval.dino_model={dino_folder}", "eval.metrics=[clip_score]",
                          evaluate=True), CPU)
    assert off.dino is None


def test_clip_t_reads_the_trigger_word_replaced_by_its_description(make_cfg):
    """On the toy world (its toy CLIP knows the words "sdsweep style")."""
    plain = Scorer(make_cfg("eval.metrics=[clip_score]", evaluate=True), CPU)
    cfg = make_cfg("eval.metrics=[clip_score]", "eval.trigger=sdsweep style",
                   "eval.trigger_description=thick black outlines on dotted paper", evaluate=True)
    replaced = Scorer(cfg, CPU)
    assert replaced.text_side("a red circle, sdsweep style") == "a red circle, thick black outlines on dotted paper"
    assert plain.text_side("a red circle, sdsweep style") == "a red circle, sdsweep style"
    samples = _samples()
    a, b = plain.score(samples, None)[0]["eval/clip_score"], replaced.score(samples, None)[0]["eval/clip_score"]
    assert a != b  # the text side really changed
    # only with both set: a trigger without a description is read as written
    alone = Scorer(make_cfg("eval.metrics=[clip_score]", "eval.trigger=sks", evaluate=True), CPU)
    assert alone.text_side("sks dog") == "sks dog"


def test_encoder_weights_that_are_not_there_are_refused_before_launch_with_the_fix(make_cfg, tmp_path, monkeypatch,
                                                                                   dino_folder):  # noqa: F811
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))  # nothing downloaded
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty-cache"))
    real = make_cfg("model=sdxl", evaluate=True)
    problems = missing_encoder_weights([real, real])  # once per sweep, not once per cell
    assert len(problems) == 2, problems
    assert "ViT-L-14" in problems[0] and "eval.clip_pretrained" in problems[0]
    assert "facebook/dinov2-base" in problems[1] and "eval.dino_model" in problems[1]
    weights = tmp_path / "vit.safetensors"
    weights.write_bytes(b"x")
    ok = make_cfg("model=sdxl", "eval.clip_model=ViT-L-14", f"eval.clip_pretrained={weights}",
                  f"eval.dino_model={dino_folder}", evaluate=True)
    assert missing_encoder_weights([ok]) == []
    assert missing_encoder_weights([make_cfg("model=sdxl", "eval.enabled=false")]) == []
    assert missing_encoder_weights([make_cfg(evaluate=True)]) == []  # the toy world's own encoders ship


def test_training_captions_are_in_distribution_and_every_other_prompt_out_of_it(make_cfg):
    """On the toy world, whose answers are known: its in-distribution prompts are training captions, its held-out
    combinations are not; eval.caption_prompts adds training captions (each prompt asked once)."""
    cfg = make_cfg(f"eval.prompts=['{world.IN_DISTRIBUTION_PROMPTS[0]}','{world.HELD_OUT_PROMPTS[0]}']",
                   "eval.caption_prompts=3", evaluate=True)
    scorer = Scorer(cfg, CPU)
    assert [scorer.split(p) for p in world.IN_DISTRIBUTION_PROMPTS] == ["in"] * len(world.IN_DISTRIBUTION_PROMPTS)
    assert [scorer.split(p) for p in world.HELD_OUT_PROMPTS] == ["out"] * len(world.HELD_OUT_PROMPTS)
    captions = [item.caption for item, _ in world.finetune_items()]
    # 3 captions evenly spaced over the set: the first is the red square already asked, so 2 are new
    assert scorer.prompts[:2] == list(cfg.eval.prompts) and len(scorer.prompts) == 4
    assert set(scorer.prompts[2:]) <= set(captions) and len(set(scorer.prompts)) == 4
    samples = [Sample(p, 0, f"{i:02d}.png", world.render(world.parse_prompt(p), seed=i)) for i, p in enumerate(scorer.prompts)]
    out, rows = scorer.score(samples, base=None)
    assert [r["split"] for r in rows] == ["in", "out", "in", "in"]
    ins = [r["clip_score"] for r in rows if r["split"] == "in"]
    assert out["eval/in/clip_score"] == pytest.approx(sum(ins) / 3) and out["eval/in/images"] == 3
    assert out["eval/out/clip_score"] == pytest.approx(rows[1]["clip_score"]) and out["eval/out/images"] == 1
    # the base record is keyed by the prompts asked, captions included
    from sdsweep.eval.base import base_samples_key

    assert base_samples_key(cfg, "m", CPU, "d", scorer.prompts)[1]["prompts"] == scorer.prompts


def test_set_level_metrics_carry_a_bootstrap_interval_over_the_images(make_cfg):
    """Gram, colour and centroid distances are one number per set: their interval resamples the trial's images
    (fixed seed: the same images give the same interval), and holds the number itself."""
    from sdsweep.eval import metrics as M

    scorer = Scorer(make_cfg("model=tiny-sdxl", evaluate=True), CPU)
    samples = _samples()
    out, _ = scorer.score(samples, base=None)
    again, _ = scorer.score(samples, base=None)
    for metric in ("gram_distance", "color_distance", "clip_centroid_distance"):
        low, high = out[f"eval/{metric}_ci_low"], out[f"eval/{metric}_ci_high"]
        assert low <= out[f"eval/{metric}"] <= high and low < high, metric
        assert (again[f"eval/{metric}_ci_low"], again[f"eval/{metric}_ci_high"]) == (low, high)
    assert out["eval/gram_distance"] == pytest.approx(M.gram_distance([s.image for s in samples], scorer.references),
                                                      rel=1e-6)
    assert out["eval/color_distance"] == pytest.approx(M.color_distance([s.image for s in samples], scorer.references),
                                                       rel=1e-9)
    # identical images: nothing to resample, the interval closes on the number
    same = [Sample(s.prompt, 0, s.file, samples[0].image) for s in samples]
    flat, _ = scorer.score(same, base=None)
    assert flat["eval/color_distance_ci_low"] == pytest.approx(flat["eval/color_distance_ci_high"])
    assert "eval/vendi_ci_low" not in out and "eval/kid_ci_low" not in out  # biased by repeats: not bootstrapped


def test_a_single_run_whose_encoders_are_missing_stops_before_training_with_the_fix(make_cfg, tmp_path, monkeypatch):
    """No sweep preflight for a single run: the trial itself refuses before loading anything."""
    from sdsweep.sweep.trial import run_trial

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    cfg = make_cfg(f"eval.dino_model={tmp_path / 'no-such-dino'}", evaluate=True)  # the toy model, a missing DINO
    metrics = run_trial(cfg, tmp_path / "trial")
    assert metrics["status"] == "failed" and "eval.dino_model" in metrics["reason"]
    assert "losses" not in metrics and not (tmp_path / "trial" / "adapter").exists()


def test_the_colour_bootstrap_gives_exactly_the_quantiles_of_each_resample():
    """resampled_channel_quantiles(pixels)(i) is channel_quantiles(pixels[i]) to the last bit, for resamples
    with repeats and missing images, pixels with ties (an 8-bit image's values repeat) and a reordering."""
    import numpy as np

    from sdsweep.eval import metrics as M

    rng = np.random.default_rng(0)
    pixels = torch.from_numpy(rng.integers(0, 256, size=(7, 3, 16, 12)).astype(np.float32) / 255)
    pixels[2] = pixels[5]  # two identical images
    of = M.resampled_channel_quantiles(pixels)
    for _ in range(25):
        i = torch.from_numpy(rng.integers(0, 7, size=7))
        assert torch.equal(of(i), M.channel_quantiles(pixels[i]))
    assert torch.equal(of(torch.tensor([3, 3, 3, 3, 3, 3, 3])), M.channel_quantiles(pixels[[3] * 7]))
    assert torch.equal(of(torch.arange(7)), M.channel_quantiles(pixels))
