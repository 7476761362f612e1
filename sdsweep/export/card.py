"""The adapter's model card, `adapter/README.md` in Hugging Face's format: YAML front matter (base_model, tags,
instance_prompt, widget images) and a body with how to load each file, the prompts it was judged on, its
leaderboard row with intervals, sample images and the trial's resolved config. `hf upload REPO adapter/`
publishes it as it is.

A trial writes it when it saves its adapter (no scores or samples exist yet); `python -m sdsweep.export`
writes it again with the leaderboard row and copies a few of the trial's sample images beside it.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from sdsweep.export.kohya import config_value
from sdsweep.layout import KOHYA_ADAPTER, TrialDir

CARD = "README.md"
CARD_IMAGES = "images"  # inside the adapter folder, so an upload of the folder carries them
MAX_IMAGES = 6
FAMILY_TAGS = {"sd15": ["stable-diffusion", "stable-diffusion-diffusers"], "sdxl": ["stable-diffusion-xl"],
               "sd3": ["sd3", "stable-diffusion-3"]}
KIND_NAMES = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa (LyCORIS)", "lokr": "LoKr (LyCORIS)"}
PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}


def hub_id(pretrained: str | None) -> str | None:
    """`model.pretrained` when it names a hub model (owner/name), not a local file or folder."""
    if not pretrained or pretrained.startswith((".", "/", "~")) or pretrained.endswith((".safetensors", ".ckpt")):
        return None
    return pretrained if re.fullmatch(r"[\w.-]+/[\w.-]+", pretrained) else None


def trigger(prompts: list[str]) -> str | None:
    """The phrase every evaluation prompt ends with (the toy world's 'sdsweep style'), if there is one."""
    if len(prompts) < 2:
        return None
    words = [re.split(r"[\s,]+", p.strip()) for p in prompts]
    common: list[str] = []
    for column in zip(*(reversed(w) for w in words)):
        if len(set(column)) != 1:
            break
        common.insert(0, column[0])
    return " ".join(common) or None


def leaderboard_row(trial: TrialDir) -> dict[str, str] | None:
    """The trial's configuration's row of its sweep's leaderboard.csv (intervals in *_ci_low/_ci_high)."""
    sweep = trial.sweep
    if sweep is None or not sweep.leaderboard.is_file():
        return None
    with sweep.leaderboard.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if trial.name in (row.get("trials") or "").split() or row.get("trial") == trial.name:
                return row
    return None


def _row_table(row: Mapping[str, str]) -> list[str]:
    lines = ["| column | value | 95% interval |", "|---|---|---|"]
    for key, value in row.items():
        if key.endswith(("_ci_low", "_ci_high", "_vs_base_low", "_vs_base_high")) or value in ("", None):
            continue
        low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        interval = f"[{low}, {high}]" if low not in (None, "") and high not in (None, "") else ""
        if key.endswith("_vs_base"):
            lo, hi = row.get(f"{key}_low"), row.get(f"{key}_high")
            interval = f"[{lo}, {hi}]" if lo not in (None, "") and hi not in (None, "") else ""
        lines.append(f"| {key} | {value} | {interval} |")
    return lines


def copy_samples(trial: TrialDir, folder: Path) -> list[str]:
    """Up to MAX_IMAGES of the trial's evaluation images into `folder/images/`; their paths in `folder`."""
    if not trial.samples.is_dir():
        return []
    # one per prompt first (seed 0 of each), then the other seeds
    images = sorted(trial.samples.glob("*.png"), key=lambda p: (_seed_of(p.name), p.name))[:MAX_IMAGES]
    if not images:
        return []
    target = folder / CARD_IMAGES
    target.mkdir(parents=True, exist_ok=True)
    for image in images:
        shutil.copyfile(image, target / image.name)
    return [f"{CARD_IMAGES}/{image.name}" for image in images]


def _seed_of(name: str) -> int:
    match = re.search(r"_seed(\d+)\.png$", name)
    return int(match.group(1)) if match else 0


def sample_prompts(trial: TrialDir) -> dict[str, str]:
    """{image file: its prompt as asked} from the trial's metrics.json (empty when it cannot be read)."""
    try:
        rows = json.loads(trial.metrics.read_text()).get("eval_images") or []
        return {r["file"]: r["prompt"] for r in rows if isinstance(r, dict) and "file" in r and "prompt" in r}
    except (OSError, ValueError, AttributeError):
        return {}


def _prompt_of(image: str, prompts: Mapping[str, str] | None = None) -> str:
    """The prompt an image was drawn from: as asked (metrics.json), else its name's slug
    (`03_a-red-circle-sdsweep-style_seed1.png`) in words."""
    if prompts and Path(image).name in prompts:
        return prompts[Path(image).name]
    stem = Path(image).stem
    stem = re.sub(r"^\d+_", "", re.sub(r"_seed\d+$", "", stem))
    return stem.replace("-", " ")


def card_text(family: str, kind: str, config: Mapping | None, trial_name: str, row: Mapping[str, str] | None = None,
              images: list[str] | None = None, image_prompts: Mapping[str, str] | None = None) -> str:
    images = images or []
    base = hub_id(config_value(config, "model.pretrained"))
    prompts = [str(p) for p in (config_value(config, "eval.prompts") or [])]
    instance = trigger(prompts)
    tags = ["text-to-image", *FAMILY_TAGS.get(family, [family]), "lora", "diffusers", "template:sd-lora", "sdsweep"]
    if kind in ("loha", "lokr"):
        tags.insert(tags.index("lora") + 1, "lycoris")
    front: dict[str, Any] = {}
    if base:
        front["base_model"] = base
    front.update(library_name="diffusers", tags=tags)
    if instance:
        front["instance_prompt"] = instance
    if images:
        front["widget"] = [{"text": _prompt_of(i, image_prompts), "output": {"url": i}} for i in images]
    model = base or config_value(config, "model.pretrained") or f"sdsweep's built-in {config_value(config, 'model.name', family)} model"
    rank, alpha = config_value(config, "adapter.rank"), config_value(config, "adapter.alpha")
    targets, text = config_value(config, "targets.name"), config_value(config, "text_encoder.name")
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).strip(), "---", "",
        f"# {trial_name}", "",
        f"A {KIND_NAMES.get(kind, kind)} adapter for `{model}` ({family}), trained by an sdsweep trial: "
        f"rank {rank}, alpha {alpha}, targets `{targets}`, text encoders `{text}`, "
        f"{config_value(config, 'train.max_steps')} steps at {config_value(config, 'data.resolution')} px.", "",
        "## Files", "",
        f"- `{KOHYA_ADAPTER}`: kohya/LyCORIS format, for ComfyUI (`models/loras/`, LoraLoader node) and "
        "A1111/Forge (`models/Lora/`, `<lora:NAME:1>` in the prompt)",
    ]
    if kind in ("lora", "dora"):
        lines.append("- `pytorch_lora_weights.safetensors`: diffusers' format (`pipe.load_lora_weights(folder)`)")
    else:
        lines.append("- `unet/`, `text_encoder*/`: peft's format (`PeftConfig.from_pretrained` + "
                     "`set_peft_model_state_dict`); diffusers' `load_lora_weights` does not read LoHa/LoKr")
    lines += ["", "## Use it", "", "```python", "import torch",
              f"from diffusers import {PIPELINES.get(family, 'DiffusionPipeline')}", "",
              f"pipe = {PIPELINES.get(family, 'DiffusionPipeline')}.from_pretrained({(base or 'BASE_MODEL')!r}, "
              "torch_dtype=torch.float16).to('cuda')"]
    if kind in ("lora", "dora"):
        lines.append("pipe.load_lora_weights('.')  # this folder")
    else:
        encoders = ", 'text_encoder_2': pipe.text_encoder_2" if family in ("sdxl", "sd3") else ""
        denoiser = "pipe.transformer" if family == "sd3" else "pipe.unet"
        lines += ["from sdsweep.model.adapters import load_adapter", "",
                  f"load_adapter('.', {{'{'transformer' if family == 'sd3' else 'unet'}': {denoiser}, "
                  f"'text_encoder': pipe.text_encoder{encoders}}})  # this folder"]
    example = prompts[0] if prompts else (instance or "a photo")
    lines += [f"image = pipe({example!r}).images[0]", "```", ""]
    if instance:
        lines += ["## Trigger", "", f"Every prompt it was judged on ends with **{instance}**.", ""]
    if prompts:
        lines += ["## Evaluation prompts", "", *[f"- {p}" for p in prompts], ""]
    if row:
        lines += ["## Leaderboard row", "", "Its configuration's row of the sweep's `leaderboard.csv` (intervals: paired "
                  "bootstrap over prompt x seed cells).", "", *_row_table(row), ""]
    if images:
        lines += ["## Samples", "", *[f"![{_prompt_of(i, image_prompts)}]({i})" for i in images], ""]
    if config:
        lines += ["## Training config", "", "```yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)),
                                                                    sort_keys=False).strip(), "```", ""]
    return "\n".join(lines)


def write_card(folder: Path, family: str, kind: str, config: Mapping | None, trial: TrialDir,
               with_samples: bool = False) -> Path:
    """Write `folder/README.md` for the trial's adapter; with_samples: copy its sample images beside it."""
    from sdsweep.io import atomic_write_bytes

    images = copy_samples(trial, folder) if with_samples else []
    path = Path(folder) / CARD
    text = card_text(family, kind, config, trial.name, leaderboard_row(trial), images, sample_prompts(trial))
    atomic_write_bytes(path, text.encode())
    return path
