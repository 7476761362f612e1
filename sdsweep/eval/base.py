"""The base model's images and scores, sampled once per sweep and shared by every trial.

`<sweep>/base/<key>/` (layout.BaseDir), keyed by what they depend on: model, precision, device,
prompts, seeds, the evaluation settings and the training images (the style references they are scored against).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sdsweep.config.encoders import clip_choice
from sdsweep.eval.sampling import Sample, generate, read_prompts, sampling_batch
from sdsweep.eval.scorer import Scorer
from sdsweep.io import atomic_dir, atomic_write_json
from sdsweep.layout import BaseDir, UnreadableRecord

log = logging.getLogger(__name__)


def base_samples_key(cfg: DictConfig, source: str, device: torch.device, data: str,
                     prompts: list[str] | None = None) -> tuple[str, dict]:
    """What the base model's images and scores depend on, and a short hash of it (the folder name).
    `data`: the identity of the trial's data source (DataSource.identity), which the style
    references are drawn from: another data set is another base record."""
    e, m, p = cfg.eval, cfg.model, cfg.precision
    info = {
        "model": source, "family": m.family, "vae": m.vae, "revision": m.revision, "variant": m.variant,
        "precision": {k: p[k] for k in ("mixed_precision", "base_dtype", "vae_dtype", "quantize")},
        "device": device.type, "prompts": prompts if prompts is not None else read_prompts(e),
        "data": data,
        **{k: OmegaConf.to_container(e[k]) if OmegaConf.is_config(e[k]) else e[k]
           for k in ("seeds", "steps", "guidance_scale", "resolution", "metrics", "max_reference_images",
                     "kid_subsets")},
    }
    info["clip_model"], info["clip_pretrained"] = clip_choice(cfg)  # `auto` as it resolved
    info["batch_size"] = sampling_batch(cfg)  # a batch's last bits differ: trials pair with base images drawn alike
    return hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12], info


def _read_samples(base: BaseDir) -> list[Sample]:
    record = base.read_record()
    return [Sample(r["prompt"], r["seed"], r["file"], Image.open(base.samples / r["file"]).convert("RGB"))
            for r in record["eval_images"]]


def ensure_base(cfg: DictConfig, pipe, base: BaseDir, info: dict, scorer: Scorer,
                autocast_dtype: torch.dtype | None) -> list[Sample]:
    """The base model's samples in `base`: read back if a trial of this sweep drew them, else drawn now
    (from `pipe`, which must hold no adapter) and written with their scores, atomically."""
    if base.exists():
        try:
            return _read_samples(base)
        except (UnreadableRecord, OSError, KeyError, TypeError) as e:  # drawn again below, in its place
            log.warning("the base model's samples in %s cannot be read (%s): drawing them again", base.path, e)
    started = time.perf_counter()
    prompts = getattr(scorer, "prompts", None) or read_prompts(cfg.eval)  # the scorer's: captions included
    samples = generate(pipe, prompts, list(cfg.eval.seeds), cfg.eval, autocast_dtype, sampling_batch(cfg))
    scores, rows = scorer.score(samples, base=None)
    with atomic_dir(base.path) as tmp:
        staged = BaseDir(tmp)
        staged.samples.mkdir()
        for s in samples:
            s.image.save(staged.samples / s.file)
        atomic_write_json(staged.record, {"key": base.key, "settings": info, "status": "reference", **scores,
                                          "eval_images": rows, "eval_s": time.perf_counter() - started})
    log.info("base model sampled once for this sweep: %s", base.path)
    return samples
