"""`shardtune export CHECKPOINT --out DIR`: a DCP checkpoint -> a Hugging Face folder (safetensors).

The model is built from the checkpoint's own `huggingface/config.json` on the meta device, materialised
once on the CPU and filled from the DCP shards (whatever world size wrote them); `save_pretrained` then
writes sharded safetensors with an index when the model is large. One copy of the weights is held.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from transformers import AutoConfig, AutoTokenizer
from transformers.initialization import no_init_weights

from shardtune import quantize
from shardtune.checkpoint import damage, is_complete, single_process_ok
from shardtune.errors import ShardtuneError
from shardtune.model import DTYPES, auto_class, generation_config
from shardtune.vision import copy_processor_files


def export_checkpoint(checkpoint: str, out: str, dtype: str = "bf16", max_shard_size: str = "5GB",
                      adapter_only: bool = False, overwrite: bool = False) -> Path:
    """LoRA checkpoints are merged into the base weights (a plain model folder), or with `adapter_only`
    written as a peft adapter folder (adapter_config.json + adapter_model.safetensors). The files are written
    to a new folder beside `out`, then moved into it: a failed export leaves `out` as it was, and files in
    `out` that export does not write are never touched."""
    src, dst = Path(checkpoint), Path(out)
    check_checkpoint(src)
    if dtype not in DTYPES:
        raise ShardtuneError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    check_out(dst, overwrite)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.export-", dir=dst.absolute().parent))
    try:
        _export(src, tmp, dtype, max_shard_size, adapter_only)
        dst.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, dst / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    what = "the LoRA adapter of " if adapter_only else ""
    print(f"exported {what}{src} -> {dst} ({dtype}, {time.perf_counter() - t0:.1f} s)")
    return dst


def check_checkpoint(src: Path) -> None:
    """A complete, undamaged checkpoint folder, or a clear error (before any weights load)."""
    if not is_complete(src) or not (src / "huggingface" / "config.json").is_file():
        raise ShardtuneError(f"'{src}' is not a complete shardtune checkpoint (global_step_N with .metadata, "
                             "trainer_state.json and huggingface/config.json).")
    problem = damage(src)
    if problem:
        raise ShardtuneError(f"'{src}' is damaged: {problem}. Fix: use another checkpoint of the run "
                             "(or copy this one again).")


def check_out(dst: Path, overwrite: bool) -> None:
    """--out is a new or empty folder, or --overwrite allows a non-empty one; checked before any weights load."""
    if dst.exists() and not dst.is_dir():
        raise ShardtuneError(f"--out '{dst}' is a file. Fix: pass a folder path (a new one, or an empty one).")
    parent = next(p for p in dst.absolute().parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ShardtuneError(f"--out '{dst}': '{parent}' is not a writable folder. Fix: pass a folder you may write.")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        held = sorted(p.name for p in dst.iterdir())
        raise ShardtuneError(f"--out '{dst}' is not empty (it holds "
                             f"{', '.join(held[:5])}{' ...' if len(held) > 5 else ''}). "
                             "Fix: pass a new folder, or add --overwrite to replace the files export writes "
                             "(config.json, *.safetensors, tokenizer files; others are kept).")
    if not dst.exists():
        dst.absolute().parent.mkdir(parents=True, exist_ok=True)


def _export(src: Path, dst: Path, dtype: str, max_shard_size: str, adapter_only: bool) -> None:
    hf = src / "huggingface"
    if adapter_only and not (hf / "adapter_config.json").is_file():
        raise ShardtuneError(f"'{src}' was not trained with LoRA (no adapter_config.json): there is no "
                             "adapter to export. Fix: drop --adapter-only.")
    model, lora = load_checkpoint_model(src)
    config = model.config
    if lora and adapter_only:
        model.save_pretrained(dst, safe_serialization=True)
        AutoTokenizer.from_pretrained(hf).save_pretrained(dst)
        copy_processor_files(hf, dst)
        return
    if lora:
        model = model.merge_and_unload()  # W + (alpha/r) B A, in place: still one copy
    model.to(DTYPES[dtype])
    model.config.use_cache = True  # inference default for the exported model
    model.save_pretrained(dst, safe_serialization=True, max_shard_size=max_shard_size)
    AutoTokenizer.from_pretrained(hf).save_pretrained(dst)
    copy_processor_files(hf, dst)
    generation_config(hf, config).save_pretrained(dst)


def load_checkpoint_model(src: Path) -> tuple[torch.nn.Module, bool]:
    """The model of a checkpoint written by any world size, in fp32 on the CPU (with its LoRA adapters, not
    merged, when it was trained with them), and whether it is LoRA. `shardtune chat` loads through here too."""
    hf = src / "huggingface"
    config = AutoConfig.from_pretrained(hf)
    with no_init_weights():  # allocate without random init; buffers such as rotary inv_freq are still computed
        model = auto_class(config).from_config(config, dtype=torch.float32)  # a VLM: its own class, tower included
    lora = (hf / "adapter_config.json").is_file()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig.from_pretrained(hf))
    live = get_model_state_dict(model)
    try:
        # a QLoRA base was saved in 4 bits: read its parts, then write them de-quantized into the model
        saved = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
        state = {"model": quantize.part_buffers(live, saved)}
        with single_process_ok():
            dcp.load(state, checkpoint_id=str(src))  # reads into the model's own tensors: no second copy
    except (Exception, CheckpointException) as e:  # a shard damaged in a way its size does not show
        raise ShardtuneError(f"'{src}' cannot be read ({type(e).__name__}: {str(e)[:300]}). Fix: use another "
                             "checkpoint of the run (or copy this one again).") from None
    quantize.fill_dense(live, state["model"])
    dense = quantize.without_parts(state["model"])  # the 4-bit weights are filled already
    set_model_state_dict(model, dense, options=StateDictOptions(strict=len(dense) == len(state["model"])))
    return model, lora
