"""Which encoders judge a trial (read by config validation before launch, and by eval/ when it scores): they follow the model, and a stand-in never judges a real model silently.

eval.clip_model=auto (the default) picks, from the model being trained:
  the toy world's model (model=toy-sdxl)        the toy CLIP trained on the same world (`toy`)
  a random-weight tiny model (model=tiny-*)     the random stand-in (`tiny`): shapes only, like the model
  anything else: a hub id, a folder, a file     OpenAI's CLIP ViT-L/14 through open_clip (`ViT-L-14`/`openai`,
                                                ~1.7 GB downloaded once), what the field reports CLIP-T with
A stand-in (`toy` or `tiny`) asked for by name on a real model is refused before launch, unless
eval.allow_stand_in=true: then it scores, and every row of the leaderboard says which encoder did.
"""

from __future__ import annotations

from typing import Any

from sdsweep.config.schema import TINY_CLIP, TOY_CLIP

AUTO = "auto"
REAL_CLIP = ("ViT-L-14", "openai")
REAL_DINO = "facebook/dinov2-base"
NO_DINO = ("none", "null", "")
STAND_INS = (TINY_CLIP, TOY_CLIP)


def built_in(model: Any) -> bool:
    """The model is one of sdsweep's own, built in code (tiny random or toy), not a user's weights."""
    return bool(model.build_tiny and not model.pretrained)


def clip_choice(cfg: Any) -> tuple[str, str | None]:
    """(eval.clip_model, eval.clip_pretrained) with `auto` resolved for cfg.model."""
    e, m = cfg.eval, cfg.model
    if e.clip_model != AUTO:
        return e.clip_model, e.clip_pretrained
    if built_in(m):
        return (TOY_CLIP if m.tiny_weights == "toy" else TINY_CLIP), None
    return REAL_CLIP[0], e.clip_pretrained or REAL_CLIP[1]


def stand_in_problem(cfg: Any) -> str | None:
    """Why this config would score a real model with a stand-in encoder, with the fix; None when it does not."""
    name, _ = clip_choice(cfg)
    if name not in STAND_INS or built_in(cfg.model) or cfg.eval.allow_stand_in or not cfg.eval.enabled:
        return None
    what = "the toy world's CLIP" if name == TOY_CLIP else "a random-weight stand-in"
    return (f"eval.clip_model={name} would score model={cfg.model.name} ({cfg.model.pretrained or 'a real model'}) "
            f"with {what}: its numbers say nothing about real images. Use eval.clip_model=auto (ViT-L-14/openai, "
            "~1.7 GB downloaded once) or eval=clip, or eval.clip_model=... eval.clip_pretrained=... for another "
            "open_clip model; eval.allow_stand_in=true scores with it anyway (every leaderboard row then names "
            "the encoder)")


def dino_choice(cfg: Any) -> str | None:
    """eval.dino_model with `auto` resolved: DINOv2-base for a real model, none for a model built in code
    (its images are not photographs: the toy CLIP judges the toy world); None when DINO is off."""
    e = cfg.eval
    if "dino" not in e.metrics or not e.enabled:
        return None
    name = e.dino_model
    if name == AUTO:
        return None if built_in(cfg.model) else REAL_DINO
    return None if name is None or str(name).lower() in NO_DINO else str(name)
