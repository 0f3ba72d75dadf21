"""Every transform between a loaded model and the model that trains, in one ordered function.

`parallelize(model, cfg, world)` serves one process and many alike: each step takes the model, the config
and the world, returns the model, and does nothing when its switch is off (Ulysses on one sequence-parallel
rank, FSDP2 on one process). Adding a transform is one line in `parallelize`, at the place its order asks
for; the order and its reasons are stated once, in docs/design-notes.md ("Model transforms").

Under torchrun only rank 0 holds real weights; the other ranks run the same steps on a model on the meta
device and receive their shards from rank 0 in the last step, so no host holds one full copy per process.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

from shardtune import attention, linear_attention, parallel, vision
from shardtune.loss import find_loss_head, install_loss_head
from shardtune.model import DTYPES, compute_dtype, liger_usable
from shardtune.parallel import decoder_layers


def parallelize(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """The model ready to train: kernels, loss head, activation checkpointing, frozen parts, LoRA, Ulysses,
    compile, then FSDP2 and rank 0's weights (docs/design-notes.md, "Model transforms")."""
    model = use_liger_kernels(model, cfg, world)
    model = add_loss_head(model, cfg, world)
    model = checkpoint_activations(model, cfg, world)
    model = offload_activations(model, cfg, world)
    model = freeze_vision_parts(model, cfg, world)
    model = quantize_base(model, cfg, world)
    model = isolate_linear_attention(model, cfg, world)
    model = add_lora(model, cfg, world)
    model = add_neftune(model, cfg, world)
    model = use_ulysses(model, cfg, world)
    model = compile_layers(model, cfg, world)
    weights = model.state_dict() if world.distributed and world.is_main else {}  # sent to the others below
    model = shard(model, cfg, world)
    return receive_weights(model, weights, cfg, world)


def uses_liger(cfg: Any, world: parallel.World) -> bool:
    return liger_usable(cfg.model, world.device)[0]


def use_liger_kernels(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """Liger's RMSNorm, SwiGLU and RoPE in the decoder layers; not under torch.compile, which fuses those itself
    and cannot trace Liger's autograd Functions."""
    if uses_liger(cfg, world) and not cfg.engine.use_torch_compile:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance

        # our LossHead calls Liger's fused linear cross-entropy itself, with our normalisation
        _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    return model


def add_loss_head(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """The memory-lean loss head in place of lm_head (same weight). Liger's fused cross-entropy only where no
    chunk size is set: with a large vocabulary over a small hidden size its chunks are a few dozen tokens, and
    each chunk re-reads and re-writes the whole fp32 weight gradient (measured on an H200: 30% of the step for a
    1.5B model; docs/performance.md)."""
    liger = uses_liger(cfg, world)
    if cfg.model.loss_chunk_size > 0 or liger:
        install_loss_head(model, cfg.model.loss_chunk_size, liger and cfg.model.loss_chunk_size == 0)
    return model


def checkpoint_activations(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    if cfg.model.enable_gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def offload_activations(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """Saved activations to host memory per decoder layer (after checkpointing, whose layer inputs are what
    moves when it is on; shardtune/offload.py)."""
    if cfg.model.enable_activation_offload:
        from shardtune import offload

        offload.offload_activations(model, cfg.model.enable_gradient_checkpointing)
    return model


def quantize_base(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """QLoRA's 4-bit base (before LoRA wraps the Linear layers; shardtune/quantize.py): each weight whole, on
    the training device (fast on a GPU), where the weights are real (rank 0, or the one process)."""
    if cfg.model.load_in_4bit:
        from shardtune import quantize

        quantize.quantize_base(model, cfg.model.bnb_4bit_quant_type, four_bit_dtype(cfg), world.device)
    return model


def four_bit_dtype(cfg: Any) -> torch.dtype:
    """What the 4-bit weights de-quantize to, and the dtype of the adapters over them."""
    name = cfg.model.bnb_4bit_compute_dtype
    name = {"float32": "fp32", "bfloat16": "bf16"}.get(name, name)
    return compute_dtype(cfg) if name == "auto" else DTYPES[name]


def freeze_vision_parts(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    if vision.is_vision_config(model.config):
        vision.freeze(model, cfg.model)
    return model


def isolate_linear_attention(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """Linear-attention layers (Gated DeltaNet, Mamba-style) run once per sequence of a packed row, so their
    recurrent state restarts at every sequence start (shardtune/linear_attention.py); before LoRA wraps them."""
    linear_attention.isolate_recurrent_layers(model)
    return model


def add_lora(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """peft LoRA adapters (base weights frozen), or an adapter loaded to continue; after every step that
    replaces modules, since LoRA wraps the final ones."""
    mcfg = cfg.model
    if mcfg.lora_rank == 0:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if mcfg.enable_gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    # over a 4-bit base the adapters take the base's compute dtype (peft would otherwise upcast bf16 ones)
    autocast = not mcfg.load_in_4bit
    if mcfg.lora_adapter_path:
        return PeftModel.from_pretrained(model, os.path.expanduser(mcfg.lora_adapter_path), is_trainable=True,
                                         autocast_adapter_dtype=autocast)
    targets = "all-linear" if mcfg.target_modules == ["all-linear"] else mcfg.target_modules
    exclude = mcfg.exclude_modules or None
    if exclude is None and vision.is_vision_config(model.config):
        exclude = vision.lora_exclude(mcfg)  # LoRA on the language model (and the vision parts that train)
    return get_peft_model(model, LoraConfig(
        r=mcfg.lora_rank, lora_alpha=mcfg.lora_alpha, lora_dropout=mcfg.lora_dropout, target_modules=targets,
        exclude_modules=exclude, use_dora=mcfg.use_dora, task_type="CAUSAL_LM"), autocast_adapter_dtype=autocast)


def add_neftune(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """NEFTune's noise on the input embeddings in training mode (hooks, so every wrapper after it keeps them);
    `model.neftune` is where the engine tells it the step."""
    if cfg.model.neftune_noise_alpha > 0:
        from shardtune.neftune import install_neftune

        model.neftune = install_neftune(model, cfg.model.neftune_noise_alpha, cfg.trainer.seed)
    return model


def use_ulysses(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """Attention over the sequence-parallel group; the vision tower keeps plain sdpa (each rank runs it on every
    picture of the micro-batch)."""
    if world.sp_size > 1:
        model.set_attn_implementation(vision.attention_per_part(model.config,
                                                                attention.register_ulysses(world.sp_group)))
    return model


def compile_layers(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """torch.compile each decoder layer (before FSDP2 wraps it), with dynamic shapes: packed rows change length
    every step, and one graph serves every length and every layer (they share the code)."""
    if cfg.engine.use_torch_compile:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)
    return model


def shard(model: torch.nn.Module, cfg: Any, world: parallel.World) -> torch.nn.Module:
    """FSDP2 over the mesh; one process trains the plain model (no DTensor overhead)."""
    if not world.distributed:
        return model
    ecfg = cfg.engine
    head = find_loss_head(model)
    gathered = [head] if head is not None else []
    if getattr(model.config.get_text_config(), "hidden_size_per_layer_input", None):
        # Gemma 4's multimodal forward reads the input embedding's pad row directly, after the embedding's own
        # forward: a resharded embedding would hand it a DTensor
        gathered.append(model.get_input_embeddings())
    return apply_fsdp2(
        # compute in the weights' dtype unless mixed precision asks for bf16 (as on one process)
        model, parallel.build_mesh(world, ecfg.fsdp_size), param_dtype=compute_dtype(cfg),
        reduce_dtype=DTYPES[ecfg.mixed_precision.reduce_dtype], offload=ecfg.param_offload or ecfg.optimizer_offload,
        reshard_after_forward=ecfg.reshard_after_forward,
        # the chunked loss head forms its weight's gradient in the forward and never reads the weight in
        # backward: keeping it gathered saves an all-gather of the largest matrix (freed after backward)
        keep_gathered=gathered)


def apply_fsdp2(model: torch.nn.Module, mesh: Any, param_dtype: torch.dtype | None = None,
                reduce_dtype: torch.dtype = torch.float32, offload: bool = False,
                reshard_after_forward: bool = True, keep_gathered: Sequence[torch.nn.Module] = ()) -> torch.nn.Module:
    """`fully_shard` each decoder layer, the untied embeddings and head, then the root. Modules in
    `keep_gathered` stay unsharded from their forward to the end of backward (no second all-gather).

    The gradient divide factor is set to 1: the loss is already divided by the global number of supervised
    tokens, so gradients must be summed over ranks, not averaged.
    """
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    kwargs = {"mesh": mesh, "mp_policy": mp, "reshard_after_forward": reshard_after_forward}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    units = list(decoder_layers(model))
    if not getattr(model.config, "tie_word_embeddings", False):
        units += [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    for module in [*units, model]:
        gathered = any(module is m for m in keep_gathered)
        fully_shard(module, **{**kwargs, "reshard_after_forward": False} if gathered else kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
    return model


def receive_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], cfg: Any,
                    world: parallel.World) -> torch.nn.Module:
    """Rank 0's weights (`weights`, taken before sharding) onto every rank's shards, on the training device
    (the CPU under offload). One process loaded its weights onto its device already."""
    if not world.distributed:
        return model
    device = torch.device("cpu") if cfg.engine.param_offload or cfg.engine.optimizer_offload else world.device
    if world.is_main:
        model.to(device)
    else:
        model.to_empty(device=device)
    four_bit = cfg.model.load_in_4bit
    if four_bit:
        from shardtune import quantize

        four_bit_weights, weights = quantize.split_state(weights)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                                  strict=not four_bit))
    if four_bit:  # rank 0 quantized each weight whole; every rank takes its rows
        quantize.broadcast_from_rank0(model, four_bit_weights, world.device)
    # Buffers that are not in the state dict (rotary inv_freq) are garbage after to_empty: take rank 0's,
    # sent over the device the process group serves (NCCL cannot send CPU tensors, e.g. under offload).
    for buf in model.buffers():
        staged = buf.data.to(world.device)
        dist.broadcast(staged, src=0)
        buf.data.copy_(staged)
    return model
