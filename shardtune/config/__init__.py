"""Typed, strict configuration.

A run is described by a tree of frozen dataclasses (`schema.py`). It is built from an optional YAML file
plus `key=value` overrides, the syntax verl users type (`loading.py`), checked key by key and then across
fields by `validate` (`rules.py`), all before any model or data is loaded.
"""

from shardtune.config.loading import (
    Override,
    all_keys,
    dump_yaml,
    from_dict,
    load_config,
    parse_overrides,
    set_dotted,
    to_dict,
)
from shardtune.config.rules import notes, validate
from shardtune.config.schema import (
    CHECKPOINT_CONTENTS,
    ENGINE_ALIASES,
    LOGGER_PACKAGES,
    LOGGERS,
    CheckpointConfig,
    Config,
    DataConfig,
    EngineConfig,
    EvalConfig,
    MixedPrecisionConfig,
    ModelConfig,
    OptimConfig,
    TrainerConfig,
)
from shardtune.config.sources import Source, resolve_sources

__all__ = [
    "CHECKPOINT_CONTENTS", "ENGINE_ALIASES", "LOGGERS", "LOGGER_PACKAGES", "CheckpointConfig", "Config", "DataConfig",
    "EngineConfig", "EvalConfig", "MixedPrecisionConfig", "ModelConfig", "OptimConfig", "Override", "Source", "TrainerConfig",
    "all_keys", "dump_yaml", "from_dict", "load_config", "notes", "parse_overrides", "resolve_sources", "set_dotted",
    "to_dict", "validate",
]
