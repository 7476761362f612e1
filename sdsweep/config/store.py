"""sdsweep's entries in Hydra and OmegaConf: the schema node `sdsweep_schema` every YAML is merged
into, and the two resolvers conf/config.yaml names trial folders with. Call `register_configs()`
before composing (the CLI does at import, so Hydra's launchers' worker processes have them too).
`in_schema` and `schema_fields` answer what the schema node holds, for the code that judges an
override before Hydra sees it (resume, preflight)."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import re
import typing
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from sdsweep.config.identity import folder_excluded_keys
from sdsweep.config.schema import Config

MAX_NAME_BYTES = 255
"""The longest file or folder name (in bytes) that Linux's and macOS's file systems accept (NAME_MAX)."""
NAME_DIGEST_CHARS = 16
"""Hex digits of the hash that ends a trial folder name too long to be the overrides themselves."""


def register_configs() -> None:
    ConfigStore.instance().store(name="sdsweep_schema", node=Config)
    if not OmegaConf.has_resolver("sdsweep_trial_dirname"):
        OmegaConf.register_new_resolver("sdsweep_trial_dirname", trial_dirname)
    if not OmegaConf.has_resolver("sdsweep_untrained_keys"):
        # override_dirname.exclude_keys: the one list of keys that name no trial folder
        OmegaConf.register_new_resolver("sdsweep_untrained_keys", folder_excluded_keys)


def trial_dirname(override_dirname: str) -> str:
    """A stable, filesystem-safe folder name for a trial, derived from its overrides.

    A name longer than MAX_NAME_BYTES (a long data.path) keeps its beginning and ends in a hash of
    the whole override_dirname: unique per cell, and the same on every run, so a resumed sweep finds
    the folder again. Names that fit are the overrides themselves, as they always were."""
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname) or "default"
    if len(name.encode()) <= MAX_NAME_BYTES:  # ASCII only after the substitution: one byte a character
        return name
    digest = hashlib.sha256(override_dirname.encode()).hexdigest()[:NAME_DIGEST_CHARS]
    return f"{name[:MAX_NAME_BYTES - NAME_DIGEST_CHARS - 1]}-{digest}"


_NOT_IN_SCHEMA = object()


@functools.cache
def _schema_type(key: str) -> Any:
    """The type schema.py gives the dotted `key`, or _NOT_IN_SCHEMA. Every entry of a dict node is a
    key of it (eval.score_weights.kid). Remembered: the schema does not change while a process runs, and
    typing.get_type_hints evaluates every annotation of a dataclass anew (0.3 s a validation)."""
    node: Any = Config
    for part in key.split(".") if key else []:
        if typing.get_origin(node) is dict:
            node = typing.get_args(node)[1]
        elif dataclasses.is_dataclass(node) and part in (hints := typing.get_type_hints(node)):
            node = hints[part]
        else:
            return _NOT_IN_SCHEMA
    return node


def in_schema(key: str) -> bool:
    """Whether `key` (train.max_steps, adapter, eval.score_weights.kid) is a key of schema.py's Config."""
    return _schema_type(key) is not _NOT_IN_SCHEMA


def schema_fields(node: str) -> list[str]:
    """The keys of the schema's node `node` (adapter -> kind, rank, ...; "" -> the top-level keys); [] for
    a leaf or no key."""
    found = _schema_type(node)
    return [f.name for f in dataclasses.fields(found)] if dataclasses.is_dataclass(found) else []


def schema_hint(full_key: str) -> str | None:
    """For a key a typed node of the schema lacks (adapter.rnak): the key meant, or the node's keys."""
    node, _, leaf = full_key.rpartition(".")
    keys = schema_fields(node)
    if not keys:  # not a typed node: a dict entry (eval.score_weights.x), which + may append
        return None
    prefix = f"{node}." if node else ""
    if close := difflib.get_close_matches(leaf, keys, n=1):
        return f"did you mean {prefix}{close[0]}?"
    return f"the keys of {node or 'the config'}: {', '.join(keys)}"
