"""Activation offloading (`model.enable_activation_offload`): what autograd saves in each decoder layer's
forward waits for its backward in pinned host memory instead of on the GPU.

Without gradient checkpointing, `saved_tensors_hooks` are active during each layer's forward: a saved
tensor is copied to the host on a side stream (the compute stream goes on; the device memory is freed
once the copy is done; a layer's forward waits for the copies of the layer two below, so that copies in
flight stay few), and brought back when backward first needs a tensor of that layer; the layer below is
then prefetched on the side stream, so its copies overlap this layer's backward. With gradient
checkpointing a layer saves only its input (the rest is recomputed); that input is what moves to the host.

On the CPU the same hooks run and keep each tensor where it is (host memory is where it already lives),
so the path is tested there and the numbers are those of a run without offloading, bit for bit.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from shardtune.parallel import decoder_layers

MIN_BYTES = 1 << 16  # smaller saved tensors stay on the device (copies of them would cost more than they free)


class _Offloaded:
    """One saved tensor: on the host, and back on the device once fetched."""

    __slots__ = ("host", "device_copy", "event", "device")

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.host, self.device, self.device_copy, self.event = host, device, None, None


class LayerOffload:
    """The pack/unpack hooks of one decoder layer; `below` is the layer whose backward comes next."""

    def __init__(self, stream: Any):
        self.stream = stream  # the side stream on CUDA, None on the CPU
        self.saved: list[_Offloaded] = []
        self.below: LayerOffload | None = None
        self.copied: Any = None  # an event on the side stream after this layer's copies to the host

    def pack(self, t: torch.Tensor) -> Any:
        if isinstance(t, torch.nn.Parameter) or type(t) is not torch.Tensor:
            return t  # weights (FSDP2 re-gathers them for backward) and tensor subclasses stay as they are
        if self.stream is None or t.device.type != "cuda" or t.numel() * t.element_size() < MIN_BYTES:
            item = _Offloaded(t, t.device)  # the CPU path: already in host memory
        else:
            host = torch.empty(t.size(), dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # the device memory is reused only after the copy
            item = _Offloaded(host, t.device)
        self.saved.append(item)
        return item

    def unpack(self, item: Any) -> torch.Tensor:
        if not isinstance(item, _Offloaded):
            return item
        self.fetch()
        if self.below is not None:
            self.below.fetch()  # prefetch the next layer of backward while this one computes
        if item.event is not None:
            torch.cuda.current_stream().wait_event(item.event)
            item.device_copy.record_stream(torch.cuda.current_stream())
        return item.device_copy

    def fetch(self) -> None:
        """Start copying this layer's saved tensors back to the device (once; a no-op on the CPU)."""
        for item in self.saved:
            if item.device_copy is not None:
                continue
            if self.stream is None or item.device.type != "cuda" or item.host.device.type == "cuda":
                item.device_copy = item.host
                continue
            self.stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.stream):
                item.device_copy = item.host.to(item.device, non_blocking=True)
                item.event = self.stream.record_event()
        self.saved = []

    def __enter__(self) -> None:
        # a layer's forward starts once the copies of the layer two below are done: the GPU computes faster
        # than it copies to the host, and unbounded copies in flight would hold their device memory
        two_below = self.below.below if self.below is not None else None
        if two_below is not None and two_below.copied is not None:
            torch.cuda.current_stream().wait_event(two_below.copied)
            two_below.copied = None
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
        self._hooks.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)
        if self.stream is not None:
            self.copied = self.stream.record_event()


def offload_activations(model: torch.nn.Module, checkpointing: bool) -> list[LayerOffload]:
    """Install offloading on every decoder layer of `model` (before LoRA and FSDP2 wrap it)."""
    stream = torch.cuda.Stream() if torch.cuda.is_available() else None
    layers = decoder_layers(model)
    offloads = [LayerOffload(stream) for _ in layers]
    for layer, offload, below in zip(layers, offloads, [None, *offloads[:-1]], strict=True):
        offload.below = below
        if checkpointing:  # the checkpointed input is the one tensor the layer keeps
            layer._gradient_checkpointing_func = _offloaded_input(layer._gradient_checkpointing_func, offload)
        else:
            layer.register_forward_pre_hook(lambda _m, _a, o=offload: o.__enter__())
            layer.register_forward_hook(lambda _m, _a, _r, o=offload: o.__exit__(None, None, None), always_call=True)
    return offloads


def _offloaded_input(checkpoint: Any, offload: LayerOffload) -> Any:
    """A checkpoint function whose first argument (the layer's hidden states) is kept on the host until
    the recomputation in backward, which copies it back."""

    @functools.wraps(checkpoint)
    def run(function: Any, hidden: torch.Tensor, *args: Any) -> Any:
        device = hidden.device
        if offload.stream is None or device.type != "cuda":
            host = _through_hooks(offload, hidden)  # the same hooks on the CPU, where nothing moves
        else:
            # a differentiable copy into pinned memory (non_blocking), ordered on the compute stream before
            # the copy back that the recomputation makes
            host = hidden.to("cpu", non_blocking=True)

        def on_device(h: torch.Tensor, *a: Any) -> Any:
            return function(h.to(device, non_blocking=True), *a)

        return checkpoint(on_device, host, *args)

    return run


def _through_hooks(offload: LayerOffload, hidden: torch.Tensor) -> torch.Tensor:
    """On the CPU: the hidden states, passed through pack and unpack as the GPU path moves them."""
    return offload.unpack(offload.pack(hidden)) if isinstance(hidden, torch.Tensor) else hidden
