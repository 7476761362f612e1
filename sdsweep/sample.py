"""python -m sdsweep.sample TRIAL_DIR "a prompt" --seed N [--scale S] [--out FILE]

One image from a trial's saved adapter: the base model loaded as the trial loaded it, the adapter from
its folder with peft (export/saved.py:attach), `--scale` the adapter's strength (0: the base model, 1: as trained,
the same number as A1111's <lora:NAME:S> and ComfyUI's strength), the trial's evaluation settings for
steps, guidance and size unless given. Writes a PNG and prints its path.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sdsweep.sample", description=__doc__.split("\n\n", 1)[1])
    p.add_argument("trial_dir", metavar="TRIAL_DIR", help="a trial folder with a saved adapter")
    p.add_argument("prompt")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (the same noise as evaluation's seed N)")
    p.add_argument("--scale", type=float, default=1.0, help="adapter strength (default 1)")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: ./<trial>_<prompt>_seedN.png)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the trial's eval.steps)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the trial's eval.guidance_scale)")
    p.add_argument("--size", type=int, default=None, help="image side in px (default: the trial's eval.resolution)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    return p


def set_strength(modules: dict[str, torch.nn.Module], scale: float) -> int:
    """Multiply every adapter layer's scale by `scale` (peft's scale_layer: LoRA, DoRA, LoHa, LoKr alike);
    the number of layers scaled."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for module in modules.values() for m in module.modules() if isinstance(m, BaseTunerLayer)]
    if scale != 1.0:
        for layer in layers:
            layer.scale_layer(scale)
    return len(layers)


def default_out(trial_name: str, prompt: str, seed: int, scale: float) -> Path:
    from sdsweep.export.__main__ import slug

    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:40] or "prompt"
    strength = "" if scale == 1.0 else f"_scale{scale:g}"
    return Path.cwd() / f"{slug(trial_name)}_{words}_seed{seed}{strength}.png"


def sample(trial_dir: Path | str, prompt: str, seed: int = 0, scale: float = 1.0, out: Path | None = None,
           steps: int | None = None, guidance: float | None = None, size: int | None = None,
           device: str = "auto") -> Path:
    """Generate one image with the trial's adapter at strength `scale`; the PNG's path."""
    from omegaconf import OmegaConf

    from sdsweep.config.schema import PrecisionConfig
    from sdsweep.eval.sampling import adaptable_modules, build_pipeline, generate
    from sdsweep.export import saved
    from sdsweep.export.trial import open_trial
    from sdsweep.model import load as models
    from sdsweep.model.precision import autocast_dtype_of

    trial = open_trial(trial_dir)
    cfg = trial.cfg
    where = models.resolve_device(device)
    # the trial's precision on a GPU; fp32 on a CPU, where half precision is slow or unsupported
    precision = cfg.precision if where.type == "cuda" else OmegaConf.structured(PrecisionConfig())
    components = models.load_components(cfg.model, precision)
    saved.attach(components.modules(), saved.from_folder(trial.dir.adapter, trial.config_dict().get("adapter")))
    models.place(components, precision, where)  # after the adapter: its weights move (and stay fp32) with them
    pipe = build_pipeline(components)
    set_strength(adaptable_modules(pipe), scale)
    e = OmegaConf.merge(cfg.eval, {k: v for k, v in (("steps", steps), ("guidance_scale", guidance),
                                                       ("resolution", size)) if v is not None})
    image = generate(pipe, [prompt], [seed], e, autocast_dtype_of(precision))[0].image
    out = Path(out) if out else default_out(trial.name, prompt, seed, scale)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from sdsweep.export.trial import TrialError

    try:
        path = sample(args.trial_dir, args.prompt, args.seed, args.scale, args.out, args.steps, args.guidance,
                      args.size, args.device)
    except TrialError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
