"""Setting up one trial's training: data, the base model, the feature cache, adapters, optimizer.

`setup` reads as a table of contents; each `_setup_*` step is one stage of it. trial.py runs a
trial around this (metrics.json, failures, evaluation); this module raises on failure.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from datetime import timedelta

import torch
from omegaconf import DictConfig

from sdsweep.data import cache
from sdsweep.data import class_images as prior
from sdsweep.data.dataset import CaptionedImages, load_dataset
from sdsweep.data.folder import count_long_captions
from sdsweep.model import adapters, kept_base, textual_inversion
from sdsweep.model import load as models
from sdsweep.model.precision import autocast_dtype_of
from sdsweep.train.meters import MemoryMeter

log = logging.getLogger(__name__)


@dataclass
class Setup:
    components: models.Components
    device: torch.device
    dataset: CaptionedImages
    data_report: dict
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    accelerator: object
    autocast_dtype: torch.dtype | None
    memory: MemoryMeter
    timings: dict
    """Seconds spent reading data, loading the base (0 when kept from the last trial), filling the cache."""
    offloaded: list[str]
    """Frozen modules parked in CPU memory while training (see offload_cached_encoders)."""
    ema: object | None = None
    """diffusers' EMAModel of `trainable` (train.ema_decay), or None."""
    class_dataset: CaptionedImages | None = None
    """The class images of prior preservation (data.num_class_images), or None."""
    after_step: list = field(default_factory=list)
    """Called after every optimizer step (textual inversion puts the embedding's frozen rows back)."""


def setup(cfg: DictConfig, trial_number: int = 0, memory: MemoryMeter | None = None) -> Setup:
    """Everything the loop needs. `memory`: the caller's meter, started before set-up so that its
    peak covers loading too (a fresh one when None)."""
    device = models.resolve_device(cfg.device, trial_number)
    accelerator = _setup_accelerator(device)
    timings: dict = {}
    autocast_dtype = autocast_dtype_of(cfg.precision)
    # the main process builds tiny models, data and cache entries first; the others then read them
    with accelerator.main_process_first():
        dataset, data_report, components, class_dataset = _setup_data_and_base(cfg, device, autocast_dtype, timings)
    offloaded = offload_cached_encoders(cfg, components, data_report["cache"], device)
    trained_encoders = _attach_adapters(cfg, components)
    after_step = [lambda: textual_inversion.restore_frozen_rows(trained_encoders)] if _inverts(cfg) else []
    trainable = {f"{name}.{pname}": p for name, module in components.modules().items()
                 for pname, p in module.named_parameters() if p.requires_grad}
    optimizer, scheduler = _setup_optimizer(cfg, components, trained_encoders, device)
    # Mixed precision is autocast + GradScaler from torch.amp rather than accelerate's, because
    # accelerate silently turns fp16 off on a CPU, and precision=fp16 must mean fp16 everywhere.
    # accelerate still owns device placement, multi-GPU (DDP) and gradient-accumulation syncs.
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision.mixed_precision == "fp16")
    if cfg.train.compile:
        components.denoiser = compiled(components.denoiser, cfg.train)
    components.denoiser, optimizer = accelerator.prepare(components.denoiser, optimizer)
    return Setup(components, device, dataset, data_report, trainable, optimizer, scheduler, scaler, accelerator,
                 autocast_dtype, memory or MemoryMeter(device), timings, offloaded, _setup_ema(cfg, trainable),
                 class_dataset, after_step)


def _inverts(cfg: DictConfig) -> bool:
    return cfg.adapter.kind == textual_inversion.KIND


def _setup_ema(cfg: DictConfig, trainable: dict[str, torch.nn.Parameter]):
    """diffusers' EMAModel over the trainable (adapter) weights, on the CPU with train.ema_on_cpu; None when off."""
    if not cfg.train.ema_decay:
        return None
    from diffusers.training_utils import EMAModel

    ema = EMAModel(list(trainable.values()), decay=cfg.train.ema_decay)
    if cfg.train.ema_on_cpu:
        ema.to("cpu")
    return ema


def _setup_accelerator(device: torch.device):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if device.type == "cuda" and device.index is not None:
        # accelerate places models on the *current* CUDA device: make it this trial's GPU
        torch.cuda.set_device(device)
    # under `accelerate launch` / torchrun this joins the other processes of the trial (DDP). They
    # wait for the main one while it downloads the base, fills the cache, or samples validation
    # images: far longer than the default collective timeout (10 min with nccl)
    return Accelerator(cpu=device.type == "cpu", kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))])


def _setup_data_and_base(cfg: DictConfig, device: torch.device, autocast_dtype: torch.dtype | None,
                         timings: dict) -> tuple[CaptionedImages, dict, models.Components, CaptionedImages | None]:
    """The data set, the base model (kept from the last trial or loaded), the filled feature cache, and
    the class images of prior preservation (None without)."""
    clock = time.perf_counter()
    torch.manual_seed(cfg.seed)
    # data first: a folder without captions should fail in a second, not after loading SDXL
    dataset, report = load_dataset(cfg.data, cfg.model.cache_dir)
    if _inverts(cfg):  # the new word must be in what the encoders read (its text is encoded live, never cached)
        dataset.records = [replace(r, caption=textual_inversion.expanded(r.caption, cfg.adapter))
                           for r in dataset.records]  # copies: the records may be shared with the next trial
    timings["data_s"], clock = time.perf_counter() - clock, time.perf_counter()
    components, timings["base_reused"] = kept_base.acquire(cfg, device)
    timings["load_s"], clock = time.perf_counter() - clock, time.perf_counter()
    report.truncated_captions = count_long_captions(dataset.records, components.tokenizers)
    data_report = report.summary()
    class_dataset = None
    if prior.prior_on(cfg):  # drawn by the base model as loaded: before any adapter, before the denoiser is parked
        class_dataset, data_report["class_images"] = _setup_class_images(cfg, components, autocast_dtype)
        timings["class_images_s"], clock = time.perf_counter() - clock, time.perf_counter()
    # before any adapter is attached: the cache keys hash the frozen modules as loaded. The encoders
    # fill it with the denoiser parked in CPU memory: at 1024 px the fp32 VAE's activations would
    # otherwise sit on top of SDXL's UNet (bitsandbytes layers stay where they are)
    park = cfg.cache.enabled and device.type == "cuda" and cfg.precision.quantize == "none"
    if park:
        components.denoiser.to("cpu")
    data_report["cache"] = cache.prepare(cfg, components, dataset, device, autocast_dtype)
    if class_dataset is not None:
        data_report["class_cache"] = cache.prepare(cfg, components, class_dataset, device, autocast_dtype)
        _same_latent_source(dataset, class_dataset, data_report)
    if park:
        components.denoiser.to(device)
    timings["cache_s"] = time.perf_counter() - clock
    return dataset, data_report, components, class_dataset


def _setup_class_images(cfg: DictConfig, components: models.Components,
                        autocast_dtype: torch.dtype | None) -> tuple[CaptionedImages, dict]:
    """data.num_class_images class images (data.class_data_dir's, the rest drawn by the base model once and
    cached for every trial) as a training set of their own, captioned data.class_prompt."""
    from omegaconf import OmegaConf

    from sdsweep.config.encoders import built_in

    # the evaluation stage's sampler, used as a library: a pipeline over these very modules, no copy
    from sdsweep.eval.sampling import build_pipeline, generate

    d = cfg.data
    sampler = OmegaConf.create({"steps": d.class_steps, "guidance_scale": d.class_guidance_scale,
                                "resolution": d.resolution, "vae_tiling": False})

    def draw(prompt: str, seeds: list[int]):
        return [sample.image for sample in generate(build_pipeline(components), [prompt], seeds, sampler,
                                                    autocast_dtype, len(seeds))]

    # a model built in code draws a few images per call in a blink; a real one draws one at a time
    namespace = prior.class_namespace(cfg, components, autocast_dtype)
    report = prior.ensure_class_images(cfg, namespace, draw, batch_size=8 if built_in(cfg.model) else 1)
    return CaptionedImages(report.records, d), report.summary()


def _same_latent_source(dataset: CaptionedImages, class_dataset: CaptionedImages, data_report: dict) -> None:
    """A batch concatenates instance and class latents: both cached, or both encoded live each step."""
    if (dataset.latents is None) == (class_dataset.latents is None):
        return
    dataset.latents = class_dataset.latents = None
    why = "live (the instance or the class images have no single crop to cache: both are encoded each step)"
    for key in ("cache", "class_cache"):
        if isinstance(data_report[key]["latents"], dict):
            data_report[key]["latents"] = why


def _attach_adapters(cfg: DictConfig, components: models.Components) -> list[torch.nn.Module]:
    """Adapters on the denoiser (and the text encoders with text_encoder=lora); returns the trained encoders."""
    # adapter initialisation depends on the seed alone, not on what set-up drew before it
    # (filling the cache or not must not change the trial)
    torch.manual_seed(cfg.seed)
    if _inverts(cfg):  # new embeddings in the CLIP encoders; no adapter anywhere
        n = len(components.trainable_text_encoders)
        trained = textual_inversion.attach(components.tokenizers[:n], components.trainable_text_encoders, cfg.adapter)
        for te in trained:
            te.train()
        if cfg.train.gradient_checkpointing:
            models.set_checkpointing(components.denoiser, True)
        return trained
    name = "transformer" if components.family == "sd3" else "unet"
    adapters.attach(components.denoiser, cfg.adapter, adapters.denoiser_patterns(cfg.targets, components.family), name)
    trained_encoders = components.trainable_text_encoders if cfg.text_encoder.train else []
    for i, te in enumerate(trained_encoders):
        adapters.attach(te, cfg.adapter, list(cfg.text_encoder.patterns), f"text encoder {i + 1}")
        te.train()  # adapter dropout acts only in training mode (the frozen CLIP has no dropout of its own)
    if cfg.train.gradient_checkpointing:
        for module in [components.denoiser, *trained_encoders]:
            models.set_checkpointing(module, True)
    components.denoiser.train()
    return trained_encoders


def _setup_optimizer(cfg: DictConfig, components: models.Components, trained_encoders: list[torch.nn.Module],
                     device: torch.device):
    from diffusers.optimization import get_scheduler

    te_lr = cfg.text_encoder.lr or cfg.train.lr
    if trained_encoders and cfg.optimizer.name == "prodigy" and te_lr != cfg.train.lr:
        # Prodigy estimates one step size for all groups and refuses different lrs (as diffusers'
        # scripts do, the text encoders then use train.lr, which is Prodigy's multiplier)
        log.warning("optimizer=prodigy: text_encoder.lr=%s is ignored; the text encoders use train.lr=%s",
                    te_lr, cfg.train.lr)
        te_lr = cfg.train.lr
    groups = [{"params": adapters.trainable_parameters(components.denoiser), "lr": cfg.train.lr}]
    if trained_encoders:
        # textual inversion's embeddings are the trial's whole adapter: they train at train.lr
        groups.append({"params": [p for te in trained_encoders for p in adapters.trainable_parameters(te)],
                       "lr": cfg.train.lr if _inverts(cfg) else te_lr})
    groups = [g for g in groups if g["params"]]  # textual inversion: nothing trains in the denoiser
    optimizer = build_optimizer(cfg, groups, device)
    scheduler = get_scheduler(cfg.optimizer.scheduler, optimizer, num_warmup_steps=cfg.optimizer.warmup_steps,
                              num_training_steps=cfg.train.max_steps)
    return optimizer, scheduler


def build_optimizer(cfg: DictConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optimizer
    common = dict(weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    if o.name == "adamw":
        # the fused kernel: one launch for all parameters on CUDA, one loop in C++ on a CPU instead of several
        # tensor ops per parameter in Python (480 LoRA tensors of the toy model: 6 ms a step instead of 33)
        return torch.optim.AdamW(groups, fused=device.type in ("cuda", "cpu"), **common)
    if o.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **common)
    from prodigyopt import Prodigy

    return Prodigy(groups, d_coef=o.d_coef, safeguard_warmup=o.warmup_steps > 0, use_bias_correction=True, **common)


def compiled(module: torch.nn.Module, train_cfg: DictConfig) -> torch.nn.Module:
    """`module` behind torch.compile (train.compile_backend, train.compile_mode). A wrapper, not
    Module.compile(): the module itself stays plain for saving, evaluation and the next trial, and
    denoiser() takes the wrapper off with the others."""
    mode = None if train_cfg.compile_mode == "default" else train_cfg.compile_mode
    return torch.compile(module, backend=train_cfg.compile_backend, mode=mode)


def denoiser(s: Setup) -> torch.nn.Module:
    """The trial's UNet / SD3 transformer itself, out of what training wraps it in (DDP, torch.compile)."""
    return s.accelerator.unwrap_model(s.components.denoiser, keep_torch_compile=False)


def offload_cached_encoders(cfg: DictConfig, components: models.Components, cache_report: dict,
                            device: torch.device) -> list[str]:
    """The frozen modules a training step never calls (their outputs all come from the cache): they
    wait in CPU memory until evaluation, so the GPU holds the denoiser and the adapter alone
    during training. Returns their names (also on a CPU, where nothing moves)."""
    if cfg.tracking.validation_every:
        return []  # validation samples during training: everything stays where sampling needs it
    names = []
    if isinstance(cache_report.get("latents"), dict):
        names.append("vae")
    if isinstance(cache_report.get("text"), dict):
        names += [n for n in components.modules() if n.startswith("text_encoder")]
    if device.type == "cuda":
        for name in names:
            components.modules()[name].to("cpu")
    return names


def restore_offloaded(s: Setup) -> None:
    """Back to the training device: for evaluation, and for the next trial that keeps the base."""
    modules = s.components.modules()
    for name in s.offloaded:
        modules[name].to(s.device)
    s.offloaded = []
