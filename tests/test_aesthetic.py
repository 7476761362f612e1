"""eval.aesthetic: LAION's improved aesthetic predictor on CLIP ViT-L/14 features (optional, off by default),
tested the way the encoders are: the real head's architecture with random weights from a local file."""

from __future__ import annotations

import pytest
import torch
from test_real_encoders import vit_l14_file  # noqa: F401 - the real ViT-L-14 with random weights, once a session

from sdsweep.eval import aesthetic as A

# the improved-aesthetic-predictor checkpoint's tensors (sac+logos+ava1-l14-linearMSE.pth), name -> shape
LAION_LAYOUT = {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,), "layers.2.weight": (128, 1024),
                "layers.2.bias": (128,), "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                "layers.6.weight": (16, 64), "layers.6.bias": (16,), "layers.7.weight": (1, 16), "layers.7.bias": (1,)}


@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("aesthetic") / "head.pth"
    torch.save(A.AestheticHead().state_dict(), path)
    return path


def test_the_head_has_the_released_checkpoints_layout_and_scores_normalised_embeddings(head_file, tmp_path):
    assert {k: tuple(v.shape) for k, v in A.AestheticHead().state_dict().items()} == LAION_LAYOUT
    head = A.load_aesthetic(str(head_file), tmp_path)
    emb = torch.randn(5, 768)
    scores = head(emb)
    assert scores.shape == (5,) and torch.equal(scores, head(emb))  # eval mode: no dropout
    torch.testing.assert_close(head(3 * emb), scores)  # normalised first, as the head was trained
    assert len(set(scores.tolist())) == 5


def test_missing_weights_and_the_wrong_clip_are_refused_with_the_fix(head_file, tmp_path, monkeypatch):
    assert A.aesthetic_problem(str(head_file), tmp_path, "ViT-L-14") is None
    wrong = A.aesthetic_problem(str(head_file), tmp_path, "toy")
    assert "needs CLIP ViT-L-14" in wrong and "eval.aesthetic=false" in wrong
    missing = A.aesthetic_problem(str(tmp_path / "none.pth"), tmp_path, "ViT-L-14")
    assert "no such file" in missing and "eval.aesthetic_weights" in missing
    with pytest.raises(A.AestheticLoadError, match="no such file"):
        A.load_aesthetic(str(tmp_path / "none.pth"), tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the default URL, not downloaded: said before launch
    offline = A.aesthetic_problem(None, tmp_path, "ViT-L-14")
    assert "HF_HUB_OFFLINE" in offline and "download_url_to_file" in offline and A.LAION_URL in offline
    assert A.weights_path(None, tmp_path) == tmp_path / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth"
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(A.AestheticLoadError, match="cannot be read"):
        A.load_aesthetic(str(tmp_path / "garbage.pth"), tmp_path)


def test_the_scorer_reports_each_images_aesthetic_score_from_its_vit_l14_features(make_cfg, head_file,
                                                                                 vit_l14_file):  # noqa: F811
    from sdsweep.data import toy_world as world
    from sdsweep.eval.sampling import Sample
    from sdsweep.eval.scorer import Scorer

    cpu = torch.device("cpu")
    weights = vit_l14_file[0]  # (path, probe values, parameter count)
    # no CLIP metric asked: the aesthetic head alone loads the CLIP (1.5 s an image at 224 px: one sample here)
    cfg = make_cfg("eval.metrics=[random_style]", "eval.clip_model=ViT-L-14", f"eval.clip_pretrained={weights}",
                   "eval.aesthetic=true", f"eval.aesthetic_weights={head_file}", "eval.max_reference_images=2",
                   evaluate=True)
    scorer = Scorer(cfg, cpu)
    samples = [Sample(p, 0, f"{i:02d}.png", world.render(world.parse_prompt(p), seed=i))
               for i, p in enumerate(world.HELD_OUT_PROMPTS[:1])]
    out, rows = scorer.score(samples, base=None)
    expected = A.load_aesthetic(str(head_file), cfg.model.cache_dir)(scorer.clip.encode_images([s.image for s in samples], cpu))
    assert [r["aesthetic"] for r in rows] == pytest.approx(expected.tolist(), rel=1e-5)
    assert out["eval/aesthetic"] == pytest.approx(float(expected.mean()), rel=1e-5)
    off = Scorer(make_cfg("eval.metrics=[clip_score]", evaluate=True), cpu)  # off by default
    assert "eval/aesthetic" not in off.score(samples, base=None)[0]


def test_an_aesthetic_score_the_sweep_cannot_compute_is_refused_before_launch(make_cfg, head_file):
    from sdsweep.sweep.preflight import missing_encoder_weights

    (problem,) = missing_encoder_weights([make_cfg("eval.aesthetic=true", f"eval.aesthetic_weights={head_file}",
                                                   evaluate=True)])  # the toy world's CLIP is not ViT-L-14
    assert "needs CLIP ViT-L-14" in problem
    assert missing_encoder_weights([make_cfg(evaluate=True)]) == []  # off by default
