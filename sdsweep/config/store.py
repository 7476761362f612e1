"""sdsweep's entries in Hydra and OmegaConf: the schema node `sdsweep_schema` every YAML is merged
into, and the two resolvers conf/config.yaml names trial folders with. Call `register_configs()`
before composing (the CLI does at import, so Hydra's launchers' worker processes have them too)."""

from __future__ import annotations

import re

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sdsweep.config.identity import folder_excluded_keys
from sdsweep.config.schema import Config


def register_configs() -> None:
    ConfigStore.instance().store(name="sdsweep_schema", node=Config)
    if not OmegaConf.has_resolver("sdsweep_trial_dirname"):
        OmegaConf.register_new_resolver("sdsweep_trial_dirname", trial_dirname)
    if not OmegaConf.has_resolver("sdsweep_untrained_keys"):
        # override_dirname.exclude_keys: the one list of keys that name no trial folder
        OmegaConf.register_new_resolver("sdsweep_untrained_keys", folder_excluded_keys)


def trial_dirname(override_dirname: str) -> str:
    """A stable, filesystem-safe folder name for a trial, derived from its overrides."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname)
    return name or "default"
