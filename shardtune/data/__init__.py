"""The data pipeline: readers -> row formats -> conversations -> tokens -> micro-batches (pure, no
torch.distributed)."""

from shardtune.data.chat import (
    IGNORE_INDEX,
    MaskOptions,
    TemplateMismatch,
    Tokenized,
    conversation_samples,
    tokenize_conversation,
)

__all__ = ["IGNORE_INDEX", "MaskOptions", "TemplateMismatch", "Tokenized", "conversation_samples",
           "tokenize_conversation"]
