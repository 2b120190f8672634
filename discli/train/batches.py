"""The data order of a training phase: which images form each iteration's batch, and their seeds.

Which images form iteration ``i``'s batch, and the random augmentation of each, are pure
functions of (seed, i): sample ``j`` of the batch is position ``p = i*B + j`` of an endless
stream of seeded epoch permutations, and its augmentation runs under a seed derived from ``p``.
Nothing about the data order has to be saved: a run resumed from the checkpoint of iteration
``k`` sees exactly the batches ``k+1, k+2, ...`` of an uninterrupted run, so on CPU it ends with
bit-identical weights. Under DDP each rank takes its share of the same global batch, so a global
batch ``B`` over ``N`` ranks sees the same images as one process with ``B``.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from discli.distributed import DistInfo
from discli.train.keys import TrainConfig

if TYPE_CHECKING:
    from discli.data.dataset import SegDataset


@dataclass
class Source:
    dataset: SegDataset
    per_batch: int  # images of the global batch drawn from this source


class PlannedBatches(Sampler[list[tuple[int, int, int]]]):
    """Yields, for iterations [start, stop), this rank's share of each global batch as
    (source, index, sample_seed) triples."""

    def __init__(self, sizes: Sequence[int], per_batch: Sequence[int], seed: int, start: int,
                 stop: int, dist: DistInfo = DistInfo()):
        self.sizes, self.per_batch, self.seed = list(sizes), list(per_batch), seed
        self.start, self.stop, self.dist = start, stop, dist
        self._perm_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _seed(self, source: int, n: int) -> int:
        """A generator seed of (run seed, source, n), within the 63 bits torch takes for any
        run seed up to 2**64 - 1."""
        return (self.seed * 1_000_003 + source * 7919 + n) % 2**63

    def _index(self, source: int, position: int) -> int:
        n = self.sizes[source]
        epoch, offset = divmod(position, n)
        key = (source, epoch)
        if key not in self._perm_cache:
            g = torch.Generator().manual_seed(self._seed(source, epoch))
            self._perm_cache = {key: torch.randperm(n, generator=g)}
        return int(self._perm_cache[key][offset])

    def batch(self, iteration: int) -> list[tuple[int, int, int]]:
        items = []
        for source, count in enumerate(self.per_batch):
            for j in range(count):
                position = iteration * count + j
                sample_seed = self._seed(source, position)
                items.append((source, self._index(source, position), sample_seed))
        # Dealt out round-robin, so that every rank's share mixes the sources in the global
        # batch's proportion: a contiguous slice gave one rank only pixel-labelled images and
        # another only pseudo-labelled ones, and their BatchNorm statistics drifted apart. The
        # deal starts one rank later every iteration, so that odd remainders even out.
        world = self.dist.world_size
        share = len(items) // world
        return items[(self.dist.rank + iteration) % world::world][:share]

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for iteration in range(self.start, self.stop):
            yield self.batch(iteration)

    def __len__(self) -> int:
        return self.stop - self.start


class SeededSources(Dataset):
    """Item (source, index, seed): the source's item with its random transform seeded."""

    def __init__(self, sources: Sequence[Dataset]):
        self.sources = list(sources)

    def __len__(self) -> int:
        return sum(len(s) for s in self.sources)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int, int]) -> dict[str, Any]:
        source, index, seed = key
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only (the items are made on the CPU): torch.manual_seed also
            # queues the seeds of lazily initialised CUDA/XPU/MTIA generators, a tenth of a
            # training step of the demo
            torch.default_generator.manual_seed(seed)
            state = random.getstate()
            random.seed(seed)
            item = self.sources[source][index]
            random.setstate(state)
        item["source"] = source
        return item


def planned_loader(sources: Sequence[Source], cfg: TrainConfig, start: int, stop: int,
                   device: torch.device, dist: DistInfo) -> DataLoader:
    """This rank's batches of iterations [start, stop), read by ``cfg.num_workers`` workers."""
    sampler = PlannedBatches([len(s.dataset) for s in sources],  # type: ignore[arg-type]
                             [s.per_batch for s in sources], cfg.seed, start, stop, dist)
    from discli.data.dataset import collate

    for source in sources:
        source.dataset.keep_decoded(cfg.decoded_mb)
    return DataLoader(SeededSources([s.dataset for s in sources]), batch_sampler=sampler,
                      collate_fn=collate, num_workers=cfg.num_workers,
                      pin_memory=device.type == "cuda",
                      persistent_workers=False)
