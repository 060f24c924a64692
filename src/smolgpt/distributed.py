"""Training on several processes at once: PyTorch's own engine, launched by ``torchrun``.

``torchrun --nproc_per_node=N train.py ...`` starts N copies of the same command and tells
each, through environment variables, who it is: ``RANK`` (0 .. WORLD_SIZE-1 over all
machines), ``LOCAL_RANK`` (its place on this machine: which GPU it drives) and
``WORLD_SIZE``. smolgpt reads them (:func:`from_environment`); each process joins a
process group (NCCL between GPUs, Gloo between CPUs) and the trainer wraps its model in
``DistributedDataParallel``, which averages the gradients of all processes during the
backward pass, so every process takes the same optimiser step. A single process under
torchrun (``--nproc_per_node=1``) joins a group of one all the same, as nanoGPT's does: the
way to try the multi-GPU path (NCCL included) on a machine with one GPU.

Who does what:

- every rank trains on its own micro-batches and evaluates its share of the windows;
- rank 0 alone writes (checkpoints, metrics, plots, progress, logs) and decides when training
  ends (its clock keeps --time_budget); :meth:`Group.agree` tells the others, once a step;
- a signal to any rank stops them all at the same step, and a rank that dies takes the
  others down with an error, not a hang (its sockets close; a silent one is caught by
  PEER_TIMEOUT).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import Relayed, SmolGPTError

# How long a rank waits for the others at one collective before it gives up: long enough
# for rank 0 to tokenize a large corpus or save a large checkpoint meanwhile.
PEER_TIMEOUT = datetime.timedelta(minutes=10)

T = TypeVar("T")


class PeerLost(SmolGPTError):
    """Another rank stopped answering (it died, or its machine did)."""


@dataclass(frozen=True)
class Group:
    """This process's place among the processes of a run (one process: rank 0 of 1)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # started by torchrun, which may start a single process

    @property
    def distributed(self) -> bool:
        """Whether this process belongs to a process group: several processes, or one that
        torchrun started."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes and decides."""
        return self.rank == 0

    # ------------------------------------------------------------- collectives
    # Each is a no-op in a single process, and must be called by every rank in the same
    # order. Errors from a lost peer become PeerLost (one line, not a traceback).

    def agree(
        self, decided_by_main: int, *any_rank: int, device: torch.device = None
    ) -> tuple[int, ...]:
        """(rank 0's decided_by_main, a non-negative int, then the largest of each any_rank
        value over all ranks): one small all-reduce, once a step (what to do next; a signal,
        a non-finite loss that any rank met)."""
        if not self.distributed:
            return (decided_by_main, *any_rank)
        flags = torch.tensor(
            [int(decided_by_main) if self.is_main else 0, *any_rank],
            dtype=torch.int64,
            device=device,
        )
        self._call(dist.all_reduce, flags, op=dist.ReduceOp.MAX)
        return tuple(int(f) for f in flags)

    def from_main(self, value: float, device: torch.device = None) -> float:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        shared = torch.tensor([value], dtype=torch.float64, device=device)
        self._call(dist.broadcast, shared, src=0)
        return float(shared[0])

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self.distributed:
            self._call(dist.barrier)

    def sum(self, values: list[float], device: torch.device = None) -> list[float]:
        """values summed over all ranks, in float64."""
        if not self.distributed:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=device)
        self._call(dist.all_reduce, total)
        return total.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order (picklable Python objects)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._call(dist.all_gather_object, out, obj)
        return out

    def main_first(self, work: Callable[[], T]) -> T:
        """work() on rank 0, then on the others: rank 0 checks the run and builds the token
        cache before the others read it. A SmolGPTError on rank 0 is raised on every rank
        (with rank 0's message) instead of leaving them waiting."""
        if not self.distributed:
            return work()
        failure = None
        if self.is_main:
            try:
                result = work()
            except SmolGPTError as exc:
                failure = exc
        message = [str(failure) if failure else None]
        self._call(dist.broadcast_object_list, message, src=0)
        if failure is not None:
            raise failure
        if message[0] is not None:
            raise Relayed(message[0])
        return result if self.is_main else work()

    def _call(self, collective: Callable, *args, **kwargs) -> None:
        try:
            collective(*args, **kwargs)
        except (RuntimeError, dist.DistError) as exc:  # gloo and NCCL raise either
            raise self.lost(exc) from None

    @contextlib.contextmanager
    def talking_inside_torch(self) -> Iterator[None]:
        """Around work in which PyTorch itself talks to the other ranks (DDP averages the
        gradients during the backward pass): an error of the connection there becomes
        PeerLost too. Any other error goes on as it is."""
        try:
            yield
        except (RuntimeError, dist.DistError) as exc:
            text = str(exc).lower()
            if self.distributed and (
                isinstance(exc, dist.DistError) or "gloo" in text or "nccl" in text
            ):
                raise self.lost(exc) from None
            raise

    def lost(self, exc: BaseException) -> PeerLost:
        """The error that ends a rank that lost the others."""
        text = str(exc).strip()
        # The first sentence: gloo and NCCL add paragraphs of guesses after it.
        first = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
        return PeerLost(
            f"rank {self.rank} of {self.world_size} lost contact with the other "
            f"ranks ({first}): another rank has stopped; see its output"
        )


# torchrun sets this in every process it starts (and the ranks' variables with it).
TORCHRUN_ENV = "TORCHELASTIC_RUN_ID"


def from_environment() -> Group:
    """This process's Group, from the variables torchrun sets (none: one process)."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise SmolGPTError(
            "WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets "
            "them): unset them to train in one process"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise SmolGPTError(
            f"RANK {rank} does not fit WORLD_SIZE {world}: launch with "
            "torchrun, or unset them to train in one process"
        )
    return Group(rank, local, world, launched=TORCHRUN_ENV in os.environ)


@contextlib.contextmanager
def session(group: Group, device: torch.device) -> Iterator[torch.device]:
    """Join the run's process group for the duration (NCCL on CUDA, Gloo on CPU) and yield
    this rank's device: its own GPU (cuda:LOCAL_RANK), or the CPU. Ranks other than 0 log
    errors only, so that a line is printed once, by rank 0. One process: yields device."""
    if not group.distributed:
        yield device
        return
    if device.type == "cuda":
        if group.local_rank >= torch.cuda.device_count():
            raise SmolGPTError(
                f"LOCAL_RANK {group.local_rank} but {torch.cuda.device_count()} "
                "GPU(s) here: --nproc_per_node at most the number of GPUs"
            )
        device = torch.device("cuda", group.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise SmolGPTError(
            f"distributed training runs on CUDA or on CPUs, not {device.type}: pass --device cpu"
        )
    package = logging.getLogger("smolgpt")
    level = package.level
    if not group.is_main:
        package.setLevel(logging.ERROR)
    try:
        dist.init_process_group(
            backend,
            rank=group.rank,
            world_size=group.world_size,
            timeout=PEER_TIMEOUT,
            device_id=device if backend == "nccl" else None,
        )
    except (RuntimeError, ValueError, dist.DistError) as exc:
        package.setLevel(level)
        raise group.lost(exc) from None
    try:
        yield device
    finally:
        package.setLevel(level)
        dist.destroy_process_group()


def replicate(model: torch.nn.Module, group: Group, device: torch.device) -> torch.nn.Module:
    """The model as the training step calls it: under distributed training wrapped in
    DistributedDataParallel, which averages the ranks' gradients in the backward pass (and
    copies rank 0's weights to the others now); else the model itself. The rotary tables
    are constants: no need to send them along before every forward pass (newer torch
    names that setting differently)."""
    if not group.distributed:
        return model
    parameters = inspect.signature(DistributedDataParallel).parameters
    no_buffer_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None, **no_buffer_sync
    )


@dataclass
class Losses:
    """The loss functions of a training run (see :func:`training_losses`)."""

    replicated: torch.nn.Module  # under DDP the wrapper, whose no_sync() skips averaging
    train: Callable  # what a training step differentiates: replicated, maybe compiled
    eval: Callable  # what an evaluation scores

    def accumulating(self, last: bool) -> ContextManager:
        """The context of one micro-batch's forward and backward pass. Under DDP the ranks'
        gradients are averaged once, in the last micro-batch's backward pass: the earlier
        ones only accumulate locally."""
        if last or not isinstance(self.replicated, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.replicated.no_sync()


def training_losses(
    loss: torch.nn.Module, group: Group, device: torch.device, compiled: bool
) -> Losses:
    """loss(x, y), the mean loss of a batch, made ready to train: replicated (DDP under
    torchrun) and with --compile compiled. Evaluations need no gradients, so no DDP: under
    distributed training each rank scores its own windows with the plain loss."""
    replicated = replicate(loss, group, device)
    train = torch.compile(replicated) if compiled else replicated
    return Losses(replicated, train, train if not group.distributed else loss)
