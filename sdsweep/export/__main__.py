"""python -m sdsweep.export TRIAL_DIR --format kohya|diffusers|peft|merged [--out PATH] [--dtype fp16|bf16|fp32]

  kohya      one .safetensors in kohya/LyCORIS format (ComfyUI models/loras/, A1111/Forge models/Lora/);
             default: the trial's adapter/kohya.safetensors (written again)
  diffusers  pytorch_lora_weights.safetensors for `pipe.load_lora_weights` (LoRA/DoRA; diffusers has no
             LoHa/LoKr reader for SD/SDXL/SD3); default: the trial's own file, nothing copied
  peft       <component>/adapter_model.safetensors + adapter_config.json per adapted component;
             default: ./<trial>-peft/ (LoHa/LoKr: the trial's own folders, nothing copied)
  merged     the adapter fused into its base model, one single-file checkpoint (SD3: a diffusers
             folder); default: ./<trial>-merged.safetensors, fp16

Every export also writes the model card adapter/README.md again, with the trial's leaderboard row and
a few of its sample images (adapter/images/), ready for `hf upload`. Prints the path it wrote.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path

FORMATS = ("kohya", "diffusers", "peft", "merged")
DTYPES = ("fp16", "bf16", "fp32")


def slug(name: str) -> str:
    """A trial folder's name as a file name every tool accepts (`adapter=dora,targets=many` ->
    `adapter-dora_targets-many`): A1111's `<lora:NAME:1>` takes the file's name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.replace("=", "-").replace(",", "_")).strip("-") or "adapter"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdsweep.export", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trial_dir", metavar="TRIAL_DIR", help="a trial folder (multirun/<date>/<time>/<overrides>/)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", type=Path, default=None, help="where to write it (a file, or a folder for peft/diffusers)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="kohya: fp32 unless set (the adapter as trained); merged: fp16 unless set")
    return p


def _dtype(name: str | None, default: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name or default]


def denoiser_config(trial) -> dict | None:
    """The trial's UNet config.json (SDXL's kohya names follow its block layout); the reference SDXL's
    when the base model's configs cannot be read here (a hub model not in the cache, offline)."""
    if trial.family != "sdxl":
        return None
    from diffusers import UNet2DConditionModel

    from sdsweep.model import load as models
    from sdsweep.model.architectures import SDXL_UNET

    try:
        source = models.resolve_source(trial.cfg.model)
        if Path(source).is_file():
            source = trial.cfg.model.single_file_config
        if source:
            return dict(UNet2DConditionModel.load_config(source, subfolder="unet"))
    except Exception as e:  # noqa: BLE001 - offline, gated, moved: the reference layout is SDXL's own
        logging.getLogger(__name__).warning("the base model's UNet config cannot be read (%s: %s): SDXL's "
                                            "reference block layout names the kohya layers", type(e).__name__, e)
    return dict(SDXL_UNET)


def components(trial):
    from sdsweep.export import saved

    found = saved.from_folder(trial.dir.adapter, trial.config_dict().get("adapter"))
    if "unet" in found:
        found["unet"].model_config = denoiser_config(trial)
    return found


def export_kohya(trial, out: Path | None, dtype: str | None) -> Path:
    from sdsweep.export import kohya

    return kohya.write_kohya(out or trial.dir.kohya_adapter, trial.family, components(trial), trial.kind,
                             trial.config_dict(), trial.name, _dtype(dtype, "fp32"))


def export_diffusers(trial, out: Path | None) -> Path:
    from sdsweep.export import saved
    from sdsweep.export.kohya import ExportError

    if trial.kind not in ("lora", "dora"):
        raise ExportError(
            f"{trial.kind}: diffusers' load_lora_weights has no LoHa/LoKr reader for SD1.5/SDXL/SD3 (it raises on "
            "their keys); use --format kohya (ComfyUI, A1111/Forge), --format peft (peft, or sdsweep.model.adapters."
            "load_adapter on a diffusers pipeline's modules) or --format merged (a plain checkpoint)")
    source = trial.dir.adapter / saved.LORA_WEIGHTS
    if out is None:
        return source
    target = out if out.suffix == ".safetensors" else out / saved.LORA_WEIGHTS
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def export_peft(trial, out: Path | None) -> Path:
    from safetensors.torch import save_file

    from sdsweep.export import saved
    from sdsweep.export.kohya import layers
    from sdsweep.io import atomic_dir

    if trial.kind in ("loha", "lokr") and out is None:
        return trial.dir.adapter  # saved in peft's format already
    out = out or Path.cwd() / f"{slug(trial.name)}-peft"
    found = saved.from_folder(trial.dir.adapter, trial.config_dict().get("adapter"))
    with atomic_dir(out) as tmp:
        for name, c in found.items():
            config = dict(c.config)
            config.setdefault("peft_type", "LORA" if trial.kind in ("lora", "dora") else trial.kind.upper())
            # the adapted layers by full name: diffusers' metadata keeps only their last parts ('2', 'proj'),
            # which would match more layers than were trained
            config["target_modules"] = sorted(layers(c.state))
            (tmp / name).mkdir()
            save_file({k: v.contiguous() for k, v in c.state.items()}, tmp / name / saved.PEFT_WEIGHTS)
            (tmp / name / saved.PEFT_CONFIG).write_text(json.dumps(config, indent=2, default=str), encoding="utf-8")
    return out


def export_merged(trial, out: Path | None, dtype: str | None) -> Path:
    from sdsweep.export.merge import write_merged

    default = f"{slug(trial.name)}-merged" + ("" if trial.family == "sd3" else ".safetensors")
    return write_merged(trial, out or Path.cwd() / default, _dtype(dtype, "fp16"))


def export(trial_dir: Path | str, fmt: str, out: Path | None = None, dtype: str | None = None) -> Path:
    """Write the trial's adapter in `fmt` (see the module docstring) and its model card; the path written."""
    from sdsweep.export import card
    from sdsweep.export.trial import open_trial

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: not a format; one of {', '.join(FORMATS)}")
    trial = open_trial(trial_dir)
    if fmt == "kohya":
        path = export_kohya(trial, out, dtype)
    elif fmt == "diffusers":
        path = export_diffusers(trial, out)
    elif fmt == "peft":
        path = export_peft(trial, out)
    else:
        path = export_merged(trial, out, dtype)
    card.write_card(trial.dir.adapter, trial.family, trial.kind, trial.config_dict(), trial.dir, with_samples=True)
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from sdsweep.export.kohya import ExportError
    from sdsweep.export.names import UnmappedName
    from sdsweep.export.trial import TrialError

    try:
        path = export(args.trial_dir, args.format, args.out, args.dtype)
    except (TrialError, ExportError, UnmappedName) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
