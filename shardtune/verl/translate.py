"""A verl command line -> shardtune overrides: compose verl's config (compose.py), then send each of its
keys through the trainer's table (mapping.py).

Every key of the composed config is translated, so verl's defaults (and interpolations such as the
default run directory) reach shardtune as verl would use them. Where several verl keys land on one
shardtune key, the one the line sets wins over the others' defaults; two that the line sets to different
values are an error, not a silent last-wins.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from shardtune.config import Config
from shardtune.errors import ConfigError
from shardtune.verl import configs, mapping
from shardtune.verl.compose import Composed, compose
from shardtune.verl.rules import Custom, Map, Refuse, Warn


@dataclass(frozen=True)
class Spec:
    """One verl entry point: its config, its table, and what the line must give."""

    trainer: configs.VerlTrainer
    table: dict[str, Any]
    prefix_warn: dict[str, str] = field(default_factory=dict)
    implied: dict[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()


LEGACY = Spec(configs.LEGACY, mapping.LEGACY, required=("model.partial_pretrain", "data.train_files"))
ENGINE = Spec(configs.ENGINE, mapping.ENGINE, mapping.ENGINE_PREFIX_WARN, mapping.ENGINE_IMPLIED,
              required=("model.path", "data.train_files"))
# sft_trainer_ray: the engine trainer, whose launcher reads the process count from trainer.nnodes/n_gpus_per_node
RAY = dataclasses.replace(ENGINE, table={**mapping.ENGINE, "trainer.nnodes": mapping.LAUNCHER,
                                         "trainer.n_gpus_per_node": mapping.LAUNCHER})


@dataclass
class _Assignment:
    key: str
    value: Any
    set_on_line: bool
    alias: bool


class Context:
    """What the rules produce: shardtune assignments, warnings and refusals."""

    def __init__(self, tree: dict[str, Any], touched: set[str]):
        self.tree, self.touched = tree, touched
        self.assignments: dict[str, list[_Assignment]] = {}
        self.warnings: list[str] = []
        self.refused: list[str] = []

    def is_set(self, key: str) -> bool:
        return any(t == key or t.startswith(key + ".") or key.startswith(t + ".") for t in self.touched)

    def assign(self, target: str, value: Any, key: str, alias: bool = False) -> None:
        if value is not None:
            self.assignments.setdefault(target, []).append(_Assignment(key, value, self.is_set(key), alias))

    def warn(self, key: str, why: str) -> None:
        self.warnings.append(f"verl key {key} is ignored: {why}.")

    def note(self, key: str, what: str) -> None:
        """A key that is honoured with an adjustment the user should know of."""
        self.warnings.append(f"verl key {key}: {what}.")

    def refuse(self, key: str, why: str) -> None:
        self.refused.append(f"{key} ({why})")


def rule_for(key: str, spec: Spec) -> Any:
    """The rule of a verl key: its own, its enclosing mapping's (e.g. `model.override_config`), or its
    option group's; None when shardtune knows no such key."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        rule = spec.table.get(".".join(parts[:n]))
        if rule is not None:
            return rule
    for prefix, why in spec.prefix_warn.items():
        if key.startswith(prefix):
            return Warn(why)
    return None


def translate(argv: list[str], spec: Spec) -> list[str]:
    """verl overrides -> shardtune overrides (`key=value`), or a ConfigError listing every problem."""
    composed = compose(argv, spec.trainer)
    strategy = _get(composed.tree, "engine.strategy")
    if strategy in configs.OTHER_STRATEGIES:  # verl 0.9's fsdp_turbo: a backend chosen by a key, not a group
        composed.backends.append(f"engine.strategy={strategy}")
    ctx = Context(composed.tree, composed.touched)
    for key, value in units(composed.tree, spec):
        _apply_rule(key, value, rule_for(key, spec), ctx, composed, spec)
    for key in sorted(k for k in composed.touched if k.split(".")[0] == "hydra"):
        ctx.warn(key, "one of Hydra's own run settings (output folder, logging); shardtune runs no Hydra app")
    for key in composed.unknown:
        ctx.refuse(key, f"not a key of verl's {spec.trainer.yaml}, which refuses it too{_did_you_mean(key, spec)}")
    for key in spec.required:
        if _get(composed.tree, key) is None:
            ctx.refuse(key, "required")
    overrides = _resolve(ctx)
    problems = composed.errors + ctx.refused
    if composed.backends:
        raise ConfigError(_backend_message(composed, problems))
    if problems:
        raise ConfigError("These verl keys are not supported by shardtune: " + "; ".join(problems) + ".")
    if os.environ.get("RANK", "0") == "0":
        for w in dict.fromkeys(ctx.warnings):
            print(f"shardtune: warning: {w}", file=sys.stderr)
    implied = [f"{k}={_text(k, v)}" for k, v in spec.implied.items()]
    return implied + overrides


def units(tree: dict[str, Any], spec: Spec, prefix: str = ""):
    """(key, value) of every setting: a leaf, or a whole mapping that has a rule of its own."""
    for k, v in tree.items():
        key = prefix + k
        if key in spec.table or not isinstance(v, dict):
            yield key, v
        else:
            yield from units(v, spec, key + ".")


def _apply_rule(key: str, value: Any, rule: Any, ctx: Context, composed: Composed, spec: Spec) -> None:
    if rule is None:
        if any(key == a or key.startswith(a + ".") for a in composed.added):
            ctx.warn(key, f"`+` adds it to verl's config, whose {spec.trainer.yaml} does not define it; shardtune "
                          "does not read it" + _did_you_mean(key, spec))
        elif value not in (None, {}, []):
            ctx.refuse(key, "shardtune has no mapping for it")
    elif isinstance(rule, Warn):
        if ctx.is_set(key):
            ctx.warn(key, rule.why)
    elif isinstance(rule, Refuse):
        if value not in rule.allowed:
            closest = f"; closest shardtune setting: {rule.closest}" if rule.closest else ""
            ctx.refuse(f"{key}={value!r}", rule.why + closest)
    elif isinstance(rule, Custom):
        rule.handle(key, value, ctx)
    elif isinstance(rule, Map) and value is not None:
        try:
            ctx.assign(rule.target, rule.convert(value) if rule.convert else value, key, rule.alias)
        except ConfigError as e:
            ctx.refuse(key, str(e))


def _resolve(ctx: Context) -> list[str]:
    out = []
    for target, entries in ctx.assignments.items():
        on_line = [e for e in entries if e.set_on_line]
        values = {repr(e.value) for e in on_line}
        if len(values) > 1:
            both = " and ".join(f"{e.key}={_get(ctx.tree, e.key, e.value)!r}" for e in on_line)  # as the line wrote it
            ctx.refuse(both, f"both set shardtune's {target}, to different values. Fix: keep one of them")
            continue
        chosen = on_line or [e for e in entries if not e.alias]
        if chosen:
            out.append(f"{target}={_text(target, chosen[0].value)}")
    return out


def _backend_message(composed: Composed, problems: list[str]) -> str:
    known = {**configs.BACKENDS, **configs.OTHER_STRATEGIES}
    names = sorted({known[line.split("=", 1)[1]] for line in composed.backends})
    only = [k for k in composed.unknown if k.startswith(("engine.", "optim."))]
    only += sorted(k for k in composed.touched if k.startswith("engine.turbo_config.") and
                   not any(t.startswith(k + ".") for t in composed.touched))
    rest = [p for p in problems if not any(p.startswith(k + " ") for k in only)]
    others = ", ".join(v for v in known.values() if v not in names)
    msg = (f"{' '.join(composed.backends)} selects verl's {' and '.join(names)} backend; shardtune runs "
           f"PyTorch FSDP2 (fully_shard) only (verl's other backends, {others}, are not run either). To run this line on shardtune's FSDP2 engine (verl's engine=fsdp), "
           f"drop {' '.join(composed.backends)}" + (f" and these {'/'.join(names)}-only keys: {', '.join(only)}"
                                                     if only else ""))
    return msg + (". Also: " + "; ".join(rest) if rest else "") + "."


def _did_you_mean(key: str, spec: Spec) -> str:
    close = difflib.get_close_matches(key, list(spec.table), n=1, cutoff=0.75)
    return f". Did you mean {close[0]}?" if close else ""


def _get(tree: dict[str, Any], key: str, missing: Any = None) -> Any:
    node: Any = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return missing
        node = node[part]
    return node


def _text(target: str, value: Any) -> str:
    """A value as shardtune's override parser reads it back: text fields take strings as typed, the rest
    is read as YAML."""
    if isinstance(value, str) and _is_text_field(target):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip().removesuffix("...").strip()


def _is_text_field(target: str) -> bool:
    cls: Any = Config
    *parents, leaf = target.split(".")
    for p in parents:
        cls = typing.get_type_hints(cls)[p]
    hint = typing.get_type_hints(cls)[leaf] if dataclasses.is_dataclass(cls) else None
    args = set(typing.get_args(hint))
    return hint is str or (typing.get_origin(hint) in (typing.Union, types.UnionType) and args == {str, type(None)})
