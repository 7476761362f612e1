"""Validation of a composed config: what the schema's types cannot say (ranges, enumerations,
combinations), one function per group, every problem collected and raised at once (ConfigError),
before anything is loaded. `warnings` lists options that this combination would ignore."""

from __future__ import annotations

import os
import re
from typing import Any

from omegaconf import DictConfig

from sdsweep.config.encoders import clip_choice, stand_in_problem
from sdsweep.config.schema import (
    ADAPTER_KINDS,
    CLIP_METRICS,
    COMPILE_MODES,
    CROPS,
    DEVICES,
    DTYPE_NAMES,
    EVAL_METRICS,
    FAMILIES,
    LORA_INITS,
    MIXED_PRECISIONS,
    OPTIMIZERS,
    QUANTIZATIONS,
    SCHEDULERS,
    SCORE_KEYS,
    TINY_CLIP,
    TINY_WEIGHTS,
    TOY_CLIP,
    TRACKING_MODES,
    WEIGHTING_SCHEMES,
    AdapterConfig,
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    TargetsConfig,
    TrainConfig,
)
from sdsweep.config.store import in_schema, schema_fields, schema_hint


def validate(cfg: DictConfig | Config) -> None:
    """Raise ConfigError listing every problem of `cfg` (each naming the key to change), or return."""
    p: list[str] = []
    for check in (_unknown_keys, _adapter, _targets, _text_encoder, _precision, _optimizer, _model, _data, _eval,
                  _train, _ema, _prior, _tracking, _sweep):
        check(p, cfg)
    _check_choice(p, "device", cfg.device, DEVICES)
    if p:
        raise ConfigError(p)


def _unknown_keys(p: list[str], cfg: Any, node: str = "") -> None:
    """Keys the schema does not define: `+adapter.rnak=4` composes (the + adds it), and nothing would read it."""
    if not isinstance(cfg, DictConfig):
        return
    for key in cfg.keys():
        full = f"{node}.{key}" if node else str(key)
        if full == "hydra":
            continue
        if not in_schema(full):
            hint = schema_hint(full)
            p.append(f"{full} is not a key of sdsweep's config, so nothing would read it (a typo, or added with +)"
                     + (f": {hint}" if hint else ""))
        elif schema_fields(full):  # a typed node: its keys are checked too (a dict node's entries are all keys)
            _unknown_keys(p, cfg[key], full)


def _check_choice(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}")


def _at_least(p: list[str], node: Any, prefix: str, keys: tuple[str, ...], low: int, hint: str = "") -> None:
    for key in keys:
        if getattr(node, key) < low:
            p.append(f"{prefix}.{key}={getattr(node, key)}: must be >= {low}{hint}")


def _adapter(p: list[str], cfg: Any) -> None:
    a = cfg.adapter
    _check_choice(p, "adapter.kind", a.kind, ADAPTER_KINDS)
    if a.rank < 1:
        p.append(f"adapter.rank={a.rank}: must be >= 1 (try 4, 8 or 16)")
    if a.alpha <= 0:
        p.append(f"adapter.alpha={a.alpha}: must be > 0 (usually equal to adapter.rank)")
    if not 0.0 <= a.dropout < 1.0:
        p.append(f"adapter.dropout={a.dropout}: must be in [0, 1)")
    if a.kind in ("lora", "dora"):
        _check_choice(p, "adapter.init", a.init, LORA_INITS)
    if a.kind == "textual_inversion":
        if a.num_vectors < 1:
            p.append(f"adapter.num_vectors={a.num_vectors}: must be >= 1 (1 to 8 is usual)")
        if not a.token.strip() or len(a.token.split()) != 1:
            p.append(f"adapter.token={a.token!r}: must be one word without spaces, e.g. '<my-style>'")
        if not a.initializer_token.strip() or len(a.initializer_token.split()) != 1:
            p.append(f"adapter.initializer_token={a.initializer_token!r}: must be one word, e.g. style")


def _targets(p: list[str], cfg: Any) -> None:
    t, family = cfg.targets, cfg.model.family
    if family == "sd3" and not t.transformer_patterns:
        p.append(f"targets={t.name} lists no transformer_patterns for model.family=sd3: "
                 "set targets.transformer_patterns")
    if family != "sd3" and not t.patterns:
        p.append(f"targets={t.name} lists no patterns: set targets.patterns")
    for pattern in list(t.patterns) + list(t.transformer_patterns) + list(cfg.text_encoder.patterns):
        try:
            re.compile(pattern)
        except re.error as e:
            p.append(f"target pattern {pattern!r} is not a valid regular expression: {e}")


def _text_encoder(p: list[str], cfg: Any) -> None:
    t = cfg.text_encoder
    if t.train and not t.patterns:
        p.append("text_encoder.train=true needs text_encoder.patterns")
    if t.lr is not None and t.lr <= 0:
        p.append(f"text_encoder.lr={t.lr}: must be > 0")


def _precision(p: list[str], cfg: Any) -> None:
    pr = cfg.precision
    _check_choice(p, "precision.mixed_precision", pr.mixed_precision, MIXED_PRECISIONS)
    _check_choice(p, "precision.base_dtype", pr.base_dtype, DTYPE_NAMES)
    _check_choice(p, "precision.vae_dtype", pr.vae_dtype, DTYPE_NAMES)
    _check_choice(p, "precision.quantize", pr.quantize, QUANTIZATIONS)


def _optimizer(p: list[str], cfg: Any) -> None:
    o = cfg.optimizer
    _check_choice(p, "optimizer.name", o.name, OPTIMIZERS)
    _check_choice(p, "optimizer.scheduler", o.scheduler, SCHEDULERS)
    if len(o.betas) != 2:
        p.append(f"optimizer.betas={list(o.betas)}: needs exactly two values")
    if o.warmup_steps < 0:
        p.append(f"optimizer.warmup_steps={o.warmup_steps}: must be >= 0")


def _model(p: list[str], cfg: Any) -> None:
    m = cfg.model
    _check_choice(p, "model.family", m.family, FAMILIES)
    if m.drop_t5 and m.family != "sd3":
        p.append(f"model.drop_t5=true applies to model.family=sd3 only (this is {m.family})")
    if m.t5_max_length < 1:
        p.append(f"model.t5_max_length={m.t5_max_length}: must be >= 1 (77 or 256)")
    _check_choice(p, "model.tiny_weights", m.tiny_weights, TINY_WEIGHTS)
    if m.build_tiny and m.tiny_weights == "toy" and m.family != "sdxl":
        p.append(f"model.tiny_weights=toy: only the tiny SDXL is trained on the toy world (model.family={m.family}); "
                 "use model=toy-sdxl, or model.tiny_weights=random for a random tiny model of this family")
    if not m.build_tiny and not m.pretrained:
        p.append(f"model={m.name} names no weights: set model.pretrained=HUB_ID_OR_FOLDER")


def _data(p: list[str], cfg: Any) -> None:
    d = cfg.data
    if d.resolution < 8 or d.resolution % 8:
        p.append(f"data.resolution={d.resolution}: must be a positive multiple of 8 (e.g. 512 or 1024)")
    _check_choice(p, "data.crop", d.crop, CROPS)
    if d.path and d.dataset:
        p.append(f"data.path={d.path} and data.dataset={d.dataset} are both set: keep one of them")
    if d.buckets:
        if d.bucket_step < 8 or d.bucket_step % 8 or d.bucket_step > d.resolution:
            p.append(f"data.bucket_step={d.bucket_step}: must be a multiple of 8 no larger than data.resolution")
        if d.max_aspect < 1.0:
            p.append(f"data.max_aspect={d.max_aspect}: must be >= 1 (2.0 allows 2:1 and 1:2 buckets)")
    if not 0.0 <= d.caption_dropout <= 1.0:
        p.append(f"data.caption_dropout={d.caption_dropout}: must be in [0, 1]")
    if d.num_workers < 0:
        p.append(f"data.num_workers={d.num_workers}: must be >= 0")


def _train(p: list[str], cfg: Any) -> None:
    tr = cfg.train
    if cfg.model.family == "sd3" and tr.snr_gamma:
        p.append("train.snr_gamma is min-SNR weighting for DDPM models; sd3 trains with flow matching: "
                 "set train.snr_gamma=null and choose train.weighting_scheme")
    _check_choice(p, "train.weighting_scheme", tr.weighting_scheme, WEIGHTING_SCHEMES)
    _at_least(p, tr, "train", ("max_steps", "batch_size", "grad_accum", "log_every"), 1)
    if tr.lr <= 0:
        p.append(f"train.lr={tr.lr}: must be > 0 (1e-4 for AdamW, 1.0 for Prodigy)")
    if tr.noise_offset < 0:
        p.append(f"train.noise_offset={tr.noise_offset}: must be >= 0 (0.05 to 0.1 is usual)")
    if tr.snr_gamma is not None and tr.snr_gamma <= 0:
        p.append(f"train.snr_gamma={tr.snr_gamma}: must be > 0 (5.0 is usual) or null")
    if tr.max_grad_norm < 0:
        p.append(f"train.max_grad_norm={tr.max_grad_norm}: must be >= 0 (0 disables clipping)")
    if tr.checkpoint_every < 0:
        p.append(f"train.checkpoint_every={tr.checkpoint_every}: must be >= 0 (0: never)")
    _check_choice(p, "train.nan_policy", tr.nan_policy, ("stop", "skip"))
    _at_least(p, tr, "train", ("max_nan_skips",), 0)
    _at_least(p, tr, "train", ("checkpoints_keep",), 1)
    if tr.compile:
        _compile(p, tr)


def _compile(p: list[str], tr: Any) -> None:
    import torch._dynamo

    _check_choice(p, "train.compile_mode", tr.compile_mode, COMPILE_MODES)
    if tr.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):  # debugging ones too
        p.append(f"train.compile_backend={tr.compile_backend!r} is not a torch.compile backend here "
                 f"(one of {', '.join(torch._dynamo.list_backends())}, or eager / aot_eager to debug)")


def _prior(p: list[str], cfg: Any) -> None:
    """DreamBooth prior preservation (data.num_class_images, data.class_prompt, train.prior_loss_weight)."""
    d = cfg.data
    if d.num_class_images < 0:
        p.append(f"data.num_class_images={d.num_class_images}: must be >= 0 (0 turns prior preservation off)")
    if cfg.train.prior_loss_weight < 0:
        p.append(f"train.prior_loss_weight={cfg.train.prior_loss_weight}: must be >= 0 (1.0 is diffusers' default)")
    if d.num_class_images <= 0:
        return
    if not (d.class_prompt or "").strip():
        p.append(f"data.num_class_images={d.num_class_images} needs data.class_prompt: the prompt the base model "
                 "draws the class images with, e.g. data.class_prompt='a photo of a dog'")
    if d.class_data_dir and not os.path.isdir(os.path.expanduser(d.class_data_dir)):
        p.append(f"data.class_data_dir={d.class_data_dir}: no such folder (your own class images; null: all drawn)")
    if d.class_steps < 1:
        p.append(f"data.class_steps={d.class_steps}: must be >= 1 (denoising steps of each class image)")
    if d.class_guidance_scale < 0:
        p.append(f"data.class_guidance_scale={d.class_guidance_scale}: must be >= 0")
    if d.buckets:
        p.append("data.num_class_images with data.buckets=true: a batch joins instance and square class images "
                 "in one tensor, so both must share a shape: set data.buckets=false or data.num_class_images=0")


def _tracking(p: list[str], cfg: Any) -> None:
    tk = cfg.tracking
    _check_choice(p, "tracking.mode", tk.mode, TRACKING_MODES)
    if not 0.0 <= tk.smoothing < 1.0:
        p.append(f"tracking.smoothing={tk.smoothing}: must be in [0, 1)")
    _at_least(p, tk, "tracking", ("warmup_steps", "validation_every", "profile_wait", "profile_warmup"), 0)
    _at_least(p, tk, "tracking", ("profile_active",), 1)


def _ema(p: list[str], cfg: Any) -> None:
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        p.append(f"train.ema_decay={cfg.train.ema_decay}: must be in [0, 1) (0 turns the average off; 0.999 is usual)")


def _sweep(p: list[str], cfg: Any) -> None:
    budget = cfg.sweep.vram_budget_gb
    if budget is not None and budget < 0:
        p.append(f"sweep.vram_budget_gb={budget}: must be >= 0 (GiB of GPU memory; 0 or null: no budget)")
    _check_choice(p, "sweep.estimate", cfg.sweep.estimate, ("auto", "always", "never"))
    es = cfg.sweep.early_stop
    if es.enabled and (not es.at or any(not 0.0 < f < 1.0 for f in es.at)):
        p.append(f"sweep.early_stop.at={list(es.at)}: give fractions of train.max_steps in (0, 1), e.g. [0.5]")
    if es.min_trials < 1 or es.window < 1 or es.margin < 0:
        p.append(f"sweep.early_stop: min_trials={es.min_trials} and window={es.window} must be >= 1, "
                 f"margin={es.margin} >= 0")


def _eval(p: list[str], cfg: Any) -> None:
    e = cfg.eval
    # eval.resolution follows data.resolution unless set: one mistake, one message
    if e.resolution != cfg.data.resolution and (e.resolution < 8 or e.resolution % 8):
        p.append(f"eval.resolution={e.resolution}: must be a positive multiple of 8")
    if e.steps < 1:
        p.append(f"eval.steps={e.steps}: must be >= 1")
    if e.caption_prompts < 0:
        p.append(f"eval.caption_prompts={e.caption_prompts}: must be >= 0 (training captions added as prompts)")
    if e.batch_size is not None and e.batch_size < 1:
        p.append(f"eval.batch_size={e.batch_size}: must be >= 1, or null (every cell at once for a model built "
                 "in code, 1 for a real model)")
    if not e.enabled:
        return
    if e.prompts_file:
        if not os.path.isfile(os.path.expanduser(e.prompts_file)):
            p.append(f"eval.prompts_file={e.prompts_file}: no such file (one prompt per line)")
    elif not e.prompts and not e.caption_prompts:
        p.append("eval.prompts is empty: list prompts, set eval.prompts_file or eval.caption_prompts, or "
                 "eval.enabled=false")
    if not e.seeds:
        p.append("eval.seeds is empty: give at least one seed, e.g. eval.seeds=[0]")
    if e.guidance_scale < 0:
        p.append(f"eval.guidance_scale={e.guidance_scale}: must be >= 0 (<= 1 disables classifier-free guidance)")
    for m in e.metrics:
        _check_choice(p, "eval.metrics entry", m, EVAL_METRICS)
    if e.max_reference_images < 2:
        p.append(f"eval.max_reference_images={e.max_reference_images}: must be >= 2 (KID needs two)")
    if e.kid_subsets < 1:
        p.append(f"eval.kid_subsets={e.kid_subsets}: must be >= 1")
    for key, weight in e.score_weights.items():
        _check_choice(p, "eval.score_weights key", key, SCORE_KEYS)
        if weight is None or weight < 0:
            p.append(f"eval.score_weights.{key}={weight}: must be >= 0 (0 leaves it out of the composite)")
    if not any(w for w in e.score_weights.values()):
        p.append("eval.score_weights are all 0: give at least one metric a positive weight")
    if any(m in CLIP_METRICS for m in e.metrics):
        _clip(p, *clip_choice(cfg))
        if (problem := stand_in_problem(cfg)) is not None:
            p.append(problem)


def _clip(p: list[str], model: str, pretrained: str | None) -> None:
    """Names only (no download here): a typo fails before training, not after it."""
    if model in (TINY_CLIP, TOY_CLIP):
        if pretrained:
            p.append(f"eval.clip_model={model} has its own weights: set eval.clip_pretrained=null, or pick "
                     f"a real model for eval.clip_pretrained={pretrained} (e.g. eval.clip_model=ViT-L-14)")
        return
    if model.startswith(("hf-hub:", "local-dir:")):
        return
    if not pretrained:
        p.append(f"eval.clip_model={model} needs eval.clip_pretrained (e.g. openai), or use eval.clip_model=tiny "
                 "for the random offline stand-in")
        return
    import open_clip

    if model not in open_clip.list_models():
        p.append(f"eval.clip_model={model} is not an open_clip model: pick one of open_clip.list_models(), "
                 "e.g. ViT-L-14 or ViT-B-32")
    elif not os.path.isfile(os.path.expanduser(pretrained)) and pretrained not in (
        open_clip.list_pretrained_tags_by_model(model)
    ):
        tags = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "none"
        p.append(f"eval.clip_pretrained={pretrained} is neither a file nor a tag of {model} (its tags: {tags})")


# --- options this combination would ignore ----------------------------------------------------------

FULL_IGNORED_ADAPTER_KEYS = ("rank", "alpha", "dropout", "init")
FLOW_MATCHING_KEYS = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "precondition_outputs")


def warnings(cfg: DictConfig | Config) -> list[str]:
    """Options set away from their defaults that do nothing in this combination, each naming its key.

    Warned about, not refused: across a matrix an option often matters in some cells only
    (optimizer.d_coef=2 in a sweep over optimizer=adamw,prodigy)."""
    w: list[str] = []
    o, a, m, tr, d = cfg.optimizer, cfg.adapter, cfg.model, cfg.train, cfg.data
    if o.name != "prodigy" and o.d_coef != OptimizerConfig.d_coef:
        w.append(f"optimizer.d_coef={o.d_coef} is Prodigy's and does nothing with optimizer={o.name}")
    if o.scheduler == "constant" and o.warmup_steps > 0:
        w.append(f"optimizer.warmup_steps={o.warmup_steps} does nothing with optimizer.scheduler=constant "
                 "(diffusers drops it): use optimizer.scheduler=constant_with_warmup")
    if a.kind in ("loha", "lokr") and a.init != AdapterConfig.init:
        w.append(f"adapter.init={a.init} does nothing with adapter={a.kind}, which always starts as a zero update")
    why = {"full": "no adapter: every denoiser weight trains",
           "textual_inversion": "only new token embeddings train"}.get(a.kind)
    if why:
        w += [f"adapter.{k}={a[k]} does nothing with adapter={a.kind} ({why})"
              for k in FULL_IGNORED_ADAPTER_KEYS if a[k] != getattr(AdapterConfig, k)]
        if cfg.targets.name != TargetsConfig.name:
            w.append(f"targets={cfg.targets.name} does nothing with adapter={a.kind} ({why})")
    if a.kind != "textual_inversion":
        w += [f"adapter.{k}={a[k]} is textual inversion's and does nothing with adapter={a.kind}"
              for k in ("token", "num_vectors", "initializer_token") if a[k] != getattr(AdapterConfig, k)]
    if m.family != "sd3":
        changed = [k for k in FLOW_MATCHING_KEYS if tr[k] != getattr(TrainConfig, k)]
        w += [f"train.{k}={tr[k]} is for sd3's flow matching and does nothing with model.family={m.family}"
              for k in changed]
    if m.t5_max_length != ModelConfig.t5_max_length and (m.family != "sd3" or m.drop_t5):
        why = f"model.family={m.family} has no T5 encoder" if m.family != "sd3" else "model.drop_t5=true"
        w.append(f"model.t5_max_length={m.t5_max_length} does nothing: {why}")
    if cfg.text_encoder.lr is not None and not cfg.text_encoder.train:
        w.append(f"text_encoder.lr={cfg.text_encoder.lr} does nothing with text_encoder={cfg.text_encoder.name} "
                 "(the text encoders are frozen)")
    if not d.buckets:
        w += [f"data.{k}={d[k]} does nothing without data.buckets=true"
              for k in ("bucket_step", "max_aspect") if d[k] != getattr(DataConfig, k)]
    if d.num_class_images == 0:
        w += [f"data.{k}={d[k]!r} is ignored with data.num_class_images=0 (no prior preservation)"
              for k in PRIOR_KEYS if d[k] != getattr(DataConfig, k)]
        if tr.prior_loss_weight != TrainConfig.prior_loss_weight:
            w.append(f"train.prior_loss_weight={tr.prior_loss_weight} is ignored with data.num_class_images=0 "
                     "(no prior preservation)")
    return w


PRIOR_KEYS = ("class_prompt", "class_data_dir")
"""Set by a user for prior preservation alone (data.class_steps / class_guidance_scale are a model's defaults too)."""
