"""Typed configuration.

Every stage and network has one frozen dataclass; `from_mapping` fills it from a
`params.yaml` section and rejects unknown keys. `load_params` reads `params.yaml`
and, when its top-level `profile` names something other than `tiny`, deep-merges
`profiles/<profile>.yaml` over it.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from magicfuse.errors import ConfigError

T = TypeVar("T")

DEFAULT_PARAMS = Path("params.yaml")

#: the top-level keys of a parameters file (and of a profile); anything else is a typo
SECTIONS = ("profile", "device", "synthesize", "shards", "train_ae", "train_ikr", "train_ckg", "train_mkf",
            "evaluate", "tracking")


def check_sections(params: Mapping[str, Any], where: str) -> None:
    """Reject top-level keys that are not sections (e.g. a misspelt `train_ikrr:`), which
    would otherwise be ignored silently; `where` names the file or source in the error."""
    import difflib

    unknown = [k for k in params if k not in SECTIONS]
    if unknown:
        hints = {k: difflib.get_close_matches(str(k), SECTIONS, n=1) for k in unknown}
        said = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
        raise ConfigError(f"{where}: unknown section(s) {said}; sections are {list(SECTIONS)}")


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Return `base` with `over` merged in, recursively for nested mappings."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_params(path: str | Path = DEFAULT_PARAMS, *, profile: str | None = None,
                resolved: bool = False) -> dict[str, Any]:
    """Read params.yaml (plus the profile overrides it selects) into a dict.

    `profile`, when given, replaces the file's top-level `profile` value. `resolved`: the
    file already holds its profile's values (a merged copy, as `magicfuse.pipeline.
    run_stage_distributed` writes it), so the profile is not merged in again.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found")
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(params).__name__}")
    check_sections(params, str(path))
    if profile is not None:
        params["profile"] = profile
    profile = params.get("profile", "tiny")
    if profile != "tiny" and not resolved:
        prof_path = path.parent / "profiles" / f"{profile}.yaml"
        if not prof_path.is_file():
            raise ConfigError(f"{path}: profile {profile!r} selected but {prof_path} does not exist")
        over = yaml.safe_load(prof_path.read_text()) or {}
        if not isinstance(over, dict):
            raise ConfigError(f"{prof_path}: top level must be a mapping")
        check_sections(over, str(prof_path))
        params = deep_merge(params, over)
    return params


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last: Exception | None = None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as exc:
                last = exc
        raise last or ConfigError(f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if origin is tuple and args:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        seq = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_mapping(cls: type[T], mapping: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass `cls` from `mapping`; unknown keys and wrong types are errors."""
    where = where or cls.__name__
    mapping = {} if mapping is None else mapping
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {mapping!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(mapping) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in mapping.items():
        kwargs[name] = _coerce(value, hints[name], f"{where}.{name}")
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key(s) {missing}")
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict form of a config dataclass (tuples become lists), for YAML/JSON/checkpoints."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(obj)


def section(params: Mapping[str, Any], name: str, cls: type[T]) -> T:
    """Build `cls` from section `name` of a params dict."""
    if name not in params:
        raise ConfigError(f"params.yaml: section {name!r} is missing")
    return from_mapping(cls, params[name], where=f"params.yaml:{name}")
