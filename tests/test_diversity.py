"""Vendi score, squared centroid distance and mean cosine (sdsweep/eval/diversity.py) against textbook cases."""

from __future__ import annotations

import math

import pytest
import torch

from sdsweep.eval.diversity import centroid_distance, mean_cosine, vendi_score


def _random(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def test_vendi_identical_is_one():
    v = torch.randn(1, 16, generator=torch.Generator().manual_seed(0))
    assert vendi_score(v.repeat(7, 1)) == pytest.approx(1.0, abs=1e-9)
    assert vendi_score(v) == pytest.approx(1.0)  # a single image


def test_vendi_orthogonal_is_n():
    for n in (2, 5, 8):
        assert vendi_score(torch.eye(n, 12)) == pytest.approx(n, rel=1e-9)
    # any orthonormal set, scaled arbitrarily: the score normalises first
    q, _ = torch.linalg.qr(_random(10, 6, 1))
    assert vendi_score(q.T * torch.arange(1, 7).unsqueeze(1)) == pytest.approx(6, rel=1e-9)


def test_vendi_equal_disjoint_clusters_count_clusters():
    a, b = torch.eye(2, 8)
    assert vendi_score(torch.stack([a] * 4 + [b] * 4)) == pytest.approx(2.0, rel=1e-9)
    assert vendi_score(torch.eye(3, 8).repeat_interleave(5, dim=0)) == pytest.approx(3.0, rel=1e-9)


def test_vendi_by_hand_and_bounds():
    # two unit vectors at cosine c: K/n has eigenvalues (1 + c)/2 and (1 - c)/2
    c = 0.6
    x = torch.tensor([[1.0, 0.0], [c, math.sqrt(1 - c * c)]])
    p = [(1 + c) / 2, (1 - c) / 2]
    assert vendi_score(x) == pytest.approx(math.exp(-sum(q * math.log(q) for q in p)), rel=1e-6)
    # unequal clusters (3 + 1 of two orthogonal points): exp of the entropy of (3/4, 1/4), between 1 and 2
    a, b = torch.eye(2, 4)
    uneven = vendi_score(torch.stack([a, a, a, b]))
    assert uneven == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-9)
    assert 1 < uneven < 2
    for seed in range(3):
        x = _random(9, 5, seed)
        assert 1 <= vendi_score(x) <= 9


def test_vendi_cross_check_with_reference_package():
    """The authors' implementation (pip vendi-score; not a dependency of sdsweep: it pulls in scikit-learn)."""
    vendi = pytest.importorskip("vendi_score.vendi", reason="vendi-score is not installed "
                                "(pip install vendi-score: the authors' reference implementation, only for this check)")
    for seed, (n, d) in enumerate([(6, 4), (12, 32), (20, 3)]):
        x = _random(n, d, seed) + 2 * (seed % 2)  # some sets clustered off the origin
        assert vendi_score(x) == pytest.approx(float(vendi.score_X(x.double().numpy())), rel=1e-7)
    assert float(vendi.score_X(torch.eye(4).numpy())) == pytest.approx(vendi_score(torch.eye(4)))


def test_centroid_distance_identical_and_antipodal():
    x = _random(6, 8, 0)
    assert centroid_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert centroid_distance(x, x[torch.randperm(6, generator=torch.Generator().manual_seed(1))]) == pytest.approx(
        0.0, abs=1e-12)  # order does not matter
    v = torch.nn.functional.normalize(_random(1, 8, 2), dim=-1)
    assert centroid_distance(v.repeat(3, 1), -v.repeat(5, 1)) == pytest.approx(4.0, rel=1e-12)
    # orthogonal single points: |e1 - e2|^2 = 2
    e = torch.eye(2, 3)
    assert centroid_distance(e[:1], e[1:]) == pytest.approx(2.0)
    # scale of the raw features does not matter (normalised first)
    assert centroid_distance(3 * x, x) == pytest.approx(0.0, abs=1e-12)


def test_centroid_distance_by_hand():
    gen = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # mean (1/2, 1/2)
    ref = torch.tensor([[1.0, 0.0]])  # mean (1, 0)
    assert centroid_distance(gen, ref) == pytest.approx(0.25 + 0.25)


def test_mean_cosine_identical_sets_by_hand():
    x = _random(5, 7, 3)
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    by_hand = sum(float(u[i] @ u[j]) for i in range(5) for j in range(5)) / 25
    assert mean_cosine(x, x) == pytest.approx(by_hand, rel=1e-12)
    # = |mean of unit vectors|^2, below 1 for distinct images
    assert by_hand == pytest.approx(float((u.mean(0) ** 2).sum()), rel=1e-12) and by_hand < 1
    v = torch.nn.functional.normalize(_random(1, 7, 4), dim=-1)
    assert mean_cosine(v.repeat(3, 1), v.repeat(2, 1)) == pytest.approx(1.0)
    assert mean_cosine(v.repeat(3, 1), -v.repeat(2, 1)) == pytest.approx(-1.0)


def test_mean_cosine_is_average_over_generated_of_mean_to_reference():
    gen = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    ref = torch.tensor([[1.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    s = 1 / math.sqrt(2)
    per_gen = [(s + 1 - 1) / 3, (s + 0 + 0) / 3]
    assert mean_cosine(gen, ref) == pytest.approx(sum(per_gen) / 2)


def test_bad_shapes_refused():
    with pytest.raises(ValueError):
        vendi_score(torch.empty(0, 4))
    with pytest.raises(ValueError):
        centroid_distance(torch.ones(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError):
        mean_cosine(torch.ones(3), torch.ones(2, 3))
