"""Data-parallel training over several processes (``torchrun``): who this process is, its share of an
epoch, and the few collectives the training loops need.

torchrun starts N copies of the same command and tells each its place through WORLD_SIZE, RANK,
LOCAL_RANK and LOCAL_WORLD_SIZE. Every process holds the whole model and the whole data set; each
epoch every process draws the *same* permutation (a generator seeded from the run's seed and the epoch
number) and trains on every N-th sample of it from its rank, as torch's DistributedSampler does with
``drop_last=True``. DistributedDataParallel averages the gradients after every backward pass, so the
replicas stay identical and one step sees N × batch-size samples. Validation, tests and every file
written belong to rank 0; the others wait in the next collective (the broadcast of the stopping
decision, or a barrier), so all stop at the same epoch.

A process started without torchrun (WORLD_SIZE unset or 1) is :data:`SINGLE`: every helper below is
then the identity and the training loops run exactly their one-process code, bit for bit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as td
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from model.data import IntArray

log = logging.getLogger(__name__)

# The longest a process waits in a collective. The other ranks wait while rank 0 validates, tunes the
# vote and transitions, tests and writes the model: minutes on the larger data sets, far more than
# torch's 10-minute default for NCCL allows. A crashed process does not leave the others waiting this
# long: torchrun's agent stops the whole group when one worker fails.
WAIT = timedelta(hours=2)

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # its index among the processes of its machine (its GPU there)
    local_world_size: int = 1  # processes on its machine, which share its cores

    @property
    def on(self) -> bool:
        """Several processes: the distributed paths are taken."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Rank 0, the process that validates, tests, logs the metrics and writes files."""
        return self.rank == 0


SINGLE = Dist()


def from_env(environ: Mapping[str, str] | None = None) -> Dist:
    """The place torchrun gives this process in its environment; :data:`SINGLE` without one."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    return Dist(int(env["RANK"]), world, int(env.get("LOCAL_RANK", "0")), local_world)


def backend(device: str) -> str:
    """NCCL between GPUs, Gloo between CPU processes."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init(device: str) -> Dist:
    """Join the process group torchrun set up (rendezvous through MASTER_ADDR/MASTER_PORT); a GPU
    process takes the GPU of its local rank, so ``device="cuda"`` means that one from here on."""
    dist = from_env()
    if not dist.on:
        return dist
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(dist.local_rank)
    td.init_process_group(backend(device), timeout=WAIT)
    log.info(
        "process %d of %d (%s), %d on this machine",
        dist.rank,
        dist.world_size,
        backend(device),
        dist.local_world_size,
    )
    return dist


def close(dist: Dist) -> None:
    """Leave the process group (no collective: a failed process must not wait for the others)."""
    if dist.on and td.is_initialized():
        td.destroy_process_group()


def shard(n: int, rng: np.random.Generator, dist: Dist) -> IntArray:
    """This process's share of a shuffled ``range(n)``: the permutation ``rng`` draws (the same on every
    process, which seeds it alike) cut to a multiple of N, then every N-th index from the rank on. The
    shares are disjoint and equal in size, so every process runs as many batches (DDP needs each
    backward pass on every process); the < N indexes left over wait for a later epoch's permutation."""
    perm = rng.permutation(n)
    usable = n - n % dist.world_size
    return perm[dist.rank : usable : dist.world_size]


def fingerprint(idx: IntArray) -> int:
    """An order-free 64-bit digest of a set of sample indexes: the sum (mod 2⁶⁴) of a hash (splitmix64)
    of each. The shards' fingerprints add up to their union's, so the log shows that the processes
    trained on disjoint parts of the data without listing them."""
    x = idx.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return int(x.sum(dtype=np.uint64))  # uint64 arithmetic wraps: the sum is mod 2⁶⁴


def log_shard(what: str, mine: IntArray, n: int, dist: Dist) -> None:
    """One log line per process and epoch: how many of the ``n`` samples it trains on, and which."""
    log.info(
        "%s: process %d of %d trains on %d of %d samples (fingerprint %016x)",
        what,
        dist.rank,
        dist.world_size,
        len(mine),
        n,
        fingerprint(mine),
    )


def epoch_rngs(seed: int, epoch: int, dist: Dist) -> tuple[np.random.Generator, np.random.Generator]:
    """(shared, own) generators for ``epoch``, and torch's generator seeded for this process.

    The shared one is the same on every process (the permutation :func:`shard` splits); the own one and
    torch's (dropout) differ by rank, so the processes don't repeat each other's noise. Derived from
    the seed and the epoch alone, they make a resumed run take the same draws as an uninterrupted one,
    whatever state the checkpoint's process had."""
    shared = np.random.default_rng([seed, epoch, 0])
    own = np.random.SeedSequence([seed, epoch, 1 + dist.rank])
    torch.manual_seed(int(own.generate_state(1)[0]))
    return shared, np.random.default_rng(own)


class LossModule(nn.Module):
    """A batch's loss as a module's forward pass. DDP synchronises the gradients of what runs inside
    its wrapper's forward; the training losses call several methods of their models (encode, scores,
    the predictor's fusion), so the whole loss is the forward here. ``trainable`` is registered so the
    wrapper sees its parameters."""

    def __init__(self, trainable: nn.Module, loss: Callable[..., Tensor]) -> None:
        super().__init__()
        self.trainable = trainable
        self.loss = loss

    def forward(self, *args: Any) -> Tensor:
        return self.loss(*args)


def data_parallel(trainable: nn.Module, loss: Callable[..., Tensor], device: str) -> nn.Module:
    """``loss`` wrapped in DistributedDataParallel over ``trainable``'s parameters: calling the result
    computes the loss, and its backward pass averages the gradients over the processes. The wrapper
    broadcasts rank 0's weights first, so the replicas start identical."""
    dev = torch.device(device)
    ids = [torch.cuda.current_device()] if dev.type == "cuda" else None
    return DistributedDataParallel(LossModule(trainable, loss), device_ids=ids)


def _device() -> torch.device:
    """Where collective tensors live: NCCL reduces GPU tensors only."""
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_int(value: int, dist: Dist) -> int:
    """Rank 0's ``value`` on every process (the stopping decision: every rank stops together)."""
    if not dist.on:
        return value
    t = torch.tensor([value], dtype=torch.int64, device=_device())
    td.broadcast(t, src=0)
    return int(t.item())


def broadcast_object(obj: T, dist: Dist) -> T:
    """Rank 0's picklable ``obj`` on every process (a checkpoint only rank 0 has read)."""
    if not dist.on:
        return obj
    box: list[Any] = [obj]
    td.broadcast_object_list(box, src=0)
    out: T = box[0]
    return out


def broadcast_weights(module: nn.Module, dist: Dist) -> None:
    """Rank 0's weights into every process's ``module``, in place (the best epoch only rank 0 knows)."""
    if not dist.on:
        return
    for tensor in module.state_dict().values():
        td.broadcast(tensor, src=0)


def mean(value: float, dist: Dist) -> float:
    """The mean of ``value`` over the processes (an epoch's loss, each process's over its shard)."""
    if not dist.on:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_device())
    td.all_reduce(t)
    return float(t.item()) / dist.world_size


def barrier(dist: Dist) -> None:
    """Wait for every process (the others wait here while rank 0 writes the model)."""
    if dist.on:
        td.barrier()
