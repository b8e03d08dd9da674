"""Aspect-ratio grouped batch sampler, deterministic per (seed, epoch), sharded across ranks.

Images whose width >= height go in one group, the others in a second group, so a batch pads
little. The order of an epoch is a pure function of (seed, epoch): a resumed run rebuilds it and
skips the batches it already trained on (`start_batch`).
"""

from __future__ import annotations

import torch


def grouped_batches(
    aspect_ratios: list[float], batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
    drop_last: bool = False,
) -> list[list[int]]:
    """All batches of one epoch, over the whole dataset.

    Args:
        aspect_ratios: width / height per image.
    Returns:
        list of batches (lists of dataset indices); every full batch is one aspect group, the
        leftovers of the two groups are merged into mixed batches (dropped if `drop_last`).
    """
    n = len(aspect_ratios)
    if shuffle:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
    else:
        order = list(range(n))
    buffers: dict[bool, list[int]] = {True: [], False: []}
    batches: list[list[int]] = []
    for i in order:
        group = buffers[aspect_ratios[i] >= 1.0]
        group.append(i)
        if len(group) == batch_size:
            batches.append(list(group))
            group.clear()
    leftovers = buffers[True] + buffers[False]
    for start in range(0, len(leftovers), batch_size):
        chunk = leftovers[start:start + batch_size]
        if len(chunk) == batch_size or not drop_last:
            batches.append(chunk)
    return batches


class GroupedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's batches of the current epoch.

    Every rank gets the same number of batches (the global list is cut to a multiple of
    `world_size`), so DDP ranks never wait on a missing step.
    """

    def __init__(
        self, aspect_ratios: list[float], batch_size: int, *, seed: int = 0, shuffle: bool = True,
        drop_last: bool = False, rank: int = 0, world_size: int = 1,
    ):
        self.aspect_ratios = list(aspect_ratios)
        self.batch_size = batch_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch; skip its first `start_batch` batches of this rank (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def _rank_batches(self) -> list[list[int]]:
        batches = grouped_batches(self.aspect_ratios, self.batch_size, seed=self.seed, epoch=self.epoch,
                                  shuffle=self.shuffle, drop_last=self.drop_last)
        usable = len(batches) - len(batches) % self.world_size if self.world_size > 1 else len(batches)
        return batches[self.rank:usable:self.world_size]

    def __iter__(self):
        yield from self._rank_batches()[self.start_batch:]

    def __len__(self) -> int:
        return max(0, len(self._rank_batches()) - self.start_batch)

    def batches_per_epoch(self) -> int:
        return len(self._rank_batches())
