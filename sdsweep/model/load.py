"""Load a model family, freeze it, and place each component's dtype and device.

One loading path for everything: the tiny models are saved as diffusers folders first and
then go through the same `from_pretrained` calls as a user's SDXL from the hub. A single-file
checkpoint goes through the family's pipeline `from_single_file` and is then split into the
same components.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sdsweep.config.schema import ModelConfig, PrecisionConfig
from sdsweep.model.precision import DTYPES
from sdsweep.model.tiny import ensure_tiny_model
from sdsweep.model.toy import ensure_toy_model


class ModelLoadError(RuntimeError):
    """The configured weights could not be loaded; the message says what to set instead."""


SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


@dataclass
class Components:
    """Everything a trial needs from the base model.

    `denoiser` is the UNet (sd15, sdxl) or SD3's MMDiT transformer, so the training loop is the
    same for all. In `modules()` (and so in checkpoint keys) its slot is named "unet" for every
    family; `adapters.save_adapter` names it `transformer` in SD3's files.
    """

    family: str
    source: str
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list
    noise_scheduler: object
    extra: dict = field(default_factory=dict)

    def modules(self) -> dict[str, torch.nn.Module]:
        named = {"unet": self.denoiser, "vae": self.vae}
        for i, te in enumerate(self.text_encoders):
            named["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = te
        return named

    @property
    def trainable_text_encoders(self) -> list[torch.nn.Module]:
        """The encoders text_encoder=lora adapts: the CLIP ones (diffusers' SD3 LoRA format has no T5 slot)."""
        return self.text_encoders[:2] if self.family == "sd3" else self.text_encoders


def pipeline_class(family: str):
    """The diffusers pipeline of a family (for single files, saving and loading LoRA weights)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    return {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline, "sd3": StableDiffusion3Pipeline}[family]


def resolve_device(name: str, trial_number: int = 0) -> torch.device:
    """`auto`: CUDA when present; with several GPUs, trial N gets GPU N mod count, so trials
    run in parallel (hydra/launcher=parallel) each have a GPU of their own; one trial launched
    on several GPUs (`accelerate launch`, torchrun) uses the GPU of each process's LOCAL_RANK."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        index = int(os.environ.get("LOCAL_RANK", trial_number))
        return torch.device("cuda", index % torch.cuda.device_count())
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} but torch sees no CUDA GPU: use device=cpu or device=auto")
    return torch.device(name)


def resolve_source(cfg: ModelConfig) -> str:
    """The folder or hub id to load from; builds the tiny model first when asked to."""
    if cfg.build_tiny and not cfg.pretrained:
        if cfg.tiny_weights == "toy":
            return str(ensure_toy_model(cfg.cache_dir, cfg.family))
        return str(ensure_tiny_model(cfg.cache_dir, cfg.family, seed=0))
    assert cfg.pretrained, "validate() guarantees model.pretrained when build_tiny is false"
    path = Path(os.path.expanduser(cfg.pretrained))
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"model.pretrained={cfg.pretrained} is a file but not a checkpoint "
                f"({', '.join(SINGLE_FILE_SUFFIXES)}): point it at a single-file checkpoint or a diffusers folder"
            )
        return str(path)
    if path.exists():
        if not (path / "model_index.json").exists():
            raise ModelLoadError(
                f"model.pretrained={cfg.pretrained} is a folder but not a diffusers model "
                "(no model_index.json): point it at the folder saved by save_pretrained"
            )
        return str(path)
    if cfg.pretrained.startswith((".", "/", "~")) or cfg.pretrained.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise ModelLoadError(f"model.pretrained={cfg.pretrained}: no such file or folder")
    return cfg.pretrained


def _load(cls, source: str, subfolder: str | None, cfg: ModelConfig | None = None, config_only: bool = False,
          dtype: torch.dtype | None = None):
    revision, variant = (cfg.revision, cfg.variant) if cfg else (None, None)
    try:
        if config_only:  # a scheduler's config, whatever scheduler class wrote it
            return cls.load_config(source, subfolder=subfolder, revision=revision)
        kwargs = {_dtype_keyword(cls): dtype} if dtype is not None else {}
        return cls.from_pretrained(source, subfolder=subfolder, revision=revision, variant=variant, **kwargs)
    except (OSError, ValueError) as e:
        hint = (
            "HF_HUB_OFFLINE is set, so only models already in the Hugging Face cache load: "
            f"download it first (`hf download {source}`) or set model.pretrained=/path/to/diffusers/folder"
            if _offline()
            else f"check the id (model.pretrained={source}), your network and `hf auth login` for gated models, "
            "or set model.pretrained=/path/to/diffusers/folder"
        )
        raise ModelLoadError(f"could not load {subfolder or 'the model'} of {source!r}: {hint}\n  ({type(e).__name__}: {e})") from e


def _dtype_keyword(cls) -> str:
    """diffusers' from_pretrained takes torch_dtype; transformers renamed it dtype in 4.56 (the old name warns)."""
    if cls.__module__.startswith("transformers"):
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) >= Version("4.56"):
            return "dtype"
    return "torch_dtype"


def storage_dtypes(precision: PrecisionConfig) -> dict[str, torch.dtype]:
    """The dtype each kind of component is stored in under `precision`: the frozen denoiser and text
    encoders in `base_dtype` (half precision on a GPU is what lets SDXL fit a T4), the VAE in
    `vae_dtype` (fp32 by default: the SDXL VAE overflows in fp16), T5 never in fp16 (its activations
    overflow it: it was trained in bf16)."""
    base = DTYPES[precision.base_dtype]
    return {"denoiser": base, "text": base, "vae": DTYPES[precision.vae_dtype],
            "t5": torch.bfloat16 if base == torch.float16 else base}


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false")


def _text_parts(cfg: ModelConfig, source: str, dtypes: dict) -> tuple[list, list]:
    """(tokenizers, text encoders) of the family, from a diffusers folder or hub id."""
    from transformers import (
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5EncoderModel,
        T5Tokenizer,
    )

    first = CLIPTextModelWithProjection if cfg.family == "sd3" else CLIPTextModel
    tokenizers = [_load(CLIPTokenizer, source, "tokenizer", cfg)]
    text = dtypes.get("text")
    encoders = [_load(first, source, "text_encoder", cfg, dtype=text)]
    if cfg.family in ("sdxl", "sd3"):
        tokenizers.append(_load(CLIPTokenizer, source, "tokenizer_2", cfg))
        encoders.append(_load(CLIPTextModelWithProjection, source, "text_encoder_2", cfg, dtype=text))
    if cfg.family == "sd3" and not cfg.drop_t5:
        tokenizers.append(_load(T5Tokenizer, source, "tokenizer_3", cfg))
        encoders.append(_load(T5EncoderModel, source, "text_encoder_3", cfg, dtype=dtypes.get("t5")))
    return tokenizers, encoders


def _training_scheduler(family: str, config: dict):
    """The noise scheduler training uses: DDPM's forward process for the UNet families (prediction
    type, epsilon or v, from the model's own scheduler config, as in the diffusers examples);
    flow matching for SD3."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    cls = FlowMatchEulerDiscreteScheduler if family == "sd3" else DDPMScheduler
    return cls.from_config(config)


def _from_pretrained(cfg: ModelConfig, source: str, dtypes: dict) -> Components:
    """`dtypes`: storage_dtypes() to read each component in; {}: as the files say (fp32 in diffusers)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel

    tokenizers, encoders = _text_parts(cfg, source, dtypes)
    if cfg.vae:  # a separate VAE, e.g. the fp16-fix one: a hub id or a folder, no subfolder
        vae = _load(AutoencoderKL, os.path.expanduser(cfg.vae), None, dtype=dtypes.get("vae"))
    else:
        vae = _load(AutoencoderKL, source, "vae", cfg, dtype=dtypes.get("vae"))
    if cfg.family == "sd3":
        denoiser = _load(SD3Transformer2DModel, source, "transformer", cfg, dtype=dtypes.get("denoiser"))
    else:
        denoiser = _load(UNet2DConditionModel, source, "unet", cfg, dtype=dtypes.get("denoiser"))
    from diffusers import DDPMScheduler

    scheduler_config = _load(DDPMScheduler, source, "scheduler", cfg, config_only=True)
    return Components(cfg.family, source, denoiser, vae, encoders, tokenizers,
                      _training_scheduler(cfg.family, scheduler_config))


def _from_single_file(cfg: ModelConfig, source: str) -> Components:
    """A single-file checkpoint through the family pipeline's from_single_file, then split up."""
    from diffusers import AutoencoderKL

    kwargs: dict = {}
    if cfg.single_file_config:
        kwargs["config"] = os.path.expanduser(cfg.single_file_config)
    if cfg.vae:
        kwargs["vae"] = _load(AutoencoderKL, os.path.expanduser(cfg.vae), None)
    if cfg.family == "sd3" and cfg.drop_t5:
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    try:
        pipe = pipeline_class(cfg.family).from_single_file(source, **kwargs)
    except Exception as e:  # diffusers raises many types: missing configs, unknown layouts, offline
        where = ("a local diffusers folder of the same architecture" if _offline()
                 else "a diffusers folder or hub id of the same architecture")
        raise ModelLoadError(
            f"could not load model.pretrained={source} as a model.family={cfg.family} single-file checkpoint: "
            f"set model.single_file_config to {where} (its configs and tokenizers are used), check "
            f"model.family, or convert the checkpoint to a diffusers folder\n  ({type(e).__name__}: {e})"
        ) from e
    encoders = [pipe.text_encoder] + [getattr(pipe, n) for n in ("text_encoder_2", "text_encoder_3")
                                      if getattr(pipe, n, None) is not None]
    tokenizers = [pipe.tokenizer] + [getattr(pipe, n) for n in ("tokenizer_2", "tokenizer_3")
                                     if getattr(pipe, n, None) is not None]
    denoiser = pipe.transformer if cfg.family == "sd3" else pipe.unet
    components = Components(cfg.family, source, denoiser, pipe.vae, encoders, tokenizers,
                            _training_scheduler(cfg.family, dict(pipe.scheduler.config)))
    # diffusers leaves weights the file lacks on the meta device without a word; training would
    # then fail far from the cause (or, for a frozen encoder, on its first forward)
    unset = {name: [k for k, t in m.state_dict().items() if t.is_meta] for name, m in components.modules().items()}
    if unset := {name: keys for name, keys in unset.items() if keys}:
        detail = "; ".join(f"{name}: {len(keys)} tensors, e.g. {keys[0]}" for name, keys in unset.items())
        raise ModelLoadError(
            f"model.pretrained={source}: the file has no weights for part of the model ({detail}), and "
            f"diffusers left them unset: check model.family={cfg.family} and model.single_file_config, or "
            "use a complete checkpoint")
    return components


def load_components(cfg: ModelConfig, precision: PrecisionConfig | None = None) -> Components:
    """Load tokenizers, text encoders, VAE, denoiser and the training noise scheduler, on the CPU.

    With `precision`, a diffusers folder or hub model is read straight into the dtypes `place` will
    store it in: SDXL then takes about 7 GB of host memory while loading instead of the 14 GB of an
    fp32 load cast down afterwards (a free Colab has 12.7 GB), and loads faster. Without it, and
    for single-file checkpoints, everything is fp32."""
    source = resolve_source(cfg)
    if Path(source).is_file():
        components = _from_single_file(cfg, source)
    else:
        components = _from_pretrained(cfg, source, storage_dtypes(precision) if precision else {})
    components.extra["t5_max_length"] = cfg.t5_max_length
    for module in components.modules().values():
        module.requires_grad_(False)
        module.eval()
    return components


def load_base_denoiser(cfg: ModelConfig, precision: PrecisionConfig, device: torch.device) -> torch.nn.Module:
    """The base's denoiser alone, frozen and placed as `place` places it: for evaluating a full fine-tune,
    whose trial trained its own copy in place (a single-file checkpoint is read whole: it has no parts)."""
    source = resolve_source(cfg)
    dtype = storage_dtypes(precision)["denoiser"]
    if Path(source).is_file():
        denoiser = load_components(cfg, precision).denoiser
    else:
        from diffusers import SD3Transformer2DModel, UNet2DConditionModel

        cls, sub = (SD3Transformer2DModel, "transformer") if cfg.family == "sd3" else (UNet2DConditionModel, "unet")
        denoiser = _load(cls, source, sub, cfg, dtype=dtype)
    denoiser.requires_grad_(False)
    return denoiser.to(device, dtype=dtype).eval()


def quantize_unet(unet: torch.nn.Module, mode: str, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Swap the UNet's frozen nn.Linear layers for bitsandbytes int8 / nf4 layers (CUDA only).

    peft then attaches its adapters to the quantized layers (its bnb LoRA/DoRA layers), which
    is QLoRA. Convolutions stay in `compute_dtype`.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"precision={mode} quantizes the base weights with bitsandbytes, which needs a CUDA GPU; "
            "none is visible here: use precision=fp16, bf16 or fp32 on this machine"
        )
    import bitsandbytes as bnb

    def replace(parent: torch.nn.Module) -> None:
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear):
                if mode == "int8":
                    q = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                            has_fp16_weights=False, threshold=6.0)
                    q.weight = bnb.nn.Int8Params(child.weight.data.to(torch.float16), requires_grad=False,
                                                 has_fp16_weights=False)
                else:
                    q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, quant_type="nf4")
                    q.weight = bnb.nn.Params4bit(child.weight.data.to(torch.float16), requires_grad=False,
                                                 quant_type="nf4")
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
                setattr(parent, name, q)
            else:
                replace(child)

    replace(unet)
    return unet.to("cuda")  # bitsandbytes quantizes the weights when they move to the GPU


def set_checkpointing(module: torch.nn.Module, on: bool) -> None:
    """Gradient (activation) checkpointing on or off, for diffusers' and transformers' modules alike.

    diffusers names it enable/disable_gradient_checkpointing; transformers renamed its
    gradient_checkpointing_enable/disable to activation_checkpointing_* in 5.23, and the old names
    now warn on every call and go in v6."""
    if hasattr(module, "enable_gradient_checkpointing"):  # diffusers
        (module.enable_gradient_checkpointing if on else module.disable_gradient_checkpointing)()
    elif hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.23
        (module.activation_checkpointing_enable if on else module.activation_checkpointing_disable)()
    else:
        (module.gradient_checkpointing_enable if on else module.gradient_checkpointing_disable)()


def is_checkpointing(module: torch.nn.Module) -> bool:
    """Whether `module` has checkpointing on (looked up on the class: the old property warns when read)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(module), name):
            return bool(getattr(module, name))
    return False


def place(components: Components, precision: PrecisionConfig, device: torch.device) -> None:
    """Cast (see `storage_dtypes`; a no-op when loaded with this precision) and move every
    component for training under `precision`. Adapter weights are upcast to fp32 after they are attached."""
    dtypes = storage_dtypes(precision)
    if precision.quantize != "none":
        quantize_unet(components.denoiser, precision.quantize, dtypes["denoiser"])
        components.denoiser.to(device)
    else:
        components.denoiser.to(device, dtype=dtypes["denoiser"])
    components.vae.to(device, dtype=dtypes["vae"])
    for te in components.text_encoders:
        te.to(device, dtype=dtypes["t5" if type(te).__name__.startswith("T5") else "text"])
