"""Torch access to the data cache: whole batches straight from the memory map, no per-sample work."""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from shared.cache import ECGCache


class ECGDataset(Dataset):
    """One split of the cache as (B×12×T float32 per-lead standardized with train stats, B×5 float32).

    `__getitems__` serves a whole batch with one sorted memory-map read; the DataLoader then only
    passes it through (see `make_loader`), so loading stays a small share of the step time.
    """

    def __init__(self, cache: ECGCache, split: str, normalize: bool = True):
        self.cache = cache
        self.split = split
        self.indices = cache.split_indices(split)
        mean, std = cache.norm_stats()
        self.mean = mean[None, :, None] if normalize else np.zeros((1, 12, 1), np.float32)
        self.std = std[None, :, None] if normalize else np.ones((1, 12, 1), np.float32)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, positions):
        rows = self.indices[np.asarray(positions, dtype=np.int64)]
        order = np.argsort(rows)  # a sorted read is one sequential pass over the memory map
        x = np.empty((len(rows),) + self.cache.signals.shape[1:], np.float32)
        x[order] = self.cache.signals[rows[order]]
        x = (x - self.mean) / self.std
        y = self.cache.labels[rows].astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y)

    @property
    def labels(self) -> np.ndarray:
        return self.cache.labels[self.indices]


def _pass_through(batch):
    return batch


def make_loader(dataset: ECGDataset, batch_size: int = 32, shuffle: bool = False, seed: int = 0,
                sampler: Sampler | None = None, drop_last: bool = False, num_workers: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle if sampler is None else False,
                      sampler=sampler, drop_last=drop_last, collate_fn=_pass_through, num_workers=num_workers,
                      generator=generator, persistent_workers=num_workers > 0)
