"""The FSDP2 engine: a Hugging Face causal LM, AdamW and a schedule, sharded with `fully_shard`.

Loss normalisation (docs/design-notes.md, "Global token mean"): the supervised tokens of the whole
optimizer step are counted over all micro-batches and ranks before the first backward; each micro-batch
adds sum(token losses) / that count to the gradient, and FSDP sums (not averages) gradients over ranks. The
result is the gradient of the global token-mean loss, however the step is split.

Micro-batches arrive ready from the data path (collated, sliced for sequence parallelism, pinned); the
engine only moves them to the device.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from shardtune import moe, parallel, quantize
from shardtune.batch import IGNORE_INDEX, MicroBatch
from shardtune.engine.base import Engine, StepResult
from shardtune.errors import ConfigError
from shardtune.loss import find_loss_head
from shardtune.model import build_from_config, compute_dtype, liger_usable, load_hf_config, load_model
from shardtune.optim import build_optimizer, build_scheduler
from shardtune.parallelize import parallelize
from shardtune.vision import VisionInputsBuilder, blank_picture, blank_video, is_vision_config


class FSDP2Engine(Engine):
    def __init__(self, cfg: Any, world: parallel.World, total_steps: int, tokenizer: Any):
        self.cfg, self.world = cfg, world
        self.tokenizer = tokenizer  # only written beside exported weights
        self.compute_dtype = compute_dtype(cfg)
        _, liger_message = liger_usable(cfg.model, world.device)
        if liger_message and world.is_main:
            warnings.warn(liger_message, stacklevel=1)
        self.model = self._build_model()
        self.vision = None
        if is_vision_config(self.model.config):  # the image processor lives beside the tokenizer
            blank = blank_picture(tokenizer.name_or_path) if world.distributed else None
            video = blank_video(tokenizer.name_or_path, self.model.config) if world.distributed else None
            self.vision = VisionInputsBuilder(self.model, blank, world.sp_rank, video)
        self.loss_head = find_loss_head(self.model)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, total_steps)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.routing = moe.routing(self.model.config)
        self.neftune = getattr(self.model, "neftune", None)  # NEFTune's noise depends on the step

    # ------------------------------------------------------------------------------------------------------
    def _build_model(self) -> torch.nn.Module:
        """Only rank 0 reads the weights; under torchrun the others build the model on the meta device and
        receive theirs shard by shard from rank 0 (`parallelize`), so no host holds one copy per process."""
        mcfg, world = self.cfg.model, self.world
        if world.is_main:
            model = load_model(mcfg, "cpu" if world.distributed else world.device, attention_device=world.device,
                               compute_dtype=self.compute_dtype)
        else:
            with torch.device("meta"):
                model = build_from_config(load_hf_config(mcfg), mcfg, world.device, self.compute_dtype)
        return parallelize(model, self.cfg, world)

    def _autocast(self):
        """bf16 autocast on one process (FSDP2's MixedPrecisionPolicy does this job when sharded)."""
        bf16 = self.cfg.engine.mixed_precision.param_dtype == "bf16" and not self.world.distributed
        return torch.autocast(self.world.device.type, dtype=torch.bfloat16, enabled=bf16)

    # ------------------------------------------------------------------------------------------------------
    def _loss_sum(self, mb: MicroBatch) -> tuple[torch.Tensor, Any]:
        """Sum of next-token cross-entropy over the supervised tokens of one micro-batch (of this rank's
        slice of it under sequence parallelism: the slices of a group add up to the whole), and the model's
        output (its `aux_loss` and `router_logits` for MoE models)."""
        packed = {}
        if mb.cu_seqlens is not None:  # sequence boundaries for varlen attention kernels
            cu = self._to_device(mb.cu_seqlens)
            packed = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": mb.max_seqlen,
                      "max_length_k": mb.max_seqlen}
        if self.routing is not None:
            packed["output_router_logits"] = True
        inputs = dict(input_ids=self._to_device(mb.input_ids), position_ids=self._to_device(mb.position_ids),
                      attention_mask=self._to_device(mb.attention_mask), use_cache=False, **packed)
        if self.vision is not None:  # pixel tensors, image-token types, 3-D rope positions
            inputs.update(self.vision.inputs(mb, self._to_device))
        # DFT and message weights shape the training loss only: validation reports the plain cross-entropy
        dft = self.cfg.optim.loss_type == "dft" and self.model.training
        weights = mb.weights if self.model.training else None
        if self.loss_head is not None:
            return self._fused_loss_sum(inputs, mb.targets.flatten(), dft, weights)
        with self._autocast():
            out = self.model(**inputs)
        plain = not dft and weights is None
        ce = F.cross_entropy(out.logits.flatten(0, 1).float(), self._to_device(mb.targets).flatten(),
                             ignore_index=IGNORE_INDEX, reduction="sum" if plain else "none")  # 0 where untrained
        if plain:
            return ce, out
        if dft:
            ce = ce * torch.exp(-ce).detach()
        if weights is not None:
            ce = ce * self._to_device(weights).flatten()
        return ce.sum(), out

    def _to_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Host to device without stalling the host: a pinned staging copy and an asynchronous transfer on
        CUDA (a plain `.to("cuda")` of pageable memory waits for the copy)."""
        if t is None or self.world.device.type != "cuda":
            return t
        return (t if t.is_pinned() else t.pin_memory()).to(self.world.device, non_blocking=True)

    def _fused_loss_sum(self, inputs: dict[str, Any], targets: torch.Tensor, dft: bool,
                        weights: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """The loss head computes the loss of the supervised positions (found on the host, so no sync)."""
        positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
        weights = None if weights is None else self._to_device(weights.flatten()[positions])
        with self._autocast(), self.loss_head.computing_loss(self._to_device(positions),
                                                             self._to_device(targets[positions]), dft, weights):
            out = self.model(**inputs)
        loss = out.logits
        if loss is not self.loss_head.last_loss:
            raise ConfigError(
                f"{type(self.model).__name__} transforms its logits after lm_head (e.g. final soft-capping or "
                "logit scaling), which the chunked/fused loss head does not model. Fix: model.loss_chunk_size=0 "
                "and model.use_liger=false for this model.")
        return loss, out

    def train_batch(self, micro_batches: list[MicroBatch], num_targets: int) -> StepResult:
        self.model.train()
        if self.neftune is not None:  # the steps taken before this one: the schedule's position, kept on resume
            self.neftune.step = self.scheduler.last_epoch
        denom = float(max(num_targets, 1))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.world.device)
        router = _RouterStats(self.routing, self.world, self.model)
        for i, mb in enumerate(micro_batches):
            self._set_gradient_sync(last=i == len(micro_batches) - 1)
            loss, out = self._loss_sum(mb)
            aux = router.add(out, mb)
            ((loss + aux) / denom).backward()
            loss_sum += loss.detach()
        max_norm = self.cfg.optim.clip_grad or math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        sums = parallel.all_reduce_tensor_(torch.cat([loss_sum[None], router.sums()]), self.world)
        # the step's one host sync (the skip decision needs the norm); identical on every rank
        grad_norm, total_loss, *routed = torch.cat([grad_norm.to(loss_sum)[None], sums]).tolist()
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
        with warnings.catch_warnings():  # a skipped step still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step()`")
            self.scheduler.step()
        return StepResult(total_loss / denom, grad_norm, lr, skipped, num_targets, router.metrics(routed, denom))

    def _set_gradient_sync(self, last: bool) -> None:
        """With engine.reduce_grads_every_micro_batch=false, FSDP2 keeps accumulating unsharded gradients
        and reduces once, after the step's last micro-batch: fewer collectives, more memory. Always so when
        each shard group is one rank (engine.fsdp_size=1: replicas hold whole gradients anyway)."""
        if self.world.distributed and self.cfg.engine.grads_reduced_once_per_step:
            self.model.set_requires_gradient_sync(last)

    @torch.no_grad()
    def eval_batch(self, micro_batches: list[MicroBatch]) -> tuple[float, float]:
        """Each rank counts the targets of its own micro-batches (its slices under sequence parallelism), so
        the sum over all ranks counts every token once."""
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.world.device)
        for mb in micro_batches:
            loss_sum += self._loss_sum(mb)[0]
        loss, count = parallel.all_reduce_sum([float(loss_sum), sum(mb.num_targets for mb in micro_batches)],
                                              self.world)
        return loss, count

    def generate(self, conversations: list[list[dict[str, Any]]], sampling: Any, batch_size: int) -> list[str]:
        from shardtune.data.chat import resolve_chat_template
        from shardtune.generate import generate

        template = resolve_chat_template(self.cfg.data.chat_template, self.tokenizer)
        with self._autocast():
            return generate(self.model, self.tokenizer, conversations, sampling, batch_size=batch_size,
                            synced=self.world.distributed, chat_template=template, device=self.world.device,
                            template_kwargs=self.cfg.data.apply_chat_template_kwargs)

    # ------------------------------------------------------------------------------------------------------
    def checkpoint_parts(self) -> dict[str, Any]:
        """Model and optimizer as DCP state (sharded DTensors under FSDP2, reshardable on load; the model is
        loaded first, the optimizer's state is keyed by its parameters) and the schedule's position."""
        return {"model": _ModelState(self), "optimizer": _OptimizerState(self), "schedule": _ScheduleState(self)}

    def model_config(self) -> Any:
        return self.model.config

    def adapter_config(self) -> Any:
        peft_config = getattr(self.model, "peft_config", None)
        return peft_config["default"] if peft_config else None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded weights (4-bit ones de-quantized), on rank 0 only (empty elsewhere)."""
        if not self.world.distributed:
            return {k: quantize.dense(v.detach()) for k, v in self.model.state_dict().items()}
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: quantize.dense(v) for k, v in state.items()}

    def export(self, path: str) -> None:
        state = self.full_state_dict()
        if self.world.is_main:
            model = self.model
            model.save_pretrained(path, state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(path)
        parallel.barrier(self.world)


class _RouterStats:
    """One step's routing of an MoE model: the aux loss terms added to the loss (moe.py) and the expert
    counts, gathered per micro-batch on the device and summed over ranks with the loss (no extra sync)."""

    def __init__(self, routing: moe.Routing | None, world: parallel.World, model: torch.nn.Module):
        self.routing, self.world, self.device = routing, world, world.device
        self.aux_fn = moe.aux_function(model) if routing is not None and world.sp_size > 1 else None
        self.aux_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.counts: torch.Tensor | None = None

    def add(self, out: Any, mb: MicroBatch) -> torch.Tensor | float:
        """This micro-batch's aux term for the loss sum (coef x aux x its supervised tokens), or 0. Under
        sequence parallelism the aux loss is the whole row's, and each of the group's ranks adds 1/sp of
        its term (coef x aux x the row's supervised tokens)."""
        r = self.routing
        if r is None or getattr(out, "router_logits", None) is None:
            return 0.0
        counts = moe.expert_counts(tuple(x.detach() for x in out.router_logits), r, self._real_tokens(mb))
        self.counts = counts if self.counts is None else self.counts + counts
        aux, num_targets = getattr(out, "aux_loss", None), mb.num_targets
        if aux is None:
            return 0.0
        if self.aux_fn is not None:
            aux = moe.whole_row_aux(self.aux_fn, out.router_logits, r, mb.num_tokens, self.world.sp_group)
            row_targets = torch.tensor(float(mb.num_targets), dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(row_targets, group=self.world.sp_group)
            num_targets = row_targets / self.world.sp_size
        self.aux_sum += aux.detach().to(torch.float64) * num_targets
        return r.aux_coef * aux * num_targets if r.aux_coef else 0.0

    def _real_tokens(self, mb: MicroBatch) -> Any:
        """The index of this rank's real tokens among its positions: a packed row's padding (to divide by the
        sequence-parallel size, or fill a bucket) comes last; padded rows have their attention mask."""
        if mb.cu_seqlens is None:
            return slice(None) if mb.attention_mask is None else mb.attention_mask.flatten().bool().to(self.device)
        width = mb.input_ids.shape[1]
        return slice(0, min(max(mb.num_tokens - self.world.sp_rank * width, 0), width))

    def sums(self) -> torch.Tensor:
        if self.routing is None:
            return torch.zeros(0, dtype=torch.float64, device=self.device)
        counts = self.counts if self.counts is not None else torch.zeros(1, self.routing.experts, dtype=torch.float64,
                                                                        device=self.device)
        return torch.cat([self.aux_sum[None], counts.flatten()])

    def metrics(self, summed: list[float], denom: float) -> dict[str, float]:
        if self.routing is None:
            return {}
        counts = torch.tensor(summed[1:], dtype=torch.float64).reshape(-1, self.routing.experts)
        return {"train/aux_loss": summed[0] / denom, "train/expert_imbalance": moe.imbalance(counts)}


class _ModelState:
    def __init__(self, engine: FSDP2Engine):
        self.engine = engine

    def state_dict(self) -> dict[str, Any]:
        # a 4-bit weight as its parts, views of the live tensors: DCP loads them in place
        return quantize.checkpoint_entries(get_model_state_dict(self.engine.model))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        four_bit = self.engine.cfg.model.load_in_4bit
        set_model_state_dict(self.engine.model, quantize.without_parts(state),
                             options=StateDictOptions(strict=not four_bit))


class _OptimizerState(_ModelState):
    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.engine.model, self.engine.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.engine.model, self.engine.optimizer, state)


class _ScheduleState(_ModelState):
    def state_dict(self) -> dict[str, Any]:
        return self.engine.scheduler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.scheduler.load_state_dict(state)
        # LambdaLR does not touch the optimizer's lr on load; without optimizer state it would be stale
        for group, lr in zip(self.engine.optimizer.param_groups, self.engine.scheduler.get_last_lr()):
            group["lr"] = lr

