"""How a 12×T ECG batch becomes a model input. Batch tensor operations, run on the training device.

Each representation is a named, documented option (config key `representation`):

- `seed`     the original recipe: the T×12 signal resized to a 182×256 image, copied to 3 channels
             (standardized per lead first). Kept so results compare with it; it squeezes 1,000 time
             samples into 182 rows and loses waveform detail.
- `rows`     leads as image rows at full time resolution: 12 leads each repeated `row_repeat` times
             (default 8 → 96×T), 1 channel. Gives 2-D CNNs a lead axis big enough to downsample.
- `leads`    the raw 1×12×T plane, 1 channel; with a transformer patch of 12×P every token spans all
             12 leads over P samples (no resizing at all).
- `strip`    the 12 leads as the 12 channels of a 1×T image; a 2-D CNN runs on it with every kernel cut
             to its middle row (nets.build_model), so it convolves along time and mixes leads in its
             channels — as a 1-D network does, built from the family's own blocks.
- `signal`   the B×12×T signal itself, for 1-D models.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SEED_SIZE = (182, 256)


def seed(x: torch.Tensor, size: tuple[int, int] = SEED_SIZE) -> torch.Tensor:
    img = x.transpose(1, 2).unsqueeze(1)  # B×1×T×12: time along rows, as the original design
    img = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
    return img.expand(-1, 3, -1, -1)


def rows(x: torch.Tensor, row_repeat: int = 8) -> torch.Tensor:
    return x.repeat_interleave(row_repeat, dim=1).unsqueeze(1)


def leads(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(1)


def strip(x: torch.Tensor) -> torch.Tensor:
    return x.unsqueeze(2)


def signal(x: torch.Tensor) -> torch.Tensor:
    return x


REPRESENTATIONS = {"seed": seed, "rows": rows, "leads": leads, "strip": strip, "signal": signal}


def input_shape(name: str, n_leads: int, n_samples: int, row_repeat: int = 8) -> tuple[int, ...]:
    """(channels, *spatial) a model must accept for representation `name`."""
    if name == "seed":
        return (3, *SEED_SIZE)
    if name == "rows":
        return (1, n_leads * row_repeat, n_samples)
    if name == "leads":
        return (1, n_leads, n_samples)
    if name == "strip":
        return (n_leads, 1, n_samples)
    if name == "signal":
        return (n_leads, n_samples)
    raise KeyError(f"unknown representation {name!r}; choose from {sorted(REPRESENTATIONS)}")


def apply(name: str, x: torch.Tensor, **kw) -> torch.Tensor:
    try:
        fn = REPRESENTATIONS[name]
    except KeyError:
        raise KeyError(f"unknown representation {name!r}; choose from {sorted(REPRESENTATIONS)}") from None
    return fn(x, **kw) if kw else fn(x)
