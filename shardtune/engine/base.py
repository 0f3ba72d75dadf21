"""The engine boundary: everything the training loop may ask of a model + optimizer + parallelism.

The loop hands over micro-batches and gets back plain numbers; it never touches torch.distributed,
FSDP or the optimizer itself, so another backend only has to implement this interface.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from shardtune.batch import MicroBatch


@dataclass
class StepResult:
    loss: float  # global token-mean loss of the optimizer step
    grad_norm: float  # total norm before clipping
    lr: float  # learning rate the step used
    skipped: bool  # non-finite gradient norm: no update on any rank
    num_targets: int  # supervised tokens of the whole step (all ranks)
    extra: dict[str, float] = field(default_factory=dict)  # model-specific metrics (MoE routing)


class Engine(ABC):
    compute_dtype: Any  # the dtype matmuls run in (for peak FLOP/s)

    @abstractmethod
    def train_batch(self, micro_batches: list[MicroBatch], num_targets: int) -> StepResult:
        """One optimizer step over this rank's micro-batches (every rank passes the same number);
        `num_targets`: the supervised tokens of the whole step on all ranks (the loss divisor, known on the
        host from the data plan, so no collective is needed for it)."""

    @abstractmethod
    def eval_batch(self, micro_batches: list[MicroBatch]) -> tuple[float, float]:
        """(sum of token losses, number of supervised tokens) over all ranks."""

    @abstractmethod
    def generate(self, conversations: list[list[dict[str, Any]]], sampling: Any, batch_size: int) -> list[str]:
        """The model's answers to this rank's conversations (every rank passes the same number: under
        sharding each forward is a collective)."""

    @abstractmethod
    def checkpoint_parts(self) -> dict[str, Any]:
        """The engine's checkpoint state as named `Stateful` parts: "model" and "optimizer" (tensors, saved
        with DCP, reshardable) and "schedule" (the learning-rate schedule's position, plain JSON)."""

    @abstractmethod
    def model_config(self) -> Any:
        """The Hugging Face config of the model (saved beside every checkpoint)."""

    @abstractmethod
    def adapter_config(self) -> Any:
        """The peft adapter config when training LoRA adapters, else None."""

    @abstractmethod
    def export(self, path: str) -> None:
        """Write the model as a Hugging Face folder (safetensors)."""
