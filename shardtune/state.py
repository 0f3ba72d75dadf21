"""What a run carries across a restart besides the weights and the data position: the training counters,
early stopping, and every random number generator. Each is a `Stateful` part of the checkpoint (plain
JSON, so resuming never unpickles anything)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken
    tokens_seen: int = 0
    skipped_steps: int = 0  # non-finite gradient norm: no update
    best_val: float = math.inf
    bad_validations: int = 0  # validations since the best one
    stopped_early: bool = False

    def record_validation(self, val_loss: float, patience: int, min_delta: float) -> bool:
        """Update the early-stopping record; True when `patience` validations in a row did not improve."""
        if val_loss < self.best_val - min_delta:
            self.best_val, self.bad_validations = val_loss, 0
        else:
            self.bad_validations += 1
        return patience > 0 and self.bad_validations >= patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            if f.name in state:  # a field added later keeps its default when an older checkpoint lacks it
                setattr(self, f.name, state[f.name])


class RNGState:
    """Python, numpy, torch (and CUDA) generators of this process; one per rank in a checkpoint."""

    per_rank = True

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {"python": _lists(random.getstate()), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                 "torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state().tolist()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(_tuples(state["python"]))
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lists(x: Any) -> Any:
    return [_lists(v) for v in x] if isinstance(x, (tuple, list)) else x


def _tuples(x: Any) -> Any:
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x
