"""Data sources: the entries of `data.train_files` / `data.val_files` resolved into typed `Source`s.

An entry is either a path or glob, or a mapping that makes a source of its own:

    {path: chat.parquet, name: chat, weight: 0.7, max_samples: 1000, format: messages, messages_key: turns}

All plain paths of a list together form one source, read in order (what a list of files has always meant),
so a config without mappings has exactly one source. A mapping takes `path` (a path, glob or list of them),
`name` (default: the file's stem), `weight` (default: equal shares), `max_samples` (default:
data.train_max_samples / val_max_samples) and any of the row-format keys of the data section, which apply to
that source only. Weights are shares of the training mixture: normalized when every source has one; when
only some do, the others split what the given ones leave of 1 equally. Validation reads every sample of
every source once, whatever the weights.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from shardtune.config.loading import coerce
from shardtune.config.schema import DataConfig
from shardtune.config.urls import DATA_SUFFIXES
from shardtune.errors import ConfigError

FORMAT_KEYS = ("format", "messages_key", "tools_key", "enable_thinking_key", "prompt_key", "response_key",
               "prompt_dict_keys", "response_dict_keys", "system_prompt", "message_weight_key")
SOURCE_KEYS = ("path", "name", "weight", "max_samples", *FORMAT_KEYS)
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")  # names go into metric keys such as data/samples/<name>
_DATA_SUFFIXES = (*DATA_SUFFIXES, ".arrow")  # stripped from a file name to name its source


@dataclass(frozen=True)
class Source:
    name: str
    paths: tuple[str, ...]  # as written: files, folders or globs, expanded when the data is read
    weight: float  # share of the training mixture; the weights of one list sum to 1
    max_samples: int  # rows read from the source (-1 = all)
    data: DataConfig  # the data section with this source's format keys applied


def resolve_sources(entries: list[str | dict[str, Any]], data: DataConfig, max_samples: int = -1,
                    where: str = "data.train_files") -> list[Source]:
    """The sources of one list of entries, in order. Raises `ConfigError` naming the entry and the fix."""
    specs: list[tuple[str, dict[str, Any]]] = []
    plain = [e for e in entries if isinstance(e, str)]
    first_plain = next((i for i, e in enumerate(entries) if isinstance(e, str)), None)
    for i, entry in enumerate(entries):
        if isinstance(entry, str):
            if i == first_plain:  # the plain paths form one source, placed where the first of them is
                specs.append((where, {"path": plain}))
        elif isinstance(entry, dict):
            specs.append((f"{where}[{i}]", entry))
        else:
            raise ConfigError(f"{where}[{i}] must be a path or a mapping {{path: ..., weight: ...}}, got {entry!r}.")
    parsed = [_parse_entry(label, entry, data, max_samples) for label, entry in specs]
    names = [p["name"] for p in parsed]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"Two sources in {where} are named '{name}'. Fix: give one of them another "
                              f"`name:` (names label the per-source metrics).")
    weights = _resolve_weights([p["weight"] for p in parsed], names, where)
    return [Source(p["name"], p["paths"], w, p["max_samples"], p["data"]) for p, w in zip(parsed, weights)]


def _parse_entry(label: str, entry: dict[str, Any], data: DataConfig, max_samples: int) -> dict[str, Any]:
    for key in entry:
        if key not in SOURCE_KEYS:
            close = difflib.get_close_matches(str(key), SOURCE_KEYS, n=1, cutoff=0.6)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"Unknown key '{key}' in the source {label}.{hint} "
                              f"Valid keys of a source: {', '.join(SOURCE_KEYS)}.")
    if not entry.get("path"):
        raise ConfigError(f"The source {label} has no path. Fix: {{path: data.parquet, ...}}.")
    paths = tuple(coerce(f"{label}.path", entry["path"], list[str]))
    name = coerce(f"{label}.name", entry["name"], str) if "name" in entry else _default_name(paths)
    if not _NAME.match(name):
        raise ConfigError(f"{label}.name='{name}' must use only letters, digits, '_', '-' and '.' "
                          "(it becomes part of metric names).")
    weight = coerce(f"{label}.weight", entry["weight"], float) if entry.get("weight") is not None else None
    if weight is not None and not (weight > 0 and math.isfinite(weight)):
        raise ConfigError(f"{label}.weight must be a positive number, got {entry['weight']!r}.")
    rows = coerce(f"{label}.max_samples", entry.get("max_samples", max_samples), int)
    if rows == 0 or rows < -1:
        raise ConfigError(f"{label}.max_samples must be -1 (all rows) or >= 1, got {rows}.")
    hints = typing.get_type_hints(DataConfig)
    overrides = {k: coerce(f"{label}.{k}", entry[k], hints[k]) for k in FORMAT_KEYS if k in entry}
    source_data = dataclasses.replace(data, **overrides)
    problem = weight_key_problem(source_data, f"{label}.message_weight_key")
    if problem:
        raise ConfigError(problem)
    if source_data.system_prompt and source_data.format not in ("auto", "prompt_response", "alpaca"):
        raise ConfigError(f"{label}: system_prompt applies to prompt/response and alpaca rows only, and this "
                          f"source's format is {source_data.format}.")
    return {"name": name, "paths": paths, "weight": weight, "max_samples": rows, "data": source_data}


# what a message's key means to the trainer already: a weight cannot live there
_MESSAGE_KEYS = ("role", "content", "train", "loss_mask", "trainable", "tool_calls", "reasoning_content", "name",
                 "from", "value")


def weight_key_problem(data: DataConfig, where: str = "data.message_weight_key") -> str | None:
    """Why the weight key cannot be used with these data settings (None when it can)."""
    key = data.message_weight_key
    if key is None:
        return None
    if not key.strip():
        return f"{where} is empty. Fix: name the numeric field of each message that holds its weight, or null (off)."
    taken = {*_MESSAGE_KEYS, data.messages_key, data.prompt_key, data.response_key, data.tools_key,
             data.enable_thinking_key, data.image_key, data.video_key, "instruction", "input", "output", "system",
             "conversations"}
    if key in taken:
        return (f"{where}='{key}' names a key the trainer already reads (a message's or the row's). Fix: store the "
                "weights under a key of their own, e.g. loss_weight.")
    return None


def _default_name(paths: tuple[str, ...]) -> str:
    """The stem of a single path (for a glob: the last folder without wildcards); "data" for several."""
    if len(paths) != 1:
        return "data"
    parts = [p for p in PurePosixPath(paths[0].replace("\\", "/")).parts if p not in ("/", "")]
    plain = [p for p in parts if not any(ch in p for ch in "*?[")]
    if not plain:
        return "data"
    name = plain[-1]
    for suffix in _DATA_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "data"


def _resolve_weights(weights: list[float | None], names: list[str], where: str) -> list[float]:
    given = [w for w in weights if w is not None]
    if len(given) == len(weights):
        total = sum(given)
        return [w / total for w in given]
    rest = 1.0 - sum(given)
    if rest <= 0:
        missing = [n for n, w in zip(names, weights) if w is None]
        raise ConfigError(f"The weights given in {where} sum to {sum(given):g}, which leaves no share for the "
                          f"source(s) without a weight ({', '.join(missing)}). Fix: give every source a weight "
                          "(they are normalized), or make the given ones sum to less than 1.")
    share = rest / (len(weights) - len(given))
    return [share if w is None else w for w in weights]
