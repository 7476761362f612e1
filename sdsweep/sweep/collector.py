"""The garbage collector in a process that runs trials: the imported libraries are frozen out of its scans.

A trial calls gc.collect() four times (trial.py twice, accelerate's free_memory twice), so that the
next trial of a one-process sweep starts with the memory handed back. A full collection scans every
tracked object, and once torch, diffusers, transformers, peft, wandb and a pipeline are imported a
process holds about 600,000 of them, nearly all module-level objects that live as long as the
process: 0.36 s a collection on 2 cores, about 1.5 s a trial, half of what 100 LoRA steps on the toy
model take. `gc.freeze()` moves the objects alive now into a permanent generation that collections
skip; collections still free everything made after it. So the libraries a trial of this config
imports lazily are imported first, and frozen with the rest, once per process, before its first trial
(while no base model is loaded: a frozen model's reference cycles would never be collected).

The tests freeze their workers the same way (tests/conftest.py, with `libraries(None)`: all of them).
"""

from __future__ import annotations

import gc
import importlib

from omegaconf import DictConfig

PIPELINES = {
    "sd15": "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
    "sdxl": "diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl",
    "sd3": "diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3",
}
TRAINING = ["diffusers.optimization", "diffusers.training_utils", "peft", "accelerate", "safetensors.torch",
            "transformers.models.clip.modeling_clip", "pandas"]  # pandas: the board, rewritten after each trial
CLIP = ["open_clip", "torchvision.transforms"]  # every metric but the weight-free ones scores through CLIP
KID = ["torchmetrics.image"]
# wandb.init imports its launch package (and with it the public API client) at every first run of a process
WANDB = ["wandb", "wandb.sdk.launch.inputs.internal"]
WEIGHT_FREE_METRICS = {"random_style"}  # scored without open_clip (a random network of its own)


def libraries(cfg: DictConfig | None) -> list[str]:
    """The modules a trial of `cfg` imports after its start (all that any trial may, for None)."""
    if cfg is None:
        return [*PIPELINES.values(), *TRAINING, "transformers.models.t5.modeling_t5", *CLIP, *KID, "torch._dynamo",
                *WANDB, "bitsandbytes", "prodigyopt"]
    names = [PIPELINES[cfg.model.family], *TRAINING]
    if cfg.model.family == "sd3":
        names.append("transformers.models.t5.modeling_t5")
    metrics = set(cfg.eval.metrics) if cfg.eval.enabled else set()
    if metrics - WEIGHT_FREE_METRICS:
        names += CLIP
    if "kid" in metrics:
        names += KID
    if cfg.tracking.mode != "disabled":
        names += WANDB
    names += {"adamw8bit": ["bitsandbytes"], "prodigy": ["prodigyopt"]}.get(cfg.optimizer.name, [])
    if cfg.train.compile:
        names.append("torch._dynamo")
    return names


def import_all(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:  # an optional library this environment lacks: the trial that needs it says so
            pass


_frozen = False
"""Whether this process froze (or found frozen) its libraries: gc.get_freeze_count() walks every frozen
object (0.06 s with 600,000 of them), too slow to ask before every trial."""


def freeze_libraries(cfg: DictConfig) -> bool:
    """Import what a trial of `cfg` will, then freeze every object alive, once per process and only while
    no base model is kept loaded. True if it froze now."""
    global _frozen
    from sdsweep.model import kept_base

    if _frozen or kept_base.holds_model():
        return False  # frozen before (an earlier trial), or a model would be frozen too
    if gc.get_freeze_count():  # frozen by whoever runs this process (the test worker)
        _frozen = True
        return False
    import_all(libraries(cfg))
    gc.collect()  # what is garbage now is not frozen with the rest
    gc.freeze()
    _frozen = True
    return True
