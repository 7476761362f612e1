"""What a trial *is*: the keys that change what it trains, what it is judged by, and nothing else.

One list, used by everything that compares trials: the trial folder's name (Hydra's
override_dirname exclude_keys, through the `sdsweep_untrained_keys` resolver in conf/config.yaml),
the fingerprint resume compares before keeping a finished trial, and early stopping's test of
whether two trials are peers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from typing import Any

from omegaconf import DictConfig, OmegaConf

from sdsweep.config.schema import SCORE_KEYS, Config

UNTRAINED: tuple[str, ...] = ("tracking", "cache", "sweep", "device", "model.cache_dir", "data.num_workers")
"""Config nodes and keys that change neither what a trial trains nor how it is judged: where it is
logged, whether its features come from the cache (which never changes them), how the sweep
schedules it, the device it runs on, where files are kept, how many processes read the data."""

EVALUATION: tuple[str, ...] = ("eval",)
"""Changes how a trial is judged, not what it trains: a finished trial whose evaluation settings
changed is scored again from its saved adapter, not trained again."""


def _leaf_keys(cls: type, prefix: str) -> list[str]:
    """`prefix.field` for every field of the dataclass `cls`, nested dataclasses expanded."""
    keys = []
    for name, hint in typing.get_type_hints(cls).items():
        keys.append(f"{prefix}.{name}")
        if dataclasses.is_dataclass(hint):
            keys += _leaf_keys(hint, f"{prefix}.{name}")
    return keys


def folder_excluded_keys() -> list[str]:
    """Every override key that must not name a trial folder: the UNTRAINED and EVALUATION nodes with
    each key inside them (and a group's own choice, `eval=clip`), as Hydra's override_dirname spells them."""
    nodes = typing.get_type_hints(Config)
    keys = []
    for path in (*UNTRAINED, *EVALUATION):
        keys.append(path)
        if dataclasses.is_dataclass(nodes.get(path)):
            keys += _leaf_keys(nodes[path], path)
    # a dict node's entries are keys of their own: eval.score_weights.clip_score=2
    keys += [f"eval.score_weights.{k}" for k in SCORE_KEYS]
    return keys


def _without(cfg: DictConfig, paths: tuple[str, ...]) -> dict:
    data = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(data, dict)
    for path in paths:
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return data


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint_without(cfg: DictConfig, paths: tuple[str, ...]) -> str:
    """A short hash of the resolved config without the nodes and keys in `paths`."""
    return _digest(_without(cfg, paths))


INERT_UNLESS: tuple[tuple[str, Any, tuple[str, ...]], ...] = (
    ("train.ema_decay", 0.0, ("train.ema_decay", "train.ema_on_cpu")),
    ("data.num_class_images", 0, ("data.num_class_images", "data.class_prompt", "data.class_data_dir",
                                  "data.class_steps", "data.class_guidance_scale", "train.prior_loss_weight")),
)
"""(switch, its off value, the keys it makes inert): while a feature is off its keys train nothing, so they
stay out of the training fingerprint. A trial finished before the feature existed then keeps its
fingerprint, and a resumed sweep keeps it instead of training it again."""
TEXTUAL_INVERSION_KEYS = ("adapter.token", "adapter.num_vectors", "adapter.initializer_token")


def inert_keys(cfg: DictConfig) -> tuple[str, ...]:
    """The keys this config's combination does not read for training (see INERT_UNLESS)."""
    keys = [k for switch, off, ks in INERT_UNLESS if OmegaConf.select(cfg, switch) == off for k in ks]
    if OmegaConf.select(cfg, "adapter.kind") != "textual_inversion":
        keys += TEXTUAL_INVERSION_KEYS
    return tuple(keys)


def training_fingerprint(cfg: DictConfig) -> str:
    """Equal for two configs that train the same adapter (whatever their logging, caching, scheduling
    or evaluation, and the keys of features they leave off)."""
    return fingerprint_without(cfg, (*UNTRAINED, *EVALUATION, *inert_keys(cfg)))


def evaluation_fingerprint(cfg: DictConfig) -> str:
    """Equal for two configs that judge a trained adapter the same way."""
    return _digest(OmegaConf.to_container(cfg.eval, resolve=True))


def trained_on(cfg: DictConfig, nodes: tuple[str, ...] = ("model", "data")) -> dict:
    """`nodes` of the config without their UNTRAINED keys: what early-stopping peers must share."""
    data = _without(cfg, UNTRAINED)
    return {k: data.get(k) for k in nodes}
