"""Engine registry: `engine.strategy` -> implementation, imported only when used."""

from __future__ import annotations

import importlib
from typing import Any

from shardtune.config.schema import ENGINE_ALIASES

ENGINES = {"fsdp2": "shardtune.engine.fsdp2:FSDP2Engine"}


def build_engine(cfg: Any, world: Any, total_steps: int, tokenizer: Any):
    """The engine `engine.strategy` names (config loading already checked the name)."""
    name = ENGINE_ALIASES.get(cfg.engine.strategy, cfg.engine.strategy)
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)(cfg, world, total_steps, tokenizer)
