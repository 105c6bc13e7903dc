"""Sweep plans: a TOML file (shared settings and a list of runs) resolved into frozen run configs.

    [shared]                      # any RunConfig field (cv flag spelling with '-' works too)
    data = "data/"                # relative paths are relative to the plan file
    folds = 5
    group = "pairs"

    [[runs]]
    recipe = "effnet-b4-adam"

    [[runs]]
    name = "convnext"
    model = "convnext_tiny"
    img_size = 224

A bad plan stops with one line naming the plan file, the run and the key, before anything is written.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aivh_ens.config import RunConfig, resolve_config
from aivh_ens.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

FIELDS = {f.name for f in dataclasses.fields(RunConfig)}
PATH_FIELDS = ("data", "weights", "cache_dir", "pseudo")
KEYWORDS = {"pseudo": "blend"}  # a path field's value that names no file (``pseudo = "blend"``)
TOP_KEYS = ("shared", "runs")


@dataclass(frozen=True)
class Plan:
    """Resolved runs of one sweep. ``source`` names where it came from (the plan file, or cv's flags)."""

    source: str
    runs: tuple[RunConfig, ...]


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether a TOML value fits a RunConfig field's annotation (lists stand for tuples)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in args)
    if tp is type(None):
        return value is None
    if origin is tuple:
        items = args[:1] * len(value) if args[-1:] == (Ellipsis,) else args
        return isinstance(value, list) and len(value) == len(items) and all(map(_type_ok, value, items))
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, origin or tp)


_HINTS = typing.get_type_hints(RunConfig)


def _clean(table: Any, where: str, base: Path) -> dict[str, Any]:
    """Keys in field spelling, checked for names and types; relative paths resolved against ``base``."""
    if not isinstance(table, dict):
        raise UserError(f"{where}: expected a table of settings, got {type(table).__name__}")
    out: dict[str, Any] = {}
    for raw, value in table.items():
        key = raw.replace("-", "_")
        if key not in FIELDS:
            raise UserError(
                f"{where}: key {raw!r}: unknown; valid keys are RunConfig fields ({', '.join(sorted(FIELDS))})"
            )
        if not _type_ok(value, _HINTS[key]):
            raise UserError(f"{where}: key {raw!r}: expected {_HINTS[key]}, got {value!r}")
        if key in PATH_FIELDS and isinstance(value, str) and value != KEYWORDS.get(key):
            value = ",".join(str(base / p) if not Path(p).is_absolute() else p for p in value.split(","))
        out[key] = tuple(value) if isinstance(value, list) else value
    return out


def _resolve(values: dict[str, Any], where: str) -> RunConfig:
    """One run's config (defaults -> recipe -> values), its model name checked against timm."""
    from aivh_ens.train.models import check_model_name

    recipe = values.pop("recipe", "none")
    if values.get("model") is None and recipe == "none":
        raise UserError(f"{where}: key 'model': give a timm model name, or a 'recipe'")
    try:
        cfg = resolve_config(recipe, **values)
    except UserError as e:
        key = "recipe" if "recipe" in str(e) else _named_key(str(e), values)
        raise UserError(f"{where}: key {key!r}: {e}") from None
    for name in cfg.backbones:
        try:
            check_model_name(name)
        except UserError as e:
            raise UserError(f"{where}: key 'model': {e}") from None
    return cfg


def _named_key(message: str, values: dict[str, Any]) -> str:
    """The plan key a config error is about: the one named in it (as a field or a ``--flag``)."""
    for k in values:
        if re.search(rf"(^|[^\w-])(--{k.replace('_', '-')}|{k})\b", message):
            return k
    return "?"


def plan_from_configs(source: str, tables: list[dict[str, Any]]) -> Plan:
    """A plan from run settings already in field spelling (``cv --model a,b`` builds one this way)."""
    runs = []
    seen: dict[str, str] = {}
    for i, values in enumerate(tables):
        where = f"{source}: run {values.get('name') or '#' + str(i + 1)}"
        cfg = _resolve(dict(values), where)
        if cfg.name in seen:
            raise UserError(
                f"{where}: key 'name': run name {cfg.name!r} is used twice ({seen[cfg.name]} and run #{i + 1}); "
                "give each run its own name"
            )
        seen[cfg.name] = f"run #{i + 1}"
        runs.append(cfg)
    if not runs:
        raise UserError(f"{source}: key 'runs': the plan has no runs; add [[runs]] tables")
    return Plan(source, tuple(runs))


def load_plan(path: str | Path, overrides: dict[str, Any] | None = None) -> Plan:
    """Read and resolve a plan file; ``overrides`` (field spelling) apply on top of every run.

    Raises:
        UserError: one line naming the plan file, the run and the key: unknown keys, unknown recipe or model,
            a run name twice, a value of the wrong type or out of range.
    """
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"plan file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    unknown = sorted(set(doc) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{path}: key {unknown[0]!r}: unknown at the top level; use [shared] and [[runs]]")
    base = path.resolve().parent
    shared = _clean(doc.get("shared", {}), f"{path}: [shared]", base)
    runs = doc.get("runs", [])
    if not isinstance(runs, list):
        raise UserError(f"{path}: key 'runs': expected [[runs]] tables")
    tables = []
    for i, run in enumerate(runs):
        name = run.get("name") if isinstance(run, dict) else None
        tables.append(
            {**shared, **_clean(run, f"{path}: run {name or '#' + str(i + 1)}", base), **(overrides or {})}
        )
    return plan_from_configs(str(path), tables)
