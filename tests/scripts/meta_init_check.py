"""Under torchrun: build the FSDP2 engine (rank 0 loads, others start on the meta device) and check that the
gathered full weights and the buffers on every rank equal what plain from_pretrained loads."""

import sys

import torch
from transformers import AutoModelForCausalLM

from shardtune import parallel
from shardtune.config import load_config
from shardtune.engine.fsdp2 import FSDP2Engine
from shardtune.model import load_tokenizer

world = parallel.init_world()
cfg = load_config(None, sys.argv[1:])
engine = FSDP2Engine(cfg, world, total_steps=1, tokenizer=load_tokenizer(cfg.model))
state = engine.full_state_dict()
reference = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
if world.is_main:
    ref = reference.state_dict()
    assert state.keys() == ref.keys(), (state.keys() ^ ref.keys())
    for k in ref:
        assert torch.equal(state[k], ref[k]), k
ref_buffers = dict(reference.named_buffers())
for name, buf in engine.model.named_buffers():
    assert torch.equal(buf, ref_buffers[name]), name
print(f"rank {world.rank}: meta init OK ({len(ref_buffers)} buffers)", flush=True)
parallel.shutdown(0)
