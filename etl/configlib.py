"""TOML → typed, frozen dataclasses, shared by every stage.

One loader for all configs so that the rules are the same everywhere:

* an unknown key fails with its dotted name (``training.lerning_rate``);
* a value of the wrong type fails with the key, the expected and the given type;
* ``--set section.key=value`` overrides one key, the value parsed as a TOML literal
  (``--set training.steps=10``, ``--set data.path="'/scratch/cache'"`` or bare strings);
* an enumeration is a ``typing.Literal[...]`` field: a value outside it fails naming the key
  (``env.backend: expected one of ['jax', 'bullet', 'racecar_gym'], got 'foo'``), at load time
  and — through :func:`check_literals` in ``__post_init__`` — when a dataclass is built in code;
* :func:`config_hash` is a stable digest of the resolved config (used by the ETL to decide
  whether a finished drive can be skipped, and by checkpoints to detect a changed architecture);
* :func:`cli_load` / :func:`cli_error`: every command line reports a config error the same way,
  one line ``<prog>: config error: <message>`` on stderr and exit code :data:`EXIT_CONFIG` (2).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

EXIT_CONFIG = 2  # the exit code of every entry point for a config error


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def check_range(key: str, value: Any, lo: float | None = None, hi: float | None = None, *,
                lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise :class:`ConfigError` ``<key>: must be in (lo, hi], got <value>`` (or ``≥ lo``,
    ``> lo``, ``≤ hi``, ``< hi`` with one bound) unless ``value`` lies in the range. NaN never
    does. For ``__post_init__`` range checks: config values are checked when loaded."""
    ok = value == value  # not NaN
    if lo is not None:
        ok = ok and (value > lo if lo_open else value >= lo)
    if hi is not None:
        ok = ok and (value < hi if hi_open else value <= hi)
    if ok:
        return
    if lo is not None and hi is not None:
        rng = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f"{'>' if lo_open else '≥'} {lo:g}"
    else:
        rng = f"{'<' if hi_open else '≤'} {hi:g}"
    shown = f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else repr(value)
    raise ConfigError(f"{key}: must be {rng}, got {shown}")


def check_ranges(obj: Any, prefix: str, rules: dict[str, tuple]) -> None:
    """:func:`check_range` for several fields of ``obj``: ``{name: (lo, hi[, lo_open,
    hi_open])}``; a tuple value (an image size) is checked item by item."""
    for name, rule in rules.items():
        lo, hi, *opens = rule
        lo_open, hi_open = (opens + [False, False])[:2]
        v = getattr(obj, name)
        for x in v if isinstance(v, tuple) else (v,):
            check_range(f"{prefix}.{name}" if prefix else name, x, lo, hi,
                        lo_open=lo_open, hi_open=hi_open)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table [{key}], got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(
                _coerce(a, v, f"{key}[{i}]")
                for i, (a, v) in enumerate(zip(args, value, strict=True))
            )
        inner = args[0] if args else Any
        return tuple(_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table, got {type(value).__name__}")
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a (nested) dict, validating every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a table, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k in data:
        if k not in fields:
            name = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{name}: unknown key (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name in fields:
        if name in data:
            key = f"{prefix}.{name}" if prefix else name
            kwargs[name] = _coerce(hints[name], data[name], key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field without a value
        raise ConfigError(f"{prefix or '<root>'}: {e}") from None


def _has_literal(tp: Any) -> bool:
    if typing.get_origin(tp) is typing.Literal:
        return True
    return any(_has_literal(a) for a in typing.get_args(tp) if a is not Ellipsis)


def check_literals(obj: Any, prefix: str = "") -> None:
    """Check every ``Literal``-typed field of the dataclass instance ``obj`` (also inside a union
    such as ``Literal[...] | None``, or a tuple of them) and of the dataclasses it holds, for a
    dataclass built in code rather than by :func:`from_dict`: call it from ``__post_init__``.
    Raises :class:`ConfigError` naming the field (``prefix.section.name``), as the loader."""
    for name, tp in _literal_fields(type(obj)):
        _coerce(tp, getattr(obj, name), f"{prefix}.{name}" if prefix else name)
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_literals(value, f"{prefix}.{f.name}" if prefix else f.name)


@functools.cache
def _literal_fields(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(cls)
                 if _has_literal(hints[f.name]))


ADDED = "added"  # dataclasses.field metadata: the date a field joined its config


def added(default: Any, since: str) -> Any:
    """A config field added after results were recorded under its config (``since``: the
    date). Its ``default`` must reproduce the behaviour from before it existed;
    :func:`identity_dict` then leaves it out while it holds that default, so a record hashed
    before the field existed (rl.study's unit markers) still matches today's config."""
    return dataclasses.field(default=default, metadata={ADDED: since})


def _plain(v: Any, skip_added: bool) -> Any:
    """``v`` as plain data (dataclasses → dicts, tuples → lists); ``skip_added``: without
    the :func:`added` fields that hold their default."""
    if dataclasses.is_dataclass(v):
        return {f.name: _plain(getattr(v, f.name), skip_added) for f in dataclasses.fields(v)
                if not (skip_added and ADDED in f.metadata
                        and getattr(v, f.name) == f.default)}
    if isinstance(v, (tuple, list)):
        return [_plain(x, skip_added) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x, skip_added) for k, x in v.items()}
    return v


def identity_dict(cfg: Any) -> dict[str, Any]:
    """:func:`to_dict` without the fields declared with :func:`added` that hold their
    default: what identifies a config's results across versions of the code (rl.study hashes
    it), as a checkpoint saved before a key existed restores with that key's default."""
    return _plain(cfg, skip_added=True)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The dataclass as plain TOML/JSON-friendly data (tuples become lists)."""
    return _plain(cfg, skip_added=False)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare string such as a path
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries into a nested dict (a copy)."""
    out = json.loads(json.dumps(data))
    for text in overrides:
        parts, value = _parse_override(text)
        d = out
        for p in parts[:-1]:
            d = d.setdefault(p, {})
            if not isinstance(d, dict):
                raise ConfigError(f"--set {text}: {p} is not a table")
        d[parts[-1]] = value
    return out


def load(cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read a TOML file (or only defaults when ``path`` is None) into ``cls``."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            data = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
    data = apply_overrides(data, list(overrides))
    return from_dict(cls, data)


def config_hash(cfg: Any) -> str:
    """A stable 16-hex digest of the resolved config."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cli_error(prog: str, err: BaseException) -> int:
    """Report a config error on a command line: one line ``prog: config error: message`` on
    stderr; returns :data:`EXIT_CONFIG` for ``main`` to return."""
    print(f"{prog}: config error: {' '.join(str(err).split())}", file=sys.stderr)
    return EXIT_CONFIG


def cli_load(
    prog: str, cls: type[T], path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> T | None:
    """:func:`load` for a command line: on a config error, report it (:func:`cli_error`) and
    return None; the caller then returns :data:`EXIT_CONFIG`."""
    try:
        return load(cls, path, overrides)
    except ConfigError as e:
        cli_error(prog, e)
        return None
