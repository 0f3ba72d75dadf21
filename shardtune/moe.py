"""Mixture-of-experts routing: the router's load-balancing loss as the model defines it, and the per-step
routing metrics.

transformers' MoE models (Qwen3-MoE, Qwen3.5-MoE, Mixtral, OLMoE, gpt-oss, ...) compute an auxiliary
load-balancing loss from the router logits when asked (`output_router_logits`) and add
`router_aux_loss_coef` times it to the loss when their config sets `output_router_logits: true`. shardtune
follows the config: when it is set, each micro-batch adds coef x its aux loss x its supervised tokens to the
summed cross-entropy, so after the division by the step's supervised tokens the aux term is the token-weighted
mean over micro-batches (and ranks), the same however the step is split into equal micro-batches. The logged
`train/loss` stays the cross-entropy; `train/aux_loss` is that token-weighted mean; `train/expert_imbalance`
is max/mean tokens per expert (top-k choices of every token), averaged over the MoE layers.

Under Ulysses sequence parallelism each rank routes a slice of the packed row, and the aux loss (a product of
per-expert token fractions and mean probabilities) is not a sum over slices: `whole_row_aux` gathers the
slices' router logits and applies the model's own aux function to the whole row, as one process does.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Routing:
    experts: int
    top_k: int
    aux_coef: float  # 0 when the config does not add the aux loss (output_router_logits false)


def routing(hf_config: Any) -> Routing | None:
    """The routing of an MoE model whose transformers class returns router logits, else None (dense
    models, and MoE models balanced without an aux loss, such as DeepSeek-V3's bias-corrected router)."""
    c = hf_config.get_text_config()
    if not hasattr(c, "router_aux_loss_coef") or not hasattr(c, "output_router_logits"):
        return None
    experts = next((getattr(c, n) for n in ("num_experts", "num_local_experts") if getattr(c, n, None)), None)
    if not experts:
        return None
    top_k = getattr(c, "num_experts_per_tok", None) or getattr(c, "num_experts_per_token", 1)
    return Routing(experts, top_k, float(c.router_aux_loss_coef) if c.output_router_logits else 0.0)


def expert_counts(router_logits: tuple[torch.Tensor, ...], r: Routing, real: Any = slice(None)) -> torch.Tensor:
    """[layers, experts]: how many top-k choices each expert received in each MoE layer, over the tokens that
    `real` indexes (padding is not counted)."""
    rows = []
    for logits in router_logits:
        chosen = logits.reshape(-1, logits.shape[-1])[real].topk(r.top_k, dim=-1).indices.flatten()
        rows.append(torch.bincount(chosen, minlength=r.experts).to(torch.float64))
    return torch.stack(rows)


def imbalance(counts: torch.Tensor) -> float:
    """max / mean tokens per expert, averaged over layers (1.0 = perfectly balanced)."""
    mean = counts.mean(dim=1).clamp(min=1e-12)
    return float((counts.max(dim=1).values / mean).mean())


def aux_function(model: torch.nn.Module) -> Any:
    """The model's own load-balancing loss function (transformers defines one per MoE modeling file)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    for cls in type(base).__mro__:  # FSDP2 subclasses the model's class in a torch module
        fn = getattr(sys.modules.get(cls.__module__), "load_balancing_loss_func", None)
        if fn is not None:
            return fn
    return None


def whole_row_aux(aux_fn: Any, router_logits: tuple[torch.Tensor, ...], r: Routing, num_tokens: int,
                  group: Any) -> torch.Tensor:
    """The aux loss of a packed row whose slices the sequence-parallel `group` routes, on every rank: each
    layer's router logits gathered in rank order (autograd-aware: each rank's gradient reaches every slice),
    without the padding that made the row divide by the group size (the last positions past `num_tokens`)."""
    from torch.distributed.nn.functional import all_gather

    whole = tuple(torch.cat(all_gather(x.reshape(-1, x.shape[-1]).contiguous(), group=group))[:num_tokens]
                  for x in router_logits)
    return aux_fn(whole, r.experts, r.top_k, None)
