"""Image metrics: functions from images (PIL) and prompts to numbers, with no knowledge of trials.

CLIP-based (open_clip; torchmetrics' formulas):
  clip_score          text-image alignment, torchmetrics' CLIPScore: max(mean(100 * cos(image, prompt)), 0)
  style_centroid_cos  cosine of each image to the centroid of the reference images, averaged
  style_nn_cos        cosine of each image to its nearest reference image, averaged
  kid                 torchmetrics' KernelInceptionDistance with CLIP image features
  content_cos         cosine of each adapted image to the base model's image of the same prompt and seed
Weight-free (a fixed, seeded random network; judges style where no CLIP weights can be loaded):
  gram_distance       relative distance of Gram matrices of random-conv features, set against set
  color_distance      1-D Wasserstein distance of the per-channel pixel distributions, set against set
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)

TINY_CLIP_NAME = "sdsweep-tiny-clip"
# Small towers, but CLIP's real text side (vocabulary 49408, context 77), so open_clip's own
# tokenizer and every code path are exactly those of ViT-L-14; random weights from seed 0.
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


class ClipLoadError(RuntimeError):
    """The configured CLIP weights could not be loaded; the message says how to choose others."""


@dataclass
class Clip:
    """An open_clip model with its preprocessing and tokenizer."""

    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    name: str

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], device: torch.device, batch: int = 16) -> torch.Tensor:
        """L2-normalised image embeddings (N, D), float32 on the CPU."""
        out = []
        for i in range(0, len(images), batch):
            pixels = torch.stack([self.preprocess(im) for im in images[i : i + batch]]).to(device)
            out.append(self.model.encode_image(pixels).float().cpu())
        return F.normalize(torch.cat(out), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], device: torch.device) -> torch.Tensor:
        emb = self.model.encode_text(self.tokenizer(texts).to(device)).float().cpu()
        return F.normalize(emb, dim=-1)


_CLIP_CACHE: dict[tuple[str, str | None], Clip] = {}


@contextmanager
def _quiet_root_logger():
    """open_clip logs to the root logger: silence it while one of our own models is built."""
    root = logging.getLogger()
    was, root.disabled = root.disabled, True
    try:
        yield
    finally:
        root.disabled = was


def load_clip(model_name: str, pretrained: str | None, cache_dir: str | os.PathLike) -> Clip:
    """The open_clip model `model_name` with `pretrained` weights, the toy CLIP (`toy`), or the tiny random stand-in (`tiny`).

    Cached per process on the CPU (Hydra runs a whole sweep in one process: ViT-L-14 loads
    once); callers move it to their device and back, so it never counts in a later trial's VRAM.
    Never falls back silently: weights that cannot be loaded raise ClipLoadError with the fix.
    """
    key = (model_name, pretrained or None)
    if key in _CLIP_CACHE:
        return _CLIP_CACHE[key]
    import open_clip

    if model_name == "toy":
        from sdsweep.eval.toy_clip import load_toy_clip

        with _quiet_root_logger():  # open_clip's INFO lines about the shipped file, once per process
            model, preprocess, tokenizer = load_toy_clip(cache_dir)
        name = "toy (trained on the toy world)"
    elif model_name == "tiny":
        config_file = Path(cache_dir).expanduser() / "open_clip" / f"{TINY_CLIP_NAME}.json"
        if not config_file.exists():
            from sdsweep.io import atomic_write_json

            atomic_write_json(config_file, TINY_CLIP_CONFIG)
        if TINY_CLIP_NAME not in open_clip.list_models():
            open_clip.add_model_config(config_file)
        # open_clip warns "initialized randomly": that is the point
        with _quiet_root_logger(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP_NAME, pretrained=None)
            tokenizer = open_clip.get_tokenizer(TINY_CLIP_NAME)
        name = "tiny (random weights)"
    else:
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                model_name, pretrained=os.path.expanduser(pretrained) if pretrained else None, require_pretrained=True
            )
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as e:  # noqa: BLE001 - network, missing file, bad tag, corrupt download: one message
            raise ClipLoadError(
                f"could not load CLIP weights eval.clip_model={model_name} eval.clip_pretrained={pretrained} "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Choose another: a tag from "
                "open_clip.list_pretrained() (e.g. eval.clip_model=ViT-B-32 eval.clip_pretrained=laion2b_s34b_b79k), "
                "a local weights file (eval.clip_pretrained=/path/to/open_clip_model.safetensors), "
                "eval.metrics=[random_style] for the weight-free style metric only, or eval.clip_model=tiny "
                "eval.clip_pretrained=null for the random stand-in (its numbers mean nothing). Re-score a "
                "finished trial with `python -m sdsweep.evaluate TRIAL_DIR eval.clip_model=...`"
            ) from e
        name = f"{model_name}/{pretrained}"
    model.eval().requires_grad_(False)
    clip = Clip(model, preprocess, tokenizer, name)
    _CLIP_CACHE[key] = clip
    return clip


# --- CLIP metrics ---------------------------------------------------------------------------


def clip_scores(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair 100 * cos(image_i, text_i), before any clamp (torchmetrics' _clip_score_update)."""
    return 100 * (F.normalize(image_emb, dim=-1) * F.normalize(text_emb, dim=-1)).sum(-1)


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor) -> float:
    """torchmetrics' CLIPScore.compute(): max(mean of 100 * cos, 0), in [0, 100], higher is better."""
    return max(float(clip_scores(image_emb, text_emb).mean()), 0.0)


def style_per_image(gen_emb: torch.Tensor, ref_emb: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per generated image, its cosine to the reference centroid and to its nearest reference; [-1, 1]."""
    gen, ref = F.normalize(gen_emb, dim=-1), F.normalize(ref_emb, dim=-1)
    centroid = F.normalize(ref.mean(0), dim=-1)
    return {"style_centroid_cos": gen @ centroid, "style_nn_cos": (gen @ ref.T).max(dim=1).values}


def style_similarity(gen_emb: torch.Tensor, ref_emb: torch.Tensor) -> dict[str, float]:
    """Cosine to the reference centroid and to the nearest reference, each averaged over images; [-1, 1]."""
    return {k: float(v.mean()) for k, v in style_per_image(gen_emb, ref_emb).items()}


def content_similarity(adapted_emb: torch.Tensor, base_emb: torch.Tensor) -> torch.Tensor:
    """Per-pair cosine of an adapted image to the base model's image of the same prompt and seed."""
    return (F.normalize(adapted_emb, dim=-1) * F.normalize(base_emb, dim=-1)).sum(-1)


class _Features(torch.nn.Module):
    """Hands torchmetrics' KID features already extracted by the CLIP image encoder (each image is
    encoded once per trial for every CLIP metric). Equal to KID(feature=ClipImageFeatures(...))."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ClipImageFeatures(torch.nn.Module):
    """CLIP image features as a torchmetrics feature extractor: uint8 (N, 3, H, W) -> (N, D)."""

    def __init__(self, clip: Clip, device: torch.device):
        super().__init__()
        self.clip, self.device = clip, device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import to_pil_image

        return self.clip.encode_images([to_pil_image(im) for im in images], self.device)


def kid(gen_feats: torch.Tensor, ref_feats: torch.Tensor, subsets: int = 50, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KernelInceptionDistance (cubic polynomial kernel MMD) on given features.

    Subset size is min(#generated, #reference): with few images KID is noisy but unbiased.
    About 0 for one distribution (may dip slightly below), larger is further apart.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(gen_feats), len(ref_feats))
    if n < 2:
        raise ValueError(f"KID needs at least 2 generated and 2 reference images (have {len(gen_feats)}, {len(ref_feats)})")
    with warnings.catch_warnings():  # "will save all extracted features": a few hundred vectors at most
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Features(), subsets=subsets, subset_size=n)
    metric.update(ref_feats.double(), real=True)
    metric.update(gen_feats.double(), real=False)
    with torch.random.fork_rng(devices=[]):  # the subsets are torch.randperm draws: seed them
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


# --- weight-free style ------------------------------------------------------------------------

STYLE_SIZE = 128


class RandomStyleNet(torch.nn.Module):
    """Four random 3x3 conv + ReLU layers with weights from a fixed seed (never trained).

    Gram matrices of random convolutional features capture texture and stroke statistics
    (He et al. 2016, "A powerful generative model using random weights"), so style can be
    compared with no pretrained weights at all; the seed makes the numbers comparable everywhere.
    """

    def __init__(self, seed: int = 0, widths: tuple[int, ...] = (16, 32, 64, 64)):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, cin = [], 3
        for i, cout in enumerate(widths):
            conv = torch.nn.Conv2d(cin, cout, 3, stride=1 if i == 0 else 2, padding=1)
            fan_in = cin * 9
            conv.weight.data = torch.randn(conv.weight.shape, generator=g) * (2 / fan_in) ** 0.5
            conv.bias.data.zero_()
            layers.append(conv)
            cin = cout
        self.layers = torch.nn.ModuleList(layers)
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for conv in self.layers:
            x = F.relu(conv(x))
            feats.append(x)
        return feats


def _to_tensor(images: list[Image.Image], size: int) -> torch.Tensor:
    """(N, 3, size, size) in [0, 1], resized with antialiasing (generated and reference sides differ)."""
    arrays = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) / 255 for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).clamp(0, 1)


@torch.no_grad()
def image_grams(images: list[Image.Image], net: RandomStyleNet) -> list[torch.Tensor]:
    """Per layer, each image's Gram matrix F F^T / (H W) of the random features: (N, C, C)."""
    x = _to_tensor(images, STYLE_SIZE) * 2 - 1
    return [(f.flatten(2) @ f.flatten(2).transpose(1, 2) / f.flatten(2).shape[-1]) for f in net(x)]


def mean_grams(images: list[Image.Image], net: RandomStyleNet) -> list[torch.Tensor]:
    """Per layer, the Gram matrix F F^T / (H W) of the random features, averaged over images."""
    return [g.mean(0) for g in image_grams(images, net)]


def gram_distance_of(gen_grams: list[torch.Tensor], ref_grams: list[torch.Tensor]) -> float:
    """gram_distance from the two sets' per-layer mean Gram matrices."""
    dists = []
    for a, b in zip(gen_grams, ref_grams):
        scale = (a.norm() + b.norm()) / 2
        dists.append(float((a - b).norm() / scale) if scale > 0 else 0.0)
    return float(np.mean(dists))


def gram_distance(gen: list[Image.Image], ref: list[Image.Image], seed: int = 0) -> float:
    """Mean over layers of ||G_gen - G_ref|| / ((||G_gen|| + ||G_ref||) / 2): 0 for identical texture
    statistics, at most 2; lower is closer in style."""
    net = RandomStyleNet(seed)
    return gram_distance_of(mean_grams(gen, net), mean_grams(ref, net))


def color_distance(gen: list[Image.Image], ref: list[Image.Image], size: int = 64, quantiles: int = 256) -> float:
    """1-D Wasserstein distance between the sets' pixel value distributions, averaged over R, G, B.

    Values in [0, 1] (fraction of the full intensity range by which pixels must move): 0 for the
    same colour distribution; lower is closer.
    """
    return color_distance_of(_to_tensor(gen, size), _to_tensor(ref, size), quantiles)


def channel_quantiles(pixels: torch.Tensor, quantiles: int = 256) -> torch.Tensor:
    """(quantiles, 3): each channel's pixel-value quantiles over a set's pixels, (N, 3, H, W)."""
    # torch.quantile's linear interpolation, by one sort: 10x faster, equal to 1e-16 (the bootstrap calls it 200 times)
    values = np.sort(pixels.permute(1, 0, 2, 3).flatten(1).double().numpy(), axis=1)
    low, high, weight = _quantile_positions(values.shape[1], quantiles)
    return torch.from_numpy((values[:, low] * (1 - weight) + values[:, high] * weight).T)


def _quantile_positions(total: int, quantiles: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The order statistics (low, high) between which each of `quantiles` evenly spaced quantiles of `total`
    sorted values lies, and the weight of the high one: linear interpolation, as torch.quantile does it."""
    position = np.linspace(0, 1, quantiles) * (total - 1)
    low = np.floor(position).astype(int)
    return low, np.minimum(low + 1, total - 1), position - low


def resampled_channel_quantiles(pixels: torch.Tensor, quantiles: int = 256):
    """A function of image indices (a resample of the N images, with repeats) giving exactly
    channel_quantiles(pixels[indices]), without sorting each resample's pixels: the pixels are sorted once,
    and a resample's k-th smallest value is the sorted value where the running count of the resample's
    copies of each image passes k. The colour bootstrap draws 200 resamples per trial."""
    n, per_image = pixels.shape[0], pixels.shape[2] * pixels.shape[3]
    flat = pixels.permute(1, 0, 2, 3).flatten(1).double().numpy()  # (3, N * H * W), image by image
    order = np.argsort(flat, axis=1, kind="stable")
    values, image_of = np.take_along_axis(flat, order, axis=1), order // per_image

    def of(indices: torch.Tensor) -> torch.Tensor:
        copies = np.cumsum(np.bincount(np.asarray(indices), minlength=n)[image_of], axis=1)
        low, high, weight = _quantile_positions(len(indices) * per_image, quantiles)
        at = [np.stack([values[c, np.searchsorted(copies[c], k, side="right")] for c in range(3)]) for k in (low, high)]
        return torch.from_numpy((at[0] * (1 - weight) + at[1] * weight).T)

    return of


def color_distance_of(gen: torch.Tensor | None, ref: torch.Tensor | None = None, quantiles: int = 256,
                      ref_quantiles: torch.Tensor | None = None, gen_quantiles: torch.Tensor | None = None) -> float:
    """color_distance from the two sets' pixels, (N, 3, H, W) in [0, 1] (or either set's channel_quantiles)."""
    b = channel_quantiles(ref, quantiles) if ref_quantiles is None else ref_quantiles
    a = channel_quantiles(gen, quantiles) if gen_quantiles is None else gen_quantiles
    return float((a - b).abs().mean())


SET_DRAWS = 200


def set_interval(statistic, n: int, draws: int = SET_DRAWS, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap of a set-level metric over the generated images: `statistic(indices)` recomputed
    on `draws` resamples of the n images with replacement (the references fixed), from a fixed seed."""
    rng = np.random.default_rng(seed)
    values = [statistic(torch.from_numpy(rng.integers(0, n, size=n))) for _ in range(draws)]
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)
