"""Predict a trial's peak GPU memory from its config, before anything is loaded.

What is predicted is the figure the trial records as `peak_vram_mb`: `torch.cuda.max_memory_allocated()`
over the whole trial (see meters.MemoryMeter). That counts the tensors torch allocates, not the CUDA
context (~0.5 GiB of driver and kernel images) nor blocks the caching allocator holds but has not
handed out; `Estimate.device_gb` adds both when a prediction is compared with `sweep.vram_budget_gb`.

How, with no weights read and nothing on a GPU:
* Parameters: each component (denoiser, VAE, text encoders) is built from its `config.json` alone,
  on the meta device, so counts are exact for any architecture. Offline without the hub cache,
  a known hub id falls back to `sdsweep.architectures`; otherwise the estimate is skipped (with a
  reason), never the trial.
* Frozen weights: what `models.place` and `train.setup` really do. Every component is on the GPU
  in `precision.base_dtype` (VAE: `vae_dtype`; T5 never fp16), except that the denoiser waits in
  CPU memory while the cache is filled, and the VAE and text encoders whose outputs are all
  cached wait there while training (`offloadable_gb`). A quantized UNet (`int8`/`nf4`) has its Linear weights at ~1 / ~0.52 bytes and everything
  else left in fp32, as `models.quantize_unet` leaves it.
* Adapter: attached with the project's own `adapters.attach` to the meta denoiser (and text
  encoders when they train): fp32 parameters, fp32 gradients and the optimizer's state (and with
  train.ema_decay, unless train.ema_on_cpu, the moving average: one more fp32 copy). adapter=full:
  the same for every weight of the denoiser, which then has no frozen copy.
* One training step: the meta denoiser, with its adapters, dtypes and gradient checkpointing as
  the trial will have them, runs forward and backward on meta tensors at the trial's latent size
  and batch. A dispatch mode counts every storage the step allocates for as long as it lives, so
  the step's peak includes activations saved for backward, their gradients, recomputation under
  checkpointing, the adapters' gradients and autocast's copies. Two things differ on meta and
  are put right by a function mode (`_CudaOps`): meta tensors have no autocast, so CUDA
  autocast's cast policy is applied by hand (checked against torch's own autocast on fake CUDA
  tensors in tests/test_estimate.py); and SDPA would take the math path and keep the whole
  attention matrix, where a CUDA GPU runs flash / memory-efficient attention, which keeps only
  q, k, v, the output and the log-sum-exp.
* VAE encoding (filling the cache, or live every step when latents are not cached): traced the
  same way, without gradients, at the batch size; it runs with the weights already on the GPU.
  What is cached follows `cache.latents_cached` / `cache.text_cached`, the rules training applies,
  from the config alone: for a random crop of a folder's images (not known before they are read)
  latents are assumed live, the larger peak, and the notes say so.
* A constant for cuBLAS/cuDNN workspaces.

Not modelled: bitsandbytes' own activation layout for quantized layers (taken as fp16's), the
allocator's rounding beyond 512 bytes, and evaluation (sampling runs after training, in eval mode
without gradients: well under the training peak for the same resolution).

Speed (issue 18: an SDXL cell in ~2 s; benchmarks/estimate_speed.py): each meta kernel runs once per
input layout (meta_ops.MetaOps), nothing is initialised (torch.nn.init is skipped: meta tensors hold
no values), and the cyclic garbage collector waits until the estimate is done. What is left is
diffusers', peft's and autograd's own Python per op, and peft attaching its layers one by one.
"""

from __future__ import annotations

import gc
import json
import logging
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from sdsweep.model.precision import DTYPES, autocast_dtype_of
from sdsweep.sweep.meta_ops import MetaOps

log = logging.getLogger(__name__)

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5
"""Driver context and kernel images: on the device, but not in max_memory_allocated."""
ALLOCATOR_SLACK = 1.05
"""Reserved / allocated: blocks the caching allocator holds but cannot hand out (fragmentation)."""
WORKSPACE_GIB = 0.25
"""cuBLAS and cuDNN workspaces, allocated through the caching allocator."""
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
BNB_MIN_8BIT_SIZE = 4096
"""bitsandbytes' 8-bit optimizers keep fp32 state for tensors smaller than this (min_8bit_size)."""

# CUDA autocast's policy (aten/src/ATen/autocast_mode.cpp), by torch-function name
LOWER_PRECISION = frozenset({
    "linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "matmul",
    "__matmul__", "__rmatmul__", "mm", "bmm", "baddbmm", "addmm", "addbmm", "addmv", "mv", "einsum", "prelu",
    "chain_matmul", "scaled_dot_product_attention",
})
FP32 = frozenset({
    "group_norm", "layer_norm", "softmax", "log_softmax", "interpolate", "upsample", "exp", "expm1", "log", "log2",
    "log10", "log1p", "pow", "__pow__", "__rpow__", "rsqrt", "reciprocal", "sum", "prod", "cumsum", "cumprod",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "norm", "vector_norm", "cosine_similarity", "softplus",
    "logsumexp", "acos", "asin", "cosh", "sinh", "tan", "erfinv", "nll_loss", "cross_entropy", "kl_div",
    "binary_cross_entropy_with_logits", "cdist", "dist", "renorm",
})


class EstimateUnavailable(RuntimeError):
    """The model's configs could not be read: the prediction is skipped, the trial is not."""


@dataclass
class Estimate:
    """A predicted peak of torch.cuda.max_memory_allocated, in GiB, and what it is made of."""

    total_gb: float | None
    weights_gb: float = 0.0
    """Frozen weights of every component, as models.place puts them on the GPU."""
    adapter_gb: float = 0.0
    """Adapter parameters (fp32), their gradients (fp32) and the optimizer's state."""
    activations_gb: float = 0.0
    """Everything else the peak phase allocates: saved activations, their gradients, autocast copies."""
    workspace_gb: float = 0.0
    peak_phase: str = ""
    """training step | VAE encoding: which phase sets the peak."""
    offloadable_gb: float = 0.0
    """Weights of components the trial keeps on the GPU but does not use while training (cached)."""
    cached_latents: bool = False
    """Whether the estimate has the trial train on cached latents (cache.latents_cached)."""
    phases: dict[str, float] = field(default_factory=dict)
    """Predicted peak of each phase (training step, VAE encoding), GiB; total_gb is the larger."""
    weights_by_component: dict[str, float] = field(default_factory=dict)
    params: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0
    seconds: float = 0.0
    remembered: bool = False
    """Read from the on-disk memo (`seconds` is then the time to read it), not computed here."""
    reason: str | None = None
    """Why there is no prediction (total_gb is None)."""
    notes: list[str] = field(default_factory=list)

    @property
    def device_gb(self) -> float | None:
        """What the trial needs of the device: the allocated peak, allocator slack and the CUDA context."""
        return None if self.total_gb is None else self.total_gb * ALLOCATOR_SLACK + CUDA_CONTEXT_GIB

    def fits(self, budget_gb: float | None) -> bool:
        """True without a budget (None or 0) or a prediction: only a prediction can prune a trial."""
        if not budget_gb or self.device_gb is None:
            return True
        return self.device_gb <= budget_gb

    def metrics(self) -> dict[str, Any]:
        """The keys run_trial writes into metrics.json."""
        breakdown = {k: _round(getattr(self, k)) for k in (
            "weights_gb", "adapter_gb", "activations_gb", "workspace_gb", "offloadable_gb", "device_gb")}
        breakdown.update(peak_phase=self.peak_phase, phases={k: _round(v) for k, v in self.phases.items()},
                         weights_by_component={k: _round(v) for k, v in self.weights_by_component.items()},
                         cached_latents=self.cached_latents, params=self.params,
                         trainable_params=self.trainable_params,
                         seconds=_round(self.seconds), remembered=self.remembered, reason=self.reason, notes=self.notes)
        return {"predicted_peak_vram_gb": _round(self.total_gb), "predicted_vram": breakdown}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


# --- configs and meta modules ----------------------------------------------------------------------


def component_configs(model) -> tuple[dict[str, tuple[str, dict]], list[str]]:
    """{component: (class name, config)} of the model's denoiser, VAE and text encoders, read from
    their config.json files only; falls back to `architectures` for known hub ids and single files."""
    from sdsweep.model.architectures import KNOWN_HUB_IDS, family_components
    from sdsweep.model.load import ModelLoadError, resolve_source

    notes: list[str] = []
    if model.build_tiny and not model.pretrained:
        return _tiny_configs(model), notes
    try:
        source = resolve_source(model)
    except ModelLoadError as e:
        raise EstimateUnavailable(str(e)) from e
    single_file = source.lower().endswith((".safetensors", ".ckpt"))
    if single_file and model.single_file_config:
        source = model.single_file_config
    try:
        if single_file and not model.single_file_config:
            raise OSError("a single-file checkpoint without model.single_file_config")
        configs = _read_configs(source, model)
    except Exception as e:  # noqa: BLE001 - offline, missing, gated: all mean "read no configs"
        fallback = model.family if single_file else KNOWN_HUB_IDS.get(str(source))
        if not fallback:
            raise EstimateUnavailable(f"could not read the component configs of {source} ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0][:200]})") from e
        configs = family_components(fallback)
        notes.append(f"configs of {source} not readable here: assumed the reference {fallback} architecture")
    if model.family == "sd3" and model.drop_t5:
        configs.pop("text_encoder_3", None)
    if model.vae:
        try:
            from diffusers import AutoencoderKL

            configs["vae"] = ("AutoencoderKL", dict(AutoencoderKL.load_config(model.vae)))
        except Exception:  # noqa: BLE001
            notes.append(f"config of model.vae={model.vae} not readable here: assumed the model's own VAE")
    return configs, notes


def _tiny_configs(model) -> dict[str, tuple[str, dict]]:
    """The tiny or toy model's configs: from its folder when it is built (a few JSON files), else from
    tiny.py's or toy.py's own builders (a preflight must not write the model into model.cache_dir)."""
    from pathlib import Path

    from sdsweep.model import tiny, toy

    toy_weights = model.tiny_weights == "toy"
    folder = toy.toy_folder(model.cache_dir, model.family) if toy_weights else tiny.tiny_folder(model.cache_dir, model.family)
    if (folder / "model_index.json").exists():
        return _read_configs(str(folder), model)
    if toy_weights:
        return _configs_of(_toy_modules())
    family = model.family
    if family == "sd3":
        import tempfile

        from transformers import T5Tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            tiny.save_t5_tokenizer(Path(tmp))
            vocab = len(T5Tokenizer.from_pretrained(tmp))
        built = {"transformer": tiny._sd3_transformer(0), "vae": tiny._sd3_vae(0),
                 "text_encoder": tiny._text_encoder(0, True), "text_encoder_2": tiny._text_encoder(0, True),
                 "text_encoder_3": tiny._t5_encoder(0, vocab)}
    else:
        built = {"unet": tiny._unet(0, family), "vae": tiny._vae(0), "text_encoder": tiny._text_encoder(0, False)}
        if family == "sdxl":
            built["text_encoder_2"] = tiny._text_encoder(0, True)
    return _configs_of(built)


def _toy_modules() -> dict[str, torch.nn.Module]:
    """The toy SDXL's modules as toy.py builds them (untrained: only their configs are read)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from sdsweep.model import toy

    return {"unet": toy.new_unet(), "vae": toy.new_vae(), "text_encoder": CLIPTextModel(toy.text_encoder_config()),
            "text_encoder_2": CLIPTextModelWithProjection(toy.text_encoder_config())}


def _configs_of(built: dict[str, torch.nn.Module]) -> dict[str, tuple[str, dict]]:
    return {name: (type(m).__name__, {k: v for k, v in (m.config.to_dict() if hasattr(m.config, "to_dict")
                                                          else dict(m.config)).items() if not k.startswith("_")})
            for name, m in built.items()}


def _read_configs(source: str, model) -> dict[str, tuple[str, dict]]:
    index = _read_json(source, "model_index.json", model.revision)
    configs = {}
    for name in ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        entry = index.get(name)
        if entry and entry[1] is not None:
            configs[name] = (entry[1], _read_json(source, f"{name}/config.json", model.revision))
    return configs


def _read_json(source: str, filename: str, revision: str | None = None) -> dict:
    """A json file of a diffusers folder or hub repository (the Hugging Face cache when offline)."""
    import os
    from pathlib import Path

    folder = Path(os.path.expanduser(source))
    if folder.is_dir():
        path = folder / filename
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source, filename, revision=revision))
    return {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}


def meta_modules(configs: dict[str, tuple[str, dict]]) -> dict[str, torch.nn.Module]:
    """Every component built on the meta device: shapes and dtypes, no memory, no initialisation cost."""
    from accelerate import init_empty_weights
    from diffusers.models.modeling_utils import no_init_weights

    from sdsweep.model.architectures import instantiate

    # no_init_weights: torch.nn.init's functions would fill meta tensors, which hold no values, one by one
    with init_empty_weights(include_buffers=True), no_init_weights():
        modules = {name: instantiate(cls, dict(config)) for name, (cls, config) in configs.items()}
    for module in modules.values():
        module.requires_grad_(False)
    return modules


# --- bytes at rest -----------------------------------------------------------------------------------


def frozen_bytes(name: str, module: torch.nn.Module, precision) -> float:
    """Bytes of a frozen component on the GPU after models.place."""
    dtype = _placed_dtype(name, module, precision)
    if name in ("unet", "transformer") and precision.quantize != "none":
        return _quantized_bytes(module, precision)
    return sum(t.numel() * (BYTES[dtype] if t.is_floating_point() else t.element_size())
               for t in [*module.parameters(), *module.buffers()])


def _placed_dtype(name: str, module: torch.nn.Module, precision) -> str:
    if name == "vae":
        return precision.vae_dtype
    if type(module).__name__.startswith("T5") and precision.base_dtype == "fp16":
        return "bf16"  # models.place: T5 overflows fp16
    return precision.base_dtype


def _quantized_bytes(module: torch.nn.Module, precision) -> float:
    """models.quantize_unet swaps every nn.Linear for a bitsandbytes layer and leaves the rest as
    loaded (fp32): int8 keeps 1 byte per weight plus an fp32 scale per row; nf4 half a byte plus
    blockwise absmax (blocks of 64, themselves quantized to 8 bits: Params4bit's compress_statistics)."""
    total = 0.0
    linear_params = set()
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            n = m.weight.numel()
            total += n + 4 * m.out_features if precision.quantize == "int8" else n * (0.5 + 1 / 64 + 4 / (64 * 256))
            if m.bias is not None:
                total += m.bias.numel() * BYTES[precision.base_dtype]
            linear_params.update(id(p) for p in m.parameters(recurse=False))
    total += sum(p.numel() * 4 for p in module.parameters() if id(p) not in linear_params)
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def optimizer_state_bytes(numel: int, optimizer: str) -> float:
    """Optimizer state per trainable tensor: AdamW two fp32 moments; bitsandbytes' AdamW8bit two
    uint8 moments with an fp32 absmax per 256 (fp32 moments below BNB_MIN_8BIT_SIZE elements);
    Prodigy (prodigyopt, slice_p=1) exp_avg, exp_avg_sq, s and p0, all fp32."""
    if optimizer == "adamw8bit":
        return numel * (8.0 if numel < BNB_MIN_8BIT_SIZE else 2.0 + 8 / 256)
    return numel * {"adamw": 8.0, "prodigy": 16.0}[optimizer]


# --- tracing on meta -------------------------------------------------------------------------------


class _FusedAttention(torch.autograd.Function):
    """SDPA as a CUDA GPU runs it (flash / memory-efficient): keeps q, k, v, the output (laid out
    (B, L, H, D) like the kernels' own) and an fp32 log-sum-exp per query; backward allocates
    dq, dk, dv and flash's fp32 dq accumulator."""

    @staticmethod
    def forward(ctx, q, k, v):
        shape = (*q.shape[:-1], v.shape[-1])
        if q.dim() == 4:
            out = torch.empty(shape[0], shape[2], shape[1], shape[3], dtype=q.dtype, device=q.device).transpose(1, 2)
        else:
            out = torch.empty(shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, lse = ctx.saved_tensors
        accumulator = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # noqa: F841 - alive till return
        delta = torch.empty_like(lse)  # noqa: F841
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class _CudaOps(TorchFunctionMode):
    """What a CUDA GPU would do differently from meta: autocast's casts, fused attention."""

    active: _CudaOps | None = None  # the mode of the trace in progress, for checkpoint recomputation

    def __init__(self, autocast: torch.dtype | None):
        super().__init__()
        self.autocast = autocast
        self.cast_cache: dict[int, torch.Tensor] = {}  # autocast caches casts of leaf weights that train

    def __enter__(self):
        _CudaOps.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        _CudaOps.active = None
        return super().__exit__(*exc)

    def _cast(self, t: Any, to: torch.dtype, only: tuple[torch.dtype, ...]) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype not in only:
            return t
        if t.is_leaf and t.requires_grad:
            if id(t) not in self.cast_cache:
                self.cast_cache[id(t)] = t.to(to)
            return self.cast_cache[id(t)]
        return t.to(to)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _KINDS.get(func)
        if kind is None:
            name = getattr(func, "__name__", "")
            kind = _KINDS[func] = ("sdpa" if name == "scaled_dot_product_attention" else
                                   "lower" if name in LOWER_PRECISION else "fp32" if name in FP32 else "")
        if kind and self.autocast is not None:
            if kind == "fp32":
                if kwargs.get("dtype") is None:
                    args, kwargs = _map_tensors(
                        lambda t: self._cast(t, torch.float32, (torch.float16, torch.bfloat16)), (args, kwargs))
            else:
                args, kwargs = _map_tensors(
                    lambda t: self._cast(t, self.autocast, (torch.float32, torch.float64)), (args, kwargs))
        if kind == "sdpa":
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            return _FusedAttention.apply(q, k, v)
        return func(*args, **kwargs)


_KINDS: dict[Any, str] = {}


def _map_tensors(fn, value: Any) -> Any:
    """pytree.tree_map(fn, value) for fn that leaves non-tensors alone, without building a tree spec on
    every call (a torch function's args nest plain tuples, lists and dicts; anything else goes to pytree)."""
    kind = type(value)
    if kind is tuple or kind is list:
        return kind(_map_tensors(fn, v) for v in value)
    if kind is dict:
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (tuple, list, dict)):  # namedtuples, OrderedDicts
        return pytree.tree_map(fn, value)
    return value


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages allocated under it that are still alive, and their peak.

    A storage is counted once however many views it has, from its allocation until it dies
    (a weak reference), rounded as the CUDA caching allocator rounds (512 bytes)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # nothing here is compiled: without this, torch wraps __torch_dispatch__ in a dynamo-disabling
        # wrapper whose cost is paid on every one of the trace's ~50 000 ops
        return False

    def __init__(self, external: set[int]):
        super().__init__()
        self.external, self.live, self.now, self.peak = external, {}, 0, 0
        self.ops = MetaOps()  # meta kernels run once per input layout: most of the trace's time otherwise

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self.ops.run(func, args, kwargs or {})
        if isinstance(out, torch.Tensor):
            self._track(out)
        elif isinstance(out, (tuple, list)):
            for t in out:
                if isinstance(t, torch.Tensor):
                    self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live or key in self.external:
            return
        size = -(-storage.nbytes() // 512) * 512
        self.live[key] = (size, weakref.ref(storage, lambda _, key=key: self._free(key)))
        self.now += size
        if self.now > self.peak:
            self.peak = self.now

    def _free(self, key: int) -> None:
        size, _ = self.live.pop(key, (0, None))
        self.now -= size


def _storages(modules) -> set[int]:
    return {t.untyped_storage()._cdata for m in modules for t in [*m.parameters(), *m.buffers()]}


def _checkpoint(module, *args):
    """diffusers' own gradient checkpointing call (non-reentrant); RNG state is not stashed on meta.

    The backward pass runs without Python function modes, so the recomputation enters the trace's
    `_CudaOps` again: on a GPU, checkpointing recomputes under the forward's autocast state."""
    import torch.utils.checkpoint
    from torch.overrides import _get_current_function_mode_stack

    ops = _CudaOps.active

    def run(*inputs):
        if ops is None or _get_current_function_mode_stack():
            return module(*inputs)
        again = _CudaOps(ops.autocast)
        again.cast_cache = ops.cast_cache
        with again:
            return module(*inputs)

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, preserve_rng_state=False)


def trace_step(cfg, modules: dict[str, torch.nn.Module], trained_encoders: list[torch.nn.Module]) -> tuple[int, int]:
    """(peak bytes one training step allocates, bytes of the adapter gradients) on meta."""
    family = cfg.model.family
    denoiser = modules["transformer" if family == "sd3" else "unet"]
    autocast = autocast_dtype_of(cfg.precision)
    if cfg.train.gradient_checkpointing:  # as train.setup does, with the call swapped for _checkpoint
        from sdsweep.model.load import set_checkpointing

        for module in [denoiser, *trained_encoders]:
            set_checkpointing(module, True)
            for m in module.modules():
                if getattr(m, "gradient_checkpointing", False):
                    m._gradient_checkpointing_func = _checkpoint
    denoiser.train()
    for te in trained_encoders:
        te.train()
    ops = _CudaOps(autocast)
    with _LiveBytes(_storages(modules.values())) as live:
        with ops:
            loss = _forward_loss(cfg, denoiser, modules, trained_encoders, autocast or torch.float32)
        # autocast empties its cache of cast weights when the forward's autocast region ends
        ops.cast_cache.clear()
        loss.backward()
        del loss
        grads = sum(p.grad.numel() * p.grad.element_size() for m in modules.values()
                    for p in m.parameters() if p.grad is not None)
    return live.peak, grads


def _forward_loss(cfg, denoiser, modules, trained_encoders, text_dtype: torch.dtype) -> torch.Tensor:
    """train.diffusion_loss on meta: noisy latents in, a mean squared error out."""
    from sdsweep.data.class_images import examples_per_batch

    family, batch, res, meta = cfg.model.family, examples_per_batch(cfg), cfg.data.resolution, torch.device("meta")
    latents = torch.empty(batch, denoiser.config.in_channels, res // 8, res // 8, device=meta)
    noise = torch.empty_like(latents)
    timesteps = torch.zeros(batch, dtype=torch.long, device=meta)
    embeds, pooled = _text_inputs(cfg, denoiser, modules, trained_encoders, batch, text_dtype)
    if family == "sd3":
        pred = denoiser(hidden_states=latents + noise, timestep=timesteps, encoder_hidden_states=embeds,
                        pooled_projections=pooled).sample
    else:
        added = None
        if family == "sdxl":
            added = {"text_embeds": pooled, "time_ids": torch.empty(batch, 6, device=meta)}
        pred = denoiser(latents + noise, timesteps, embeds, added_cond_kwargs=added).sample
    return torch.nn.functional.mse_loss(pred.float(), noise, reduction="none").mean()


def _text_inputs(cfg, denoiser, modules, trained_encoders, batch: int, dtype: torch.dtype):
    """The denoiser's text conditioning: from trained encoders run now, or as cached features."""
    family, meta = cfg.model.family, torch.device("meta")
    c = denoiser.config
    if trained_encoders:
        hidden, pooled = [], []
        for te in trained_encoders:
            out = te(torch.zeros(batch, 77, dtype=torch.long, device=meta), output_hidden_states=True)
            hidden.append(out.hidden_states[-1 if family == "sd15" else -2])
            pooled.append(out[0])
        embeds = torch.cat(hidden, dim=-1)
        pooled_embeds = pooled[-1] if family == "sdxl" else torch.cat(pooled, dim=-1)
    else:
        width = c.joint_attention_dim if family == "sd3" else c.cross_attention_dim
        embeds = torch.empty(batch, 77, width, dtype=dtype, device=meta)
        pooled_embeds = None
        if family == "sdxl":
            width = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            pooled_embeds = torch.empty(batch, width, dtype=dtype, device=meta)
        elif family == "sd3":
            pooled_embeds = torch.empty(batch, c.pooled_projection_dim, dtype=dtype, device=meta)
    if family == "sd3":
        embeds = torch.nn.functional.pad(embeds, (0, c.joint_attention_dim - embeds.shape[-1]))
        t5 = torch.empty(batch, cfg.model.t5_max_length, c.joint_attention_dim, dtype=embeds.dtype, device=meta)
        embeds = torch.cat([embeds, t5], dim=-2)
    return embeds, pooled_embeds


def trace_vae_encode(vae: torch.nn.Module, batch: int, resolution: int) -> int:
    """Peak bytes of encoding one batch to latents (no gradients), as cache.prepare or train.latents_of do."""
    dtype = next(vae.parameters()).dtype
    with torch.no_grad(), _CudaOps(None), _LiveBytes(_storages([vae])) as live:
        pixels = torch.empty(batch, 3, resolution, resolution, dtype=dtype, device="meta")
        vae.encode(pixels).latent_dist.parameters.float()
    return live.peak


# --- the estimate -----------------------------------------------------------------------------------

_CACHE: dict[str, Estimate] = {}

ESTIMATE_INPUTS = (
    # the components' configs and where they are read from (component_configs)
    "model.family", "model.pretrained", "model.build_tiny", "model.tiny_weights", "model.cache_dir", "model.revision",
    "model.single_file_config", "model.vae", "model.drop_t5", "model.t5_max_length",
    # dtypes, adapters, optimizer state
    "precision.name", "precision.mixed_precision", "precision.base_dtype", "precision.vae_dtype",
    "precision.quantize", "adapter.kind", "adapter.rank", "adapter.dropout", "targets.patterns",
    "targets.transformer_patterns", "text_encoder.train", "text_encoder.patterns", "optimizer.name",
    # the step, what is cached (cache.latents_cached, cache.text_cached) and what stays on the GPU
    "train.batch_size", "train.gradient_checkpointing", "data.resolution", "cache.enabled", "data.crop",
    "data.path", "data.dataset", "data.buckets", "data.bucket_step", "data.max_aspect",
    "tracking.validation_every", "train.ema_decay", "train.ema_on_cpu",
    # prior preservation doubles the step's batch (class_images.examples_per_batch)
    "data.num_class_images",
)
"""The memo's key: every config value the estimate reads, except VALUE_ONLY_INPUTS. tests/test_estimate.py
records what estimates read and checks it against these two lists."""
VALUE_ONLY_INPUTS = ("adapter.alpha", "adapter.init")
"""Read (adapters.peft_config) but they set the adapter's scale and initial values, never a shape or a
dtype: an estimate on meta tensors is the same whatever they are, so alpha / init ablations share one."""


def cache_key(cfg) -> str:
    """What the estimate depends on; cells differing in anything else share one estimate."""
    from omegaconf import Container, OmegaConf

    picked = {}
    for path in ESTIMATE_INPUTS:
        value = OmegaConf.select(cfg, path)
        picked[path] = OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
    return json.dumps(picked, sort_keys=True, default=str)


def estimate_peak(cfg) -> Estimate:
    """The predicted peak of torch.cuda.max_memory_allocated for this trial.

    Computed once per distinct estimator input and remembered: in this process (`_CACHE`) and on
    disk (`<model.cache_dir>/estimates/`), so a resumed sweep, a second process and the workers of a
    parallel launcher reuse it. Never raises: an estimate that cannot be made has total_gb=None and
    says why in `reason` (such an estimate is not remembered on disk: the cause may be passing)."""
    key = cache_key(cfg)
    if key in _CACHE:
        return _CACHE[key]
    started = time.perf_counter()
    configs = _readable_configs(cfg)
    memo = _memo_path(cfg, key, configs) if configs else None
    estimate = _read_memo(memo) if memo else None
    if estimate is None:
        estimate = _estimate_or_reason(cfg, configs)
        if memo and estimate.total_gb is not None:
            _write_memo(memo, estimate)
    estimate.seconds = time.perf_counter() - started
    _CACHE[key] = estimate
    return estimate


def _readable_configs(cfg) -> tuple[dict, list[str]] | None:
    """component_configs, or None when they cannot be read (`_estimate` then says why)."""
    try:
        return component_configs(cfg.model)
    except Exception:  # noqa: BLE001
        return None


def _estimate_or_reason(cfg, configs: tuple[dict, list[str]] | None) -> Estimate:
    try:
        with _collector_paused():
            return _estimate(cfg, configs)
    except EstimateUnavailable as e:
        return Estimate(total_gb=None, reason=str(e))
    except Exception as e:  # noqa: BLE001 - the estimator must never cost a trial
        log.warning("memory estimate failed (%s: %s); the trial is not affected", type(e).__name__, e)
        return Estimate(total_gb=None, reason=f"the estimator failed: {type(e).__name__}: {e}")


@contextmanager
def _collector_paused():
    """No cyclic garbage collection while estimating: the meta modules and the traced step's autograd
    graph are a few million objects that every full collection walks again (about a third of the estimate's
    time). The trace counts storages freed by reference counting; none is left to the collector (the
    figures are the same with it on), and it runs as usual once the estimate is done."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


ESTIMATOR_VERSION = 2
"""Raise it whenever what `_estimate` computes changes: remembered estimates of older versions are not read."""


def _memo_path(cfg, key: str, configs: tuple[dict, list[str]]):
    """Where this estimate is remembered: named by a hash of everything it depends on, i.e. the config
    values it reads (cache_key), the components' configs (a local model folder can change under one
    path), and the versions of the estimator and of the libraries whose modules it traces."""
    import hashlib
    import importlib.metadata as metadata
    from pathlib import Path

    components, notes = configs
    versions = {lib: metadata.version(lib) for lib in ("torch", "diffusers", "transformers", "peft")}
    inputs = json.dumps({"key": key, "configs": components, "notes": notes, "versions": versions,
                         "estimator": ESTIMATOR_VERSION}, sort_keys=True, default=str)
    digest = hashlib.sha256(inputs.encode()).hexdigest()[:32]
    return Path(cfg.model.cache_dir).expanduser() / "estimates" / f"{digest}.json"


def _read_memo(path) -> Estimate | None:
    """A remembered estimate, or None when there is none or it cannot be read (then it is computed again)."""
    try:
        fields = json.loads(path.read_text())
        return Estimate(**{**fields, "remembered": True})
    except (OSError, ValueError, TypeError):
        return None


def _write_memo(path, estimate: Estimate) -> None:
    from dataclasses import asdict

    from sdsweep.io import atomic_write_json

    try:
        atomic_write_json(path, {k: v for k, v in asdict(estimate).items() if k not in ("seconds", "remembered")})
    except OSError as e:  # a read-only cache folder costs a recomputation next time, nothing else
        log.debug("could not remember the memory estimate in %s: %s", path, e)


def _estimate(cfg, configs: tuple[dict, list[str]] | None = None) -> Estimate:
    """The estimate itself; `configs`: component_configs(cfg.model) when the caller read them already."""
    from sdsweep.model import adapters

    family, pr = cfg.model.family, cfg.precision
    configs, notes = configs or component_configs(cfg.model)
    notes = list(notes)
    cached_latents = _latents_cached(cfg, notes)
    modules = meta_modules(configs)
    denoiser_name = "transformer" if family == "sd3" else "unet"
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    weights = {name: frozen_bytes(name, m, pr) for name, m in modules.items()}
    from diffusers.utils import logging as diffusers_logging

    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "modules that should be kept in float32": none here
    try:
        for name, m in modules.items():  # the dtypes models.place gives them (a quantized UNet traced as base_dtype)
            m.to(DTYPES[_placed_dtype(name, m, pr)])
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if cfg.adapter.kind == adapters.FULL:  # its weights are the trainable fp32 copy counted below, not frozen ones
        weights[denoiser_name] = sum(b.numel() * b.element_size() for b in modules[denoiser_name].buffers())
    clip_names = [n for n in modules if n.startswith("text_encoder") and not (family == "sd3" and n.endswith("_3"))]
    trained = []
    if cfg.adapter.kind == "textual_inversion":
        # the embedding matrices train whole (gradients and optimizer state for every row, a few of them kept)
        # and model.textual_inversion keeps an fp32 copy of each to put the frozen rows back
        trained = [modules[n] for n in clip_names]
        for module in trained:
            weight = module.get_input_embeddings().weight
            weight.data = weight.data.float()
            weight.requires_grad_(True)
    else:
        _attach_uninitialised(modules[denoiser_name], cfg.adapter,
                              adapters.denoiser_patterns(cfg.targets, family), denoiser_name)
    if cfg.text_encoder.train:
        for i, name in enumerate(clip_names):
            _attach_uninitialised(modules[name], cfg.adapter, list(cfg.text_encoder.patterns),
                                  f"text encoder {i + 1}")
            trained.append(modules[name])
    trainable = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    adapter_at_rest = sum(p.numel() * 4 + optimizer_state_bytes(p.numel(), cfg.optimizer.name) for p in trainable)
    if cfg.adapter.kind == "textual_inversion":
        adapter_at_rest += sum(p.numel() * 4 for p in trainable)
    averaged, offloaded = cfg.train.ema_decay > 0, cfg.train.ema_on_cpu  # both read: both are memo inputs
    if averaged and not offloaded:  # the moving average: one fp32 copy of the adapter
        adapter_at_rest += sum(p.numel() * 4 for p in trainable)

    step_peak, grads = trace_step(cfg, modules, trained)
    from sdsweep.data.class_images import examples_per_batch

    # cached latents are encoded train.batch_size at a time (cache.prepare), live ones a whole step's batch
    encode_batch = cfg.train.batch_size if cached_latents else examples_per_batch(cfg)
    encode_peak = trace_vae_encode(modules["vae"], encode_batch, cfg.data.resolution)
    workspace, all_weights = WORKSPACE_GIB * GIB, sum(weights.values())
    offloadable = _offloadable(cfg, weights, cached_latents)
    # train.offload_cached_encoders: validation during training keeps every module where sampling needs it
    resident = all_weights - (0.0 if cfg.tracking.validation_every else offloadable)
    if cached_latents:
        # filling the cache runs before any adapter exists, with the denoiser parked in CPU memory
        # (train.setup) unless it is quantized; the training step then runs without the idle encoders
        parked = weights[denoiser_name] if pr.quantize == "none" else 0.0
        encoding = all_weights - parked + encode_peak + workspace
    else:  # live encoding every step, beside the adapter and its optimizer state
        encoding = resident + adapter_at_rest + encode_peak + workspace
    phases = {"training step": resident + adapter_at_rest + step_peak + workspace, "VAE encoding": encoding}
    phase = max(phases, key=phases.get)
    peak = step_peak if phase == "training step" else encode_peak
    if pr.quantize != "none":
        notes.append(f"precision={pr.name}: activations estimated as for {pr.base_dtype} "
                     "(bitsandbytes' own not modelled)")
    return Estimate(
        total_gb=phases[phase] / GIB, weights_gb=sum(weights.values()) / GIB,
        adapter_gb=(adapter_at_rest + grads) / GIB,
        activations_gb=max(peak - grads, 0) / GIB, workspace_gb=WORKSPACE_GIB, peak_phase=phase,
        offloadable_gb=offloadable / GIB, cached_latents=cached_latents,
        phases={k: v / GIB for k, v in phases.items()},
        weights_by_component={k: v / GIB for k, v in weights.items()}, params=params,
        trainable_params=sum(p.numel() for p in trainable), notes=notes,
    )




def _attach_uninitialised(module: torch.nn.Module, adapter, patterns: list[str], what: str) -> None:
    """adapters.attach without torch.nn.init: peft builds each adapter layer on the CPU, fills it with
    random values (a third of attaching SDXL's 560 LoRA layers) and then moves it to its base layer's
    device, meta here, where no value exists."""
    from diffusers.models.modeling_utils import no_init_weights

    from sdsweep.model import adapters

    with no_init_weights():
        adapters.attach(module, adapter, patterns, what)


def _latents_cached(cfg, notes: list[str]) -> bool:
    """cache.latents_cached from the config alone; where that depends on images not read yet, live
    (the larger peak: the VAE stays on the GPU and encodes beside the adapter), said in `notes`."""
    from sdsweep.data.cache import latents_cached

    cached = latents_cached(cfg)
    if cached is None:
        notes.append("data.crop=random on images not read yet: latents assumed encoded live every step; "
                     "if every image already has its target's shape they are cached and the peak is lower")
    return bool(cached)


def _offloadable(cfg, weights: dict[str, float], cached_latents: bool) -> float:
    """Weights train.offload_cached_encoders moves off the GPU while training: the text encoders
    when their outputs are cached, the VAE when latents are."""
    from sdsweep.data.cache import text_cached

    idle = [n for n in weights if n.startswith("text_encoder")] if text_cached(cfg) else []
    if cached_latents:
        idle.append("vae")
    return sum(weights[n] for n in idle)
