"""Process group, device mesh and collectives (FSDP2 is applied in `shardtune.parallelize`).

Backend: nccl when CUDA is present, gloo otherwise. One process (no torchrun) needs no process group at
all: every collective below is then the identity.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh


@dataclass
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    # Ranks form a (dp, sp) grid: the sp ranks of one data-parallel group share the same samples and split
    # each packed row along the sequence (Ulysses). Without sequence parallelism sp_size is 1.
    sp_size: int = 1
    sp_group: Any = None

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp_size

    @property
    def dp_size(self) -> int:
        return self.world_size // self.sp_size

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp_size


def exit_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> None:
    """Have the kernel send `sig` to this process when its parent exits (Linux; a no-op elsewhere).

    A torchrun worker whose launcher is killed (kill -9, a lost node agent) would otherwise be orphaned and
    wait in its next collective until engine.timeout_minutes, holding host and GPU memory, so a relaunch on
    the same node could run out of it. The setting survives exec, so it also serves a launched torchrun.
    `parent`: the launcher's pid (default: the current parent); if it changed by the time the request is
    made, the parent already died and nobody is left to signal us. (The launcher may well be pid 1, as the
    entry point of a container.)
    """
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid() if parent is None else parent
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(sig))
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def init_world(sp_size: int = 1, timeout_minutes: int = 60) -> World:
    """Join the torchrun job described by the environment, or stay a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        exit_with_parent()
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return World(device=device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    world = World(dist.get_rank(), world_size, local_rank, device, sp_size)
    if sp_size > 1:
        # consecutive ranks form one sequence-parallel group; every rank creates every group, in order
        for start in range(0, world_size, sp_size):
            group = dist.new_group(list(range(start, start + sp_size)))
            if start <= world.rank < start + sp_size:
                world.sp_group = group
    return world


def build_mesh(world: World, fsdp_size: int = -1):
    """A 1-D mesh over all ranks, or a 2-D (replicate, shard) mesh for hybrid sharding."""
    if fsdp_size in (-1, world.world_size):
        return init_device_mesh(world.device.type, (world.world_size,), mesh_dim_names=("shard",))
    return init_device_mesh(world.device.type, (world.world_size // fsdp_size, fsdp_size),
                            mesh_dim_names=("replicate", "shard"))


def all_reduce_sum(values: list[float], world: World) -> list[float]:
    """Sum a few numbers over all ranks in one collective (identity on one process)."""
    if not world.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=world.device if world.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_tensor_(t: torch.Tensor, world: World) -> torch.Tensor:
    """Sum a device tensor over all ranks in place, without a host sync (identity on one process)."""
    if world.distributed:
        dist.all_reduce(t)
    return t


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank ([obj] on one process)."""
    if not world.distributed:
        return [obj]
    out: list[Any] = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def shutdown(code: int) -> None:
    """End a worker: flush, destroy the group, then exit without interpreter teardown.

    gloo can abort in its destructors at interpreter exit after destroy_process_group() ("terminate called
    without an active exception"); `os._exit` skips those destructors, so the exit code is the one we chose.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # the group may be broken after a failure on another rank
            pass
    os._exit(code)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks, found by the classes the model declares unsplittable."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no _no_split_modules; cannot find its decoder layers")
    return layers

