"""The scorer of a trial's images: the CLIP model and the reference images, loaded once, and the metrics."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image

from sdsweep.config.encoders import clip_choice, dino_choice
from sdsweep.config.schema import CLIP_METRICS
from sdsweep.data.dataset import DataSource, resolve_source
from sdsweep.data.folder import decode_image
from sdsweep.eval import diversity as D
from sdsweep.eval import metrics as M
from sdsweep.eval.sampling import Sample, read_prompts

PREFIX = "eval/"


def evenly_spaced(n: int, k: int) -> list[int]:
    """At most `k` of the indices 0..n-1, evenly spaced, first and last included (ascending)."""
    k = min(n, k)
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist())) if k else []


def reference_images(cfg: DictConfig, source: DataSource, records: list | None = None) -> list[Image.Image]:
    """The style reference: the trial's own training images (the records training scans of `source`,
    from the same `resolve_source`), evenly spaced over the set, at most eval.max_reference_images."""
    records = source.scan().records if records is None else records
    return [decode_image(records[i].path) for i in evenly_spaced(len(records), cfg.eval.max_reference_images)]


def evaluation_prompts(e: DictConfig, captions: list[str]) -> list[str]:
    """eval.prompts (or its file), then eval.caption_prompts of the training captions, evenly spaced, each
    prompt once (a caption already among the prompts is not asked twice)."""
    prompts = read_prompts(e)
    picked = [captions[i] for i in evenly_spaced(len(captions), e.caption_prompts) if captions[i]]
    return list(dict.fromkeys([*prompts, *picked]))


SPLITS = {"in": "in distribution: a training caption", "out": "out of distribution: any other prompt"}


class Scorer:
    """What scoring needs once per trial: the CLIP model (loaded first, so that weights that cannot
    load fail in seconds, before any sampling), the data source and its reference images."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        e = cfg.eval
        self.metrics, self.kid_subsets, self.device = set(e.metrics), e.kid_subsets, device
        self.clip = self.dino = self.aesthetic = None
        if self.metrics & set(CLIP_METRICS) or e.aesthetic:
            self.clip = M.load_clip(*clip_choice(cfg), cfg.model.cache_dir)
        if dino_name := dino_choice(cfg):
            from sdsweep.eval.dino import load_dino

            self.dino = load_dino(dino_name, cfg.model.cache_dir)
        if e.aesthetic:
            from sdsweep.eval.aesthetic import load_aesthetic

            self.aesthetic = load_aesthetic(e.aesthetic_weights, cfg.model.cache_dir)
        self.trigger = (e.trigger, e.trigger_description) if e.trigger and e.trigger_description else None
        self.source = resolve_source(cfg.data, cfg.model.cache_dir)  # resolved once: an HF dataset opens here
        records = self.source.scan().records
        self.references = reference_images(cfg, self.source, records)
        self.captions = {r.caption.strip() for r in records}
        self.prompts = evaluation_prompts(e, [r.caption for r in records])
        self._of_references: dict[str, object] = {}

    def _reference(self, name: str, compute):
        """A feature of the reference images, computed once per scorer: the base model and the trial are
        scored against the same references (everything encode/compute returns lives on the CPU)."""
        if name not in self._of_references:
            self._of_references[name] = compute()
        return self._of_references[name]

    def split(self, prompt: str) -> str:
        """"in" for a prompt that is one of the training captions, "out" for any other."""
        return "in" if prompt.strip() in self.captions else "out"

    def text_side(self, prompt: str) -> str:
        """The prompt CLIP-T reads: the trigger word replaced by its description (eval.trigger_description)."""
        return prompt.replace(*self.trigger) if self.trigger else prompt

    @contextmanager
    def _clip_on_device(self):
        """CLIP joins the device only while it scores, and goes back to the CPU (and the per-process
        cache) afterwards: it never sits in VRAM during sampling or in a later trial's figures."""
        model = self.clip.model if self.clip else None
        try:
            if model is not None:
                model.to(self.device)
            yield
        finally:
            if model is not None:
                model.to("cpu")

    def score(self, samples: list[Sample], base: list[Sample] | None) -> tuple[dict, list[dict]]:
        """Set-level metrics ("eval/...") and per-image records; `base` None scores the base model itself."""
        with self._clip_on_device():
            return self._score(samples, base)

    def _score(self, samples: list[Sample], base: list[Sample] | None) -> tuple[dict, list[dict]]:
        out: dict = {f"{PREFIX}images": len(samples), f"{PREFIX}references": len(self.references)}
        rows = [{"prompt": s.prompt, "seed": s.seed, "file": s.file, "split": self.split(s.prompt)} for s in samples]
        if self.clip:
            emb = self.clip.encode_images([s.image for s in samples], self.device)
            ref_emb = self._reference("clip", lambda: self.clip.encode_images(self.references, self.device))
            out[f"{PREFIX}clip_model"] = self.clip.name
        if "clip_score" in self.metrics:
            text = self.clip.encode_texts([self.text_side(s.prompt) for s in samples], self.device)
            out[f"{PREFIX}clip_score"] = M.clip_score(emb, text)
            for row, value in zip(rows, M.clip_scores(emb, text).tolist()):
                row["clip_score"] = max(value, 0.0)
        if "style" in self.metrics:
            per_image = M.style_per_image(emb, ref_emb)  # their means are eval/style_centroid_cos, eval/style_nn_cos
            out.update({PREFIX + k: float(v.mean()) for k, v in per_image.items()})
            for key, values in per_image.items():
                for row, value in zip(rows, values.tolist()):
                    row[key] = value
        if "fidelity" in self.metrics:  # CLIP-I (DreamBooth) and the squared centroid distance (LyCORIS)
            per_image = D.mean_cosine_per_image(emb, ref_emb)
            out[f"{PREFIX}clip_i"] = float(per_image.mean())
            out[f"{PREFIX}clip_centroid_distance"] = D.centroid_distance(emb, ref_emb)
            out.update(_interval("clip_centroid_distance", lambda i: D.centroid_distance(emb[i], ref_emb), len(samples)))
            for row, value in zip(rows, per_image.tolist()):
                row["clip_i"] = value
        if "diversity" in self.metrics:
            out[f"{PREFIX}vendi"] = D.vendi_score(emb)
        if self.dino is not None:
            out.update(self._dino(samples, rows))
        if self.aesthetic is not None:
            scores = self.aesthetic(emb.cpu())
            out[f"{PREFIX}aesthetic"] = float(scores.mean())
            for row, value in zip(rows, scores.tolist()):
                row["aesthetic"] = value
        if "kid" in self.metrics:
            try:
                out[f"{PREFIX}kid"], out[f"{PREFIX}kid_std"] = M.kid(emb, ref_emb, self.kid_subsets)
            except ValueError as err:  # too few images: say so rather than invent a number
                out[f"{PREFIX}kid"] = None
                out[f"{PREFIX}notes"] = str(err)
        if "random_style" in self.metrics:
            out.update(self._random_style([s.image for s in samples]))
        if "content" in self.metrics:
            if base is None:
                cos = torch.ones(len(samples))  # the base model against itself
            else:
                cos = M.content_similarity(emb, self.clip.encode_images([b.image for b in base], self.device))
            out[f"{PREFIX}content_cos"] = float(cos.mean())
            for row, value in zip(rows, cos.tolist()):
                row["content_cos"] = value
        return {**out, **split_means(rows)}, rows

    def _random_style(self, images: list[Image.Image]) -> dict:
        """Gram and colour distances to the training images, each with its bootstrap interval over the images."""
        net = M.RandomStyleNet(0)
        grams = M.image_grams(images, net)
        ref_grams = self._reference("grams", lambda: M.mean_grams(self.references, net))
        pixels = M._to_tensor(images, 64)
        ref_q = self._reference("colour", lambda: M.channel_quantiles(M._to_tensor(self.references, 64)))
        out = {f"{PREFIX}gram_distance": M.gram_distance_of([g.mean(0) for g in grams], ref_grams),
               f"{PREFIX}color_distance": M.color_distance_of(pixels, ref_quantiles=ref_q)}
        out.update(_interval("gram_distance", lambda i: M.gram_distance_of([g[i].mean(0) for g in grams], ref_grams),
                             len(images)))
        resampled = M.resampled_channel_quantiles(pixels)
        out.update(_interval("color_distance", lambda i: M.color_distance_of(None, ref_quantiles=ref_q,
                                                                             gen_quantiles=resampled(i)), len(images)))
        return out

    def _dino(self, samples: list[Sample], rows: list[dict]) -> dict:
        """DINO fidelity: each image's mean cosine to the training images' DINOv2 features, their centroid distance."""
        emb = self.dino.encode_images([s.image for s in samples], self.device)
        ref = self._reference("dino", lambda: self.dino.encode_images(self.references, self.device))
        per_image = D.mean_cosine_per_image(emb, ref)
        for row, value in zip(rows, per_image.tolist()):
            row["dino_cos"] = value
        return {f"{PREFIX}dino_cos": float(per_image.mean()), f"{PREFIX}dino_centroid_distance": D.centroid_distance(emb, ref),
                f"{PREFIX}dino_model": self.dino.name,
                **_interval("dino_centroid_distance", lambda i: D.centroid_distance(emb[i], ref), len(samples))}


def _interval(metric: str, statistic, n: int) -> dict[str, float]:
    """eval/<metric>_ci_low and _ci_high of a set-level metric: a bootstrap over the trial's images (the
    references fixed). Not for Vendi or KID: a resample repeats images, which lowers diversity and biases the
    unbiased MMD; KID keeps its spread over subsets (eval/kid_std)."""
    if n < 2:
        return {}
    low, high = M.set_interval(statistic, n)
    return {f"{PREFIX}{metric}_ci_low": low, f"{PREFIX}{metric}_ci_high": high}


def split_means(rows: list[dict]) -> dict[str, float | int]:
    """eval/in/<metric> and eval/out/<metric>: each per-image metric's mean over the images of one prompt set,
    with eval/<split>/images, for the splits that have images (set-level metrics stay over all images)."""
    out: dict[str, float | int] = {}
    for split in SPLITS:
        mine = [r for r in rows if r.get("split") == split]
        if not mine:
            continue
        out[f"{PREFIX}{split}/images"] = len(mine)
        for key in sorted({k for r in mine for k in r} - {"prompt", "seed", "file", "split"}):
            values = [r[key] for r in mine if isinstance(r.get(key), (int, float))]
            if values:
                out[f"{PREFIX}{split}/{key}"] = float(np.mean(values))
    return out
