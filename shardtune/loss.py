"""A memory-lean output layer: next-token cross-entropy computed from the hidden states in chunks.

The plain path builds logits for every token of a micro-batch (tokens x vocabulary, in fp32 for the loss):
8k tokens of a 152k-vocabulary model is 5 GB before the softmax's copy. `LossHead` replaces the model's
`lm_head` (same `weight`, same state-dict key, tying kept) and, while the engine asks for a loss, computes
the summed cross-entropy of the supervised tokens only, `chunk_size` tokens at a time. The gradients with
respect to the hidden states and the weight are formed chunk by chunk during the forward and kept, so no
chunk's logits outlive its iteration; backward only scales them by the incoming gradient (Liger's fused
linear cross-entropy works the same way, and is used in its place on CUDA when `model.use_liger` is on).

The loss travels out of the model as its `logits` output, so the module hooks FSDP2 puts on the head and
the root see it as an ordinary output. A model whose forward transforms the logits after `lm_head` (final
soft-capping, logit scaling) would transform the loss too; the engine checks on every micro-batch that the
model's output is the head's own loss tensor.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from shardtune.errors import ConfigError


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size: int, compute_dtype: torch.dtype, grads: bool,
                dft: bool = False, token_weights: torch.Tensor | None = None):
        # `grads` is false under no_grad (validation), where a Parameter still reports needs_input_grad
        need_h, need_w, need_b = (grads and n for n in ctx.needs_input_grad[:3])
        w = weight.to(compute_dtype)
        b = None if bias is None else bias.to(compute_dtype)
        acc = torch.promote_types(compute_dtype, torch.float32)  # the loss and its softmax: fp32 at least
        loss = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_b else None
        for start in range(0, hidden.shape[0], chunk_size):
            h = hidden[start:start + chunk_size].to(compute_dtype)
            t = targets[start:start + chunk_size]
            logits = F.linear(h, w, b).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            ce = lse - logits.gather(1, t[:, None]).squeeze(1)
            scale = torch.exp(-ce) if dft else None  # DFT: each token's CE times its (constant) probability
            if token_weights is not None:  # data.message_weight_key: times its turn's weight
                tw = token_weights[start:start + chunk_size].to(acc)
                scale = tw if scale is None else scale * tw
            loss += (ce if scale is None else scale * ce).sum()
            if not (need_h or need_w or need_b):
                continue
            # d(sum of CE)/d(logits) = softmax - one_hot(target), formed in place over the logits
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(t.shape[0], device=t.device), t] -= 1.0
            if scale is not None:
                g.mul_(scale[:, None])
            if need_b:
                grad_b += g.sum(0)  # from the fp32 softmax, before the matmuls' cast
            g = g.to(compute_dtype)
            if need_h:
                grad_h[start:start + chunk_size] = (g @ w).to(hidden.dtype)
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.T, h)
                else:  # 16-bit matmul, fp32 accumulation over the chunks
                    grad_w += (g.T @ h).to(acc)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        out = [None if g is None else (g * grad_loss.to(g.dtype)) for g in (grad_h, grad_w, grad_b)]
        return (*out, None, None, None, None, None, None)


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, chunk_size: int, dft: bool = False,
                         token_weights: torch.Tensor | None = None) -> torch.Tensor:
    """sum_i CE(hidden[i] @ weight.T + bias, targets[i]) in fp32, `chunk_size` rows of logits at a time (with
    `dft`, each CE_i times exp(-CE_i), a constant in the gradient; with `token_weights`, each CE_i times w_i).
    The matmuls run in the autocast dtype when autocast is on (as `lm_head` would), else in hidden's dtype."""
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    with torch.autocast(device, enabled=False):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, dtype,
                                                torch.is_grad_enabled(), dft, token_weights)


def _liger_cross_entropy(hidden, weight, bias, targets):
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    out = LigerFusedLinearCrossEntropyLoss(reduction="sum")(weight, hidden, targets, bias)
    return (out[0] if isinstance(out, tuple) else out).float()


class LossHead(torch.nn.Module):
    """Drop-in for a causal LM's `lm_head` Linear: plain logits normally, the summed cross-entropy of the
    requested positions inside `computing_loss(...)`."""

    def __init__(self, linear: torch.nn.Linear, chunk_size: int, use_liger: bool = False):
        super().__init__()
        self.weight = linear.weight  # the same Parameter: tying to the input embeddings is kept
        self.bias = linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.chunk_size, self.use_liger = chunk_size, use_liger
        self._request: tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None] | None = None
        self.last_loss: torch.Tensor | None = None

    @contextmanager
    def computing_loss(self, positions: torch.Tensor, targets: torch.Tensor, dft: bool = False,
                       weights: torch.Tensor | None = None):
        """Within this block a forward returns sum(CE) over `positions` (flat token indices) against
        `targets` (their next tokens) instead of logits (with `dft`: the DFT-scaled sum; with `weights`, one per
        position: the weighted sum)."""
        self._request = (positions, targets, dft, weights)
        try:
            yield
        finally:
            self._request = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._request is None:
            return F.linear(hidden, self.weight, self.bias)
        positions, targets, dft, weights = self._request
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        if positions.numel() == 0:  # an empty micro-batch: a zero that still reaches the graph (FSDP2's hooks)
            # (and gives the head's parameters a zero gradient, as on the ranks whose micro-batch is not empty)
            self.last_loss = sum((t.sum().float() * 0.0 for t in (h, *self.parameters())),
                                 h.new_zeros((), dtype=torch.float32))
        elif self.use_liger:
            self.last_loss = _liger_cross_entropy(h, self.weight, self.bias, targets)
        else:
            self.last_loss = linear_cross_entropy(h, self.weight, self.bias, targets, self.chunk_size, dft, weights)
        return self.last_loss

    def extra_repr(self) -> str:
        kernel = "liger" if self.use_liger else f"chunk_size={self.chunk_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, {kernel}"


def install_loss_head(model: torch.nn.Module, chunk_size: int, use_liger: bool = False) -> LossHead:
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise ConfigError(f"{type(model).__name__}'s output layer is {type(head).__name__}, not a Linear; the "
                          "chunked/fused loss head cannot replace it. Fix: model.loss_chunk_size=0 and "
                          "model.use_liger=false.")
    loss_head = LossHead(head, chunk_size, use_liger)
    model.set_output_embeddings(loss_head)
    return loss_head


def find_loss_head(model: torch.nn.Module) -> LossHead | None:
    return next((m for m in model.modules() if isinstance(m, LossHead)), None)
