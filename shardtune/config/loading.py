"""Loading: YAML + `key=value` overrides -> nested dict -> typed dataclasses, key by key (unknown keys get
a did-you-mean, values are checked against the field types); and writing a config back as YAML."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from shardtune.config.schema import Config
from shardtune.errors import ConfigError


@dataclass(frozen=True)
class Override:
    """A command-line value: parsed as YAML, except where the field is a string, which takes the text as typed
    (so `experiment_name=007` stays "007" and `system_prompt=Answer: briefly` is not read as a mapping)."""

    raw: str
    parsed: Any


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["a.b=1", "c=[x,y]"]` -> `{"a.b": Override("1", 1), "c": Override("[x,y]", ["x", "y"])}`. A key given
    twice takes the last value, as verl's command lines expect (`repeated_overrides` says so)."""
    out: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("+")
        if not sep or not key:
            raise ConfigError(f"Cannot parse the override '{item}'. Fix: write it as key=value, e.g. optim.lr=2e-5.")
        out.pop(key, None)  # the last one given keeps its place
        out[key] = Override(raw, _parse_value(raw))
    return out


def _by_key(overrides: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in overrides:
        out.setdefault(item.partition("=")[0].strip().lstrip("+"), []).append(item)
    return out


def repeated_overrides(overrides: list[str]) -> str | None:
    """The note to show once when a key is given twice on the command line (the last value wins), else None."""
    repeated = {k: [i.partition("=")[2] for i in v] for k, v in _by_key(overrides).items() if len(v) > 1}
    if not repeated:
        return None
    said = "; ".join(f"{k}={' then '.join(v)} (uses {v[-1]})" for k, v in repeated.items())
    return f"a key given more than once on the command line takes its last value: {said}."


def last_of_each(overrides: list[str]) -> list[str]:
    """The overrides with every key's earlier values dropped (what `parse_overrides` keeps), in their order."""
    last = {item.partition("=")[0].strip().lstrip("+"): i for i, item in enumerate(overrides)}
    return [overrides[i] for i in sorted(last.values())]


class _StrictLoader(yaml.SafeLoader):
    """PyYAML keeps the last of two equal keys silently: a section written twice would lose the first one's keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise ConfigError(f"Config file '{key_node.start_mark.name}': the key '{key}' is written twice, on "
                                  f"line {seen[key]} and line {line}; YAML would keep only the second. Fix: merge "
                                  "the two into one.")
            seen.setdefault(key, line)
        return super().construct_mapping(node, deep)


def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"Config key '{dotted}': '{p}' is a value, not a section.")
        node = child
    node[leaf] = value


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Build a `Config` from an optional YAML file and `key=value` overrides, strictly."""
    tree: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"Config file '{path}' does not exist. Fix: pass the path of a YAML file.")
        try:
            with p.open() as f:
                tree = yaml.load(f, Loader=_StrictLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"Config file '{path}' is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"Config file '{path}' must hold a mapping of sections (data:, model:, ...).")
    for key, value in parse_overrides(overrides or []).items():
        set_dotted(tree, key, value)
    return from_dict(Config, tree)


def from_dict(cls: type, tree: dict[str, Any], prefix: str = "") -> Any:
    if not isinstance(tree, dict):
        raise ConfigError(f"Config key '{prefix.rstrip('.')}' must be a section (a mapping), got {tree!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in tree.items():
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix + key, cls, prefix))
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            value = value.parsed if isinstance(value, Override) else value
            kwargs[key] = from_dict(hint, value or {}, prefix + key + ".")
        else:
            kwargs[key] = coerce(prefix + key, value, hint)
    return cls(**kwargs)


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown_key_message(key: str, cls: type, prefix: str) -> str:
    candidates = all_keys()
    leaf = key.rsplit(".", 1)[-1]  # a right leaf under a wrong section, e.g. `trainer.lr`
    close = [k for k in candidates if k.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(key, candidates, n=1, cutoff=0.6)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    valid = ", ".join(f.name for f in dataclasses.fields(cls))
    return f"Unknown config key '{key}'.{hint} Valid keys in {section}: {valid}."


def coerce(key: str, value: Any, hint: Any) -> Any:
    """Check `value` against the type `hint`, converting only where it is lossless and unsurprising."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if isinstance(value, Override):
        text_field = hint is str or (origin in (typing.Union, types.UnionType) and set(args) == {str, type(None)})
        value = value.raw if text_field and value.raw.strip() not in ("null", "~") else value.parsed
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        reasons = []
        for a in non_none:
            try:
                return coerce(key, value, a)
            except ConfigError as e:
                reasons.append(str(e).split(" must be ", 1)[-1].split(", got ")[0])
        raise ConfigError(f"Config key '{key}' must be {' or '.join(reasons)}, got {value!r}.")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint_txt = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"Config key '{key}' must be one of {list(args)}, got {value!r}.{hint_txt}")
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a bare value where a list is expected, e.g. trainer.logger=console
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config key '{key}' must be a list, got {value!r}. Fix: write {key}=[a,b].")
        return [coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"Config key '{key}' must be a mapping, got {value!r}. Fix: {key}={{k: v}}.")
        return _plain(value)
    return _coerce_scalar(key, value, hint)


def _plain(value: Any) -> Any:
    """A mapping built from dotted overrides (`key.sub=1`) holds their parsed values."""
    if isinstance(value, Override):
        return value.parsed
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _coerce_scalar(key: str, value: Any, hint: Any) -> Any:
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"Config key '{key}' must be true or false, got {value!r}.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"Config key '{key}' must be an integer, got {value!r}.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-5` as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"Config key '{key}' must be a number, got {value!r}.")
    if hint is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"Config key '{key}' must be a string, got {value!r}.")
    raise TypeError(f"unsupported config type {hint} for {key}")


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tmp.replace(path)
