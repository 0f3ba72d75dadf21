"""`shardtune export CHECKPOINT --out DIR`: a DCP checkpoint -> a Hugging Face folder (safetensors).

The model is built from the checkpoint's own `huggingface/config.json` on the meta device, materialised
once on the CPU and filled from the DCP shards (whatever world size wrote them); `save_pretrained` then
writes sharded safetensors with an index when the model is large. One copy of the weights is held.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from transformers import AutoConfig, AutoTokenizer
from transformers.initialization import no_init_weights

from shardtune.checkpoint import is_complete, single_process_ok
from shardtune.errors import ShardtuneError
from shardtune.families import from_config
from shardtune.model import DTYPES, generation_config


def export_checkpoint(checkpoint: str, out: str, dtype: str = "bf16", max_shard_size: str = "5GB",
                      adapter_only: bool = False) -> Path:
    """LoRA checkpoints are merged into the base weights (a plain model folder), or with `adapter_only`
    written as a peft adapter folder (adapter_config.json + adapter_model.safetensors)."""
    src, dst = Path(checkpoint), Path(out)
    hf = src / "huggingface"
    if not is_complete(src) or not (hf / "config.json").is_file():
        raise ShardtuneError(f"'{checkpoint}' is not a complete shardtune checkpoint (global_step_N with .metadata, "
                             "trainer_state.json and huggingface/config.json).")
    if dtype not in DTYPES:
        raise ShardtuneError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    t0 = time.perf_counter()
    config = AutoConfig.from_pretrained(hf)
    with no_init_weights():  # allocate without random init; buffers such as rotary inv_freq are still computed
        model = from_config(config, dtype=torch.float32)
    lora = (hf / "adapter_config.json").is_file()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig.from_pretrained(hf))
    elif adapter_only:
        raise ShardtuneError(f"'{checkpoint}' was not trained with LoRA (no adapter_config.json): there is no "
                             "adapter to export. Fix: drop --adapter-only.")
    state = {"model": get_model_state_dict(model)}
    with single_process_ok():
        dcp.load(state, checkpoint_id=str(src))  # reads into the model's own tensors: no second copy
    set_model_state_dict(model, state["model"])
    if lora and adapter_only:
        dst.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(dst, safe_serialization=True)
        AutoTokenizer.from_pretrained(hf).save_pretrained(dst)
        print(f"exported the LoRA adapter of {src} -> {dst}")
        return dst
    if lora:
        model = model.merge_and_unload()  # W + (alpha/r) B A, in place: still one copy
    model.to(DTYPES[dtype])
    model.config.use_cache = True  # inference default for the exported model
    dst.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(dst, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(hf).save_pretrained(dst)
    generation_config(hf, config).save_pretrained(dst)
    print(f"exported {src} -> {dst} ({dtype}, {time.perf_counter() - t0:.1f} s)")
    return dst

