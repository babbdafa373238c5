"""The L1-pruned variant's format: each pruned weight as a packed bit mask + its non-zero values
(sparse.safetensors), so 40 % zeros cost 40 % less disk; dense kernels run it after unpacking."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shared.io import load_weights, save_weights


def save_sparse(path: Path, state_dict: dict, sparse_keys: list[str], metadata: dict | None = None) -> None:
    tensors = {}
    for k, v in state_dict.items():
        v = v.detach().cpu().contiguous()
        if k in sparse_keys:
            mask = (v != 0).numpy().reshape(-1)
            tensors[f"{k}::mask"] = torch.from_numpy(np.packbits(mask))
            tensors[f"{k}::values"] = v.reshape(-1)[torch.from_numpy(mask)]
            tensors[f"{k}::shape"] = torch.tensor(v.shape, dtype=torch.int64)
        else:
            tensors[k] = v
    save_weights(path, tensors, metadata)


def load_sparse(path: Path) -> dict:
    raw = load_weights(path)
    out = {}
    for k, v in raw.items():
        if k.endswith("::mask"):
            name = k[:-6]
            shape = tuple(raw[f"{name}::shape"].tolist())
            n = int(np.prod(shape))
            mask = torch.from_numpy(np.unpackbits(v.numpy())[:n].astype(bool))
            dense = torch.zeros(n, dtype=raw[f"{name}::values"].dtype)
            dense[mask] = raw[f"{name}::values"]
            out[name] = dense.reshape(shape)
        elif not (k.endswith("::values") or k.endswith("::shape")):
            out[k] = v
    return out


def nonzero_parameters(state_dict: dict) -> tuple[int, int]:
    total = nz = 0
    for v in state_dict.values():
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            total += v.numel()
            nz += int((v != 0).sum())
    return total, nz
