"""Engine registry: `engine.strategy` -> implementation, imported only when used."""

from __future__ import annotations

import importlib
from typing import Any

from shardtune.errors import ConfigError

ENGINES = {"fsdp2": "shardtune.engine.fsdp2:FSDP2Engine"}
ALIASES = {"fsdp": "fsdp2"}  # verl's name; shardtune builds on FSDP2 only (FSDP1 is deprecated upstream)


def check_strategy(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in ENGINES:
        raise ConfigError(f"engine.strategy='{name}' is not available. Fix: use one of {sorted(ENGINES)}.")
    return name


def build_engine(cfg: Any, world: Any, total_steps: int, tokenizer: Any):
    module, cls = ENGINES[check_strategy(cfg.engine.strategy)].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, world, total_steps, tokenizer)
