"""Set-level measures on image embeddings (CLIP or DINOv2 features): diversity and fidelity.

  vendi_score        diversity of one set: the effective number of distinct images, in [1, n], higher = more diverse
  centroid_distance  fidelity: squared distance between the two sets' mean embeddings, in [0, 4], lower = closer
  mean_cosine        fidelity: mean cosine of each generated image to every reference image, in [-1, 1], higher = closer

Every function L2-normalises its inputs first, so raw features and already normalised embeddings give the
same numbers. All three are computed in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _unit(embeddings: torch.Tensor, what: str) -> torch.Tensor:
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise ValueError(f"{what} must be a non-empty (N, D) tensor, got shape {tuple(embeddings.shape)}")
    return F.normalize(embeddings.detach().to(torch.float64).cpu(), dim=-1)


def vendi_score(embeddings: torch.Tensor) -> float:
    """Vendi score (Friedman & Dieng 2023, "The Vendi Score: A Diversity Evaluation Metric for Machine Learning").

    exp(-sum_i lambda_i log lambda_i), with lambda_i the eigenvalues of K / n and K the cosine-similarity
    kernel of the n L2-normalised embeddings (K_ii = 1, so the eigenvalues sum to 1: a distribution).
    The exponential of the Shannon entropy of that spectrum is the effective number of distinct items:
    1 for n identical images, n for n mutually orthogonal ones, k for k equal-sized groups of identical
    images that are orthogonal to each other. Range [1, n]; higher = more diverse. It depends on how many
    images there are only through the upper bound, so compare sets of the same size.
    Eigenvalues from torch.linalg.eigvalsh in float64; round-off negatives are clipped to 0 (0 log 0 = 0).
    As the reference implementation (the vendi-score package's score_X with q=1)."""
    x = _unit(embeddings, "embeddings")
    n = len(x)
    lam = torch.linalg.eigvalsh(x @ x.T / n).clamp(min=0)
    lam = lam[lam > 0]
    entropy = float(-(lam * lam.log()).sum())
    return min(max(math.exp(entropy), 1.0), float(n))


def centroid_distance(gen_emb: torch.Tensor, ref_emb: torch.Tensor) -> float:
    """Squared centroid distance (LyCORIS, arXiv:2309.14859): ||mean(gen) - mean(ref)||^2 of the L2-normalised
    embeddings. 0 when the two sets have the same mean (identical sets), at most 4 (each set collapsed onto
    one point, the two antipodal); lower = the generated images sit closer to the training images."""
    g, r = _unit(gen_emb, "gen_emb"), _unit(ref_emb, "ref_emb")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"embedding widths differ: {g.shape[1]} vs {r.shape[1]}")
    return float(((g.mean(0) - r.mean(0)) ** 2).sum())


def mean_cosine_per_image(gen_emb: torch.Tensor, ref_emb: torch.Tensor) -> torch.Tensor:
    """Per generated image, its mean cosine to every reference image (mean_cosine is their mean): the
    per-image rows the leaderboard's intervals resample."""
    g, r = _unit(gen_emb, "gen_emb"), _unit(ref_emb, "ref_emb")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"embedding widths differ: {g.shape[1]} vs {r.shape[1]}")
    return (g @ r.T).mean(dim=1)


def mean_cosine(gen_emb: torch.Tensor, ref_emb: torch.Tensor) -> float:
    """CLIP-I / DINO fidelity as DreamBooth (arXiv:2208.12242) reports it: the average pairwise cosine
    similarity between generated and real images, i.e. over generated images of the mean cosine to every
    reference image. Range [-1, 1] (1 only when every image is the same point); higher = closer to the
    training images. Equal to the dot product of the two sets' mean embeddings."""
    g, r = _unit(gen_emb, "gen_emb"), _unit(ref_emb, "ref_emb")
    if g.shape[1] != r.shape[1]:
        raise ValueError(f"embedding widths differ: {g.shape[1]} vs {r.shape[1]}")
    return float((g @ r.T).mean())
