"""The training loop of one trial, and the loss of one step.

`train` reads top to bottom: resume, then per step seed, accumulate, step the optimizer, log,
checkpoint, ask whether to stop. What it does not own comes in as arguments: the tracker (a
null object when tracking is off), `stopper` (early stopping, decided by the sweep) and
`on_validation` (sampling images, decided by the evaluation stage).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from sdsweep.config.schema import trains_text_encoders
from sdsweep.data.class_images import class_seed
from sdsweep.data.dataset import make_loader, with_class_examples
from sdsweep.io import atomic_write_json
from sdsweep.layout import TrialDir
from sdsweep.model.conditioning import encode_text, prompt_embeddings, sdxl_time_ids
from sdsweep.model.precision import autocast
from sdsweep.train import objectives
from sdsweep.train.checkpoints import TrainState, load_into, newest_intact, save_checkpoint
from sdsweep.train.meters import SpeedMeter
from sdsweep.train.setup import Setup
from sdsweep.train.tracking import Tracker, finish_profiler, make_profiler

log = logging.getLogger(__name__)


class NonFiniteLoss(FloatingPointError):
    """The loss became NaN or inf; training this trial further would be meaningless.

    `figures`: the training figures up to the failing step (set by `train`), as a finished trial
    has them; `losses` ends with the failing step's loss (null in metrics.json)."""

    figures: dict[str, Any] = {}


class Stopper(Protocol):
    """Early stopping as the loop sees it (sweep/early_stop.py provides the sweep's): whether a check
    is due after `steps_logged` steps (the same on every process), and then a stop (with .reason(),
    .step, .steps_saved) or None."""

    def due(self, steps_logged: int) -> bool: ...

    def check(self, losses: list[float]) -> Any | None: ...


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
    return per_sample_loss(s, cfg, batch).mean()


def per_sample_loss(s: Setup, cfg: DictConfig, batch: dict) -> torch.Tensor:
    """The family's training loss of each example of the batch."""
    comps, device = s.components, s.device
    latents = latents_of(s, batch)
    with autocast(device, s.autocast_dtype):
        if "text_features" in batch:  # cached outputs of the frozen text encoders
            parts = {k: v.to(device) for k, v in batch["text_features"].items()}
        else:
            with torch.set_grad_enabled(trains_text_encoders(cfg)):
                parts = encode_text(comps, batch["captions"], device)
        embeds, pooled = prompt_embeddings(comps, parts)
        if comps.family == "sd3":

            def denoise(noisy, timesteps):
                return comps.denoiser(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=embeds,
                                      pooled_projections=pooled).sample

            loss = objectives.flow_matching_loss(denoise, comps.noise_scheduler, cfg.train, latents)
        else:
            added = None
            if comps.family == "sdxl":
                added = {"text_embeds": pooled, "time_ids": sdxl_time_ids(batch, device)}

            def denoise(noisy, timesteps):
                return comps.denoiser(noisy, timesteps, embeds, added_cond_kwargs=added).sample

            loss = objectives.ddpm_loss(denoise, comps.noise_scheduler, cfg.train, latents)
    return loss


# --- the loop ------------------------------------------------------------------------------------


@dataclass
class _Run:
    """What the loop carries from step to step besides the resumable TrainState."""

    cfg: DictConfig
    s: Setup
    trial: TrialDir
    tracker: Tracker
    state: TrainState
    speed: SpeedMeter
    world: int
    rank: int
    started: float = field(default_factory=time.perf_counter)
    pending: list[tuple[torch.Tensor, list[float]]] = field(default_factory=list)
    """Per-step (loss, grad norm) still on the device, with the step's learning rates."""
    smoothed: float | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def train(cfg: DictConfig, s: Setup, trial_dir: Path, tracker: Tracker | None = None,
          stopper: Stopper | None = None, on_validation: Callable[[int], None] | None = None) -> dict:
    """Train `s` for train.max_steps (continuing from the trial's newest intact checkpoint); return
    the training figures for metrics.json. Raises NonFiniteLoss (with its `figures`) when the loss
    goes NaN/inf.

    Steps are numbered from 1, as train_log.jsonl, checkpoints, debug.nan_at_step and
    debug.raise_at_step count them: step N is the N-th optimizer step, `losses[N - 1]` its loss."""
    trial = TrialDir(trial_dir)
    world, rank = s.accelerator.num_processes, s.accelerator.process_index
    state, resumed_from = _resume(s, trial, main=rank == 0)
    # train.batch_size is per process (as in diffusers' scripts): with N processes a step trains
    # on batch_size x grad_accum x N samples, each process on its own share of them
    samples_per_step = cfg.train.batch_size * cfg.train.grad_accum * world
    run = _Run(cfg, s, trial, tracker or Tracker(), state, SpeedMeter(cfg.tracking.warmup_steps, samples_per_step),
               world, rank, smoothed=_smoothed_curve(state.losses, cfg.tracking.smoothing))
    run.tracker.rewind(state.step)  # the steps after the checkpoint (or all, from scratch) are logged again
    batches = iter(make_loader(s.dataset, cfg.train.batch_size, cfg.seed, state.step * samples_per_step,
                               cfg.data.num_workers, rank, world))
    if s.class_dataset is not None:  # prior preservation: as many class examples beside them, a stream of their own
        batches = with_class_examples(batches, iter(make_loader(
            s.class_dataset, cfg.train.batch_size, class_seed(cfg.seed), state.step * samples_per_step,
            cfg.data.num_workers, rank, world)))
    trace: dict | None = {"rank": rank, "keys": [], "losses": []} if cfg.debug.trace_data else None
    profiler = make_profiler(cfg, trial.path) if run.main else None
    run.speed.start(state.step)
    try:
        stop = _train_steps(run, batches, trace, profiler, stopper, on_validation)
    except NonFiniteLoss as e:
        e.figures = _summary(run, resumed_from, None)
        raise

    if profiler is not None:
        finish_profiler(profiler, trial.path, run.tracker)
    if trace is not None:
        _write_trace(trial, trace, s.trainable)
    return _summary(run, resumed_from, stop)


def _train_steps(run: _Run, batches: Iterator[dict], trace: dict | None, profiler, stopper: Stopper | None,
                 on_validation: Callable[[int], None] | None):
    """From the state's step to train.max_steps, or to an early stop (returned)."""
    cfg, s, state = run.cfg, run.s, run.state
    world, rank = run.world, run.rank
    for step in range(state.step, cfg.train.max_steps):
        # every random draw of a step (noise, timesteps, dropout) depends only on (seed, step) and
        # the process's rank, so a resumed trial reproduces an uninterrupted one
        torch.manual_seed((cfg.seed * 1_000_003 + step) * world + rank)
        step_loss, prior_loss = _accumulate(run, batches, step, trace)
        grad_norm = _optimizer_step(run, step, step_loss)
        if s.ema is not None and (step + 1) not in state.skipped_steps:
            _ema_step(run)
        extra = [] if prior_loss is None else [prior_loss]  # train/prior_loss with class images
        run.pending.append((torch.stack([step_loss, grad_norm.detach().float().to(step_loss.device), *extra]),
                            s.scheduler.get_last_lr()))
        s.scheduler.step()
        s.optimizer.zero_grad(set_to_none=True)
        done = step + 1
        _check_nan_skips(run, done)
        if profiler is not None:
            profiler.step()
        checkpoint_step = bool(cfg.train.checkpoint_every) and done % cfg.train.checkpoint_every == 0
        # loss.item() every step would sync the GPU each step: check and log every log_every steps
        # (and before a checkpoint, which must hold every step's loss up to its own). Every process
        # flushes at the same steps: the flush reduces the losses across processes (a collective),
        # so it must not depend on which process writes the checkpoint.
        if done % cfg.train.log_every == 0 or done == cfg.train.max_steps or checkpoint_step:
            _flush_log(run, done)
        checkpoint_due = run.main and checkpoint_step
        if on_validation is not None and run.main and cfg.tracking.validation_every and (
                done % cfg.tracking.validation_every == 0 or done == cfg.train.max_steps):
            on_validation(done)
        if checkpoint_due:
            _checkpoint(run, done)
        if done == cfg.debug.raise_at_step:
            raise RuntimeError(f"debug.raise_at_step={done}: simulated crash")
        if stopper is not None and not run.pending and (stop := _should_stop(run, stopper)):
            log.warning("%s", stop.reason())
            return stop
    return None


def _resume(s: Setup, trial: TrialDir, main: bool) -> tuple[TrainState, int | None]:
    """The newest intact checkpoint's state loaded into `s` (the same trial run again in the same
    folder continues where it stopped; damaged checkpoints are set aside), or a fresh state; and
    the step resumed from."""
    checkpoint = newest_intact(trial.checkpoints, main)
    if checkpoint is None:
        return TrainState(step=0, losses=[], elapsed_s=0.0, scheduler={}, scaler={}), None
    state = load_into(checkpoint, s.trainable, s.optimizer)
    if s.ema is not None:
        _resume_ema(s, checkpoint)
    s.scheduler.load_state_dict(state.scheduler)
    if state.scaler:
        s.scaler.load_state_dict(state.scaler)
    log.info("resuming from %s at step %d", checkpoint.folder.name, state.step)
    return state, state.step


def _resume_ema(s: Setup, checkpoint) -> None:
    """The average as the checkpoint left it; a checkpoint written without one cannot continue it."""
    if checkpoint.ema is None:
        raise RuntimeError(f"checkpoint {checkpoint.folder} holds no moving average but train.ema_decay is set: "
                           "it was written by a trial without EMA; delete the trial folder or use a new one")
    with torch.no_grad():
        for shadow, name in zip(s.ema.shadow_params, s.trainable):
            shadow.copy_(checkpoint.ema[name].to(shadow.device, shadow.dtype))
    s.ema.optimization_step = checkpoint.state.ema_updates


def _smoothed_curve(losses: list[float], smoothing: float) -> float | None:
    """train/loss_smoothed after `losses`: the EMA replayed, so a resumed trial logs the same curve."""
    smoothed = None
    for value in losses:
        smoothed = _smooth(smoothed, value, smoothing)
    return smoothed


def _smooth(smoothed: float | None, value: float, smoothing: float) -> float | None:
    if not math.isfinite(value):  # a skipped NaN step (train.nan_policy=skip) leaves the EMA as it was
        return smoothed
    return value if smoothed is None else smoothing * smoothed + (1 - smoothing) * value


def _accumulate(run: _Run, batches: Iterator[dict], step: int,
                trace: dict | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Forward and backward over train.grad_accum micro-batches; the step's mean loss, and with prior
    preservation the class images' mean loss (unweighted), on the device."""
    cfg, s, accum = run.cfg, run.s, run.cfg.train.grad_accum
    step_loss = torch.zeros((), device=s.device)
    step_prior = torch.zeros((), device=s.device) if s.class_dataset is not None else None
    for micro in range(accum):
        batch = next(batches)
        class_examples = batch.get("class_examples", 0)
        if trace is not None:
            trace["keys"] += batch["key"][:len(batch["key"]) - class_examples].tolist()
        # DDP syncs gradients on the last micro-batch only
        sync = s.accelerator.no_sync(s.components.denoiser) if micro < accum - 1 else nullcontext()
        with sync:
            if class_examples:
                loss, prior = objectives.prior_preservation_loss(per_sample_loss(s, cfg, batch), class_examples,
                                                      cfg.train.prior_loss_weight)
                step_prior += prior.detach() / accum
            else:
                loss = diffusion_loss(s, cfg, batch)
            if step + 1 == cfg.debug.nan_at_step:  # step + 1: the step's number (see train)
                loss = loss * float("nan")
            s.scaler.scale(loss / accum).backward()
        step_loss += loss.detach() / accum
    if trace is not None:
        trace["losses"].append(step_loss.item())
    return step_loss, step_prior


def _optimizer_step(run: _Run, step: int, step_loss: torch.Tensor) -> torch.Tensor:
    """Average, unscale, clip and apply the gradients; with train.nan_policy=skip a NaN/inf step's
    update is dropped instead (data and schedule move on as if it had happened). The grad norm."""
    cfg, s, state = run.cfg, run.s, run.state
    if run.world > 1:  # DDP averages the denoiser's gradients; the text encoders' adapters are averaged here
        _average_gradients([p for name, p in s.trainable.items() if not name.startswith("unet.")], run.world)
    if cfg.train.nan_policy == "skip" and not torch.isfinite(
            step_loss if run.world == 1 else s.accelerator.reduce(step_loss)):
        state.skipped_steps.append(step + 1)
        log.warning("step %d: loss is %s, update skipped (%d of train.max_nan_skips=%d)", step + 1,
                    step_loss.item(), len(state.skipped_steps), cfg.train.max_nan_skips)
        return torch.full((), float("nan"))
    s.scaler.unscale_(s.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(list(s.trainable.values()), cfg.train.max_grad_norm or float("inf"))
    s.scaler.step(s.optimizer)
    s.scaler.update()
    for hook in s.after_step:  # textual inversion: the frozen rows of the embedding back as they were
        hook()
    return grad_norm


def _ema_step(run: _Run) -> None:
    """One update of the moving average; an average kept in CPU memory visits the device for it."""
    s = run.s
    params = list(s.trainable.values())
    if run.cfg.train.ema_on_cpu:
        s.ema.to(s.device, non_blocking=True)
    s.ema.step(params)
    if run.cfg.train.ema_on_cpu:
        s.ema.to("cpu", non_blocking=True)


def finish_ema(s) -> None:
    """Put the averaged weights into the trainable parameters (what the trial then saves and evaluates)."""
    if s.ema is not None:
        s.ema.copy_to(list(s.trainable.values()))


def _check_nan_skips(run: _Run, done: int) -> None:
    """NonFiniteLoss once more steps were skipped than train.max_nan_skips allows; the steps up to
    this one are logged and in the losses first, as they would be at the next log step."""
    skipped, limit = run.state.skipped_steps, run.cfg.train.max_nan_skips
    if len(skipped) > limit:
        _flush_log(run, done)
        raise NonFiniteLoss(f"loss was NaN/inf at {len(skipped)} steps (more than train.max_nan_skips={limit}): "
                            f"steps {skipped[:10]}")


def _flush_log(run: _Run, done: int) -> None:
    """Bring the pending steps' losses to the host (one sync, and one collective across processes),
    log a row per step, and fail on a NaN the policy does not skip: the steps before it are logged,
    and the losses end with its loss."""
    cfg, s, state = run.cfg, run.s, run.state
    values = torch.stack([v for v, _ in run.pending])
    # the loss of the trial is the mean over its processes
    values = (values if run.world == 1 else s.accelerator.reduce(values, "mean")).tolist()
    first_step = done - len(values) + 1
    bad = next((i for i, (value, *_) in enumerate(values)
                if not math.isfinite(value) and first_step + i not in state.skipped_steps), None)
    if bad is not None:
        _log_rows(run, values[:bad], first_step, done, {})
        state.losses.extend(v for v, *_ in values[:bad + 1])
        run.pending.clear()
        raise NonFiniteLoss(f"loss became {values[bad][0]} at step {first_step + bad}")
    figures = {**run.speed.read(done), **s.memory.read()}
    _log_rows(run, values, first_step, done, figures)
    state.losses.extend(v for v, *_ in values)
    lr = run.pending[-1][1][0]
    run.pending.clear()
    log.info("step %d/%d loss %.4f grad_norm %.3f lr %.2e %.2f it/s", done, cfg.train.max_steps, values[-1][0],
             values[-1][1], lr, figures["perf/it_per_s"])


def _log_rows(run: _Run, values: list[list[float]], first_step: int, done: int, figures: dict) -> None:
    """A train_log row per step of `values` (the pending steps from `first_step` on); the speed and
    memory figures go with step `done`'s."""
    cfg = run.cfg
    for i, ((value, norm, *prior), (_, lrs)) in enumerate(zip(values, run.pending)):
        run.smoothed = _smooth(run.smoothed, value, cfg.tracking.smoothing)
        row = {"train/loss": value, "train/loss_smoothed": run.smoothed, "train/grad_norm": norm,
               **{f"train/lr_{name}": lr for name, lr in zip(("unet", "text_encoder"), lrs)},
               **({"train/prior_loss": prior[0]} if prior else {})}
        this_step = first_step + i
        run.tracker.log({**row, **figures} if this_step == done else row, this_step)


def _checkpoint(run: _Run, done: int) -> None:
    s, state = run.s, run.state
    state.step = done
    state.elapsed_s += time.perf_counter() - run.started
    run.started = time.perf_counter()
    state.scheduler, state.scaler = s.scheduler.state_dict(), s.scaler.state_dict()
    ema = None
    if s.ema is not None:
        state.ema_updates = s.ema.optimization_step
        ema = dict(zip(s.trainable, s.ema.shadow_params))
    save_checkpoint(run.trial.checkpoints, state, s.trainable, s.optimizer, run.cfg.train.checkpoints_keep, ema)


def _should_stop(run: _Run, stopper: Stopper):
    """The main process asks the stopper and decides for all processes, which must stop together."""
    if not stopper.due(len(run.state.losses)):
        return None
    stop = stopper.check(run.state.losses) if run.main else None
    if run.world > 1:
        from accelerate.utils import broadcast_object_list

        stop = broadcast_object_list([stop])[0]
    return stop


def _summary(run: _Run, resumed_from: int | None, stop) -> dict:
    state = run.state
    finite = [v for v in state.losses if math.isfinite(v)]  # skipped NaN steps stay in the curve only
    stopped = {"reason": stop.reason(), "early_stopped_at_step": stop.step, "steps_saved": stop.steps_saved,
               "early_stop": stop.__dict__} if stop else {}
    return {
        "steps": run.cfg.train.max_steps,
        **stopped,
        "processes": run.world,
        "resumed_from_step": resumed_from,
        "train_s": state.elapsed_s + time.perf_counter() - run.started,
        **run.speed.summary(),
        "losses": state.losses,
        "nan_skipped_steps": state.skipped_steps,
        "final_loss": finite[-1] if finite else None,
        "mean_loss": sum(finite) / len(finite) if finite else None,
    }


def _write_trace(trial: TrialDir, trace: dict, trainable: dict[str, torch.nn.Parameter]) -> None:
    """debug.trace_data: what this process trained on, and a checksum of the weights it ended with."""
    digest = hashlib.sha256()
    for name in sorted(trainable):
        digest.update(name.encode())
        digest.update(trainable[name].detach().float().cpu().numpy().tobytes())
    atomic_write_json(trial.debug_trace(trace["rank"]), {**trace, "weights_sha256": digest.hexdigest()})


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
