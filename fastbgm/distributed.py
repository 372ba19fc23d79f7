"""One process per device. Rank and world come from the environment, as torchrun and
submitit's ``TorchDistributedEnvironment().export()`` set it (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so one entry point runs under torchrun, under
Slurm, or as one plain process. NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .slurmenv import slurm_hostnames

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def resolve_device(pref: str, local_rank: int = 0) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            from .config import ConfigError

            raise ConfigError("speed.device: 'cuda' asked for, but no GPU is visible here: use "
                              "--speed.device=cpu (or auto)")
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(pref)


def _export_from_slurm_step() -> None:
    """Inside a multi-task ``srun`` step (as the allocation driver starts a DDP run) with
    no torchrun/submitit variables: derive them from the step's own Slurm variables.
    The rendezvous is the step's first node, on a port fixed by (job, step)."""
    if "WORLD_SIZE" in os.environ or int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) <= 1:
        return
    nodes = os.environ.get("SLURM_STEP_NODELIST", os.environ.get("SLURM_JOB_NODELIST", "localhost"))
    first = (slurm_hostnames(nodes) or [nodes.split(",")[0]])[0]
    job, step = int(os.environ.get("SLURM_JOB_ID", "0")), int(os.environ.get("SLURM_STEP_ID", "0"))
    os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=os.environ["SLURM_STEP_NUM_TASKS"],
                      LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"), MASTER_ADDR=first,
                      MASTER_PORT=str(20000 + (job * 97 + step) % 20000))


def setup(device_pref: str = "auto", timeout_s: int = 1800) -> DistEnv:
    """Initialise the process group when the environment describes more than one rank."""
    _export_from_slurm_step()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_pref, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistEnv(rank, world, local_rank, device)


def teardown(abort: bool = False) -> None:
    """End the process group. ``abort`` when a rank failed or is stopping: its peers may
    sit inside a collective that will never complete, and NCCL's orderly destroy would
    wait for it; aborting lets this process exit, which ends the peers' wait too."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if abort and dist.get_backend() == "nccl":
        from torch.distributed import distributed_c10d as c10d

        if hasattr(c10d, "_abort_process_group"):  # torch >= 2.5
            c10d._abort_process_group()
        return  # older torch: leave it to the process's exit
    dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank ``src``'s buffers (BatchNorm running statistics), in place."""
    if dist.is_available() and dist.is_initialized():
        for b in module.buffers():
            dist.broadcast(b.data, src=src)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_gather_object(obj: object) -> list:
    """Every rank's ``obj``, in rank order (a one-element list in a single process)."""
    if dist.is_available() and dist.is_initialized():
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out
    return [obj]


def broadcast_object(obj: object, src: int = 0) -> object:
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj
