"""One trial: set up, train, save the adapter, and always leave a metrics.json behind.

`run_trial` never raises for a trial's own failure (bad config, NaN, out of memory, any
exception, even `sys.exit`): it records `status: failed` with the reason and frees what the
trial held, because Hydra's basic launcher runs every cell of a sweep in one process and
the next cell must start clean. Only Ctrl-C (KeyboardInterrupt) is passed on.
"""

from __future__ import annotations

import gc
import logging
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from . import adapters, cache, models, objectives
from .checkpoints import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from .conditioning import encode_text, prompt_embeddings, sdxl_time_ids
from .config import validate
from .data import load_dataset, make_loader
from .io import atomic_write_json

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; training this trial further would be meaningless."""


@dataclass
class Setup:
    components: models.Components
    device: torch.device
    dataset: object
    data_report: dict
    trainable: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    accelerator: object
    autocast_dtype: torch.dtype | None


# --- set-up -----------------------------------------------------------------------------------


def build_optimizer(cfg: DictConfig, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    o = cfg.optimizer
    common = dict(weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps)
    if o.name == "adamw":
        # the fused kernel is one launch for all parameters instead of several per tensor
        return torch.optim.AdamW(groups, fused=device.type == "cuda", **common)
    if o.name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **common)
    from prodigyopt import Prodigy

    return Prodigy(groups, d_coef=o.d_coef, safeguard_warmup=o.warmup_steps > 0, use_bias_correction=True, **common)


def setup(cfg: DictConfig) -> Setup:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler

    device = models.resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    # data first: a folder without captions should fail in a second, not after loading SDXL
    dataset, report = load_dataset(cfg.data, cfg.model.cache_dir)
    components = models.load_components(cfg.model)
    models.place(components, cfg.precision, device)
    mp = cfg.precision.mixed_precision
    autocast_dtype = None if mp == "no" else models.DTYPES[mp]
    # before any adapter is attached: the cache keys hash the frozen modules as loaded
    data_report = report.summary()
    data_report["cache"] = cache.prepare(cfg, components, dataset, device, autocast_dtype)

    # adapter initialisation depends on the seed alone, not on what set-up drew before it
    # (filling the cache or not must not change the trial)
    torch.manual_seed(cfg.seed)
    denoiser = "transformer" if components.family == "sd3" else "unet"
    adapters.attach(components.unet, cfg.adapter, adapters.denoiser_patterns(cfg.targets, components.family), denoiser)
    trained_encoders = components.trainable_text_encoders if cfg.text_encoder.train else []
    for i, te in enumerate(trained_encoders):
        adapters.attach(te, cfg.adapter, list(cfg.text_encoder.patterns), f"text encoder {i + 1}")
        te.train()  # adapter dropout acts only in training mode (the frozen CLIP has no dropout of its own)
    if cfg.train.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        for te in trained_encoders:
            te.gradient_checkpointing_enable()
    components.unet.train()

    trainable = {
        f"{name}.{pname}": p
        for name, module in components.modules().items()
        for pname, p in module.named_parameters()
        if p.requires_grad
    }
    te_lr = cfg.text_encoder.lr or cfg.train.lr
    groups = [{"params": adapters.trainable_parameters(components.unet), "lr": cfg.train.lr}]
    if trained_encoders:
        te_params = [p for te in trained_encoders for p in adapters.trainable_parameters(te)]
        groups.append({"params": te_params, "lr": te_lr})
    optimizer = build_optimizer(cfg, groups, device)
    scheduler = get_scheduler(
        cfg.optimizer.scheduler,
        optimizer,
        num_warmup_steps=cfg.optimizer.warmup_steps,
        num_training_steps=cfg.train.max_steps,
    )
    # Mixed precision is autocast + GradScaler from torch.amp rather than accelerate's, because
    # accelerate silently turns fp16 off on a CPU, and precision=fp16 must mean fp16 everywhere.
    # accelerate still owns device placement, multi-GPU (DDP) and gradient-accumulation syncs.
    scaler = torch.amp.GradScaler(device.type, enabled=mp == "fp16")
    accelerator = Accelerator(cpu=device.type == "cpu")
    components.unet, optimizer = accelerator.prepare(components.unet, optimizer)
    return Setup(components, device, dataset, data_report, trainable, optimizer, scheduler, scaler,
                 accelerator, autocast_dtype)


# --- one step's loss ----------------------------------------------------------------------------


def latents_of(s: Setup, batch: dict) -> torch.Tensor:
    """Scaled latents of the batch: sampled from its cached latent distribution, or encoded now.

    Either way one `DiagonalGaussianDistribution.sample()`: the same random draw, the same latents.
    """
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    vae = s.components.vae
    with torch.no_grad():
        if "latent_dist" in batch:
            params = batch["latent_dist"].to(s.device)
        else:
            pixels = batch["pixel_values"].to(s.device, dtype=next(vae.parameters()).dtype)
            params = vae.encode(pixels).latent_dist.parameters
        latents = DiagonalGaussianDistribution(params).sample()
        if getattr(vae.config, "shift_factor", None) is not None:
            latents = latents - vae.config.shift_factor
        # the fp32 VAE's latents join the half-precision UNet via autocast. Contiguous: the VAE
        # can return a channels-last layout, and randn_like(latents) follows the layout, so the
        # same seed would give other noise for encoded and for cached latents
        return (latents * vae.config.scaling_factor).float().contiguous()


def diffusion_loss(s: Setup, cfg: DictConfig, batch: dict) -> torch.Tensor:
    """The family's training loss on one batch: DDPM (sd15, sdxl) or flow matching (sd3)."""
    comps, device = s.components, s.device
    latents = latents_of(s, batch)
    with torch.autocast(device.type, dtype=s.autocast_dtype or torch.float32, enabled=s.autocast_dtype is not None):
        if "text_features" in batch:  # cached outputs of the frozen text encoders
            parts = {k: v.to(device) for k, v in batch["text_features"].items()}
        else:
            with torch.set_grad_enabled(cfg.text_encoder.train):
                parts = encode_text(comps, batch["captions"], device)
        embeds, pooled = prompt_embeddings(comps, parts)
        if comps.family == "sd3":

            def denoise(noisy, timesteps):
                return comps.unet(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                                  pooled_projections=pooled).sample

            loss = objectives.flow_matching_loss(denoise, comps.noise_scheduler, cfg.train, latents)
        else:
            added = None
            if comps.family == "sdxl":
                added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(batch, device)}

            def denoise(noisy, timesteps):
                return comps.unet(noisy, timesteps, embeds, added_cond_kwargs=added).sample

            loss = objectives.ddpm_loss(denoise, comps.noise_scheduler, cfg.train, latents)
    return loss.mean()


# --- the loop ------------------------------------------------------------------------------------


def train(cfg: DictConfig, s: Setup, trial_dir: Path) -> dict:
    checkpoint_root = trial_dir / "checkpoints"
    max_steps, accum = cfg.train.max_steps, cfg.train.grad_accum
    state = TrainState(step=0, losses=[], elapsed_s=0.0, scheduler={}, scaler={})
    resumed_from = None
    if existing := list_checkpoints(checkpoint_root):
        # the same trial run again in the same folder continues where it stopped
        state = load_checkpoint(existing[-1], s.trainable, s.optimizer)
        s.scheduler.load_state_dict(state.scheduler)
        if state.scaler:
            s.scaler.load_state_dict(state.scaler)
        resumed_from = state.step
        log.info("resuming from %s at step %d", existing[-1].name, state.step)

    samples_per_step = cfg.train.batch_size * accum
    loader = make_loader(s.dataset, cfg.train.batch_size, cfg.seed, state.step * samples_per_step,
                         cfg.data.num_workers)
    batches = iter(loader)
    unet = s.components.unet
    params = list(s.trainable.values())
    pending: list[torch.Tensor] = []  # per-step losses still on the device
    peak_rss = psutil.Process().memory_info().rss
    started, first_step_done = time.perf_counter(), None

    for step in range(state.step, max_steps):
        # every random draw of a step (noise, timesteps, dropout) depends only on (seed, step),
        # so a resumed trial reproduces an uninterrupted one
        torch.manual_seed(cfg.seed * 1_000_003 + step)
        step_loss = torch.zeros((), device=s.device)
        for micro in range(accum):
            batch = next(batches)
            sync = s.accelerator.no_sync(unet) if micro < accum - 1 else _nullcontext()
            with sync:
                loss = diffusion_loss(s, cfg, batch)
                if step == cfg.debug.nan_at_step:
                    loss = loss * float("nan")
                s.scaler.scale(loss / accum).backward()
            step_loss += loss.detach() / accum
        s.scaler.unscale_(s.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        pending.append(step_loss)
        done = step + 1
        if first_step_done is None:
            first_step_done = time.perf_counter()

        # loss.item() every step would sync the GPU each step: check and log every log_every
        if done % cfg.train.log_every == 0 or done == max_steps:
            values = torch.stack(pending).tolist()
            first_bad = next((i for i, v in enumerate(values) if not math.isfinite(v)), None)
            if first_bad is not None:
                bad_step = done - len(values) + first_bad + 1
                raise NonFiniteLoss(f"loss became {values[first_bad]} at step {bad_step}")
            state.losses.extend(values)
            pending.clear()
            peak_rss = max(peak_rss, psutil.Process().memory_info().rss)
            log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e", done, max_steps, values[-1],
                     float(grad_norm), s.scheduler.get_last_lr()[0])
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and not pending:
            state.step = done
            state.elapsed_s += time.perf_counter() - started
            started = time.perf_counter()
            state.scheduler, state.scaler = s.scheduler.state_dict(), s.scaler.state_dict()
            save_checkpoint(checkpoint_root, state, s.trainable, s.optimizer, cfg.train.checkpoints_keep)
        if done == cfg.debug.raise_at_step:
            raise RuntimeError(f"debug.raise_at_step={done}: simulated crash")

    now = time.perf_counter()
    steps_run = max_steps - (resumed_from or 0)
    # the first step pays for lazy initialisation: leave it out of the speed figure
    timed_steps = steps_run - 1
    steps_per_s = timed_steps / (now - first_step_done) if first_step_done and timed_steps > 0 else None
    return {
        "steps": max_steps,
        "resumed_from_step": resumed_from,
        "train_s": state.elapsed_s + now - started,
        "steps_per_s": steps_per_s,
        "images_per_s": steps_per_s * samples_per_step if steps_per_s else None,
        "losses": state.losses,
        "final_loss": state.losses[-1] if state.losses else None,
        "mean_loss": sum(state.losses) / len(state.losses) if state.losses else None,
        "peak_rss_mb": peak_rss / 2**20,
    }


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --- the trial ----------------------------------------------------------------------------------


def _memory_figures(device: torch.device) -> dict:
    if device.type == "cuda":
        return {
            "peak_vram_mb": torch.cuda.max_memory_allocated() / 2**20,
            "peak_vram_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        }
    return {"peak_vram_mb": None}


def run_trial(cfg: DictConfig, trial_dir: Path, choices: dict | None = None, overrides: list[str] | None = None) -> dict:
    """Train one cell of the matrix in `trial_dir`; return (and write) its metrics.json."""
    trial_dir = Path(trial_dir)
    trial_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    metrics: dict = {"choices": choices or {}, "overrides": list(overrides or []), "status": "running"}
    device = torch.device("cpu")
    s: Setup | None = None
    try:
        validate(cfg)
        device = models.resolve_device(cfg.device)
        if device.type == "cuda":
            # one process runs every trial: without this each trial reports its predecessor's peak
            torch.cuda.reset_peak_memory_stats()
        s = setup(cfg)
        metrics.update(
            device=str(device),
            data=s.data_report,
            trainable_params=sum(p.numel() for p in s.trainable.values()),
            total_params=sum(adapters.count_parameters(m, trainable=False) for m in s.components.modules().values()),
        )
        metrics.update(train(cfg, s, trial_dir))
        adapter_dir = adapters.save_adapter(trial_dir / "adapter", s.components.family, cfg.adapter.kind,
                                            _unwrapped_modules(s))
        metrics["adapter_mb"] = sum(f.stat().st_size for f in adapter_dir.rglob("*") if f.is_file()) / 2**20
        metrics["status"] = "finished"
    except KeyboardInterrupt:
        metrics.update(status="interrupted", reason="KeyboardInterrupt")
        raise
    except torch.cuda.OutOfMemoryError as e:
        metrics.update(status="failed", reason="out of memory", detail=str(e).splitlines()[0])
    except BaseException as e:  # noqa: BLE001 - SystemExit too: a sys.exit in a trial must not end the sweep
        metrics.update(status="failed", reason=f"{type(e).__name__}: {e}")
        metrics["traceback"] = traceback.format_exc(limit=8)
        log.error("trial failed: %s", metrics["reason"])
    finally:
        metrics.update(_memory_figures(device))
        metrics["wall_s"] = time.perf_counter() - started
        if metrics.get("peak_vram_mb") is not None:
            metrics["peak_memory_mb"] = metrics["peak_vram_mb"]
        else:
            metrics["peak_memory_mb"] = metrics.get("peak_rss_mb") or psutil.Process().memory_info().rss / 2**20
        atomic_write_json(trial_dir / "metrics.json", metrics)
        _release(s)
    return metrics


def _unwrapped_modules(s: Setup) -> dict[str, torch.nn.Module]:
    modules = s.components.modules()
    modules["unet"] = s.accelerator.unwrap_model(s.components.unet)
    return modules


def _release(s: Setup | None) -> None:
    """Free the trial's models and optimizer state before the next trial of the sweep."""
    from accelerate.state import AcceleratorState

    if s is not None:
        s.accelerator.free_memory()
        s.components = s.optimizer = s.trainable = None  # type: ignore[assignment]
    AcceleratorState._reset_state(reset_partial_state=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def config_to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
