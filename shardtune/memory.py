"""How much memory one device needs to train a config: an estimate that `shardtune validate` prints.

Everything is counted in bytes per device (per process). Model state comes from exact parameter counts
(the model built on the meta device, LoRA included, so tied weights, biases and adapter dtypes are right).
Activations come from what autograd saves for one Llama/Qwen2-style decoder layer per token, counted
tensor by tensor below and checked against `saved_tensors_hooks` on a real model in tests/test_memory.py.
The logits terms were measured on CPU (peak resident memory of the plain and the chunked loss).

MoE layers count every expert's weights, gradients and optimizer state, and activations for the top-k
experts of each token (`moe_bytes_per_token`); a multimodal checkpoint's frozen vision tower counts as
parameters only (no gradients, no optimizer state), and its activations on the micro-batch's pictures are
counted by shardtune/memory_vision.py.

What is not modelled: T x T attention scores (the kernels shardtune picks never materialise them, but
padded rows with an attention mask may fall back to one that does; nor per-sequence soft-capped or sink
attention, whose scores are per sequence), linear-attention layers' own activations, the extra
saved tensors of LoRA's rank-r branch (small), compiled layers (`engine.use_torch_compile`), and the
tokenized data held in host memory.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from shardtune import quantize
from shardtune.config import Config
from shardtune.flops import config_value
from shardtune.loss import LossHead
from shardtune.memory_vision import VisionShape, vision_bytes, vision_shape
from shardtune.model import build_from_config, compute_dtype, load_hf_config
from shardtune.parallel import World, decoder_layers
from shardtune.parallelize import parallelize

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2}
# Memory a process holds besides the tensors estimated here. CPU: the Python interpreter with torch,
# transformers and the model code imported, as measured before the model is built (about 0.33 GiB) plus
# kernel scratch. glibc's malloc may keep freed activation memory on top (measured: +36%, +96% with
# checkpointing; none with MALLOC_MMAP_THRESHOLD_ fixed), which is not counted. CUDA: the CUDA context and
# cuBLAS workspaces outside the caching allocator (measured 0.75 GiB on an H200, torch 2.11), and the
# allocator's rounding/fragmentation, taken as 10% of the transient peak (an assumption; on the H200 bench
# it reserved more, while the logits term was overestimated: docs/performance.md).
RUNTIME_FIXED = {"cpu": 0.35 * GIB, "cuda": 0.75 * GIB}
ALLOCATOR_SLACK = {"cpu": 0.0, "cuda": 0.10}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about a model: sizes from its config, bytes from its parameters."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params: int  # elements of all parameters (tied ones once)
    param_bytes: int  # all parameters (tied ones once), in their own dtypes
    trainable_bytes: int  # those with requires_grad (LoRA: the adapters only)
    linear_weight_params: int  # elements of Linear weights: what autocast keeps a bf16 copy of
    largest_unit_params: int  # the largest FSDP2 unit (a decoder layer, the embedding or the head)
    largest_unit_trainable_params: int
    trainable_params: int  # elements with requires_grad
    head_trainable: bool  # the output layer's weight trains (not under LoRA)
    # QLoRA (model.load_in_4bit): weights held in 4 bits, whose bytes (codes, scales) are in param_bytes
    four_bit_params: int = 0
    four_bit_bytes: int = 0
    largest_unit_4bit_params: int = 0
    largest_4bit_weight: int = 0  # elements of the largest one, de-quantized for its matmul and then freed
    # mixture of experts (0 for dense models): routed experts, how many each token uses, their width, and
    # the width of the shared experts every token also runs
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    vision: VisionShape | None = None  # a vision-language model's tower (shardtune/memory_vision.py)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one device; `host` is what offloading moves to the CPU (per process)."""

    parameters: float
    gradients: float
    optimizer: float
    working: float  # FSDP2 all-gathered layers, or autocast's bf16 weight copies on one process
    activations: float
    logits: float
    runtime: float
    host: float
    tokens: int  # per micro-batch on this device
    device_type: str
    compute_dtype: str
    host_activations: float = 0.0  # saved activations held in host memory (model.enable_activation_offload)
    vision_activations: float = 0.0  # the vision tower on the micro-batch's pictures (in `activations` too)
    image_tokens: int = 0  # of `tokens`, the image tokens the estimate assumes

    @property
    def transient(self) -> float:
        # the fused AdamW that shardtune/optim.py picks on CPU and CUDA adds no per-step temporaries
        return self.activations + self.logits

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + self.working + self.transient + self.runtime


def nbytes(p: torch.Tensor) -> int:
    """Bytes a parameter holds: a 4-bit weight's codes, block scales and constants; else numel x size."""
    if quantize.is_4bit(p):
        local = getattr(p, "_local_tensor", p)
        return sum(getattr(local, n).numel() * getattr(local, n).element_size()
                   for n in quantize.SHARDED_PARTS + quantize.REPLICATED_PARTS)
    return p.numel() * p.element_size()


def shape_of(model: torch.nn.Module) -> ModelShape:
    """Sizes from the language model's config; parameter bytes from every parameter (a multimodal
    checkpoint's frozen vision tower and projector are held, without gradients or optimizer state)."""
    c = model.config.get_text_config()
    params = list(model.parameters())  # unique: a tied weight is counted once
    four_bit = [p for p in params if quantize.is_4bit(p)]

    def count(module: torch.nn.Module | None, trainable: bool = False, only_4bit: bool = False) -> int:
        ps = [] if module is None else module.parameters()
        return sum(p.numel() for p in ps
                   if (p.requires_grad or not trainable) and (quantize.is_4bit(p) or not only_4bit))

    units = [*decoder_layers(model), model.get_input_embeddings(), model.get_output_embeddings()]
    return ModelShape(
        hidden=c.hidden_size, intermediate=config_value(c, "intermediate_size"), layers=c.num_hidden_layers,
        heads=c.num_attention_heads, kv_heads=config_value(c, "num_key_value_heads", default=c.num_attention_heads),
        head_dim=config_value(c, "head_dim", default=c.hidden_size // c.num_attention_heads), vocab=c.vocab_size,
        params=sum(p.numel() for p in params), param_bytes=sum(nbytes(p) for p in params),
        trainable_bytes=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
        linear_weight_params=sum(m.weight.numel() for m in model.modules()  # 4-bit ones save no bf16 copy
                                 if isinstance(m, (torch.nn.Linear, LossHead)) and not quantize.is_4bit(m.weight)),
        largest_unit_params=max(count(u) for u in units),
        largest_unit_trainable_params=max(count(u, trainable=True) for u in units),
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        head_trainable=model.get_output_embeddings().weight.requires_grad, **experts_of(c),
        four_bit_params=sum(p.numel() for p in four_bit), four_bit_bytes=sum(nbytes(p) for p in four_bit),
        largest_unit_4bit_params=max(count(u, only_4bit=True) for u in units),
        largest_4bit_weight=max((p.numel() for p in four_bit), default=0), vision=vision_shape(model),
    )


def experts_of(c: Any) -> dict[str, int]:
    """The MoE sizes of a (text) config, read under the names the families use; {} for dense models."""
    experts = next((getattr(c, n) for n in ("num_experts", "num_local_experts", "n_routed_experts")
                    if getattr(c, n, None)), 0)
    if not experts:
        return {}
    shared = getattr(c, "shared_expert_intermediate_size", None) or (
        (getattr(c, "n_shared_experts", None) or 0) * (getattr(c, "moe_intermediate_size", None) or 0))
    return dict(experts=experts, experts_per_token=getattr(c, "num_experts_per_tok", None) or 1,
                expert_intermediate=config_value(c, "moe_intermediate_size", "intermediate_size"),
                shared_intermediate=shared)


def model_shape(model_cfg: Any) -> ModelShape:
    """Build the model on the meta device (config.json only, no weights read) with the training switches
    and LoRA of `model_cfg`, and measure it."""
    # quiet: loading an adapter (model.lora_adapter_path) into meta tensors warns once per tensor, a no-op
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_from_config(load_hf_config(model_cfg), model_cfg, "cpu")
        model = parallelize(model, Config(model=model_cfg), World())  # the one-process transforms
    return shape_of(model)


def tokens_per_micro_batch(cfg: Any) -> int:
    """The most tokens one rank holds activations for: the token budget, or the padded micro-batch; under
    Ulysses sequence parallelism each rank keeps 1/sp of them between the attention all-to-alls."""
    data = cfg.data
    tokens = data.max_token_len_per_gpu if data.use_dynamic_bsz else data.micro_batch_size_per_gpu * data.max_length
    return math.ceil(tokens / cfg.sp_size)


def layer_bytes_per_token(s: ModelShape, act: int, residual: int, autocast: bool) -> float:
    """What autograd keeps for one decoder layer, per token (HF Llama/Qwen2 code: RMSNorm in fp32)."""
    h, kv, i = s.hidden, s.kv_heads * s.head_dim, s.intermediate
    # each RMSNorm saves its input in fp32 (the residual itself, or an fp32 copy), the normalised value
    # (for the weight's gradient) and its output; under autocast the output is saved as one bf16 cast
    # per Linear that reads it (q, k, v after the first norm; gate, up after the second)
    norm_out = 5 * act * h if autocast else 2 * act * h
    norms = 2 * (4 * h + residual * h) + norm_out + 2 * 4  # + the fp32 rsqrt, one per token each
    # q and k after RoPE, v, the attention output with its fp32 logsumexp per head, o_proj's input
    attention = 3 * act * h + 2 * act * kv + 4 * s.heads
    mlp = 4 * act * i  # gate (SiLU's input), SiLU's output, up, and their product (down_proj's input)
    if s.experts:  # (every layer counted as MoE: the dense first layers of DeepSeek-V3 are few)
        return norms + attention + moe_bytes_per_token(s, act)
    return norms + attention + mlp


def moe_bytes_per_token(s: ModelShape, act: int) -> float:
    """An MoE block per token: the router's logits and fp32 softmax, and for each of the token's top-k
    experts its gathered input, the expert's four SwiGLU tensors and its weighted output; shared experts as
    a dense MLP."""
    router = act * s.experts + 4 * 2 * s.experts + 12 * s.experts_per_token  # logits, softmax, top-k weights/ids
    routed = s.experts_per_token * (2 * act * s.hidden + 4 * act * s.expert_intermediate)
    return router + routed + 4 * act * s.shared_intermediate


def activation_bytes(s: ModelShape, tokens: int, act: int, residual: int, autocast: bool,
                     checkpointing: bool) -> float:
    layer = layer_bytes_per_token(s, act, residual, autocast) * tokens
    # outside the layers: input ids (int64), RoPE cos/sin, the final norm and lm_head's input
    outside = tokens * (8 + 2 * s.head_dim * residual + 4 * s.hidden + 2 * residual * s.hidden + 4)
    if checkpointing:  # only each layer's input is kept; backward recomputes one layer at a time
        return s.layers * tokens * s.hidden * residual + layer + outside
    return s.layers * layer + outside


def logits_bytes(s: ModelShape, tokens: int, chunk: int, act: int) -> float:
    """Peak of the output layer. Plain: logits, log-softmax output and two gradients of the size tokens x
    vocab exist together in backward, about three fp32 copies (measured). Chunked (shardtune/loss.py):
    a chunk's logits, logsumexp's temporary and the previous chunk's gradient, plus the gradients of the
    head's weight (fp32, and the copy backward scales; not when the head is frozen, as under LoRA) and of
    the hidden states."""
    if chunk <= 0:
        return 3 * 4 * tokens * s.vocab
    head_grad = 2 * 4 * s.vocab * s.hidden if s.head_trainable else 0
    return 3 * 4 * min(chunk, tokens) * s.vocab + head_grad + 2 * act * tokens * s.hidden


def compute_dtypes(cfg: Any, sharded: bool) -> tuple[int, int, bool]:
    """(bytes of an activation, bytes of the residual stream, autocast on?) as the engine runs the config."""
    act = compute_dtype(cfg).itemsize
    weight = BYTES[cfg.model.dtype]
    if sharded:  # FSDP2 computes everything, the residual stream included, in its parameter dtype
        return act, act, False
    autocast = act < weight  # one process: bf16 autocast over fp32 weights
    return act, weight, autocast  # the residual stream keeps the weights' dtype


def loss_chunk(cfg: Any, s: ModelShape, tokens: int, device_type: str) -> int:
    # Liger's heuristic: chunk logits ~ the hidden states' size
    if cfg.model.use_liger and cfg.model.loss_chunk_size == 0 and device_type == "cuda":
        return 1 << (math.ceil(tokens / math.ceil(s.vocab / s.hidden)) - 1).bit_length()
    return cfg.model.loss_chunk_size


def estimate(cfg: Any, model: ModelShape | torch.nn.Module, world_size: int = 1,
             device_type: str | None = None, image_tokens: int = 0) -> MemoryEstimate:
    """Bytes one device needs to train `cfg` on `world_size` processes (`device_type`: cuda | cpu, default:
    what this machine has). `image_tokens`: the image tokens of the micro-batch richest in pictures (what
    `shardtune validate` planned, memory_vision.worst_micro_batch_image_tokens); the vision tower runs on
    them, on the whole row under Ulysses."""
    s = model if isinstance(model, ModelShape) else shape_of(model)
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    engine = cfg.engine
    sharded = world_size > 1  # one process trains the plain model; FSDP2 only under torchrun
    shard = 1 if not sharded else (world_size if engine.fsdp_size == -1 else engine.fsdp_size)
    offload = sharded and (engine.param_offload or engine.optimizer_offload)
    act, residual, autocast = compute_dtypes(cfg, sharded)
    # parameters, gradients (trainable ones, same dtype) and AdamW's two moments, each sharded
    state = [s.param_bytes / shard, s.trainable_bytes / shard, 2 * s.trainable_bytes / shard]
    tokens = tokens_per_micro_batch(cfg)
    activations = activation_bytes(s, tokens, act, residual, autocast, cfg.model.enable_gradient_checkpointing)
    vision = 0.0 if s.vision is None else vision_bytes(s.vision, image_tokens, act,
                                                       cfg.model.enable_gradient_checkpointing)
    activations += vision
    host_activations = 0.0
    if cfg.model.enable_activation_offload and device_type == "cuda":  # on the CPU nothing moves
        moved, kept = offloaded_bytes(s, tokens, act, residual, autocast, cfg.model.enable_gradient_checkpointing)
        activations, host_activations = activations - moved + kept, moved
    logits = logits_bytes(s, tokens, loss_chunk(cfg, s, tokens, device_type), act)
    transient = activations + logits
    return MemoryEstimate(
        *([0.0] * 3 if offload else state), working=working_bytes(cfg, s, sharded, autocast, act),
        activations=activations, logits=logits,
        runtime=RUNTIME_FIXED[device_type] + ALLOCATOR_SLACK[device_type] * transient,
        host=sum(state) if offload else 0.0, tokens=tokens, device_type=device_type,
        compute_dtype="bf16" if act == 2 else "fp32", host_activations=host_activations,
        vision_activations=vision, image_tokens=image_tokens)


def offloaded_bytes(s: ModelShape, tokens: int, act: int, residual: int, autocast: bool,
                    checkpointing: bool) -> tuple[float, float]:
    """(bytes moved to the host, bytes back on the device at a time) under activation offloading: every
    layer's saved tensors (its input under checkpointing); the layer in backward and the one prefetched
    are back on the device (the recomputed layer's input alone under checkpointing)."""
    if checkpointing:
        per_layer = tokens * s.hidden * residual
        return s.layers * per_layer, per_layer
    per_layer = layer_bytes_per_token(s, act, residual, autocast) * tokens
    return s.layers * per_layer, min(2, s.layers) * per_layer


def working_bytes(cfg: Any, s: ModelShape, sharded: bool, autocast: bool, act: int) -> float:
    """Unsharded copies of the weights that exist only while computing."""
    dequantized = act * s.largest_4bit_weight  # a 4-bit weight de-quantized for its matmul, one at a time
    if not sharded:  # autocast casts each Linear weight to bf16 and autograd keeps it until backward
        return (2.0 * s.linear_weight_params if autocast else 0.0) + dequantized
    # one unit's unsharded gradient and its reduce-scatter input in the reduce dtype; when gradients are
    # reduced once per step, every unit's unsharded gradient lives through the accumulation
    grads = (act + BYTES[cfg.engine.mixed_precision.reduce_dtype]) * s.largest_unit_trainable_params
    if cfg.engine.grads_reduced_once_per_step:
        grads += act * s.trainable_params
    four_bit = s.four_bit_bytes / max(s.four_bit_params, 1)  # bytes per element, gathered in 4 bits
    if not cfg.engine.reshard_after_forward:  # every unit stays gathered from its forward to its backward
        return act * (s.params - s.four_bit_params) + four_bit * s.four_bit_params + grads + dequantized
    unit = act * (s.largest_unit_params - s.largest_unit_4bit_params) + four_bit * s.largest_unit_4bit_params
    return 2 * unit + grads + dequantized  # the unit computing and the one prefetched
