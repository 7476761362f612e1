"""Evaluate a trial: sample fixed prompts x seeds with its saved adapter, and score the images.

`evaluate_trial` runs at the end of `run_trial`, on the modules the trial already holds (no
second copy of the model in memory, so evaluation stays under the training peak):
 1. every trained adapter layer is removed: what is left is the base model;
 2. the base model's images for these prompts, seeds and settings are sampled once per sweep
    into `<sweep>/base/<key>/` (keyed by model, precision and eval settings) and reused by
    every later trial, with the base model's own scores in `base.json` (the leaderboard's
    reference row);
 3. the adapter is loaded back from `trial_dir/adapter/` (diffusers' `load_lora_weights` for
    lora/dora, peft for loha/lokr): the images are drawn from the file, which proves it works;
 4. the trial's images go to `trial_dir/samples/`, named by prompt and seed;
 5. metrics.py scores them: flat `eval/...` keys, merged into metrics.json by the caller.

A failed evaluation never loses the training result: it returns `eval_error` (the trial stays
`finished`, unranked on the leaderboard) and `python -m sdsweep.evaluate TRIAL_DIR [key=value ...]`
re-scores a finished trial from its folder alone (saved adapter + .hydra/config.yaml).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from sdsweep.config.schema import CLIP_METRICS
from sdsweep.eval import metrics as M

log = logging.getLogger(__name__)
PREFIX = "eval/"


@dataclass
class Sample:
    prompt: str
    seed: int
    file: str
    image: Image.Image


def read_prompts(e: DictConfig) -> list[str]:
    """`eval.prompts_file` (one prompt a line, blank lines and '#' comments skipped) or `eval.prompts`."""
    if e.prompts_file:
        lines = Path(e.prompts_file).expanduser().read_text(encoding="utf-8").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    return list(e.prompts)


def image_name(index: int, prompt: str, seed: int) -> str:
    """`03_bill-gates-in-naruto-style_seed1.png`: the prompt's position keeps similar prompts apart."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60] or "empty"
    return f"{index:02d}_{slug}_seed{seed}.png"


# --- the pipeline ------------------------------------------------------------------------------


def build_pipeline(components):
    """A diffusers pipeline over `components` (shared modules, no copy), with Euler sampling."""
    from accelerate.utils import extract_model_from_parallel
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    unet = extract_model_from_parallel(components.unet)
    if components.family == "sd3":
        return _sd3_pipeline(components, unet)
    scheduler = EulerDiscreteScheduler.from_config(components.noise_scheduler.config)
    if components.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0], text_encoder_2=components.text_encoders[1],
            tokenizer=components.tokenizers[0], tokenizer_2=components.tokenizers[1], unet=unet,
            scheduler=scheduler, add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=components.vae, text_encoder=components.text_encoders[0], tokenizer=components.tokenizers[0],
            unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sd3_pipeline(components, transformer):
    """SD3: the MMDiT transformer, three text encoders (T5 absent with model.drop_t5), flow matching."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tes, toks = components.text_encoders, components.tokenizers
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, vae=components.vae,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
        text_encoder=tes[0], tokenizer=toks[0], text_encoder_2=tes[1], tokenizer_2=toks[1],
        text_encoder_3=tes[2] if len(tes) > 2 else None, tokenizer_3=toks[2] if len(toks) > 2 else None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _denoiser(pipe) -> torch.nn.Module:
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def _denoisers(pipe) -> dict[str, torch.nn.Module]:
    """The modules an adapter may be attached to, under the names adapters.save_adapter uses."""
    named = {"unet": _denoiser(pipe), "text_encoder": pipe.text_encoder}
    if getattr(pipe, "text_encoder_2", None) is not None:
        named["text_encoder_2"] = pipe.text_encoder_2
    return named


def load_saved_adapter(pipe, adapter_dir: Path, kind: str) -> None:
    """Load the trial's adapter from its saved files, the way a user would."""
    from sdsweep.model.adapters import LORA_WEIGHTS, load_adapter

    if kind in ("lora", "dora"):
        pipe.load_lora_weights(str(adapter_dir), weight_name=LORA_WEIGHTS)
    else:
        load_adapter(adapter_dir, _denoisers(pipe))


@torch.no_grad()
def generate(pipe, prompts: list[str], seeds: list[int], e: DictConfig, autocast_dtype: torch.dtype | None) -> list[Sample]:
    """One image per (prompt, seed), each from its own CPU generator: the same cell of the grid
    starts from the same noise in every trial and in the base model, on any device."""
    for module in _denoisers(pipe).values():
        module.eval()
    device = _denoiser(pipe).device
    samples = []
    for i, prompt in enumerate(prompts):
        for seed in seeds:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                latents = pipe(prompt, num_inference_steps=e.steps, guidance_scale=e.guidance_scale,
                               height=e.resolution, width=e.resolution, generator=generator,
                               output_type="latent").images
            samples.append(Sample(prompt, int(seed), image_name(i, prompt, seed), decode(pipe, latents, e.vae_tiling)))
    return samples


def decode(pipe, latents: torch.Tensor, tiling: bool = False) -> Image.Image:
    """Decode outside autocast, in the VAE's own dtype (fp32 by default: the SDXL VAE overflows in fp16);
    with `tiling`, tile by tile (the VAE is shared with training and the next trial: switched back off)."""
    vae = pipe.vae
    if tiling:
        vae.enable_tiling()
        try:
            return decode(pipe, latents, tiling=False)
        finally:
            vae.disable_tiling()
    latents = latents.to(next(vae.parameters()).dtype)
    mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
    if mean is not None and std is not None:
        view = (1, -1, 1, 1)
        latents = latents * torch.tensor(std).view(view).to(latents) / vae.config.scaling_factor
        latents = latents + torch.tensor(mean).view(view).to(latents)
    else:
        # SD3's VAE also shifts its latents (shift_factor); SD1.5/SDXL's have none
        latents = latents / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    image = vae.decode(latents, return_dict=False)[0]
    return pipe.image_processor.postprocess(image.float(), output_type="pil")[0]


# --- scoring -------------------------------------------------------------------------------------


def reference_images(cfg: DictConfig) -> list[Image.Image]:
    """The style reference: the training images, evenly spaced over the set, at most eval.max_reference_images."""
    from sdsweep.data.dataset import decode_image, ensure_builtin_dataset, scan_folder

    folder = Path(cfg.data.path).expanduser() if cfg.data.path else ensure_builtin_dataset(cfg.model.cache_dir)
    records = scan_folder(folder, cfg.data.min_size).records
    k = min(len(records), cfg.eval.max_reference_images)
    picks = sorted(set(np.linspace(0, len(records) - 1, k).round().astype(int).tolist())) if k else []
    return [decode_image(records[i].path) for i in picks]


class Scorer:
    """What scoring needs once per trial: the CLIP model (loaded first, so that weights that cannot
    load fail in seconds, before any sampling) and the reference images."""

    def __init__(self, cfg: DictConfig, device: torch.device):
        e = cfg.eval
        self.metrics, self.kid_subsets, self.device = set(e.metrics), e.kid_subsets, device
        self.clip = None
        if self.metrics & set(CLIP_METRICS):
            self.clip = M.load_clip(e.clip_model, e.clip_pretrained, cfg.model.cache_dir)
        self.references = reference_images(cfg)

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
        rows = [{"prompt": s.prompt, "seed": s.seed, "file": s.file} for s in samples]
        if self.clip:
            emb = self.clip.encode_images([s.image for s in samples], self.device)
            ref_emb = self.clip.encode_images(self.references, self.device)
            out[f"{PREFIX}clip_model"] = self.clip.name
        if "clip_score" in self.metrics:
            text = self.clip.encode_texts([s.prompt for s in samples], self.device)
            out[f"{PREFIX}clip_score"] = M.clip_score(emb, text)
            for row, value in zip(rows, M.clip_scores(emb, text).tolist()):
                row["clip_score"] = max(value, 0.0)
        if "style" in self.metrics:
            out.update({PREFIX + k: v for k, v in M.style_similarity(emb, ref_emb).items()})
            centroid = torch.nn.functional.normalize(ref_emb.mean(0), dim=-1)
            for row, value in zip(rows, (emb @ centroid).tolist()):
                row["style_centroid_cos"] = value
        if "kid" in self.metrics:
            try:
                out[f"{PREFIX}kid"], out[f"{PREFIX}kid_std"] = M.kid(emb, ref_emb, self.kid_subsets)
            except ValueError as err:  # too few images: say so rather than invent a number
                out[f"{PREFIX}kid"] = None
                out[f"{PREFIX}notes"] = str(err)
        if "random_style" in self.metrics:
            images = [s.image for s in samples]
            out[f"{PREFIX}gram_distance"] = M.gram_distance(images, self.references)
            out[f"{PREFIX}color_distance"] = M.color_distance(images, self.references)
        if "content" in self.metrics:
            if base is None:
                cos = torch.ones(len(samples))  # the base model against itself
            else:
                cos = M.content_similarity(emb, self.clip.encode_images([b.image for b in base], self.device))
            out[f"{PREFIX}content_cos"] = float(cos.mean())
            for row, value in zip(rows, cos.tolist()):
                row["content_cos"] = value
        return out, rows


# --- the base model, once per sweep ------------------------------------------------------------------


def base_root(trial_dir: Path) -> Path:
    """`<sweep>/base` when the trial is a cell of a Hydra multirun (its parent holds multirun.yaml), else
    `<trial>/base`."""
    trial_dir = Path(trial_dir)
    return trial_dir.parent / "base" if (trial_dir.parent / "multirun.yaml").exists() else trial_dir / "base"


def base_key(cfg: DictConfig, source: str, device: torch.device) -> tuple[str, dict]:
    """What the base images and scores depend on, and a short hash of it (the folder name)."""
    e, m, p = cfg.eval, cfg.model, cfg.precision
    info = {
        "model": source, "family": m.family, "vae": m.vae, "revision": m.revision, "variant": m.variant,
        "precision": {k: p[k] for k in ("mixed_precision", "base_dtype", "vae_dtype", "quantize")},
        "device": device.type, "prompts": read_prompts(e), "data": cfg.data.path or "builtin",
        **{k: OmegaConf.to_container(e[k]) if OmegaConf.is_config(e[k]) else e[k]
           for k in ("seeds", "steps", "guidance_scale", "resolution", "metrics", "clip_model", "clip_pretrained",
                     "max_reference_images", "kid_subsets")},
    }
    return hashlib.sha1(json.dumps(info, sort_keys=True).encode()).hexdigest()[:12], info


def ensure_base(cfg: DictConfig, pipe, root: Path, key: str, info: dict, scorer: Scorer,
                autocast_dtype: torch.dtype | None) -> list[Sample]:
    """The base model's samples for `key`: read back if a trial of this sweep drew them, else drawn now
    (from `pipe`, which must hold no adapter) and written with their scores, atomically."""
    from sdsweep.io import atomic_dir, atomic_write_json

    folder = root / key
    if (folder / "base.json").exists():
        record = json.loads((folder / "base.json").read_text())
        return [Sample(r["prompt"], r["seed"], r["file"], Image.open(folder / "samples" / r["file"]).convert("RGB"))
                for r in record["eval_images"]]
    started = time.perf_counter()
    samples = generate(pipe, read_prompts(cfg.eval), list(cfg.eval.seeds), cfg.eval, autocast_dtype)
    scores, rows = scorer.score(samples, base=None)
    with atomic_dir(folder) as tmp:
        (tmp / "samples").mkdir()
        for s in samples:
            s.image.save(tmp / "samples" / s.file)
        atomic_write_json(tmp / "base.json", {"key": key, "settings": info, "status": "reference", **scores,
                                              "eval_images": rows, "eval_s": time.perf_counter() - started})
    log.info("base model sampled once for this sweep: %s", folder)
    return samples


# --- the trial -----------------------------------------------------------------------------------------


def evaluate_trial(cfg: DictConfig, trial_dir: Path, components=None) -> dict:
    """Sample and score the trial in `trial_dir` (its adapter already saved there); never raises
    for an evaluation failure: returns {"eval_error": ...} instead, so training results stay.

    `components`: the trial's loaded models (their adapter layers are removed and the saved
    adapter loaded back: the trial must not use them afterwards); None loads the base model afresh.
    """
    if not cfg.eval.enabled:
        return {}
    started = time.perf_counter()
    try:
        return {**_evaluate(cfg, Path(trial_dir), components), "eval_s": time.perf_counter() - started}
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - evaluation must never lose the training result
        reason = "out of memory" if isinstance(e, torch.cuda.OutOfMemoryError) else type(e).__name__
        log.error("evaluation failed (%s: %s); the trial's training result is kept", reason, e)
        return {"eval_error": f"{reason}: {e}", "eval_s": time.perf_counter() - started}


def _evaluate(cfg: DictConfig, trial_dir: Path, components) -> dict:
    from sdsweep.io import atomic_dir
    from sdsweep.model import load as models

    if components is None:
        components = models.load_components(cfg.model, cfg.precision)
        models.place(components, cfg.precision, models.resolve_device(cfg.device))
    pipe = build_pipeline(components)
    device = _denoiser(pipe).device
    mp = cfg.precision.mixed_precision
    autocast_dtype = None if mp == "no" else models.DTYPES[mp]
    scorer = Scorer(cfg, device)  # before sampling: a CLIP model that cannot load fails in seconds
    pipe.unload_lora_weights()  # the trained layers out: this is the base model now
    key, info = base_key(cfg, components.source, device)
    clock = time.perf_counter()
    base = ensure_base(cfg, pipe, base_root(trial_dir), key, info, scorer, autocast_dtype)
    base_s, clock = time.perf_counter() - clock, time.perf_counter()
    load_saved_adapter(pipe, trial_dir / "adapter", cfg.adapter.kind)
    samples = generate(pipe, read_prompts(cfg.eval), list(cfg.eval.seeds), cfg.eval, autocast_dtype)
    with atomic_dir(trial_dir / "samples") as tmp:
        for s in samples:
            s.image.save(tmp / s.file)
    sample_s, clock = time.perf_counter() - clock, time.perf_counter()
    by_cell = {(b.prompt, b.seed): b for b in base}
    scores, rows = scorer.score(samples, [by_cell[(s.prompt, s.seed)] for s in samples])
    timings = {"eval_base_s": base_s, "sample_s": sample_s, "score_s": time.perf_counter() - clock}
    return {**scores, f"{PREFIX}base_key": key, "eval_images": rows, **timings}


# --- re-scoring a finished trial from its folder ----------------------------------------------------


def load_trial_config(trial_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """The trial's composed config (`.hydra/config.yaml`), typed by the schema, with `key=value` overrides."""
    from sdsweep.config.schema import Config

    saved = OmegaConf.load(Path(trial_dir) / ".hydra" / "config.yaml")
    return OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(list(overrides or [])))


def rescore(trial_dir: Path, overrides: list[str] | None = None) -> dict:
    """Evaluate a finished trial again (e.g. with another CLIP model) and update its metrics.json."""
    from sdsweep.config.schema import validate
    from sdsweep.io import atomic_write_json

    trial_dir = Path(trial_dir)
    cfg = load_trial_config(trial_dir, overrides)
    validate(cfg)
    metrics = json.loads((trial_dir / "metrics.json").read_text())
    if metrics.get("status") != "finished":
        raise SystemExit(f"{trial_dir} did not finish training ({metrics.get('status')}): nothing to evaluate")
    result = evaluate_trial(cfg, trial_dir)
    metrics = {k: v for k, v in metrics.items() if not k.startswith(PREFIX) and k not in ("eval_error", "eval_images")}
    metrics.update(result)
    atomic_write_json(trial_dir / "metrics.json", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m sdsweep.evaluate TRIAL_DIR [key=value ...]\n"
              "  re-samples and re-scores a finished trial from its folder and updates its metrics.json,\n"
              "  e.g. eval.clip_model=ViT-B-32 eval.clip_pretrained=laion2b_s34b_b79k")
        return 0 if args else 2
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    metrics = rescore(Path(args[0]), args[1:])
    if "eval_error" in metrics:
        print(f"evaluation failed: {metrics['eval_error']}", file=sys.stderr)
        return 1
    for key, value in sorted(metrics.items()):
        if key.startswith(PREFIX):
            print(f"{key:28s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
