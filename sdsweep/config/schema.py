"""The configuration schema: dataclasses registered in Hydra's ConfigStore.

`conf/config.yaml` starts its defaults list with `sdsweep_schema` (registered by store.py), so every YAML option of
every group is merged into these typed nodes: a misspelt key or a value of the wrong type
fails at composition, with Hydra's own message, before anything is loaded. What a type
cannot say (ranges, enumerations, combinations) is checked by config/validate.py, which
collects every problem and raises once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

GROUPS = ("adapter", "targets", "text_encoder", "precision", "optimizer", "model", "data", "eval")
ABLATION_AXES = ("adapter", "targets", "text_encoder", "precision", "optimizer")

ADAPTER_KINDS = ("lora", "dora", "loha", "lokr", "full", "textual_inversion")
LORA_INITS = ("gaussian", "kaiming")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
QUANTIZATIONS = ("none", "int8", "nf4")
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
FAMILIES = ("sdxl", "sd15", "sd3")
TINY_WEIGHTS = ("random", "toy")
WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CROPS = ("center", "random")
TRACKING_MODES = ("online", "offline", "disabled")
DEVICES = ("auto", "cpu", "cuda") + tuple(f"cuda:{i}" for i in range(16))


@dataclass
class AdapterConfig:
    kind: str = "lora"
    """lora | dora (peft use_dora) | loha | lokr | full (no adapter: the whole denoiser trains) |
    textual_inversion (a new token's embeddings in each text encoder, nothing else)."""
    rank: int = 8
    """Adapter rank r: capacity, size and memory all grow with it."""
    alpha: float = 8.0
    """Scale numerator: the update is multiplied by alpha / rank."""
    dropout: float = 0.0
    """Dropout on the adapter path (LoRA dropout; module dropout for LoHa/LoKr)."""
    init: str = "gaussian"
    """lora/dora: peft init_lora_weights (gaussian, kaiming); loha/lokr always start at zero."""
    token: str = "<sdsweep>"
    """textual_inversion: the new word learned (added to every caption and evaluation prompt lacking it)."""
    num_vectors: int = 1
    """textual_inversion: embedding vectors the token stands for (`<token>`, `<token>_1`, ...)."""
    initializer_token: str = "style"
    """textual_inversion: one existing token whose embedding the new vectors start from."""


def trains_text_encoders(cfg) -> bool:
    """Whether a trial changes its text encoders (their outputs can then not be cached): text_encoder=lora,
    or textual inversion's new embeddings."""
    return bool(cfg.text_encoder.train or cfg.adapter.kind == "textual_inversion")


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
    """Build a tiny model of `family` in code (saved, then loaded like any other)."""
    tiny_weights: str = "random"
    """With build_tiny, random | toy. random: weights from a fixed seed, for tests that need only the
    shapes (it draws noise); toy: the tiny SDXL trained on the toy world (sdsweep/data/toy_world.py),
    which draws what a prompt asks for: the embedded default, model=toy-sdxl."""
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
    # DreamBooth prior preservation (sdsweep/data/class_images.py): what diffusers' DreamBooth-LoRA
    # scripts call --with_prior_preservation --class_prompt --num_class_images --class_data_dir
    num_class_images: int = 0
    """Class (regularisation) images trained beside the instance images, each batch half of each, the loss
    instance + train.prior_loss_weight * class; 0 = no prior preservation. Drawn by the base model from
    data.class_prompt once and cached under model.cache_dir/class_images/, shared by every trial."""
    class_prompt: str | None = None
    """The prompt of the class images (and their caption), e.g. `a photo of a dog`; needs data.num_class_images > 0."""
    class_data_dir: str | None = None
    """A folder of class images of your own (any captions ignored: data.class_prompt is theirs); only the
    images it lacks, up to data.num_class_images, are drawn by the base model."""
    class_steps: int = 30
    """Denoising steps the base model draws each class image with (Euler, as evaluation samples)."""
    class_guidance_scale: float = 5.0
    """Classifier-free guidance of the class images."""


EVAL_METRICS = ("clip_score", "style", "kid", "random_style", "content", "fidelity", "diversity", "dino")
CLIP_METRICS = ("clip_score", "style", "kid", "content", "fidelity", "diversity")
# each weight's key: a metric column of the leaderboard, without its "eval/" prefix
SCORE_KEYS = ("clip_score", "content_cos", "style_centroid_cos", "style_nn_cos", "kid", "gram_distance",
              "color_distance", "clip_i", "clip_centroid_distance", "dino_cos", "dino_centroid_distance", "vendi",
              "aesthetic")
TINY_CLIP = "tiny"
TOY_CLIP = "toy"


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
    enabled: bool = True
    """Sample and score every finished trial (and the base model, once per sweep)."""
    prompts: list[str] = field(default_factory=list)
    prompts_file: str | None = None
    """A text file with one prompt per line (blank lines and '#' comments skipped); replaces `prompts`."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One image per (prompt, seed); the same seed draws the same noise in every trial and the base model."""
    steps: int = 4
    guidance_scale: float = 5.0
    resolution: int = 64
    vae_tiling: bool = False
    """Decode samples tile by tile (diffusers' VAE tiling): bounded memory for 1024 px on a 16 GB card."""
    batch_size: int | None = None
    """Images drawn per pipeline call; null: every prompt x seed at once for a model built in code
    (toy, tiny), 1 for a real model (eval/sampling.py:sampling_batch)."""
    metrics: list[str] = field(default_factory=lambda: list(EVAL_METRICS))
    """Any of clip_score, style, kid, random_style, content, fidelity (CLIP-I, CLIP centroid distance),
    diversity (Vendi score), dino (DINO fidelity: eval.dino_model). random_style alone needs no weights."""
    caption_prompts: int = 0
    """Training captions (evenly spaced over the set) sampled as prompts besides eval.prompts. Every prompt that
    is one of the training captions is scored as in distribution (eval/in/...), every other one as out of
    distribution (eval/out/...): the style on what was trained, and carried over to what was not."""
    trigger: str | None = None
    """The trigger word of the training captions (e.g. `sks`); with trigger_description, CLIP-T reads the
    prompt with the trigger replaced by the description (a made-up word means nothing to CLIP)."""
    trigger_description: str | None = None
    """What the trigger stands for in words (`a watercolour painting`), put in its place on the text side."""
    aesthetic: bool = False
    """LAION's improved aesthetic predictor on the CLIP ViT-L/14 features (eval/aesthetic.py): eval/aesthetic,
    roughly 1-10, higher is liked more; needs eval.clip_model ViT-L-14; weight 0 in the composite unless set."""
    aesthetic_weights: str | None = None
    """The head's weights: null = LAION's file (3.7 MB, downloaded once into <model.cache_dir>/aesthetic/), a
    local .pth file, or another URL."""
    dino_model: str = "auto"
    """DINOv2 for fidelity (eval/dino.py): `auto` = facebook/dinov2-base (86 M parameters, ~350 MB downloaded
    once) for a real model and none for the models built in code (the toy world has no DINO); a hub id, a
    local folder (save_pretrained), or `none`."""
    clip_model: str = "auto"
    """`auto`: follows the model (config/encoders.py): the toy CLIP for model=toy-sdxl, the random stand-in for
    the random tiny models, ViT-L-14/openai for every real model. Or an open_clip architecture (ViT-L-14,
    ViT-B-32, hf-hub:...); `toy`: the toy CLIP trained on the toy world (sdsweep/eval/toy_clip.py, ships with
    the package); `tiny`: a random-weight stand-in built in code (its numbers mean nothing)."""
    clip_pretrained: str | None = None
    """open_clip pretrained tag (openai, laion2b_s32b_b82k, ...) or a local weights file; null with clip_model=toy or tiny."""
    allow_stand_in: bool = False
    """Score a real model with `toy` or `tiny` anyway (refused before launch otherwise); every row says so."""
    max_reference_images: int = 32
    """Training images used as the style reference (evenly spaced over the set); caps feature-extraction time."""
    kid_subsets: int = 50
    """Random subsets KID averages over (each of min(#generated, #reference) images)."""
    score_weights: dict[str, float] = field(
        default_factory=lambda: {"clip_score": 1.0, "content_cos": 1.0, "style_centroid_cos": 0.5,
                                 "style_nn_cos": 0.5, "kid": 0.5, "gram_distance": 0.25, "color_distance": 0.25,
                                 "clip_i": 0.0, "clip_centroid_distance": 0.0, "dino_cos": 0.5,
                                 "dino_centroid_distance": 0.0, "vendi": 0.0, "aesthetic": 0.0}
    )
    """Weights of the leaderboard's composite score (% better than the base model): a weighted mean of each
    metric's gain over the base model's value; 0 leaves a metric out."""


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
    prior_loss_weight: float = 1.0
    """Weight of the class images' loss (data.num_class_images > 0): loss = instance + weight * class."""
    ema_decay: float = 0.0
    """Exponential moving average of the trainable weights, updated after every optimizer step (diffusers'
    EMAModel: decay min(ema_decay, (1 + t) / (10 + t)) at its t-th update); 0 = off, 0.999 a usual value.
    The saved adapter, and so evaluation, holds the averaged weights; checkpoints carry the average. It
    costs one fp32 copy of the adapter (not of the base model)."""
    ema_on_cpu: bool = False
    """Keep the average in CPU memory, moved to the device for each update (diffusers' --offload_ema)."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: never)."""
    checkpoints_keep: int = 2
    log_every: int = 1
    nan_policy: str = "stop"
    """stop: a NaN/inf loss fails the trial at once. skip: drop that step's update and go on,
    up to max_nan_skips times (checks every step, which syncs the GPU once per step)."""
    max_nan_skips: int = 10
    compile: bool = False
    """torch.compile the denoiser (UNet / SD3 transformer) with its adapter attached: the first step
    pays for compilation (about a minute for SDXL), later steps run fused kernels. Never changes
    what is trained; benchmarks/step_speed.py --compile measures what it buys on a GPU."""
    compile_backend: str = "inductor"
    """torch.compile backend (torch._dynamo.list_backends()); 'inductor' generates the kernels."""
    compile_mode: str = "default"
    """default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs"""


@dataclass
class TrackingConfig:
    mode: str = "offline"
    """online | offline | disabled. W&B errors never fail a trial: online degrades to offline."""
    project: str = "sdsweep"
    entity: str | None = None
    group: str | None = None
    """W&B group; null: named after the sweep folder, so a sweep reads as one experiment."""
    init_timeout: float = 20.0
    """Seconds W&B may take to start a run before the trial goes on offline."""
    smoothing: float = 0.9
    """EMA factor of train/loss_smoothed."""
    warmup_steps: int = 1
    """First steps left out of the speed averages (they pay for lazy initialisation)."""
    validation_every: int = 0
    """Sample the eval prompts/seeds every N steps and at the end (0: never)."""
    profile: bool = False
    """Record a torch.profiler trace of a window of steps into profile/ (and W&B)."""
    profile_wait: int = 1
    profile_warmup: int = 1
    profile_active: int = 3


@dataclass
class EarlyStopConfig:
    """The median stopping rule (sdsweep/early_stop.py): a trial of a sweep whose smoothed training
    loss at a check step is worse than the median of the finished trials' at that step stops there
    (status stopped, adapter saved, not evaluated; a resumed sweep keeps it)."""

    enabled: bool = False
    at: list[float] = field(default_factory=lambda: [0.5])
    """Check steps, as fractions of train.max_steps (0.5: half-way)."""
    min_trials: int = 2
    """Finished trials of the sweep needed before any trial is stopped."""
    window: int = 5
    """Steps the smoothed loss averages over (those up to the check step)."""
    margin: float = 0.0
    """Stop only when the loss exceeds the median by this fraction (0.1: 10% worse)."""


@dataclass
class SweepConfig:
    """How the cells of a sweep run; never changes what a trial trains (left out of its fingerprint)."""

    keep_base_loaded: bool = True
    """Trials that run one after another in one process (Hydra's basic launcher) reuse the frozen
    base model loaded by the previous trial when model, precision and device are the same, and
    swap only the adapter: loading SDXL costs 35-120 s on a T4. False reloads it for every trial."""
    early_stop: EarlyStopConfig = field(default_factory=EarlyStopConfig)

    vram_budget_gb: float | None = 16.0
    """GiB of GPU memory a trial may need (16: a T4). A cell whose predicted need (sdsweep/estimate.py:
    peak allocated + allocator slack + CUDA context) is larger is pruned before it loads anything,
    with the reason. Applies only to trials that run on CUDA; 0 or null: no budget."""
    estimate: str = "auto"
    """When the peak VRAM is predicted (sdsweep/sweep/estimate.py, 1-10 s a distinct cell): `auto`, for
    trials that run on CUDA, the only ones a budget prunes; `always`, on a CPU too (plan a GPU sweep on a
    laptop: the prediction table, pred_gb on the leaderboard); `never` (no budget pruning either)."""


@dataclass
class DebugConfig:
    """Fault injection, so a user (and the tests) can check that a sweep survives a bad trial."""

    nan_at_step: int = -1
    """Replace the loss with NaN at this step (-1: never)."""
    raise_at_step: int = -1
    """Raise RuntimeError at this step, after any checkpoint of that step (-1: never)."""
    trace_data: bool = False
    """Every process writes debug/rank-N.json: the (image, draw) keys it trained on, its per-step
    losses and a checksum of its trained weights (shows how a multi-process trial shares the data)."""


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
    sweep: SweepConfig = field(default_factory=SweepConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    seed: int = 0
    device: str = "auto"
    """auto (CUDA when present; trial N on GPU N mod count) | cpu | cuda | cuda:N."""


class ConfigError(ValueError):
    """One or more configuration problems, each naming the key to change."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))
