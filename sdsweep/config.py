"""The configuration schema: dataclasses registered in Hydra's ConfigStore.

`conf/config.yaml` starts its defaults list with `sdsweep_schema`, so every YAML option of
every group is merged into these typed nodes: a misspelt key or a value of the wrong type
fails at composition, with Hydra's own message, before anything is loaded. What a type
cannot say (ranges, enumerations, combinations) is checked by `validate`, which collects
every problem and raises once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

GROUPS = ("adapter", "targets", "text_encoder", "precision", "optimizer", "model", "data", "eval")
ABLATION_AXES = ("adapter", "targets", "text_encoder", "precision", "optimizer")

ADAPTER_KINDS = ("lora", "dora", "loha", "lokr")
LORA_INITS = ("gaussian", "kaiming")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DTYPES = ("fp32", "fp16", "bf16")
QUANTIZATIONS = ("none", "int8", "nf4")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
FAMILIES = ("sdxl", "sd15", "sd3")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
CROPS = ("center", "random")
TRACKING_MODES = ("online", "offline", "disabled")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class AdapterConfig:
    kind: str = "lora"
    """lora | dora (peft use_dora) | loha | lokr."""
    rank: int = 8
    """Adapter rank r: capacity, size and memory all grow with it."""
    alpha: float = 8.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter path (LoRA dropout; module dropout for LoHa/LoKr)."""
    init: str = "gaussian"
    """lora/dora: peft init_lora_weights (gaussian, kaiming); loha/lokr always start at zero."""


@dataclass
class TargetsConfig:
    name: str = "attn"
    patterns: list[str] = field(default_factory=list)
    """Regular expressions, each full-matched against the UNet's module names (sd15, sdxl)."""
    transformer_patterns: list[str] = field(default_factory=list)
    """The same choice for an MMDiT transformer (sd3), which has joint attention (attn.to_*
    for the image stream, attn.add_*_proj / to_add_out for the text stream) instead of attn1/attn2."""


@dataclass
class TextEncoderConfig:
    name: str = "frozen"
    train: bool = False
    """Attach adapters to every text encoder and train them."""
    lr: float | None = None
    """Learning rate of the text-encoder adapters; null means train.lr."""
    patterns: list[str] = field(default_factory=list)
    """Module-name regexes inside each text encoder."""


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    mixed_precision: str = "no"
    """Autocast dtype of the forward pass: no | fp16 (with loss scaling) | bf16."""
    base_dtype: str = "fp32"
    """Storage dtype of the frozen UNet and text encoders. Adapter weights stay fp32."""
    vae_dtype: str = "fp32"
    """The SDXL VAE overflows in fp16 (NaN latents): keep fp32 and cast its latents."""
    quantize: str = "none"
    """none | int8 | nf4: bitsandbytes-quantized frozen UNet weights (CUDA only)."""


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    weight_decay: float = 1e-2
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "constant_with_warmup"
    """A diffusers.optimization.get_scheduler name."""
    warmup_steps: int = 0
    d_coef: float = 1.0
    """Prodigy only: multiplier of its estimated step size."""


@dataclass
class ModelConfig:
    name: str = "tiny-sdxl"
    family: str = "sdxl"
    """sdxl | sd15 | sd3: the architecture, its conditioning and its training objective."""
    pretrained: str | None = None
    """Hub id, local diffusers folder, or a single-file .safetensors/.ckpt checkpoint (loaded with
    diffusers' from_single_file). null with build_tiny: the tiny model built in code."""
    build_tiny: bool = False
    """Build a tiny random-weight model of `family` in code (saved, then loaded like any other)."""
    revision: str | None = None
    variant: str | None = None
    vae: str | None = None
    """Optional separate VAE (hub id or folder), e.g. madebyollin/sdxl-vae-fp16-fix."""
    single_file_config: str | None = None
    """With a single-file model.pretrained: a diffusers folder or hub id of the same architecture
    whose configs and tokenizers to use. null: diffusers picks the usual hub repository (needs
    the network or the Hugging Face cache)."""
    drop_t5: bool = False
    """sd3: do not load the T5-XXL encoder (~9 GB in half precision); its tokens are zeros, as in
    StableDiffusion3Pipeline(text_encoder_3=None)."""
    t5_max_length: int = 77
    """sd3: T5 tokens per caption (diffusers' SD3 LoRA script uses 77, the pipeline 256)."""
    cache_dir: str = "~/.cache/sdsweep"
    """Where tiny models and the built-in data set are written."""


@dataclass
class DataConfig:
    name: str = "builtin"
    path: str | None = None
    """Image folder with metadata.jsonl, metadata.csv or .txt captions; null (and no
    data.dataset) means the built-in set."""
    dataset: str | None = None
    """A Hugging Face dataset: a hub name (e.g. lambdalabs/naruto-blip-captions) or a folder
    written by `Dataset.save_to_disk`. Needs the `datasets` package (pip install 'sdsweep[hf]')."""
    split: str = "train"
    """Split of data.dataset to train on."""
    image_column: str = "image"
    """Image column of data.dataset."""
    caption_column: str = "text"
    """Caption column of data.dataset, and of a folder's metadata.jsonl / metadata.csv."""
    resolution: int = 64
    """Side of the square training image; with buckets, the area every bucket keeps (~resolution^2)."""
    crop: str = "random"
    hflip: bool = True
    buckets: bool = False
    """Aspect-ratio bucketing: each image is trained at the bucket (h, w) closest to its own
    aspect ratio, every batch drawn from one bucket, instead of a square crop."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (64 for SD/SDXL/SD3; 16 is enough for the tiny models)."""
    max_aspect: float = 2.0
    """Longest bucket side / shortest bucket side at most."""
    caption_dropout: float = 0.0
    """Probability of training on the empty prompt instead of the caption."""
    min_size: int = 8
    """Images smaller than this on either side are skipped as unusable."""
    num_workers: int = 0


@dataclass
class CacheConfig:
    enabled: bool = True
    """Cache VAE latents and frozen text-encoder outputs on disk, shared by every trial of a
    sweep that can use them. Never changes what is trained (see sdsweep/cache.py)."""
    dir: str | None = None
    """Where the entries live; null: <model.cache_dir>/features."""


@dataclass
class EvalConfig:
    name: str = "default"
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    steps: int = 4
    guidance_scale: float = 5.0
    resolution: int = 64


@dataclass
class TrainConfig:
    max_steps: int = 20
    batch_size: int = 2
    grad_accum: int = 1
    lr: float = 1e-4
    gradient_checkpointing: bool = False
    noise_offset: float = 0.0
    snr_gamma: float | None = None
    """Min-SNR loss weighting (Hang et al. 2023); 5.0 is the usual value, null disables.
    DDPM families (sd15, sdxl) only; sd3 uses weighting_scheme."""
    weighting_scheme: str = "logit_normal"
    """sd3 flow matching: timestep density and loss weighting (logit_normal, mode, cosmap,
    sigma_sqrt, none), as diffusers' SD3 training scripts; logit_normal is the SD3 paper's."""
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True
    """sd3: train on x0 = noisy - sigma * prediction (EDM preconditioning, the diffusers SD3
    script's default) instead of the raw velocity target noise - x0."""
    max_grad_norm: float = 1.0
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: never)."""
    checkpoints_keep: int = 2
    log_every: int = 1


@dataclass
class TrackingConfig:
    mode: str = "offline"
    project: str = "sdsweep"
    entity: str | None = None


@dataclass
class DebugConfig:
    """Fault injection, so a user (and the tests) can check that a sweep survives a bad trial."""

    nan_at_step: int = -1
    """Replace the loss with NaN at this step (-1: never)."""
    raise_at_step: int = -1
    """Raise RuntimeError at this step, after any checkpoint of that step (-1: never)."""


@dataclass
class Config:
    adapter: AdapterConfig = MISSING
    targets: TargetsConfig = MISSING
    text_encoder: TextEncoderConfig = MISSING
    precision: PrecisionConfig = MISSING
    optimizer: OptimizerConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when present) | cpu | cuda."""


def register_configs() -> None:
    ConfigStore.instance().store(name="sdsweep_schema", node=Config)


def _trial_dirname(override_dirname: str) -> str:
    """A stable, filesystem-safe folder name for a trial, derived from its overrides."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname)
    return name or "default"


if not OmegaConf.has_resolver("sdsweep_trial_dirname"):
    OmegaConf.register_new_resolver("sdsweep_trial_dirname", _trial_dirname)


class ConfigError(ValueError):
    """One or more configuration problems, each naming the key to change."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def _check_choice(problems: list[str], key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        problems.append(f"{key}={value!r} is not one of {', '.join(allowed)}")


def validate(cfg: DictConfig | Config) -> None:
    """Check what the schema's types cannot: ranges, enumerations and combinations.

    Runs before any model is loaded and reports every problem at once.
    """
    p: list[str] = []
    a, t, tr = cfg.adapter, cfg.text_encoder, cfg.train
    _check_choice(p, "adapter.kind", a.kind, ADAPTER_KINDS)
    if a.rank < 1:
        p.append(f"adapter.rank={a.rank}: must be >= 1 (try 4, 8 or 16)")
    if a.alpha <= 0:
        p.append(f"adapter.alpha={a.alpha}: must be > 0 (usually equal to adapter.rank)")
    if not 0.0 <= a.dropout < 1.0:
        p.append(f"adapter.dropout={a.dropout}: must be in [0, 1)")
    if a.kind in ("lora", "dora"):
        _check_choice(p, "adapter.init", a.init, LORA_INITS)
    if cfg.model.family == "sd3" and not cfg.targets.transformer_patterns:
        p.append(f"targets={cfg.targets.name} lists no transformer_patterns for model.family=sd3: "
                 "set targets.transformer_patterns")
    if cfg.model.family != "sd3" and not cfg.targets.patterns:
        p.append(f"targets={cfg.targets.name} lists no patterns: set targets.patterns")
    for pattern in list(cfg.targets.patterns) + list(cfg.targets.transformer_patterns) + list(t.patterns):
        try:
            re.compile(pattern)
        except re.error as e:
            p.append(f"target pattern {pattern!r} is not a valid regular expression: {e}")
    if t.train and not t.patterns:
        p.append("text_encoder.train=true needs text_encoder.patterns")
    if t.lr is not None and t.lr <= 0:
        p.append(f"text_encoder.lr={t.lr}: must be > 0")
    pr = cfg.precision
    _check_choice(p, "precision.mixed_precision", pr.mixed_precision, MIXED_PRECISIONS)
    _check_choice(p, "precision.base_dtype", pr.base_dtype, DTYPES)
    _check_choice(p, "precision.vae_dtype", pr.vae_dtype, DTYPES)
    _check_choice(p, "precision.quantize", pr.quantize, QUANTIZATIONS)
    o = cfg.optimizer
    _check_choice(p, "optimizer.name", o.name, OPTIMIZERS)
    _check_choice(p, "optimizer.scheduler", o.scheduler, SCHEDULERS)
    if len(o.betas) != 2:
        p.append(f"optimizer.betas={list(o.betas)}: needs exactly two values")
    if o.warmup_steps < 0:
        p.append(f"optimizer.warmup_steps={o.warmup_steps}: must be >= 0")
    m = cfg.model
    _check_choice(p, "model.family", m.family, FAMILIES)
    if m.drop_t5 and m.family != "sd3":
        p.append(f"model.drop_t5=true applies to model.family=sd3 only (this is {m.family})")
    if m.t5_max_length < 1:
        p.append(f"model.t5_max_length={m.t5_max_length}: must be >= 1 (77 or 256)")
    if m.family == "sd3" and tr.snr_gamma:
        p.append("train.snr_gamma is min-SNR weighting for DDPM models; sd3 trains with flow matching: "
                 "set train.snr_gamma=null and choose train.weighting_scheme")
    _check_choice(p, "train.weighting_scheme", tr.weighting_scheme, WEIGHTING_SCHEMES)
    if not m.build_tiny and not m.pretrained:
        p.append(f"model={m.name} names no weights: set model.pretrained=HUB_ID_OR_FOLDER")
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
    e = cfg.eval
    if e.resolution < 8 or e.resolution % 8:
        p.append(f"eval.resolution={e.resolution}: must be a positive multiple of 8")
    if e.steps < 1:
        p.append(f"eval.steps={e.steps}: must be >= 1")
    for key in ("max_steps", "batch_size", "grad_accum", "log_every"):
        if getattr(tr, key) < 1:
            p.append(f"train.{key}={getattr(tr, key)}: must be >= 1")
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
    if tr.checkpoints_keep < 1:
        p.append(f"train.checkpoints_keep={tr.checkpoints_keep}: must be >= 1")
    _check_choice(p, "tracking.mode", cfg.tracking.mode, TRACKING_MODES)
    _check_choice(p, "device", cfg.device, DEVICES)
    if p:
        raise ConfigError(p)
