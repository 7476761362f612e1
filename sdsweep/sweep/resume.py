"""Resuming a sweep: which finished trials are kept, and the overrides a sweep folder was launched with."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, Override, QuotedString
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from sdsweep.config.identity import evaluation_fingerprint, fingerprint_without, training_fingerprint
from sdsweep.config.store import in_schema
from sdsweep.layout import SweepDir, TrialDir


def fingerprints(cfg: DictConfig) -> dict[str, str]:
    """What a trial's metrics.json records of its config, to be compared on resume (config/identity.py)."""
    return {"config_fingerprint": training_fingerprint(cfg), "eval_fingerprint": evaluation_fingerprint(cfg)}


def _legacy_fingerprint(cfg: DictConfig) -> str:
    """The fingerprint metrics.json held before identity.py (everything but tracking, cache and sweep,
    evaluation included), so that sweeps run before it resume without training again."""
    return fingerprint_without(cfg, ("tracking", "cache", "sweep"))


@dataclass
class Kept:
    """A trial that already ended with this training config: kept as it is, or re-scored first."""

    metrics: dict
    rescore: bool
    """True when its evaluation settings changed (and evaluation is on): score the saved adapter again."""


def kept_trial(trial_dir: Path, cfg: DictConfig) -> Kept | None:
    """The trial in `trial_dir` if it ended with this very training config, or None (train it).

    Finished, or stopped early (a verdict of the sweep, kept like a result: rerunning it would make
    the outcome depend on whether the sweep was interrupted)."""
    metrics = TrialDir(trial_dir).read_metrics()
    if metrics is None or metrics.get("status") not in ("finished", "stopped"):
        return None
    mine, stored = fingerprints(cfg), metrics.get("config_fingerprint")
    if stored == _legacy_fingerprint(cfg):
        return Kept(metrics, rescore=False)
    if stored != mine["config_fingerprint"]:
        return None
    changed = metrics.get("eval_fingerprint") != mine["eval_fingerprint"]
    return Kept(metrics, rescore=changed and metrics["status"] == "finished" and bool(cfg.eval.enabled))


@dataclass(frozen=True)
class Refused:
    """An override of a sweep folder's multirun.yaml that resume does not replay, and why."""

    override: str
    reason: str


@dataclass(frozen=True)
class Resumed:
    """How to launch a resumed sweep, and what of its multirun.yaml was left out."""

    overrides: list[str]
    """What to launch the resumed sweep with (the accepted saved ones, then the command line's)."""
    refused: list[Refused]


def resume_overrides(sweep_dir: Path, extra: list[str]) -> Resumed:
    """The overrides that launched `sweep_dir` (from its multirun.yaml), plus `extra`, pointed at it.

    A sweep folder is shared and downloaded, so its multirun.yaml is not trusted: only overrides of
    what sdsweep's schema and config groups define are replayed (`refusal`); the others are returned
    as refused, for the caller to name. `extra` is what the user typed: it is kept as it is and
    replaces the saved override of the same key."""
    saved = SweepDir(sweep_dir).multirun
    if not saved.exists():
        raise FileNotFoundError(
            f"sweep.resume={sweep_dir}: no multirun.yaml there; give the folder of a sweep started with -m"
        )
    given = {o.key_or_group for o in _parsed(extra)}
    kept, refused = [], []
    for line in _saved_task(saved):
        parsed = _parsed([line]) if isinstance(line, str) else []
        if parsed and parsed[0].key_or_group in given:
            continue  # the command line sets it
        if (reason := refusal(line)) is None:
            kept.append(line)
        else:
            refused.append(Refused(str(line), reason))
    return Resumed([*kept, *extra, f"hydra.sweep.dir={sweep_dir}"], refused)


class NotASweep(ValueError):
    """A multirun.yaml that cannot be read as the record of a sweep; the message names the file."""


def _saved_task(multirun: Path) -> list:
    """hydra.overrides.task of a multirun.yaml as written, interpolations unresolved (resolving one
    would already act on what the file says)."""
    try:
        record = OmegaConf.to_container(OmegaConf.load(multirun), resolve=False)
    except Exception as e:  # noqa: BLE001 - YAML and OmegaConf raise many types for a damaged file
        raise NotASweep(f"sweep.resume: {multirun} cannot be read ({type(e).__name__}: {e})") from e
    task = record
    for key in ("hydra", "overrides", "task"):
        task = task.get(key) if isinstance(task, dict) else None
    if not isinstance(task, list):
        raise NotASweep(f"sweep.resume: {multirun} holds no hydra.overrides.task list: it was not written "
                        "by a sweep (python -m sdsweep -m ...)")
    return task


def _parsed(lines: list[str]) -> list[Override]:
    """The overrides among `lines` that Hydra's parser reads (flags such as --cfg are not overrides)."""
    parser, found = OverridesParser.create(), []
    for line in lines:
        with contextlib.suppress(HydraException):
            found.append(parser.parse_override(line))
    return found


def refusal(line: object) -> str | None:
    """Why the saved override `line` must not be replayed, or None when it only sets what sdsweep defines:
    a key of schema.py's Config, or an option that ships in one of its config groups (sdsweep/conf/),
    with a value that names no callable (`_target_`) and interpolates nothing."""
    if not isinstance(line, str):
        return f"not an override but a {type(line).__name__}"
    parsed = _parsed([line])
    if not parsed:
        return "not an override Hydra can parse"
    override = parsed[0]
    key = override.key_or_group
    if key == "hydra" or override.is_hydra_override():
        return "sets Hydra itself (hydra.*: its callbacks, launchers and search path can run any code)"
    if override.package is not None:
        return f"puts a config group at a package (@{override.package}), which no sdsweep option needs"
    strings = list(_strings(override.value()))
    if any("_target_" in s for s in strings):
        return "its value names a callable (_target_), which sdsweep's options never hold"
    if any("${" in s for s in strings):
        return "its value is an interpolation (${...}), resolved by code when the config is composed"
    groups = config_groups()
    if key in groups:
        return _group_refusal(override, groups[key])
    if not in_schema(key):
        return f"{key} is no key of sdsweep's config (sdsweep/config/schema.py) nor one of its config groups"
    return None


def _group_refusal(override: Override, options: list[str]) -> str | None:
    if override.is_delete():
        return None
    value = override.value()
    if isinstance(value, Glob):  # selects among the options that ship, whatever its patterns
        return None
    chosen = value.list if isinstance(value, ChoiceSweep) else [value]
    unknown = [c for c in (_text(c) for c in chosen) if c not in options]
    if unknown:
        return (f"{override.key_or_group}={', '.join(map(str, unknown))} is no option of the config group "
                f"{override.key_or_group} that ships with sdsweep ({', '.join(options)})")
    return None


def config_groups() -> dict[str, list[str]]:
    """sdsweep's config groups (the folders of sdsweep/conf/ but Hydra's own) and the options of each."""
    root = resources.files("sdsweep.conf")
    groups: dict[str, list[str]] = {}

    def walk(folder, prefix: str) -> None:  # folder: an importlib Traversable (a zip entry as well)
        for entry in folder.iterdir():
            if entry.is_dir() and not entry.name.startswith(("_", ".")):
                walk(entry, f"{prefix}{entry.name}/")
            elif entry.name.endswith(".yaml") and prefix:
                groups.setdefault(prefix.rstrip("/"), []).append(entry.name.removesuffix(".yaml"))

    walk(root, "")
    return {g: sorted(options) for g, options in sorted(groups.items()) if not g.startswith("hydra")}


def _text(value: object) -> object:
    return value.text if isinstance(value, QuotedString) else value


def _strings(value: object) -> Iterator[str]:
    """Every string in a parsed override value: list items, dict keys and values, sweep choices, globs."""
    value = _text(value)
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)
    elif isinstance(value, ChoiceSweep):
        yield from _strings(value.list)
    elif isinstance(value, Glob):
        yield from _strings([*value.include, *value.exclude])
