"""Batches for training: random windows of token ids.

:class:`BatchSampler` draws random windows from a memory map (a split of a
:class:`~smolgpt.tokendata.TokenData`) with a seeded ``torch.Generator`` whose state
checkpoints keep; :func:`check_long_enough` makes sure each split holds one window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import SmolGPTError

if TYPE_CHECKING:
    from .tokendata import TokenData


def check_long_enough(data: TokenData, block_size: int) -> None:
    """Both splits must hold at least one window of block_size + 1 tokens."""
    need = block_size + 1
    for name, part in (("training", data.train), ("validation", data.val)):
        if len(part) < need:
            raise SmolGPTError(
                f"the corpus is too short: its {name} split has {len(part)} tokens but one "
                f"window needs {need} (block_size + 1); use a longer text or a smaller "
                f"--block_size"
            )


class BatchSampler:
    """Random contiguous windows (x, y = x shifted by one) from a token array.

    Under distributed training (rank of world_size processes) every process draws the same
    world_size x batch_size window positions from the same seeded stream and keeps its own
    batch_size of them: rank r's micro-batch is the r-th of world_size consecutive ones, so
    world_size processes see exactly the batches one process sees with world_size times the
    gradient accumulation, and the stream's state is the same on every rank."""

    def __init__(
        self,
        ids: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.ids, self.block_size, self.batch_size = ids, block_size, batch_size
        self.device, self.rank, self.world_size = device, rank, world_size
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.ids) - self.block_size,
            (self.world_size * self.batch_size,),
            generator=self.generator,
        )[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = np.stack([self.ids[s : s + self.block_size + 1] for s in starts.tolist()])
        batch = torch.from_numpy(windows.astype(np.int64))
        if self.device.type == "cuda":  # page-locked memory lets the copy overlap compute
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)
