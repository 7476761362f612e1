"""Training objectives: what the denoiser is asked to predict, at which noise levels, how weighted.

DDPM (sd15, sdxl): noise added by the model's own DDPM schedule at a uniform timestep; the
target is the noise (epsilon) or the velocity (v-prediction), as the model's scheduler config
says; optional min-SNR weighting.

Flow matching (sd3): x_t = (1 - sigma) x0 + sigma noise on a straight path; sigma from the
model's shifted FlowMatchEulerDiscreteScheduler at a timestep drawn from the configured density
(logit-normal in the SD3 paper), the loss weighted per sigma; both from diffusers'
training_utils, as in diffusers' train_dreambooth_lora_sd3.py.

Every random draw here uses the global torch generator, which the training loop seeds per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sdsweep.config.schema import TrainConfig


def _noise(latents: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    noise = torch.randn_like(latents)
    if cfg.noise_offset:
        # offset noise (Guttenberg 2023) lets the model shift the mean brightness
        noise += cfg.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device)
    return noise


def ddpm_loss(denoise, scheduler, cfg: TrainConfig, latents: torch.Tensor) -> torch.Tensor:
    """Per-sample loss; `denoise(noisy, timesteps)` runs the UNet with its conditioning."""
    noise = _noise(latents, cfg)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    pred = denoise(scheduler.add_noise(latents, noise, timesteps), timesteps)
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    target = scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if cfg.snr_gamma:
        from diffusers.training_utils import compute_snr

        # min-SNR-gamma weighting (Hang et al. 2023), as in the diffusers examples
        snr = compute_snr(scheduler, timesteps)
        clipped = torch.clamp(snr, max=cfg.snr_gamma)
        loss = loss * (clipped / (snr + 1) if v_prediction else clipped / snr)
    return loss


def flow_matching_loss(denoise, scheduler, cfg: TrainConfig, latents: torch.Tensor) -> torch.Tensor:
    """Per-sample rectified-flow loss; `denoise(noisy, timesteps)` runs the transformer."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    noise = _noise(latents, cfg)
    n = latents.shape[0]
    u = compute_density_for_timestep_sampling(cfg.weighting_scheme, n, logit_mean=cfg.logit_mean,
                                              logit_std=cfg.logit_std, mode_scale=cfg.mode_scale)
    # the training scheduler's timesteps/sigmas: num_train_timesteps values, already shifted
    indices = (u * scheduler.config.num_train_timesteps).long().clamp(0, len(scheduler.timesteps) - 1)
    timesteps = scheduler.timesteps[indices].to(latents.device)
    sigmas = scheduler.sigmas[indices].to(latents.device, latents.dtype).view(n, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    pred = denoise(noisy, timesteps).float()
    if cfg.precondition_outputs:
        # EDM-style preconditioning (Karras et al. 2022, section 5): predict x0 through the velocity
        pred, target = pred * (-sigmas) + noisy.float(), latents
    else:
        target = noise - latents
    weighting = compute_loss_weighting_for_sd3(cfg.weighting_scheme, sigmas)
    return (weighting.float() * (pred - target.float()) ** 2).reshape(n, -1).mean(dim=1)


def prior_preservation_loss(per_sample: torch.Tensor, class_examples: int,
                            weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(instance + weight * class, class) of a batch whose last `class_examples` examples are class
    images (DreamBooth prior preservation): each half's mean, as diffusers' DreamBooth scripts chunk
    the batch in two. Both halves keep the objective's own weighting (min-SNR, SD3's), as kohya
    weighs its regularisation images (diffusers' SD1.5/SDXL scripts leave min-SNR off the prior half)."""
    instance, prior = per_sample[:-class_examples].mean(), per_sample[-class_examples:].mean()
    return instance + weight * prior, prior
