"""A verl command line -> verl's composed config, with Hydra's own override grammar and semantics.

Hydra (hydra-core, which verl users already have) parses every `key=value` exactly as verl's entry points
do: `+key` adds (and sets a key verl's config has: a line written for a verl version whose YAML did not have
the key yet, e.g. `+model.fsdp_config.model_dtype=bf16`, means what it meant there), `++key` adds or sets,
`~key` removes, `group=option` picks a config group (`engine=fsdp`), lists, dicts, quoting and `${...}`
interpolations. Group selections are applied first and key overrides after them, whatever their order on the
line, as in Hydra; interpolations are resolved by OmegaConf against the composed config, so
`checkpoints/${trainer.project_name}` means what it means in verl.
"""

from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass, field
from typing import Any

from shardtune.errors import ConfigError
from shardtune.verl.configs import BACKENDS, VerlTrainer


@dataclass
class Composed:
    tree: dict[str, Any]  # the resolved config (plain Python values)
    touched: set[str]  # dotted keys the line set (a dict value touches each of its leaves too)
    added: set[str]  # keys `+`/`++` created that verl's config does not have
    backends: list[str] = field(default_factory=list)  # `engine=megatron`-like selections of other backends
    unknown: list[str] = field(default_factory=list)  # keys set without `+` that verl's config does not have
    errors: list[str] = field(default_factory=list)


def hydra_modules() -> tuple[Any, Any, Any]:
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from omegaconf import OmegaConf
    except ImportError:
        raise ConfigError("The verl entry points read command lines with Hydra's override grammar, and hydra-core "
                          "is not installed. Fix: pip install 'shardtune[verl]'.") from None
    if not OmegaConf.has_resolver("now"):  # Hydra registers it when its app starts: ${now:%Y-%m-%d}
        OmegaConf.register_new_resolver("now", lambda fmt: datetime.datetime.now().strftime(fmt), use_cache=True)
    return OverridesParser, ConfigLoaderImpl, OmegaConf


CONFIG_NAME_FLAGS = ("--config-name", "-cn")


def without_own_config_name(argv: list[str], trainer: VerlTrainer) -> list[str]:
    """`--config-name sft_trainer_engine` (or `=`) names the config verl composes for this trainer anyway:
    nothing to do. Another name is a config shardtune cannot see; parse() refuses it."""
    own, out, i = trainer.yaml.removesuffix(".yaml"), [], 0
    while i < len(argv):
        flag, eq, name = argv[i].partition("=")
        if flag in CONFIG_NAME_FLAGS and not eq and i + 1 < len(argv):
            flag, eq, name, i = flag, "=", argv[i + 1], i + 1
        if not (flag in CONFIG_NAME_FLAGS and eq and name.removesuffix(".yaml") == own):
            out.append(argv[i] if not (flag in CONFIG_NAME_FLAGS and eq) else f"{flag}={name}")
        i += 1
    return out


def parse(argv: list[str]) -> tuple[list[Any], list[str]]:
    """Hydra `Override` objects, and a message for each argument Hydra cannot read."""
    parser_cls, _, _ = hydra_modules()
    parser = parser_cls.create()
    overrides, errors = [], []
    for arg in argv:
        if arg.startswith("-"):  # Hydra's app flags: --config-name, --config-path, --cfg, --multirun, ...
            errors.append(f"'{arg}': a Hydra application flag; shardtune composes verl's own config for this "
                          "trainer (--config-name naming it is accepted) and reads no other YAML. Fix: give the "
                          "keys of your YAML on the command line (key=value)")
            continue
        try:
            ov = parser.parse_override(arg)
        except Exception as e:  # OverrideParseException
            first = str(e).splitlines()[0]
            errors.append(f"'{arg}' is not a Hydra override ({first}). Fix: write key=value; quote values with "
                          f"characters Hydra reserves, e.g. {arg.split('=')[0]}='{arg.partition('=')[2]}'")
            continue
        if ov.is_sweep_override():
            errors.append(f"'{arg}' is ambiguous: a comma makes it a Hydra sweep. Fix: a list is written "
                          "key=[a,b], a string with a comma is quoted key='a,b'")
            continue
        overrides.append(ov)
    return overrides, errors


def compose(argv: list[str], trainer: VerlTrainer) -> Composed:
    overrides, errors = parse(without_own_config_name(argv, trainer))
    _, loader, omegaconf = hydra_modules()
    selected, backends = dict(trainer.defaults), []
    config_overrides = []
    for ov in overrides:
        key = ov.key_or_group
        if ov.package is None and key not in trainer.groups:
            config_overrides.append(ov)
        elif ov.is_delete() or not isinstance(ov.value(), str):
            errors.append(f"'{ov.input_line}': verl's {key} group needs one option, e.g. {key}="
                          f"{trainer.defaults.get(key, 'NAME')}")
        elif ov.value() in BACKENDS and key in ("engine", "optim"):
            backends.append(ov.input_line)
        elif key in trainer.groups and ov.value() in trainer.groups[key]:
            selected[key] = ov.value()
        else:
            options = ", ".join(trainer.groups.get(key, {})) or "none"
            errors.append(f"'{ov.input_line}': verl's {trainer.yaml} has no such config group option "
                          f"(options: {options})")
    defaults = trainer.compose(selected)
    cfg = omegaconf.create(defaults)
    omegaconf.set_struct(cfg, True)
    for key in trainer.free_form:  # verl's code reads any key of these mappings
        node = omegaconf.select(cfg, key)
        if node is not None:
            omegaconf.set_struct(node, False)
    out = Composed({}, set(), set(), backends, errors=errors)
    for ov in config_overrides:
        _apply(ov, cfg, loader, omegaconf, out)
        if ov.is_delete() and ov.key_or_group not in out.unknown:
            _restore_default(ov.key_or_group, cfg, defaults, omegaconf)
    try:
        out.tree = omegaconf.to_container(cfg, resolve=True)
    except Exception as e:  # an interpolation that does not resolve
        out.errors.append(f"an interpolation does not resolve: {str(e).splitlines()[0]}")
        out.tree = omegaconf.to_container(cfg, resolve=False)
    return out


def _apply(ov: Any, cfg: Any, loader: Any, omegaconf: Any, out: Composed) -> None:
    key = ov.key_or_group
    if key == "hydra" or key.startswith("hydra."):
        out.touched.add(key)  # Hydra's own settings (output dirs, logging): not part of the trainer's config
        return
    existed = omegaconf.select(cfg, key, default=_MISSING, throw_on_missing=False) is not _MISSING
    if ov.is_add() and existed:  # Hydra: `Could not append`; in the verl the line was written for, a new key
        ov = dataclasses.replace(ov, type=_force_add_type())
    try:
        loader._apply_overrides_to_config([ov], cfg)
    except Exception as e:  # ConfigCompositionException, with Hydra's own wording
        message = str(e).strip()
        if message.startswith("Could not override"):
            out.unknown.append(key)
        else:
            out.errors.append(f"'{ov.input_line}': " + " ".join(message.split()))
        return
    if (ov.is_add() or ov.is_force_add()) and not existed:
        out.added.add(key)
    out.touched.update(_leaves(key, ov.value()) if not ov.is_delete() else {key})


_MISSING = object()


def _force_add_type() -> Any:
    from hydra.core.override_parser.types import OverrideType

    return OverrideType.FORCE_ADD


def _restore_default(key: str, cfg: Any, defaults: dict[str, Any], omegaconf: Any) -> None:
    """`~key` leaves the key unset, which verl's trainers read as its default value: put that back."""
    node: Any = defaults
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return  # a key `+` added: gone for good
        node = node[part]
    omegaconf.update(cfg, key, node, merge=False, force_add=True)


def _leaves(key: str, value: Any) -> set[str]:
    if isinstance(value, dict) and value:
        return {key} | {leaf for k, v in value.items() for leaf in _leaves(f"{key}.{k}", v)}
    return {key}
