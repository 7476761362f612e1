"""An aesthetic score: LAION's improved aesthetic predictor on CLIP ViT-L/14 image features (optional, off by default).

What: the "sac+logos+ava1-l14-linearMSE" head (christophschuhmann/improved-aesthetic-predictor, the one LAION
filtered LAION-Aesthetics with): five linear layers, dropout between the first four and no activation,
trained with MSE on human ratings (SAC, LAION-logos, AVA) of OpenAI CLIP ViT-L/14 image embeddings,
L2-normalised. Range: roughly 1-10 (LAION-Aesthetics v2 kept images scoring 5 and above); higher = people
tend to like the picture more. It knows nothing about the prompt or the training style: a trial can win style
and lose aesthetics, which is why it is reported, weight 0 in the composite unless asked.

The head's weights are one 3.7 MB file, downloaded once from the project's GitHub into
`<model.cache_dir>/aesthetic/` (or `eval.aesthetic_weights`: a local file or another URL). It only makes
sense on ViT-L/14 (OpenAI) features, so eval.aesthetic=true needs eval.clip_model=ViT-L-14 (what `auto`
picks for a real model). Written by hand: neither torchmetrics nor open_clip ships the head; the
`simple-aesthetics-predictor` package wraps the same weights in a transformers CLIP, not open_clip's.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import unquote, urlparse

import torch
import torch.nn.functional as F

LAION_URL = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
             "sac%2Blogos%2Bava1-l14-linearMSE.pth")
EMBED_DIM = 768  # ViT-L/14's image embedding
REQUIRED_CLIP = "ViT-L-14"


class AestheticLoadError(RuntimeError):
    """The head's weights could not be read or fetched; the message names the fix."""


class AestheticHead(torch.nn.Module):
    """The improved aesthetic predictor's MLP, with its state-dict names (layers.0 ... layers.7)."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(EMBED_DIM, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1))

    @torch.no_grad()
    def forward(self, image_emb: torch.Tensor) -> torch.Tensor:
        """(N,) scores of (N, 768) CLIP ViT-L/14 image embeddings (normalised here, as the head was trained)."""
        return self.layers(F.normalize(image_emb.float(), dim=-1)).squeeze(-1)


def _is_url(source: str) -> bool:
    return urlparse(str(source)).scheme in ("http", "https")


def weights_path(source: str | None, cache_dir: str | os.PathLike) -> Path:
    """Where the weights are read from: a local file as given, a URL's file under <cache_dir>/aesthetic/."""
    source = source or LAION_URL
    if not _is_url(source):
        return Path(source).expanduser()
    name = unquote(Path(urlparse(source).path).name)
    return Path(cache_dir).expanduser() / "aesthetic" / name


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def fix_message(source: str | None, cache_dir, why: str) -> str:
    path = weights_path(source, cache_dir)
    url = source if source and _is_url(source) else LAION_URL
    return (f"the aesthetic head's weights {why}: download them once (3.7 MB) with "
            f"`python -c \"import torch; torch.hub.download_url_to_file('{url}', '{path}')\"` on a machine online, "
            f"set eval.aesthetic_weights=<a local .pth file>, or eval.aesthetic=false")


def aesthetic_problem(source: str | None, cache_dir, clip_model: str) -> str | None:
    """Why eval.aesthetic cannot score here, with the fix; None when it can (or will download on first use)."""
    if clip_model != REQUIRED_CLIP:
        return (f"eval.aesthetic=true needs CLIP ViT-L-14 features (the LAION head was trained on them), but "
                f"eval.clip_model resolves to {clip_model}: use eval.clip_model=ViT-L-14 (auto does for a real "
                "model), or eval.aesthetic=false")
    path = weights_path(source, cache_dir)
    if path.is_file():
        return None
    if source and not _is_url(source):
        return fix_message(source, cache_dir, f"are not at {path} (no such file)")
    if _offline():
        return fix_message(source, cache_dir, f"are not in the cache ({path}) and HF_HUB_OFFLINE is set")
    return None


def load_aesthetic(source: str | None, cache_dir) -> AestheticHead:
    """The head with its weights: a local file, or a URL downloaded once into the cache."""
    path = weights_path(source, cache_dir)
    if not path.is_file():
        if source and not _is_url(source):
            raise AestheticLoadError(fix_message(source, cache_dir, f"are not at {path} (no such file)"))
        if _offline():
            raise AestheticLoadError(fix_message(source, cache_dir, f"are not in the cache ({path}) and HF_HUB_OFFLINE is set"))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(source or LAION_URL, str(path), progress=False)
        except Exception as e:  # noqa: BLE001 - any network error: say how to get the file instead
            raise AestheticLoadError(fix_message(source, cache_dir, f"could not be downloaded ({type(e).__name__}: {e})")) from e
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        head = AestheticHead()
        head.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise AestheticLoadError(fix_message(source, cache_dir, f"in {path} cannot be read ({type(e).__name__}: {e})")) from e
    return head.eval()
