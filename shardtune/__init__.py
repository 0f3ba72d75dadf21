"""shardtune: supervised fine-tuning of causal language models on PyTorch FSDP2."""

__version__ = "0.1.0"
