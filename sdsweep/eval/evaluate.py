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
 5. the scorer (scorer.py, metrics.py) scores them: flat `eval/...` keys, merged into metrics.json by the caller.

A failed evaluation never loses the training result: it returns `eval_error` (the trial stays
`finished`, unranked on the leaderboard) and `python -m sdsweep.eval TRIAL_DIR [key=value ...]`
re-scores a finished trial from its folder alone (saved adapter + .hydra/config.yaml).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sdsweep.config.identity import evaluation_fingerprint
from sdsweep.config.schema import Config
from sdsweep.config.validate import validate
from sdsweep.eval.base import base_samples_key, ensure_base
from sdsweep.eval.sampling import (
    build_pipeline,
    generate,
    image_name,
    load_saved_adapter,
    pipeline_denoiser,
    sampling_batch,
)
from sdsweep.eval.scorer import PREFIX, Scorer
from sdsweep.io import atomic_dir, atomic_write_json
from sdsweep.layout import TrialDir
from sdsweep.model import load as models
from sdsweep.model import textual_inversion
from sdsweep.model.adapters import FULL
from sdsweep.model.precision import autocast_dtype_of

log = logging.getLogger(__name__)



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
    trial = TrialDir(trial_dir)
    if components is None:
        components = models.load_components(cfg.model, cfg.precision)
        models.place(components, cfg.precision, models.resolve_device(cfg.device))
    elif cfg.adapter.kind == FULL:
        # the trial trained this denoiser itself (it is saved): the base model's images need the base's
        # weights, and the trial's are read back from its folder below like any adapter
        device = next(components.denoiser.parameters()).device
        components.denoiser = None
        components.denoiser = models.load_base_denoiser(cfg.model, cfg.precision, device)
    pipe = build_pipeline(components)
    device = pipeline_denoiser(pipe).device
    autocast_dtype = autocast_dtype_of(cfg.precision)
    scorer = Scorer(cfg, device)  # before sampling: a CLIP model that cannot load fails in seconds
    pipe.unload_lora_weights()  # the trained layers out: this is the base model now
    inverted = cfg.adapter.kind == textual_inversion.KIND
    if inverted:
        textual_inversion.remove(pipe, cfg.adapter)  # and the trained tokens
    key, info = base_samples_key(cfg, components.source, device, scorer.source.identity, scorer.prompts)
    clock = time.perf_counter()
    base = ensure_base(cfg, pipe, trial.base(key), info, scorer, autocast_dtype)
    base_s, clock = time.perf_counter() - clock, time.perf_counter()
    load_saved_adapter(pipe, trial.adapter, cfg.adapter.kind)
    if inverted:
        samples = _generate_with_token(pipe, scorer.prompts, cfg, autocast_dtype)
    else:
        samples = generate(pipe, scorer.prompts, list(cfg.eval.seeds), cfg.eval, autocast_dtype, sampling_batch(cfg))
    with atomic_dir(trial.samples) as tmp:
        for s in samples:
            s.image.save(tmp / s.file)
    sample_s, clock = time.perf_counter() - clock, time.perf_counter()
    by_cell = {(b.prompt, b.seed): b for b in base}
    scores, rows = scorer.score(samples, [by_cell[(s.prompt, s.seed)] for s in samples])
    timings = {"eval_base_s": base_s, "sample_s": sample_s, "score_s": time.perf_counter() - clock}
    return {**scores, f"{PREFIX}base_key": key, "eval_images": rows, **timings}


def _generate_with_token(pipe, prompts: list[str], cfg: DictConfig, autocast_dtype) -> list:
    """Textual inversion: every prompt asks for the learned word (the pipeline expands it to all its vectors);
    each sample keeps its prompt's own text and file name, so it is scored and paired with the base's
    image of the same prompt and seed as any other trial's."""
    asked = [textual_inversion.with_token(p, cfg.adapter.token) for p in prompts]
    samples = generate(pipe, asked, list(cfg.eval.seeds), cfg.eval, autocast_dtype, sampling_batch(cfg))
    per_prompt = len(cfg.eval.seeds)  # generate draws every seed of the first prompt, then of the next
    for k, s in enumerate(samples):
        i = k // per_prompt
        s.prompt, s.file = prompts[i], image_name(i, prompts[i], s.seed)
    return samples


# --- re-scoring a finished trial from its folder ----------------------------------------------------


def load_trial_config(trial_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """The trial's composed config (`.hydra/config.yaml`), typed by the schema, with `key=value` overrides."""
    saved = OmegaConf.load(TrialDir(trial_dir).config)
    return OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(list(overrides or [])))


def rescore(trial_dir: Path, overrides: list[str] | None = None) -> dict:
    """Evaluate a finished trial again (e.g. with another CLIP model) and update its metrics.json."""
    trial = TrialDir(trial_dir)
    cfg = load_trial_config(trial.path, overrides)
    validate(cfg)
    metrics = json.loads(trial.metrics.read_text())
    if metrics.get("status") != "finished":
        raise SystemExit(f"{trial_dir} did not finish training ({metrics.get('status')}): nothing to evaluate")
    metrics = with_scores(metrics, evaluate_trial(cfg, trial.path), cfg)
    atomic_write_json(trial.metrics, metrics)
    return metrics


def with_scores(metrics: dict, result: dict, cfg: DictConfig) -> dict:
    """`metrics` with its previous scores replaced by `result`, and the evaluation settings they came from."""
    kept = {k: v for k, v in metrics.items() if not k.startswith(PREFIX) and k not in ("eval_error", "eval_images")}
    return {**kept, **result, "eval_fingerprint": evaluation_fingerprint(cfg)}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print("usage: python -m sdsweep.eval TRIAL_DIR [key=value ...]\n"
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
