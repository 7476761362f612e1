"""Open a trial folder for export and sampling, with errors that say what to give instead."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdsweep.export import saved
from sdsweep.layout import SweepDir, TrialDir

log = logging.getLogger(__name__)


class TrialError(ValueError):
    """TRIAL_DIR is not a trial with an adapter; the message names the fix."""


def read_config(trial_dir: Path) -> dict[str, Any] | None:
    """The trial's resolved config as a plain dict (`.hydra/config.yaml`), or None when it has none."""
    path = TrialDir(trial_dir).config
    if not path.is_file():
        return None
    loaded = OmegaConf.load(path)
    try:
        return OmegaConf.to_container(loaded, resolve=True)  # type: ignore[return-value]
    except Exception:  # noqa: BLE001 - an interpolation only Hydra resolves: keep it as written
        return OmegaConf.to_container(loaded, resolve=False)  # type: ignore[return-value]


@dataclass
class Trial:
    dir: TrialDir
    cfg: DictConfig
    """The resolved config, typed by the schema (what `python -m sdsweep.eval TRIAL_DIR` reads too)."""

    @property
    def name(self) -> str:
        return self.dir.name

    @property
    def family(self) -> str:
        return str(self.cfg.model.family)

    @property
    def kind(self) -> str:
        return str(self.cfg.adapter.kind)

    def config_dict(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg, resolve=True)  # type: ignore[return-value]


def open_trial(path: Path | str) -> Trial:
    """The trial in `path`; TrialError naming the fix when it is not a trial or has no adapter yet."""
    from sdsweep.config.schema import Config

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise TrialError(f"{folder}: no such folder; give a trial folder, e.g. multirun/<date>/<time>/<overrides>/")
    trial = TrialDir(folder)
    if not trial.config.is_file():
        raise TrialError(_not_a_trial(folder))
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(trial.config))
    except Exception as e:  # noqa: BLE001 - any parse or schema error: say which file
        raise TrialError(f"{trial.config} cannot be read as an sdsweep config ({type(e).__name__}: {e})") from e
    if (reason := _not_an_adapter(str(cfg.adapter.kind), trial)) is not None:
        raise TrialError(reason)
    if not saved.has_adapter(trial.adapter):
        metrics = trial.read_metrics() or {}
        status = metrics.get("status", "not started")
        why = f" ({metrics['reason']})" if metrics.get("reason") else ""
        raise TrialError(
            f"{folder} has no adapter yet (status: {status}{why}): nothing to export. Train it first: resume its "
            f"sweep with `python -m sdsweep sweep.resume={folder.parent}`, or run it again")
    return Trial(trial, cfg)


def _not_an_adapter(kind: str, trial: TrialDir) -> str | None:
    """Why a full fine-tune or a textual inversion has nothing to export: its saved file already is the usable one."""
    if kind == "full":
        return (f"{trial.path} is a full fine-tune (adapter=full), not an adapter: {trial.adapter}/unet (SD3: "
                "transformer) already is the trained denoiser as a diffusers folder; load it with "
                "UNet2DConditionModel.from_pretrained (or SD3Transformer2DModel) and pass it to the pipeline as unet=")
    if kind == "textual_inversion":
        return (f"{trial.path} is a textual inversion: {trial.adapter}/learned_embeds.safetensors already is the "
                "embedding file A1111/Forge and ComfyUI read (copy it into their embeddings folder) and diffusers' "
                "pipe.load_textual_inversion reads (with token=)")
    return None


def _not_a_trial(folder: Path) -> str:
    if SweepDir(folder).is_sweep():
        trials = SweepDir(folder).trial_dirs()
        example = f", e.g. {trials[0].path}" if trials else ""
        return f"{folder} is a sweep folder, not a trial: give one of its trial folders{example}"
    if folder.name == "adapter" and TrialDir(folder.parent).config.is_file():
        return f"{folder} is a trial's adapter folder: give the trial folder itself, {folder.parent}"
    return (f"{folder} is not a trial folder (it has no .hydra/config.yaml): give the folder of one trial, "
            "e.g. multirun/<date>/<time>/<overrides>/ or the output folder of a single `python -m sdsweep` run")
