"""How a record becomes model inputs: random training crops, overlapping evaluation windows, the model's input
representation (shared/representations.py) applied to them, and the int8 calibration set — one place, so
training, tuning, compression and evaluation feed every model the same way."""
from __future__ import annotations

import torch

from shared import representations


def random_crop(x: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """An independent random window of `length` samples for each record of a B×C×T batch."""
    b, c, t = x.shape
    if length >= t:
        return x
    starts = torch.randint(0, t - length + 1, (b,), generator=generator)
    idx = starts[:, None] + torch.arange(length)[None, :]
    return x.gather(2, idx[:, None, :].expand(b, c, length))


def windows(x: torch.Tensor, length: int, stride: int) -> tuple[torch.Tensor, int]:
    """All windows of `length` every `stride` samples (the last one flush with the end): (B·W)×C×L, W."""
    b, c, t = x.shape
    if length >= t:
        return x, 1
    starts = list(range(0, t - length + 1, stride))
    if starts[-1] != t - length:
        starts.append(t - length)
    w = torch.stack([x[:, :, s:s + length] for s in starts], dim=1)  # B×W×C×L
    return w.reshape(b * len(starts), c, length), len(starts)


class InputAdapter:
    """Crop length, window stride and representation of a config, applied to raw 12×T batches."""

    def __init__(self, cfg: dict, sampling_rate: int):
        self.crop = int(round(cfg["crop_seconds"] * sampling_rate))
        self.stride = int(round((cfg["eval_stride_seconds"] or cfg["crop_seconds"] / 2) * sampling_rate))
        self.representation = cfg["representation"]
        self.rep_kwargs = {"row_repeat": cfg["row_repeat"]} if self.representation == "rows" else {}

    def train_crop(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The raw (normalized) B×12×crop training window: a teacher takes it through its own representation."""
        return random_crop(x, self.crop, generator)

    def represent(self, x: torch.Tensor) -> torch.Tensor:
        return representations.apply(self.representation, x, **self.rep_kwargs)

    def train_input(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.represent(self.train_crop(x, generator))

    def eval_inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        w, n = windows(x, self.crop, self.stride)
        return representations.apply(self.representation, w, **self.rep_kwargs), n


def calibration_inputs(cache, adapter: InputAdapter, cfg: dict, batches: int):
    """The int8 calibration set every post-training quantizer sees (PT2E static, OpenVINO/NNCF): `batches`
    shuffled training batches, one random training-style crop per record, from fixed seeds — so two int8
    methods of one run are calibrated on exactly the same inputs."""
    from shared.dataset import ECGDataset, make_loader

    loader = make_loader(ECGDataset(cache, "train"), cfg["batch_size"], shuffle=True, seed=cfg["seed"] + 31)
    gen = torch.Generator().manual_seed(cfg["seed"] + 37)
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            return
        yield adapter.train_input(x, gen)
