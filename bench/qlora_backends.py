"""Which 4-bit weight survives FSDP2: one Linear quantized with bitsandbytes (Params4bit) and with torchao
(NF4Tensor), `fully_shard` over the processes of this torchrun job (gloo on CPU, nccl on GPU), one forward and
backward, compared with the same layer on one process. Run:

    torchrun --nproc-per-node 2 bench/qlora_backends.py

Prints one line per backend on rank 0: the local shard's shape and dtype, and the forward's largest difference
from the unsharded 4-bit layer, or the error that stopped it (docs/qlora.md has the result).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def bitsandbytes_layer(weight: torch.Tensor, device: str) -> torch.nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=False, compute_dtype=torch.float32,
                              quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    return layer.to(device)  # bitsandbytes quantizes on the move to a device


def torchao_layer(weight: torch.Tensor, device: str) -> torch.nn.Module:
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    layer.weight = torch.nn.Parameter(to_nf4(weight.to(device)), requires_grad=False)
    return layer


def main() -> None:
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, device = dist.get_rank(), "cuda" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(rank)
    torch.manual_seed(0)
    weight = torch.randn(512, 1024)
    x = torch.randn(4, 1024, device=device, requires_grad=True)
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for name, build in (("bitsandbytes", bitsandbytes_layer), ("torchao", torchao_layer)):
        try:
            reference = build(weight.clone(), device)(x).detach()
            model = torch.nn.Sequential(build(weight.clone(), device))
            fully_shard(model[0], mesh=mesh)
            fully_shard(model, mesh=mesh)
            local = model[0].weight.to_local()
            out = model(x)
            out.sum().backward()
            result = (f"sharded {type(local).__name__} {tuple(local.shape)} {local.dtype}; forward differs by "
                      f"{(out - reference).abs().max().item():.2e}; backward ran")
        except Exception as e:  # the measurement is which of them fails, and how
            result = f"failed: {type(e).__name__}: {e}"
        if rank == 0:
            print(f"{name}: {result}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
