"""Training one trial's adapter: set-up (data, base model, cache, adapter, optimizer) and the loop.

trial.py runs a trial around this (metrics.json, failures, evaluation); this module raises
on failure and leaves the bookkeeping to it.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
from omegaconf import DictConfig

from sdsweep.data import cache
from sdsweep.data.dataset import count_long_captions, load_dataset, make_loader
from sdsweep.io import atomic_write_json
from sdsweep.model import adapters, kept_base
from sdsweep.model import load as models
from sdsweep.model.conditioning import encode_text, prompt_embeddings, sdxl_time_ids
from sdsweep.sweep import early_stop
from sdsweep.train import objectives
from sdsweep.train.checkpoints import TrainState, list_checkpoints, load_checkpoint, save_checkpoint
from sdsweep.train.meters import MemoryMeter, SpeedMeter
from sdsweep.train.tracking import Tracker, finish_profiler, make_profiler

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
    memory: MemoryMeter
    timings: dict
    """Seconds spent reading data, loading the base (0 when kept from the last trial), filling the cache."""
    offloaded: list[str]
    """Frozen modules parked in CPU memory while training (see offload_cached_encoders)."""


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


def setup(cfg: DictConfig, trial_number: int = 0) -> Setup:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from diffusers.optimization import get_scheduler

    device = models.resolve_device(cfg.device, trial_number)
    if device.type == "cuda" and device.index is not None:
        # accelerate places models on the *current* CUDA device: make it this trial's GPU
        torch.cuda.set_device(device)
    # under `accelerate launch` / torchrun this joins the other processes of the trial (DDP). They
    # wait for the main one while it downloads the base, fills the cache, or samples validation
    # images: far longer than the default collective timeout (10 min with nccl)
    accelerator = Accelerator(cpu=device.type == "cpu",
                              kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=2))])
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    torch.manual_seed(cfg.seed)
    # the main process builds tiny models, data and cache entries first; the others then read them
    with accelerator.main_process_first():
        # data first: a folder without captions should fail in a second, not after loading SDXL
        dataset, report = load_dataset(cfg.data, cfg.model.cache_dir)
        timings["data_s"], clock = time.perf_counter() - clock, time.perf_counter()
        components, reused = kept_base.acquire(cfg, device)
        timings["load_s"], clock = time.perf_counter() - clock, time.perf_counter()
        report.truncated_captions = count_long_captions(dataset.records, components.tokenizers)
        mp = cfg.precision.mixed_precision
        autocast_dtype = None if mp == "no" else models.DTYPES[mp]
        # before any adapter is attached: the cache keys hash the frozen modules as loaded
        data_report = report.summary()
        # the encoders fill the cache with the denoiser parked in CPU memory: at 1024 px the fp32 VAE's
        # activations would otherwise sit on top of SDXL's UNet (bitsandbytes layers stay where they are)
        park = cfg.cache.enabled and device.type == "cuda" and cfg.precision.quantize == "none"
        if park:
            components.unet.to("cpu")
        data_report["cache"] = cache.prepare(cfg, components, dataset, device, autocast_dtype)
        if park:
            components.unet.to(device)
        timings["cache_s"] = time.perf_counter() - clock
    offloaded = offload_cached_encoders(cfg, components, data_report["cache"], device)

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
        for module in [components.unet, *trained_encoders]:
            models.set_checkpointing(module, True)
    components.unet.train()

    trainable = {
        f"{name}.{pname}": p
        for name, module in components.modules().items()
        for pname, p in module.named_parameters()
        if p.requires_grad
    }
    te_lr = cfg.text_encoder.lr or cfg.train.lr
    if trained_encoders and cfg.optimizer.name == "prodigy" and te_lr != cfg.train.lr:
        # Prodigy estimates one step size for all groups and refuses different lrs (as diffusers'
        # scripts do, the text encoders then use train.lr, which is Prodigy's multiplier)
        log.warning("optimizer=prodigy: text_encoder.lr=%s is ignored; the text encoders use train.lr=%s",
                    te_lr, cfg.train.lr)
        te_lr = cfg.train.lr
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
    if cfg.train.compile:
        components.unet = compiled(components.unet, cfg.train)
    components.unet, optimizer = accelerator.prepare(components.unet, optimizer)
    # run_trial replaces this meter with one started before set-up, so the peak covers loading too
    return Setup(components, device, dataset, data_report, trainable, optimizer, scheduler, scaler,
                 accelerator, autocast_dtype, MemoryMeter(device), {**timings, "base_reused": reused},
                 offloaded)


def compiled(module: torch.nn.Module, train_cfg: DictConfig) -> torch.nn.Module:
    """`module` behind torch.compile (train.compile_backend, train.compile_mode). A wrapper, not
    Module.compile(): the module itself stays plain for saving, evaluation and the next trial, and
    denoiser() takes the wrapper off with the others."""
    mode = None if train_cfg.compile_mode == "default" else train_cfg.compile_mode
    return torch.compile(module, backend=train_cfg.compile_backend, mode=mode)


def denoiser(s: Setup) -> torch.nn.Module:
    """The trial's UNet / SD3 transformer itself, out of what training wraps it in (DDP, torch.compile)."""
    return s.accelerator.unwrap_model(s.components.unet, keep_torch_compile=False)


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


def train(cfg: DictConfig, s: Setup, trial_dir: Path, tracker: Tracker | None = None) -> dict:
    tracker = tracker or Tracker()
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

    # train.batch_size is per process (as in diffusers' scripts): with N processes a step trains
    # on batch_size x grad_accum x N samples, each process on its own share of them
    rank, world, main = s.accelerator.process_index, s.accelerator.num_processes, s.accelerator.is_main_process
    samples_per_step = cfg.train.batch_size * accum * world
    loader = make_loader(s.dataset, cfg.train.batch_size, cfg.seed, state.step * samples_per_step,
                         cfg.data.num_workers, rank, world)
    batches = iter(loader)
    unet = s.components.unet
    params = list(s.trainable.values())
    # DDP averages the gradients of the unet it wraps; the text encoders' adapters are averaged here
    unsynced = [p for name, p in s.trainable.items() if not name.startswith("unet.")] if world > 1 else []
    trace: dict | None = {"rank": rank, "keys": [], "losses": []} if cfg.debug.trace_data else None
    checks, stop = early_stop.check_steps(cfg), None
    pending: list[torch.Tensor] = []  # per-step losses still on the device
    smoothed = state.losses[-1] if state.losses else None
    speed = SpeedMeter(cfg.tracking.warmup_steps, samples_per_step)
    speed.start(state.step)
    started = time.perf_counter()
    profiler = make_profiler(cfg, trial_dir) if main else None

    for step in range(state.step, max_steps):
        # every random draw of a step (noise, timesteps, dropout) depends only on (seed, step) and
        # the process's rank, so a resumed trial reproduces an uninterrupted one
        torch.manual_seed((cfg.seed * 1_000_003 + step) * world + rank)
        step_loss = torch.zeros((), device=s.device)
        for micro in range(accum):
            batch = next(batches)
            if trace is not None:
                trace["keys"] += batch["key"].tolist()
            sync = s.accelerator.no_sync(unet) if micro < accum - 1 else nullcontext()
            with sync:
                loss = diffusion_loss(s, cfg, batch)
                if step == cfg.debug.nan_at_step:
                    loss = loss * float("nan")
                s.scaler.scale(loss / accum).backward()
            step_loss += loss.detach() / accum
        if trace is not None:
            trace["losses"].append(step_loss.item())
        _average_gradients(unsynced, world)
        if cfg.train.nan_policy == "skip" and not torch.isfinite(step_loss if world == 1 else s.accelerator.reduce(step_loss)):
            # drop this step's update; data and schedule move on as if it had happened
            state.skipped_steps.append(step + 1)
            log.warning("step %d: loss is %s, update skipped (%d of train.max_nan_skips=%d)", step + 1,
                        step_loss.item(), len(state.skipped_steps), cfg.train.max_nan_skips)
            if len(state.skipped_steps) > cfg.train.max_nan_skips:
                raise NonFiniteLoss(f"loss was NaN/inf at {len(state.skipped_steps)} steps "
                                    f"(more than train.max_nan_skips={cfg.train.max_nan_skips}): "
                                    f"steps {state.skipped_steps[:10]}")
            grad_norm = torch.full((), float("nan"))
        else:
            s.scaler.unscale_(s.optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm or float("inf"))
            s.scaler.step(s.optimizer)
            s.scaler.update()
        lrs = s.scheduler.get_last_lr()
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        pending.append(torch.stack([step_loss, grad_norm.detach().float().to(step_loss.device)]))
        done = step + 1
        if profiler is not None:
            profiler.step()

        # loss.item() every step would sync the GPU each step: check and log every log_every
        if done % cfg.train.log_every == 0 or done == max_steps:
            values = torch.stack(pending)
            # the loss of the trial is the mean over its processes (one collective per log, not per step)
            values = (values if world == 1 else s.accelerator.reduce(values, "mean")).tolist()
            first_step = done - len(values) + 1
            first_bad = next((i for i, (v, _) in enumerate(values)
                              if not math.isfinite(v) and first_step + i not in state.skipped_steps), None)
            if first_bad is not None:
                bad_step = first_step + first_bad
                raise NonFiniteLoss(f"loss became {values[first_bad][0]} at step {bad_step}")
            figures = {**speed.read(done), **s.memory.read()}
            for i, (value, norm) in enumerate(values):
                smoothed = value if smoothed is None else cfg.tracking.smoothing * smoothed + (1 - cfg.tracking.smoothing) * value
                row = {"train/loss": value, "train/loss_smoothed": smoothed, "train/grad_norm": norm,
                       **{f"train/lr_{name}": lr for name, lr in zip(("unet", "text_encoder"), lrs)}}
                this_step = done - len(values) + i + 1
                tracker.log({**row, **figures} if this_step == done else row, this_step)
            state.losses.extend(v for v, _ in values)
            pending.clear()
            log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.2f it/s", done, max_steps, values[-1][0],
                     values[-1][1], lrs[0], figures["perf/it_per_s"])
        if main and cfg.tracking.validation_every and (done % cfg.tracking.validation_every == 0 or done == max_steps):
            validate_images(cfg, s, trial_dir, tracker, done)
        if main and cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and not pending:
            state.step = done
            state.elapsed_s += time.perf_counter() - started
            started = time.perf_counter()
            state.scheduler, state.scaler = s.scheduler.state_dict(), s.scaler.state_dict()
            save_checkpoint(checkpoint_root, state, s.trainable, s.optimizer, cfg.train.checkpoints_keep)
        if done == cfg.debug.raise_at_step:
            raise RuntimeError(f"debug.raise_at_step={done}: simulated crash")
        if checks and checks[0] <= len(state.losses) and (stop := _early_stop(cfg, s, trial_dir, state.losses, checks)):
            log.warning("%s", stop.reason())
            break

    if profiler is not None:
        finish_profiler(profiler, trial_dir, tracker)
    if trace is not None:
        _write_trace(trial_dir, trace, s.trainable)
    finite = [v for v in state.losses if math.isfinite(v)]  # skipped NaN steps stay in the curve only
    stopped = {"reason": stop.reason(), "early_stopped_at_step": stop.step, "steps_saved": stop.steps_saved,
               "early_stop": stop.__dict__} if stop else {}
    return {
        "steps": max_steps,
        **stopped,
        "processes": world,
        "resumed_from_step": resumed_from,
        "train_s": state.elapsed_s + time.perf_counter() - started,
        **speed.summary(),
        "losses": state.losses,
        "nan_skipped_steps": state.skipped_steps,
        "final_loss": finite[-1] if finite else None,
        "mean_loss": sum(finite) / len(finite) if finite else None,
    }


def _early_stop(cfg: DictConfig, s: Setup, trial_dir: Path, losses: list[float],
                checks: list[int]) -> early_stop.Stop | None:
    """Take the check steps the loss history has reached; the first that stops the trial, or None.
    The main process reads the peers and decides for all processes, which must stop together."""
    stop = None
    while stop is None and checks and checks[0] <= len(losses):
        step = checks.pop(0)
        if s.accelerator.is_main_process:
            stop = early_stop.verdict(cfg, trial_dir, losses, step)
    if s.accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        stop = broadcast_object_list([stop])[0]
    return stop


def _write_trace(trial_dir: Path, trace: dict, trainable: dict[str, torch.nn.Parameter]) -> None:
    """debug.trace_data: what this process trained on, and a checksum of the weights it ended with."""
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(trainable):
        digest.update(name.encode())
        digest.update(trainable[name].detach().float().cpu().numpy().tobytes())
    atomic_write_json(trial_dir / "debug" / f"rank-{trace['rank']}.json", {**trace, "weights_sha256": digest.hexdigest()})


def _average_gradients(params: list[torch.nn.Parameter], world: int) -> None:
    """Average gradients over the processes in one collective (what DDP does for the module it wraps)."""
    grads = [p.grad for p in params if p.grad is not None]
    if world == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world
    for g, new in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(new.view_as(g))


def validate_images(cfg: DictConfig, s: Setup, trial_dir: Path, tracker: Tracker, step: int) -> None:
    """Fixed prompts and seeds (the eval group's), so a grid cell compares across trials and time."""
    from sdsweep.eval.evaluate import build_pipeline, generate, read_prompts

    pipe = build_pipeline(s.components)  # shares the trial's modules, adapters included
    samples = generate(pipe, read_prompts(cfg.eval), list(cfg.eval.seeds), cfg.eval, s.autocast_dtype)
    for module in s.components.modules().values():  # generate() put them in eval mode
        module.train(any(p.requires_grad for p in module.parameters()))
    out = trial_dir / "validation" / f"step-{step:06d}"
    out.mkdir(parents=True, exist_ok=True)
    for sample in samples:
        sample.image.save(out / sample.file)
    tracker.log_images("validation", [(f"{x.prompt} (seed {x.seed})", x.image) for x in samples], step)
