"""Running a model over records: sigmoid probabilities averaged over each record's evaluation windows, and their
scores — for validation during training and compression, and for eval-all's scoring."""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from shared.inputs import InputAdapter
from shared.metrics import macro_auc, per_class_auc
from shared.progress import bar


def autocast(device: torch.device, enabled: bool):
    if not enabled:
        return contextlib.nullcontext()
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast("cpu", dtype=torch.bfloat16)


# Windows per forward pass on the CPU. A batch of 64 records is 448 windows; in one pass convnext's activations
# run to hundreds of MB, which glibc hands out by mmap and the kernel zero-fills page by page on every call:
# 448 windows in one pass took 9.8 s of CPU (half of it in the kernel), 7 passes of 64 took 6.6 s, same output.
CPU_WINDOWS_PER_FORWARD = 64


@torch.no_grad()
def predict_batches(model, loader, adapter: InputAdapter, device, amp: bool = False, progress: bool = False,
                    desc: str = "eval"):
    """Sigmoid probabilities averaged over sliding windows, and the labels: (N×5, N×5) numpy. progress: a bar on a
    terminal (shared.progress)."""
    model.eval()
    probs, labels = [], []
    for x, y in bar(loader, desc, enabled=progress):
        inputs, n_win = adapter.eval_inputs(x)
        step = len(inputs) if device.type == "cuda" else CPU_WINDOWS_PER_FORWARD
        with autocast(device, amp):
            logits = torch.cat([model(inputs[i:i + step].to(device)).float() for i in range(0, len(inputs), step)])
        p = torch.sigmoid(logits).reshape(len(x), n_win, -1).mean(dim=1)
        probs.append(p.cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def scores(y_true: np.ndarray, y_prob: np.ndarray, classes) -> dict:
    pc = per_class_auc(y_true, y_prob)
    return {"macro_auc": macro_auc(y_true, y_prob),
            "per_class_auc": {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, pc)},
            "records": int(len(y_true))}


def validation_scores(model, cache, adapter: InputAdapter, chunk: int = CPU_WINDOWS_PER_FORWARD) -> dict:
    """{"val": scores} of a model derived from a trained run (compressed, exported): such steps are development
    steps, so they look at the validation fold only; the test fold is eval-all's."""
    from shared.dataset import ECGDataset

    probs, labels = predict_dataset(model, ECGDataset(cache, "val"), adapter, chunk=chunk)
    return {"val": scores(labels, probs, cache.classes)}


@torch.no_grad()
def predict_dataset(model, dataset, adapter: InputAdapter, chunk: int = CPU_WINDOWS_PER_FORWARD,
                    progress: bool = False, desc: str = "eval", channels_last: bool = False):
    """Like predict_batches, but every forward sees exactly `chunk` windows (the last chunk padded), so a
    compiled or exported model never meets a new shape. Returns (probs N×5, labels N×5) numpy."""
    if hasattr(model, "eval"):
        model.eval()
    x, y = dataset.__getitems__(range(len(dataset)))
    inputs, n_win = adapter.eval_inputs(x)
    outs = []
    for start in bar(range(0, len(inputs), chunk), desc, enabled=progress):
        part = inputs[start:start + chunk]
        n = len(part)
        if n < chunk:
            part = torch.cat([part, part[-1:].expand(chunk - n, *part.shape[1:])])
        if channels_last and part.dim() == 4:
            part = part.contiguous(memory_format=torch.channels_last)
        outs.append(torch.sigmoid(model(part).float())[:n])
    probs = torch.cat(outs).reshape(len(x), n_win, -1).mean(dim=1)
    return probs.numpy(), y.numpy()
